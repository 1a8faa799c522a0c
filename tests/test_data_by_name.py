"""`data.name`: TFDS image-classification datasets by name, their checks and their
per-channel standardization, on tiny datasets the tests write (grey and colour, 10 and
100 classes; `tiny_tfds`)."""

import json
import os

import numpy as np
import pytest

from bnlab import config as config_lib
from bnlab import data
from bnlab.data import normalize
from bnlab.engine import calls as calls_lib
from bnlab.engine import train

tiny_tfds = pytest.importorskip("tiny_tfds")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  for name in ("tiny_grey10", "tiny_colour100", "tiny_dots", "tiny_vectors"):
    tiny_tfds.prepare(name, d)
  return str(d)


def arrays_of(name, tfds_dir):
  return tiny_tfds.BUILDERS[name](data_dir=tfds_dir).arrays()


def config(name, tfds_dir, **data_keys):
  cfg = config_lib.base_config()
  cfg.data.name, cfg.data.dir = name, tfds_dir
  cfg.data.update(data_keys)
  cfg.train.batch_size = 8
  cfg.train.num_steps = 6
  cfg.train.eval_every_steps = 3
  cfg.train.eval_batch_size = 16
  cfg.train.compilation_cache = False
  return cfg


def one_line_error(cfg) -> str:
  with pytest.raises((data.DataError, config_lib.ConfigError)) as info:
    config_lib.validate(cfg)
  message = str(info.value)
  assert "\n" not in message, message
  return message


@pytest.mark.parametrize("name,shape,classes,test_split", [
    ("tiny_grey10", (16, 16, 1), 10, "test"),
    ("tiny_colour100", (12, 12, 3), 100, "validation")])
def test_reads_what_was_written(tfds_dir, name, shape, classes, test_split):
  """Shape, channels and classes from the dataset's info; examples in the stored order."""
  spec = data.tfds_images.describe(name, tfds_dir)
  assert (spec.image_shape, spec.num_classes, spec.test_split) == (shape, classes, test_split)
  ds = data.tfds_images.load_by_name(name, tfds_dir)
  train_x, train_y, test_x, test_y = arrays_of(name, tfds_dir)
  for got, want in ((ds.train_images, train_x), (ds.train_labels, train_y),
                    (ds.test_images, test_x), (ds.test_labels, test_y)):
    np.testing.assert_array_equal(got, want)
  assert ds.train_images.dtype == np.uint8 and ds.num_classes == classes
  assert ds.source == f"tfds:{name}"


def test_standardization_matches_float64_reference(tfds_dir):
  """What the model gets: (x / 255 - mean) / std per channel with the training split's
  statistics, against numpy in float64; the test split with the training statistics."""
  cfg = config("tiny_colour100", tfds_dir)
  ds = data.load(cfg.data)
  train_x, _, test_x, _ = arrays_of("tiny_colour100", tfds_dir)
  x = train_x.astype(np.float64) / 255.0
  mean, std = x.mean(axis=(0, 1, 2)), x.std(axis=(0, 1, 2))
  np.testing.assert_allclose(ds.normalization[0], mean, rtol=0, atol=1e-12)
  np.testing.assert_allclose(ds.normalization[1], std, rtol=0, atol=1e-12)
  placed = calls_lib.DeviceData.place(ds)
  for got, raw in ((placed.train_images, train_x), (placed.test_images, test_x)):
    want = ((raw.astype(np.float64) / 255.0 - mean) / std).astype(np.float32)
    assert got.dtype == np.float32 and got.shape == raw.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
  # The grey dataset: one channel.
  grey = data.load(config("tiny_grey10", tfds_dir).data)
  g = arrays_of("tiny_grey10", tfds_dir)[0].astype(np.float64) / 255.0
  np.testing.assert_allclose(grey.normalization, ([g.mean()], [g.std()]), atol=1e-12)


