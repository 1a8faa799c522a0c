"""`data.pipeline="grain"`: the training split streamed through grain gives the batches,
and on CPU the results, of the device-resident path for the same seed."""

import jax
import numpy as np
import pytest

from bnlab import config as config_lib
from bnlab import data
from bnlab import load_run
from bnlab.engine import calls as calls_lib
from bnlab.engine import steps as steps_lib
from bnlab.engine import train

pytest.importorskip("grain")
tiny_tfds = pytest.importorskip("tiny_tfds")


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  tiny_tfds.prepare("tiny_colour10", d)
  tiny_tfds.prepare("tiny_grey10", d)
  return str(d)


def config(tfds_dir, pipeline, name="tiny_colour10", steps=12, **data_keys):
  cfg = config_lib.base_config()
  cfg.data.name, cfg.data.dir, cfg.data.pipeline = name, tfds_dir, pipeline
  cfg.data.update(data_keys)
  cfg.model.name = "seed1_cnn"
  cfg.train.batch_size = 16
  cfg.train.num_steps = steps
  cfg.train.eval_every_steps = 6
  cfg.train.checkpoint_min_interval_secs = 0.0
  cfg.train.compilation_cache = False
  return cfg


def test_batches_are_the_device_paths(tfds_dir):
  """Each streamed batch equals the device-resident gather of the same step (the same
  examples in the same order, standardized to the same float32 values)."""
  cfg = config(tfds_dir, "grain")
  streamed = train.load_data(cfg)
  resident = calls_lib.DeviceData.place(train.load_data(config(tfds_dir, "device")))
  assert streamed.stream is not None and streamed.num_train == 160
  assert streamed.normalization == train.load_data(config(tfds_dir, "device")).normalization
  rng = jax.random.key_data(jax.random.key(3))
  bs, spe = 16, 160 // 16
  for epoch in (0, 1):
    perm = steps_lib.permutation(rng, epoch, 160)
    host_perm = np.asarray(perm)
    # From the epoch's start, and resuming mid-epoch at step 4.
    for start, count in ((0, spe), (4, 3)):
      got = list(streamed.stream.batches(host_perm, epoch, start, count, bs))
      for k, (x, y) in enumerate(got):
        want_x, want_y = steps_lib.gather_batch(
            resident.train_images, resident.train_labels, perm, start + k, bs, None)
        np.testing.assert_array_equal(x, np.asarray(want_x))
        np.testing.assert_array_equal(y, np.asarray(want_y))


def leaves(workdir):
  return jax.tree.leaves(load_run(str(workdir)).variables)


@pytest.mark.parametrize("loop,extra", [("scan", {"augment": "crop_flip"}),
                                        ("loop", {"num_train": 100, "subset_seed": 5})])
def test_same_results_as_device_resident(tmp_path, tfds_dir, loop, extra):
  """Bit-identical parameters and training records on CPU (the same batches through the
  same step); the final whole-train-set evaluation sums its chunks on the host, so it
  agrees to float32 rounding."""
  runs = {}
  for pipeline in ("device", "grain"):
    cfg = config(tfds_dir, pipeline, **extra)
    cfg.train.loop = loop
    runs[pipeline] = train.train_and_evaluate(cfg, str(tmp_path / pipeline))
  device, grain = runs["device"], runs["grain"]
  assert grain["data_pipeline"] == "grain" and device["data_pipeline"] == "device"
  for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
    assert grain[key] == device[key], key
  np.testing.assert_allclose(grain["full_train_loss"], device["full_train_loss"], rtol=1e-5)
  assert grain["full_train_accuracy"] == pytest.approx(device["full_train_accuracy"])
  for a, b in zip(leaves(tmp_path / "device"), leaves(tmp_path / "grain")):
    np.testing.assert_array_equal(a, b)


