"""`data.validation_size`: held-out training images, fixed by their own seed, never trained on,
and scored at every evaluation (val_*) as a recomputation from the run's weights scores them."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnlab
from bnlab import config as config_lib
from bnlab import data as data_lib
from bnlab import sweep
from bnlab.engine import calls as calls_lib
from bnlab.engine import steps as steps_lib
from bnlab.engine import train
from bnlab.rundir import per_image
from run_files import final_state, read_jsonl
from test_train import tiny_config
import tiny_mnist

HELD, SEED = 64, 5


def _rows(images) -> list[bytes]:
  return [np.ascontiguousarray(x).tobytes() for x in images]


def _held_positions(n: int, size: int, seed: int) -> np.ndarray:
  """The hold-out as the docs state it: `size` positions of a seeded permutation, sorted."""
  return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def test_held_out_images_are_fixed_by_their_seed_and_disjoint_from_training(idx_dir):
  full = train.load_data(tiny_config(idx_dir))
  assert len(set(_rows(full.train_images))) == len(full.train_images)  # rows name images
  cfg = tiny_config(idx_dir, **{"data.validation_size": HELD, "data.validation_seed": SEED})
  a = train.load_data(cfg)
  want = _held_positions(len(full.train_labels), HELD, SEED)
  np.testing.assert_array_equal(a.val_images, full.train_images[want])
  np.testing.assert_array_equal(a.val_labels, full.train_labels[want])
  rest = np.setdiff1d(np.arange(len(full.train_labels)), want)
  np.testing.assert_array_equal(a.train_images, full.train_images[rest])  # all the rest
  assert a.num_train == len(full.train_labels) - HELD
  np.testing.assert_array_equal(a.test_images, full.test_images)  # the test set untouched
  cfg.seed = 7  # the run's own seed does not choose them
  np.testing.assert_array_equal(train.load_data(cfg).val_images, a.val_images)
  other = train.load_data(tiny_config(idx_dir, **{"data.validation_size": HELD,
                                                  "data.validation_seed": SEED + 1}))
  assert set(_rows(other.val_images)) != set(_rows(a.val_images))
  held = set(_rows(a.val_images))
  for subset_seed in (-1, 3):  # num_train's subset comes from the rest; the hold-out stays
    sub = train.load_data(tiny_config(idx_dir, **{
        "data.validation_size": HELD, "data.validation_seed": SEED, "data.num_train": 100,
        "data.subset_seed": subset_seed}))
    np.testing.assert_array_equal(sub.val_images, a.val_images)
    assert sub.num_train == 100 and not held & set(_rows(sub.train_images))
    if subset_seed < 0:  # the first 100 of the rest, in stored order
      np.testing.assert_array_equal(sub.train_images, full.train_images[rest[:100]])
  # What the device trains on: positions of a permutation over the training rows only.
  device = calls_lib.DeviceData.place(a)
  assert not held & set(_rows(np.asarray(device.train_images)))
  for epoch in range(3):
    perm = np.asarray(steps_lib.permutation(jax.random.key_data(jax.random.key(0)), epoch,
                                            a.num_train))
    assert sorted(perm) == list(range(a.num_train))
  assert train.data_identity(a)["num_val"] == HELD
  assert "num_val" not in train.data_identity(full)


def test_a_held_out_run_trains_exactly_as_on_data_without_those_images(idx_dir, tmp_path):
  """The strongest form of 'never in a training batch': a run holding 64 images out ends with
  the same weights, bit for bit, as a run on a copy of the data with those images deleted."""
  arrays = tiny_mnist.make_arrays(320, 100)  # what idx_dir holds
  np.testing.assert_array_equal(arrays[0], train.load_data(tiny_config(idx_dir)).train_images)
  keep = np.setdiff1d(np.arange(320), _held_positions(320, HELD, SEED))
  cut = str(tmp_path / "cut")
  os.makedirs(cut)
  names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
           "t10k-labels-idx1-ubyte")
  for name, array in zip(names, (arrays[0][keep], arrays[1][keep], arrays[2], arrays[3])):
    tiny_mnist.write_idx(os.path.join(cut, name), array)
  short = {"train.num_steps": 16, "train.eval_every_steps": 8, "train.log_every_steps": 8}
  held = tiny_config(idx_dir, **short, **{"data.validation_size": HELD,
                                          "data.validation_seed": SEED})
  s_held = train.train_and_evaluate(held, str(tmp_path / "held"))
  s_cut = train.train_and_evaluate(tiny_config(cut, **short), str(tmp_path / "plain"))
  jax.tree.map(np.testing.assert_array_equal, final_state(str(tmp_path / "held")),
               final_state(str(tmp_path / "plain")))
  assert s_held["test_correct"] == s_cut["test_correct"]
  assert "val_accuracy" in s_held and not any(k.startswith("val_") for k in s_cut)


def _numpy_scores(logits, labels):
  """(per-image correct, mean cross-entropy) in float64 numpy."""
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return z.argmax(-1) == labels, float(-log_p[np.arange(len(labels)), labels].mean())


def _check_val(run, val_images, val_labels, record):
  """`record`'s val_* equal a recomputation from `run`'s weights: running averages, and each
  batch's own statistics (one batch: every held-out image) where the record has them."""
  logits = run.model.apply(run.variables, jnp.asarray(val_images), train=False)
  correct, loss = _numpy_scores(logits, val_labels)
  np.testing.assert_array_equal(per_image.decode(record["val_correct"]), correct)
  assert record["val_accuracy"] == pytest.approx(correct.mean(), abs=1e-7)
  assert record["val_loss"] == pytest.approx(loss, rel=1e-5)
  if "val_accuracy_batch" in record:
    logits, _ = run.model.apply(run.variables, jnp.asarray(val_images), train=True,
                                mutable=["batch_stats"])
    correct, loss = _numpy_scores(logits, val_labels)
    np.testing.assert_array_equal(per_image.decode(record["val_correct_batch"]), correct)
    assert record["val_loss_batch"] == pytest.approx(loss, rel=1e-5)


