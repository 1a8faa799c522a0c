"""What a loaded MNIST is: the `Dataset` type, `DataError`, and the checks every source applies.

Below the sources (`embedded`, `tfds_source`, `idx`), which all build a
`Dataset` through these checks; it imports none of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping

import numpy as np

SOURCES = ("embedded", "tfds", "idx", "auto")
ARRAY_NAMES = ("train_images", "train_labels", "test_images", "test_labels")
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10

SOURCE_FLAG = "--config.data.source"
DIR_FLAG = "--config.data.dir"


class DataError(ValueError):
  """Bad or unavailable data; message names the source, the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """MNIST as read-only uint8 arrays in the original order."""

  train_images: np.ndarray  # (N, 28, 28) uint8
  train_labels: np.ndarray  # (N,) uint8 in [0, 9]
  test_images: np.ndarray  # (M, 28, 28) uint8
  test_labels: np.ndarray  # (M,) uint8 in [0, 9]
  source: str  # "embedded", "tfds:mnist", "tfds:bnlab_mnist" or "idx:/path"
  verified: bool  # arrays match the pinned MNIST sha256 values

  def arrays(self) -> dict[str, np.ndarray]:
    return {name: getattr(self, name) for name in ARRAY_NAMES}


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


def make_dataset(arrays: Mapping[str, np.ndarray], source: str, verified: bool) -> Dataset:
  frozen = {}
  for name in ARRAY_NAMES:
    array = np.ascontiguousarray(arrays[name])
    array.flags.writeable = False
    frozen[name] = array
  return Dataset(**frozen, source=source, verified=verified)


def check_pins(arrays: Mapping[str, np.ndarray], pins: MnistPins, where: str, fix: str) -> None:
  for name in ARRAY_NAMES:
    found = array_sha256(arrays[name])
    if found != pins.arrays[name]:
      raise DataError(
          f"{where}: {name} has sha256 {found}, expected {pins.arrays[name]}. Fix: {fix}"
      )
