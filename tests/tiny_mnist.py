"""A tiny, learnable MNIST look-alike written as IDX files, for end-to-end tests."""

import gzip
import os
import struct

import numpy as np


def make_arrays(num_train: int = 320, num_test: int = 100, seed: int = 0):
  """Images whose class is a bright 7x7 patch at one of 10 positions, plus noise."""
  rng = np.random.default_rng(seed)

  def draw(n):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
      r, q = divmod(int(c), 5)
      images[i, 3 + 12 * r: 10 + 12 * r, 1 + 5 * q: 6 + 5 * q] = 250
    return images, labels

  return (*draw(num_train), *draw(num_test))


def write_idx(path: str, array: np.ndarray, compress: bool = True) -> str:
  """Writes a uint8 array as an IDX file (gzip'd when `compress`)."""
  header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
  data = header + np.ascontiguousarray(array, np.uint8).tobytes()
  if compress:
    path += ".gz"
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    with open(path, "wb") as f:
      f.write(data)
  return path


def write_mnist_dir(directory: str, num_train: int = 320, num_test: int = 100,
                    compress: bool = True, seed: int = 0):
  """The four MNIST IDX files in `directory`; returns the arrays written."""
  os.makedirs(directory, exist_ok=True)
  arrays = make_arrays(num_train, num_test, seed)
  names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
  for name, array in zip(names, arrays):
    write_idx(os.path.join(directory, name), array, compress)
  return arrays