def test_val_accuracy_is_the_models_accuracy_on_the_held_out_images(idx_dir, tmp_path):
  full = train.load_data(tiny_config(idx_dir))
  want = _held_positions(len(full.train_labels), HELD, SEED)
  images, labels = full.train_images[want], full.train_labels[want].astype(np.int64)
  cfg = tiny_config(idx_dir, **{"data.validation_size": HELD, "data.validation_seed": SEED,
                                "train.num_steps": 6, "train.eval_every_steps": 3,
                                "train.log_every_steps": 3,
                                "train.eval_statistics": ("running", "batch")})
  wd = str(tmp_path / "solo")
  summary = train.train_and_evaluate(cfg, wd)
  records = [r for r in read_jsonl(os.path.join(wd, "metrics.jsonl")) if "val_accuracy" in r]
  assert [r["step"] for r in records] == [0, 3, 6]
  assert {"val_loss_batch", "val_accuracy_batch", "val_correct_batch"} <= set(records[-1])
  assert 0 < summary["val_accuracy"] < 1  # not a trivial score to match
  _check_val(bnlab.load_run(wd), images, labels, summary)
  _check_val(bnlab.load_run(wd, step=3), images, labels, records[1])
  # Members of a vmapped group score the same images, each with its own weights.
  base = tiny_config(idx_dir, **{"data.validation_size": HELD, "data.validation_seed": SEED,
                                 "train.num_steps": 6, "train.eval_every_steps": 3,
                                 "train.log_every_steps": 3})
  rows = sweep.run_sweep(base, sweep.axis("optimizer.learning_rate", [0.05, 0.2]),
                         str(tmp_path / "sw"))
  assert os.listdir(os.path.join(tmp_path, "sw", "_groups"))
  for row in rows:
    member = os.path.join(tmp_path, "sw", row["name"])
    with open(os.path.join(member, "summary.json")) as f:
      _check_val(bnlab.load_run(member), images, labels, json.load(f))


def test_validation_size_is_checked_before_anything_runs(idx_dir):
  def fails(match, **overrides):
    with pytest.raises(config_lib.ConfigError, match=match) as e:
      cfg = tiny_config(idx_dir, **overrides)
      config_lib.validate(cfg)
      train.load_data(cfg)
    assert "\n" not in str(e.value)
  fails(r"data.validation_size=-1 is invalid", **{"data.validation_size": -1})
  fails(r"data.validation_seed=-1 is invalid", **{"data.validation_seed": -1})
  fails(r"data.validation_size=300 is invalid: expected at most 288.*one batch",
        **{"data.validation_size": 300})  # 320 - 300 < one batch of 32
  fails(r"data.validation_size=64 is invalid: expected at most 20.*num_train=300",
        **{"data.validation_size": 64, "data.num_train": 300})
  mnist = config_lib.base_config()  # MNIST's size is known without loading it
  mnist.data.validation_size = 59_990
  with pytest.raises(config_lib.ConfigError, match="at most 59968.*60000 training examples"):
    config_lib.validate(mnist)
  mnist.data.validation_size = 10_000
  mnist.data.num_train = 55_000
  with pytest.raises(config_lib.ConfigError, match="num_train=55000 to sample from"):
    config_lib.validate(mnist)
  mnist.data.num_train = 50_000
  config_lib.validate(mnist)


def test_without_validation_nothing_changes(idx_dir):
  """validation_size 0 (the default): the subset and every array as before, nothing held."""
  ds = train.load_data(tiny_config(idx_dir, **{"data.num_train": 100, "data.subset_seed": 3}))
  assert ds.val_images is None and ds.val_labels is None
  full = train.load_data(tiny_config(idx_dir))
  idx = np.sort(np.random.default_rng(3).permutation(320)[:100])
  np.testing.assert_array_equal(ds.train_images, full.train_images[idx])
  assert data_lib.split.training_positions(320, np.zeros(0, np.int64), 0, -1) == slice(320)
  assert calls_lib.DeviceData.place(ds).val_images is None
