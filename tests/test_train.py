"""The training engine end to end on a tiny IDX dataset the tests write."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnlab.engine import steps as steps_lib
from bnlab.engine import state as state_lib
from bnlab.engine import schedule as schedule_lib
from bnlab.engine import optim as optim_lib
from bnlab.engine import evaluation as evaluation_lib
from bnlab import config as config_lib
from bnlab.engine import train
from run_files import final_state, read_jsonl


def tiny_config(idx_dir, **overrides):
  c = config_lib.base_config()
  c.data.source = "idx"
  c.data.dir = idx_dir
  c.model.name = "seed1_mlp"
  c.model.norm = "batch"
  c.model.bn_position = "before"
  c.optimizer.learning_rate = 0.1
  c.train.batch_size = 32
  c.train.num_epochs = 3
  c.train.eval_every_epochs = 1
  c.train.log_every_steps = 5
  c.train.keep_checkpoints = 50
  c.train.checkpoint_min_interval_secs = 0  # a checkpoint at every evaluation
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def test_run_writes_everything_and_learns(idx_dir, tmp_path):
  wd = str(tmp_path / "run")
  summary = train.train_and_evaluate(tiny_config(idx_dir), wd)
  assert set(os.listdir(wd)) >= {"config.json", "metrics.jsonl", "summary.json",
                                 "checkpoints", "tensorboard"}
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(wd, "tensorboard")))
  records = read_jsonl(os.path.join(wd, "metrics.jsonl"))
  steps = [r["step"] for r in records]
  assert steps == sorted(set(steps)) and steps[-1] == 30  # 3 epochs x 10 steps
  evals = [r for r in records if "test_accuracy" in r]
  assert [r["step"] for r in evals] == [0, 10, 20, 30]  # step 0: before training
  assert 0.0 < evals[0]["test_accuracy"] < 0.5 < evals[-1]["test_accuracy"]
  for r in records[1:]:
    assert {"step", "epoch", "train_loss", "train_accuracy", "examples_per_sec",
            "wall_time"} <= set(r)
  assert summary["diverged"] is False
  assert summary["test_accuracy"] > 0.5  # chance is 0.1
  assert summary["full_train_accuracy"] > 0.5
  assert json.load(open(os.path.join(wd, "config.json")))["model"]["name"] == "seed1_mlp"
  assert summary["environment"]["versions"]["jax"] == jax.__version__


def test_rerun_of_a_finished_run_does_nothing(idx_dir, tmp_path):
  wd = str(tmp_path / "run")
  first = train.train_and_evaluate(tiny_config(idx_dir, **{"train.num_epochs": 1}), wd)
  again = train.train_and_evaluate(tiny_config(idx_dir, **{"train.num_epochs": 1}), wd)
  assert first == again


@pytest.mark.parametrize("loop", ["scan", "loop"])
def test_resume_is_bit_identical(idx_dir, tmp_path, loop):
  cfg = tiny_config(idx_dir, **{"train.loop": loop, "train.checkpoint_every_steps": 5})
  full = str(tmp_path / "full")
  train.train_and_evaluate(cfg, full)
  # An interrupted run: the same run with its last checkpoints and summary gone.
  part = str(tmp_path / "part")
  shutil.copytree(full, part)
  os.remove(os.path.join(part, "summary.json"))
  for step in (15, 20, 25, 30):
    shutil.rmtree(os.path.join(part, "checkpoints", str(step)))
  with open(os.path.join(part, "metrics.jsonl"), "a") as f:
    f.write('{"step": 25, "torn')  # metrics written past the checkpoint, half a line
  train.train_and_evaluate(cfg, part)
  step_a, a = final_state(full)
  step_b, b = final_state(part)
  assert step_a == step_b == 30
  jax.tree.map(np.testing.assert_array_equal, a, b)
  ra = read_jsonl(os.path.join(full, "metrics.jsonl"))
  rb = read_jsonl(os.path.join(part, "metrics.jsonl"))
  assert [r["step"] for r in ra] == [r["step"] for r in rb]
  for x, y in zip(ra, rb):
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "test_correct"):
      assert x.get(key) == y.get(key)


def test_scan_and_loop_forms_agree(idx_dir, tmp_path):
  out = {}
  for loop in ("scan", "loop"):
    wd = str(tmp_path / loop)
    out[loop] = train.train_and_evaluate(tiny_config(idx_dir, **{"train.loop": loop}), wd)
  assert out["scan"]["test_accuracy"] == pytest.approx(out["loop"]["test_accuracy"], abs=0.03)
  assert out["scan"]["train_loss"] == pytest.approx(out["loop"]["train_loss"], rel=1e-3)


def test_divergence_is_recorded_not_raised(idx_dir, tmp_path):
  cfg = tiny_config(idx_dir, **{"model.norm": "none", "optimizer.learning_rate": 1e9,
                                "model.activation": "relu"})
  wd = str(tmp_path / "div")
  summary = train.train_and_evaluate(cfg, wd)
  assert summary["diverged"] is True
  assert 0 <= summary["diverged_at_step"] < 30
  assert summary["final_step"] < 30 or summary["diverged_at_step"] < 30
  records = read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert records[-1]["diverged_at_step"] == summary["diverged_at_step"]


def test_eval_covers_every_test_example(idx_dir):
  """An eval batch that does not divide the test set still counts every example."""
  from bnlab.models import networks as models
  cfg = tiny_config(idx_dir)
  model = models.build_model(cfg.model)
  images = jax.random.randint(jax.random.key(0), (103, 28, 28), 0, 255).astype(jnp.uint8)
  labels = jnp.arange(103) % 10
  v = model.init(jax.random.key(1), images)
  params, stats = v["params"], v["batch_stats"]
  full = evaluation_lib.evaluate(model.apply, params, stats, images, labels, batch_size=103)
  split = evaluation_lib.evaluate(model.apply, params, stats, images, labels, batch_size=10)
  np.testing.assert_allclose(full["loss"], split["loss"], rtol=1e-5)
  assert full["accuracy"] == split["accuracy"]


def test_schedule_boundaries_are_a_function_of_the_step():
  plan = schedule_lib.Schedule(total_steps=95, steps_per_epoch=30, steps_per_call=7,
                        eval_every=20, log_every=10, checkpoint_every=25)
  step, ends = 0, []
  while step < plan.total_steps:
    step = plan.next_boundary(step)
    ends.append(step)
  assert ends == [7, 10, 14, 20, 21, 25, 28, 30, 37, 40, 44, 50, 51, 58, 60, 67, 70, 74, 75, 80,
                  81, 88, 90, 95]
  # Resuming at any boundary gives the same continuation.
  for i, s in enumerate(ends[:-1]):
    assert plan.next_boundary(s) == ends[i + 1]


def test_last_record_at_or_before_a_step_is_the_last_log_or_evaluation_step():
  plan = schedule_lib.Schedule(total_steps=95, steps_per_epoch=30, steps_per_call=7,
                        eval_every=20, log_every=15, checkpoint_every=25)
  for step in range(96):
    want = max([t for t in range(1, step + 1) if plan.is_log(t)], default=0)
    assert plan.last_log_at_or_before(step) == want, step


def test_resolve_loop():
  c = config_lib.base_config().model
  c.name = "seed_cnn"
  c.conv_implementation = "xla"
  assert steps_lib.resolve_loop("auto", c, "cpu") == "loop"
  assert steps_lib.resolve_loop("auto", c, "gpu") == "scan"
  c.conv_implementation = "im2col"
  assert steps_lib.resolve_loop("auto", c, "cpu") == "scan"
  assert steps_lib.resolve_loop("loop", c, "cpu") == "loop"


def test_activation_percentiles_are_recorded_at_each_eval(idx_dir, tmp_path):
  cfg = tiny_config(idx_dir, **{"analysis.layers": ("preact_1",), "analysis.units": (0, 5),
                                "train.num_epochs": 2})
  wd = str(tmp_path / "an")
  train.train_and_evaluate(cfg, wd)
  evals = [r for r in read_jsonl(os.path.join(wd, "metrics.jsonl")) if "test_accuracy" in r]
  assert len(evals) == 3  # steps 0, 10, 20
  for r in evals:
    pct = np.array(r["preact_1/percentiles"])
    assert pct.shape == (2, 3)  # units x (15, 50, 85)
    assert np.all(np.diff(pct, axis=1) >= 0)  # percentiles are ordered
  # Independent check at the end: numpy percentiles of the same activations.
  from bnlab.models import networks as models
  step, saved = final_state(wd)
  model = models.build_model(cfg.model)
  from bnlab import data as data_lib
  ds = data_lib.load_mnist("idx", data_dir=idx_dir)
  pre = models.pre_activations(model, {"params": saved["params"],
                                       "batch_stats": saved["batch_stats"]}, ds.test_images)
  want = np.percentile(np.asarray(pre["preact_1"])[:, [0, 5]], [15, 50, 85], axis=0).T
  np.testing.assert_allclose(np.array(evals[-1]["preact_1/percentiles"]), want, rtol=1e-4,
                             atol=1e-5)


def test_unknown_analysis_layer_is_a_config_error(idx_dir):
  cfg = tiny_config(idx_dir, **{"analysis.layers": ("preact_7",)})
  with pytest.raises(config_lib.ConfigError, match="analysis.layers"):
    config_lib.validate(cfg)


@pytest.mark.parametrize("norm", ["noisy", "renorm", "ghost", "group"])
def test_variants_train_through_the_engine(idx_dir, tmp_path, norm):
  cfg = tiny_config(idx_dir, **{"model.norm": norm, "train.num_epochs": 1})
  cfg.model.bn.num_groups = 4
  summary = train.train_and_evaluate(cfg, str(tmp_path / norm))
  assert summary["diverged"] is False and summary["test_accuracy"] > 0.2


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_member_states_equal_stacked_solo_states(schedule):
  from bnlab.models import networks as models  # pylint: disable=g-import-not-at-top
  cfgs = []
  for seed, lr in ((0, 0.1), (1, 0.1), (0, 0.5)):
    c = config_lib.base_config()
    c.model.name, c.seed = "seed1_mlp", seed
    c.optimizer.schedule = schedule
    if schedule == "constant":
      c.optimizer.learning_rate = lr
    cfgs.append(c)
  model = models.build_model(cfgs[0].model)
  tx = optim_lib.make_optimizer(cfgs[0].optimizer, 100)
  want = jax.tree.map(lambda *xs: jnp.stack(xs), *[
      state_lib.create_train_state(model, optim_lib.make_optimizer(c.optimizer, 100),
                               jax.random.key(c.seed), 8).replace(tx=tx) for c in cfgs])
  got = state_lib.create_member_states(model, tx, cfgs, 8)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  # Same values up to float rounding (the group's init is compiled, a solo init is not).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)


def test_tensorboard_writer_does_not_import_torch(tmp_path):
  # A stand-in torch package that leaves a mark when imported.
  (tmp_path / "torch").mkdir()
  (tmp_path / "torch" / "__init__.py").write_text(
      f"open({str(tmp_path / 'imported')!r}, 'w').close()\n")
  code = (
      "import sys, os\n"
      f"sys.path.insert(0, {str(tmp_path)!r})\n"
      "from bnlab.rundir import records\n"
      f"w = records._summary_writer_class()({str(tmp_path / 'tb')!r})\n"
      "w.add_scalar('loss', 1.5, 3); w.flush()\n"
      f"assert not os.path.exists({str(tmp_path / 'imported')!r}), 'torch imported'\n"
      "import torch\n"  # still importable afterwards
      f"assert os.path.exists({str(tmp_path / 'imported')!r})\n")
  import subprocess
  import sys
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))


def test_a_seeded_training_subset_is_fixed_by_its_seed(idx_dir):
  """data.num_train with data.subset_seed: a fixed sample of the training set, the same for
  every run that names the seed, another for another seed; -1 keeps the first N."""
  full = train.load_data(tiny_config(idx_dir))
  first = train.load_data(tiny_config(idx_dir, **{"data.num_train": 100}))
  a = train.load_data(tiny_config(idx_dir, **{"data.num_train": 100, "data.subset_seed": 3}))
  seven = tiny_config(idx_dir, **{"data.num_train": 100, "data.subset_seed": 3})
  seven.seed = 7  # the run's own seed does not choose the subset
  again = train.load_data(seven)
  other = train.load_data(tiny_config(idx_dir, **{"data.num_train": 100, "data.subset_seed": 4}))
  assert (first.train_images == full.train_images[:100]).all()
  idx = np.sort(np.random.default_rng(3).permutation(len(full.train_labels))[:100])
  assert (a.train_images == full.train_images[idx]).all()
  assert (a.train_labels == full.train_labels[idx]).all()
  assert (again.train_images == a.train_images).all() and len(a.train_labels) == 100
  assert not (other.train_images == a.train_images).all()
  assert (a.test_images == full.test_images).all()
  with pytest.raises(config_lib.ConfigError, match="data.num_train=400 but"):
    train.load_data(tiny_config(idx_dir, **{"data.num_train": 400, "data.subset_seed": 3}))
  with pytest.raises(config_lib.ConfigError, match="data.subset_seed"):
    config_lib.validate(tiny_config(idx_dir, **{"data.subset_seed": -2}))


def test_dropout_only_in_training_steps(idx_dir, tmp_path):
  """model.dropout: off in inference and in evaluations with batch statistics (no RNG), on
  in a train step, the same for the same step and RNG; a run with it is reproducible."""
  from bnlab.models import networks
  cfg = tiny_config(idx_dir, **{"model.dropout": 0.5})
  model, plain = networks.build_model(cfg.model), networks.build_model(
      tiny_config(idx_dir).model)
  x = jax.random.randint(jax.random.key(0), (8, 28, 28), 0, 256).astype(jnp.uint8)
  v = model.init(networks.init_rngs(jax.random.key(0)), x)
  for train_mode in (False, True):  # no dropout RNG: the whole network
    kw = {"mutable": ["batch_stats"]} if train_mode else {}
    got = model.apply(v, x, train=train_mode, **kw)
    want = plain.apply(v, x, train=train_mode, **kw)
    np.testing.assert_array_equal(got[0] if train_mode else got, want[0] if train_mode else want)
  rngs = networks.train_rngs(jax.random.key_data(jax.random.key(1)), jnp.int32(3))
  one, _ = model.apply(v, x, train=True, mutable=["batch_stats"], rngs=rngs)
  two, _ = model.apply(v, x, train=True, mutable=["batch_stats"], rngs=rngs)
  off, _ = plain.apply(v, x, train=True, mutable=["batch_stats"], rngs=rngs)
  np.testing.assert_array_equal(one, two)
  assert not np.allclose(one, off)
  with pytest.raises(config_lib.ConfigError, match="model.dropout"):
    config_lib.validate(tiny_config(idx_dir, **{"model.dropout": 1.0}))
  cfg = tiny_config(idx_dir, **{"model.dropout": 0.5, "train.num_epochs": 1})
  s1 = train.train_and_evaluate(cfg, str(tmp_path / "a"))
  s2 = train.train_and_evaluate(cfg, str(tmp_path / "b"))
  s3 = train.train_and_evaluate(tiny_config(idx_dir, **{"train.num_epochs": 1}),
                                str(tmp_path / "c"))
  assert s1["test_accuracy"] == s2["test_accuracy"]
  jax.tree.map(np.testing.assert_array_equal, final_state(str(tmp_path / "a")),
               final_state(str(tmp_path / "b")))
  assert not all(jax.tree.leaves(jax.tree.map(
      np.array_equal, final_state(str(tmp_path / "a")), final_state(str(tmp_path / "c")))))
