"""The `idx` source: the four original MNIST IDX files (raw or gzip'd) in a directory.

Read strictly (magic, dims, size), so a damaged or foreign file is named, not
misread.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np

from bnlab.data.dataset import (ARRAY_NAMES, DIR_FLAG, IMAGE_SHAPE, DataError, Dataset,
                                check_arrays)
from bnlab.data.dataset import make_dataset
from bnlab.data.embedded import matches_pins

IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim
IDX_UINT8 = 0x08
IDX_FILE_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


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
  return make_dataset(arrays, f"idx:{data_dir}", matches_pins(arrays))