def test_normalize_none_gives_raw_pixels_and_mnist_is_unchanged(tfds_dir):
  ds = data.load(config("tiny_grey10", tfds_dir, normalize="none").data)
  assert ds.normalization is None
  assert calls_lib.DeviceData.place(ds).train_images.dtype == np.uint8
  mnist = config_lib.base_config()
  assert data.input_spec(mnist.data) == data.InputSpec((28, 28), "uint8")
  assert not data.normalized(mnist.data)


def test_constant_channel_is_divided_by_one():
  images = np.zeros((4, 2, 2, 2), np.uint8)
  images[..., 1] = np.arange(16).reshape(4, 2, 2)
  stats = normalize.channel_stats(images)
  assert stats[0][0] == 0.0 and stats[1][0] == 0.0
  out = normalize.standardize(images, stats)
  assert np.all(out[..., 0] == 0.0) and np.all(np.isfinite(out))


@pytest.mark.parametrize("name,model", [("tiny_grey10", "seed_cnn"),
                                        ("tiny_colour100", "seed_cnn"),
                                        ("tiny_colour100", "paper_mlp")])
def test_trains_through_train_and_evaluate(tmp_path, tfds_dir, name, model):
  cfg = config(name, tfds_dir)
  cfg.model.name = model
  summary = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  spec = data.tfds_images.describe(name, tfds_dir)
  assert summary["final_step"] == 6 and np.isfinite(summary["train_loss"])
  assert 0 <= summary["test_accuracy"] <= 1
  assert summary["data_name"] == name and summary["data_num_classes"] == spec.num_classes
  assert summary["data_input"] == [list(spec.image_shape), "float32"]
  mean, std = data.load(cfg.data).normalization
  assert summary["data_normalization"]["mean"] == list(mean)
  assert summary["data_normalization"]["std"] == list(std)
  with open(tmp_path / "run" / "config.json") as f:
    assert json.load(f)["data"]["name"] == name


def test_unknown_name(tfds_dir):
  message = one_line_error(config("no_such_dataset_xyz", tfds_dir))
  assert "not a TFDS dataset" in message and tfds_dir in message


def test_not_prepared_says_where_and_how(tmp_path):
  message = one_line_error(config("cifar10", str(tmp_path)))
  assert "not prepared" in message and str(tmp_path) in message
  assert f"tfds build cifar10 --file_format=array_record --data_dir={tmp_path}" in message


def test_tfrecord_says_rebuild(tmp_path):
  tiny_tfds.prepare("tiny_grey10", tmp_path)
  info_path = next((tmp_path / "tiny_grey10").glob("*/dataset_info.json"))
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"  # as `tfds build` writes by default
  info_path.write_text(json.dumps(info))
  data.tfds_images.describe.cache_clear()
  message = one_line_error(config("tiny_grey10", str(tmp_path)))
  assert "stored as tfrecord" in message and "--file_format=array_record" in message


def test_not_images(tfds_dir):
  message = one_line_error(config("tiny_vectors", tfds_dir))
  assert "not an image dataset" in message


def test_crop_on_tiny_images_is_refused(tfds_dir):
  message = one_line_error(config("tiny_dots", tfds_dir, augment="crop_flip"))
  assert "config.data.augment='crop_flip'" in message and "6x6" in message


def test_model_too_large_for_the_images_is_refused(tfds_dir):
  cfg = config("tiny_dots", tfds_dir)
  message = one_line_error(cfg)
  assert "config.model.name='seed_cnn' cannot take the 6x6x1 images" in message
  cfg.model.name = "paper_mlp"
  config_lib.validate(cfg)  # an MLP takes any size


def test_source_idx_with_a_tfds_name_is_refused(tfds_dir):
  message = one_line_error(config("tiny_grey10", tfds_dir, source="idx"))
  assert "config.data.source='idx'" in message


