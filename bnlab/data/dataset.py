"""What a loaded dataset is: the `Dataset` and `DataSpec` types, `DataError`, and the
checks every source applies.

Below the sources (`embedded`, `tfds_source`, `idx`, `tfds_images`), which all build a
`Dataset` through these checks; it imports none of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

SOURCES = ("embedded", "tfds", "idx", "auto")
ARRAY_NAMES = ("train_images", "train_labels", "test_images", "test_labels")
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
MNIST = "mnist"  # data.name of MNIST, read from data.source; any other name is a TFDS dataset
MNIST_NUM_TRAIN, MNIST_NUM_TEST = 60_000, 10_000

SOURCE_FLAG = "--config.data.source"
DIR_FLAG = "--config.data.dir"


class DataError(ValueError):
  """Bad or unavailable data; message names the source, the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """An image-classification dataset as read-only arrays in its stored order.

  MNIST's images are (N, 28, 28) uint8, as the built-in models have always taken
  them; a TFDS dataset's (N, H, W, C) uint8. `normalization` is the per-channel
  (mean, std) the model's inputs are standardized with (`bnlab.data.normalize`),
  None for the raw uint8 images.
  """

  train_images: np.ndarray  # (N, 28, 28) or (N, H, W, C) uint8
  train_labels: np.ndarray  # (N,) uint8, or int32 past 255 classes, in [0, num_classes)
  test_images: np.ndarray  # (M, ...) as train_images
  test_labels: np.ndarray  # (M,)
  source: str  # "embedded", "tfds:mnist", "tfds:bnlab_mnist", "idx:/path" or "tfds:NAME"
  verified: bool  # arrays match the pinned MNIST sha256 values
  name: str = MNIST
  num_classes: int = NUM_CLASSES
  normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
  # The training split streamed through grain (`grain_source.StreamedSplit`), its
  # train_images and train_labels then empty; None: every array is here.
  stream: Any = None
  # Training-split examples held out for validation (`data.validation_size`, `split`), as
  # train_images and train_labels; None: none held out.
  val_images: np.ndarray | None = None
  val_labels: np.ndarray | None = None

  @property
  def num_train(self) -> int:
    return len(self.stream) if self.stream is not None else len(self.train_labels)

  def arrays(self) -> dict[str, np.ndarray]:
    return {name: getattr(self, name) for name in ARRAY_NAMES}

  def input_spec(self) -> InputSpec:
    """One example of what the model is applied to."""
    return InputSpec(tuple(self.test_images.shape[1:]),
                     "uint8" if self.normalization is None else "float32")


class InputSpec(NamedTuple):
  """One example of what the model is applied to: its shape (no batch axis) and dtype."""

  shape: tuple[int, ...]
  dtype: str  # "uint8" (raw pixels: the built-in models scale by 1/255) or "float32"

  def batch(self, batch_size: int) -> tuple[tuple[int, ...], str]:
    return (batch_size, *self.shape), self.dtype


MNIST_INPUT = InputSpec(IMAGE_SHAPE, "uint8")


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What `data.name` names, known without reading its examples (TFDS' dataset info).

  Validation and everything shaped before the data loads (model init, memory
  estimates) read it, so a wrong name or an unprepared dataset fails before
  anything compiles.
  """

  name: str
  image_shape: tuple[int, ...]  # one stored example: (28, 28) for MNIST, else (H, W, C)
  num_classes: int
  num_train: int
  num_test: int
  test_split: str = "test"  # "validation" for datasets without a test split
  where: str = ""  # where it is read from (a TFDS dataset's directory)

  def input_spec(self, normalized: bool) -> InputSpec:
    """The model's input: the stored uint8 images, or float32 when standardized."""
    return InputSpec(tuple(self.image_shape), "float32" if normalized else "uint8")

  def example_bytes(self, normalized: bool) -> int:
    """Bytes of one example on the device (image as the model takes it, int32 label)."""
    return int(np.prod(self.image_shape)) * (4 if normalized else 1) + 4


MNIST_SPEC = DataSpec(MNIST, IMAGE_SHAPE, NUM_CLASSES, MNIST_NUM_TRAIN, MNIST_NUM_TEST)


def default_cache_dir() -> str:
  """``$BNLAB_CACHE_DIR`` if set, else ``~/.cache/bnlab``."""
  return os.environ.get("BNLAB_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "bnlab"
  )


@dataclasses.dataclass(frozen=True)
class MnistPins:
  """sha256 values the embedded source is checked against."""

  wheel_sha256: str
  pickle_sha256: str
  arrays: Mapping[str, str]  # array name -> sha256 of its raw C-order bytes


def array_sha256(array: np.ndarray) -> str:
  """sha256 of an array's raw C-order bytes."""
  return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def check_array_record(builder, where: str, fix: str) -> None:
  """A prepared TFDS builder stored as array_record: the only format TFDS reads without
  TensorFlow (tfrecord needs it)."""
  file_format = builder.info.file_format
  fmt = getattr(file_format, "value", file_format) or "tfrecord"
  if fmt != "array_record":
    raise DataError(
        f"{where} is stored as {fmt}, which TFDS reads only with TensorFlow; bnlab reads "
        f"array_record. Fix: {fix}")


def check_arrays(arrays: Mapping[str, np.ndarray], where: str, fix: str) -> None:
  """Check dtypes, shapes, label range and counts; raise DataError naming ``where``."""

  def fail(problem: str) -> None:
    raise DataError(f"{where}: {problem}. Fix: {fix}")

  for name in ARRAY_NAMES:
    array = arrays[name]
    if array.dtype != np.uint8:
      fail(f"{name} has dtype {array.dtype}, expected uint8")
    if name.endswith("_images"):
      if array.ndim != 3 or array.shape[1:] != IMAGE_SHAPE:
        fail(f"{name} has shape {array.shape}, expected (N, 28, 28)")
    else:
      if array.ndim != 1:
        fail(f"{name} has shape {array.shape}, expected (N,)")
      if array.size and array.max() >= NUM_CLASSES:
        fail(f"{name} has label {int(array.max())}, expected labels in [0, 9]")
  for split in ("train", "test"):
    n_images = len(arrays[f"{split}_images"])
    n_labels = len(arrays[f"{split}_labels"])
    if n_images != n_labels:
      fail(f"{split} has {n_images} images but {n_labels} labels")


def make_dataset(arrays: Mapping[str, np.ndarray], source: str, verified: bool,
                 **fields) -> Dataset:
  frozen = {}
  for name in ARRAY_NAMES:
    array = np.ascontiguousarray(arrays[name])
    array.flags.writeable = False
    frozen[name] = array
  return Dataset(**frozen, source=source, verified=verified, **fields)


def check_pins(arrays: Mapping[str, np.ndarray], pins: MnistPins, where: str, fix: str) -> None:
  for name in ARRAY_NAMES:
    found = array_sha256(arrays[name])
    if found != pins.arrays[name]:
      raise DataError(
          f"{where}: {name} has sha256 {found}, expected {pins.arrays[name]}. Fix: {fix}"
      )