def test_streamed_run_resumes_bit_identical(tmp_path, tfds_dir):
  full = train.train_and_evaluate(config(tfds_dir, "grain"), str(tmp_path / "full"))
  train.train_and_evaluate(config(tfds_dir, "grain", steps=6), str(tmp_path / "half"))
  resumed = train.train_and_evaluate(config(tfds_dir, "grain"), str(tmp_path / "half"))
  assert resumed["train_loss"] == full["train_loss"]
  for a, b in zip(leaves(tmp_path / "full"), leaves(tmp_path / "half")):
    np.testing.assert_array_equal(a, b)


def test_auto_streams_what_does_not_fit(tfds_dir):
  cfg = config(tfds_dir, "auto")
  need = data.data_bytes(cfg.data)
  assert need == 200 * (16 * 16 * 3 * 4 + 4)  # 160 + 40 float32 examples, int32 labels
  assert not data.streams(cfg.data, budget=4 * need)
  assert data.streams(cfg.data, budget=need)
  assert not data.streams(config_lib.base_config().data, budget=1)  # MNIST: on the device
  assert data.streams(config(tfds_dir, "grain").data, budget=10**12)
  assert not data.streams(config(tfds_dir, "device").data, budget=1)


@pytest.mark.parametrize("change,expected", [
    (lambda c: c.data.__setattr__("name", "mnist"), "data.name='mnist'"),
    (lambda c: c.train.__setattr__("eval_statistics", ("running", "population")),
     "'population'"),
    (lambda c: c.train.__setattr__("num_devices", 2), "several devices")])
def test_refused_where_it_cannot_stream(tfds_dir, change, expected):
  cfg = config(tfds_dir, "grain")
  change(cfg)
  with pytest.raises(config_lib.ConfigError) as info:
    config_lib.validate(cfg)
  assert "config.data.pipeline='grain'" in str(info.value) and expected in str(info.value)


def test_a_streamed_split_holds_out_the_device_paths_validation_images(tfds_dir):
  """data.validation_size with a streamed split: the held-out images are read into memory,
  the same (and standardized the same) as the device path's, and left out of the stream."""
  keys = {"validation_size": 32, "validation_seed": 4, "num_train": 100, "subset_seed": 2}
  streamed = train.load_data(config(tfds_dir, "grain", **keys))
  resident = train.load_data(config(tfds_dir, "device", **keys))
  assert streamed.num_train == resident.num_train == 100
  np.testing.assert_array_equal(streamed.val_images, resident.val_images)
  np.testing.assert_array_equal(streamed.val_labels, resident.val_labels)
  held = set(data.split.held_out(160, 32, 4).tolist())
  assert not held & set(streamed.stream.indices.tolist()) and len(held) == 32
  s, r = calls_lib.DeviceData.place(streamed), calls_lib.DeviceData.place(resident)
  np.testing.assert_array_equal(np.asarray(s.val_images), np.asarray(r.val_images))
  x, _ = streamed.stream.read(np.arange(100))
  np.testing.assert_array_equal(x, np.asarray(r.train_images))


def test_a_sweep_on_streamed_data_trains_each_member_alone(tmp_path, tfds_dir):
  """A streamed run feeds one model on one device, so the sweep plans its members solo
  (an MLP's members would otherwise group on CPU, and every model's on accelerators)."""
  from bnlab import sweep  # pylint: disable=g-import-not-at-top
  overrides = sweep.seeds(2)
  resident = config(tfds_dir, "device")
  resident.model.name = "seed1_mlp"
  assert [len(g) for g in sweep.group_members(
      sweep.resolve_members(resident, overrides))] == [2]
  base = config(tfds_dir, "grain")
  base.model.name = "seed1_mlp"
  assert [len(g) for g in sweep.group_members(sweep.resolve_members(base, overrides))] == [1, 1]
  rows = sweep.run_sweep(base, overrides, str(tmp_path / "sw"))
  assert [r["status"] for r in rows] == ["done", "done"], rows