def test_too_many_examples_asked(tfds_dir):
  message = one_line_error(config("tiny_grey10", tfds_dir, num_train=97))
  assert "config.data.num_train=97" in message and "96" in message


def test_default_data_dir_is_tfds_own(monkeypatch, tmp_path):
  monkeypatch.setattr(data.tfds_images._import_tfds().core.constants, "DATA_DIR",
                      str(tmp_path))
  assert data.tfds_images.tfds_dir("") == str(tmp_path)
  assert data.tfds_images.tfds_dir("~/x") == os.path.expanduser("~/x")


USER_CNN = """
import flax.linen as nn

class ColourCNN(nn.Module):  # written for 12x12 colour images: it cannot take MNIST's
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.relu(nn.Conv(4, (3, 3))(x.reshape(x.shape[0], 12, 12, 3)))
    return nn.Dense(100)(x.reshape(x.shape[0], -1))
"""


def test_a_user_cnn_is_told_by_its_kernels_on_its_own_data(tmp_path, tfds_dir, monkeypatch):
  # Traced on MNIST's shape it would fail, read as "no convolutions", and group on CPU.
  from bnlab.engine import members  # pylint: disable=g-import-not-at-top
  (tmp_path / "colour_models.py").write_text(USER_CNN)
  monkeypatch.syspath_prepend(str(tmp_path))
  cfg = config("tiny_colour100", tfds_dir)
  cfg.model.name = "colour_models:ColourCNN"
  assert not members.grouping_helps(cfg, "cpu") and members.grouping_helps(cfg, "gpu")


def test_resnet20_with_adamw_and_augmentation_on_a_colour_dataset(tmp_path, tfds_dir):
  """The README's own-problem command on generated data: ResNet-20 (narrow, for time) with BN
  and AdamW, crop-and-flip, 100 classes; its logits come back through `load_run`."""
  import bnlab
  cfg = config("tiny_colour100", tfds_dir, augment="crop_flip")
  cfg.model.name, cfg.model.bn_position, cfg.model.widths = "resnet20", "before", (4, 8, 8)
  cfg.model.conv_implementation = "xla"
  cfg.optimizer.name, cfg.optimizer.learning_rate = "adamw", 1e-3
  cfg.optimizer.weight_decay = 0.05
  summary = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  assert summary["final_step"] == 6 and np.isfinite(summary["train_loss"])
  assert summary["data_augment"] == "crop_flip" and summary["data_num_classes"] == 100
  run = bnlab.load_run(str(tmp_path / "run"))
  images = np.zeros((2, 12, 12, 3), np.float32)
  logits = run.model.apply(run.variables, images, train=False)
  assert logits.shape == (2, 100) and "batch_stats" in run.variables


def test_study_measurements_read_the_runs_own_data(tmp_path, tfds_dir):
  # The train/eval gap and why-BN's ICS/smoothness on a 12x12x3, 100-class run: the
  # measurements rebuild the model for the data the run trained on, not MNIST's.
  from bnlab.study import measurements, train_gap
  cfg = config("tiny_colour100", tfds_dir)
  cfg.model.name = "paper_mlp"
  run = str(tmp_path / "run")
  train.train_and_evaluate(cfg, run)
  with open(os.path.join(run, "config.json")) as f:
    run_cfg = json.load(f)
  gap = train_gap.train_gap(run, run_cfg, {"examples": 16, "seed": 0})
  assert gap["step"] == 6 and gap["examples"] == 16
  assert all(0 <= gap[f"accuracy_{k}"] <= 1 for k in ("running", "batch", "population"))
  ics = measurements.ics_smoothness(run, run_cfg, {"batches": 1, "num_etas": 2,
                                                   "batch_seed": 0, "hessian_iterations": 2})
  steps = [s for s, _ in ics["hessian_top/series"]]
  assert steps[0] == 0 and steps[-1] == 6
  assert all(np.isfinite(v) for _, v in ics["hessian_top/series"] + ics["beta_max/series"])
