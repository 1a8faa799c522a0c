"""Runs you can extend and move: a longer length, evaluation keys and the device layout on resume."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from bnlab import config as config_lib
from bnlab import sweep
from bnlab.engine import train
from run_files import final_state, read_jsonl
from test_train import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(idx_dir, **train_overrides):
  """test_train's tiny run, with `train.*` overrides given by their bare names."""
  return tiny_config(idx_dir, **{f"train.{k}": v for k, v in train_overrides.items()})


def evals(wd):
  return [(r["step"], r["test_accuracy"], r["train_loss"] if "train_loss" in r else None)
          for r in read_jsonl(os.path.join(wd, "metrics.jsonl")) if "test_accuracy" in r]


def assert_same_state(a, b):
  _, sa = final_state(a)
  _, sb = final_state(b)
  jax.tree.map(np.testing.assert_array_equal, sa, sb)


@pytest.fixture(scope="module")
def three_epochs(idx_dir, tmp_path_factory):
  """The reference: 3 epochs (30 steps) from the start."""
  wd = str(tmp_path_factory.mktemp("ref") / "run")
  return wd, train.train_and_evaluate(tiny(idx_dir), wd)


@pytest.mark.parametrize("first,longer", [
    ({"num_epochs": 1}, {"num_epochs": 3}),
    ({"num_steps": 10}, {"num_steps": 30}),
    ({"num_epochs": 2}, {"num_epochs": 0, "num_steps": 30}),
])
def test_a_finished_run_extended_equals_the_longer_run(idx_dir, tmp_path, three_epochs,
                                                       first, longer):
  ref_wd, ref = three_epochs
  wd = str(tmp_path / "run")
  short = train.train_and_evaluate(tiny(idx_dir, **first), wd)
  assert short["total_steps"] == short["final_step"] < 30
  longer_cfg = tiny(idx_dir, **longer)
  summary = train.train_and_evaluate(longer_cfg, wd)
  assert summary["final_step"] == summary["total_steps"] == 30
  assert json.load(open(os.path.join(wd, "summary.json")))["final_step"] == 30
  assert json.load(open(os.path.join(wd, "config.json")))["train"]["num_steps"] == \
      longer_cfg.train.num_steps
  for key in ("test_accuracy", "test_loss", "train_loss", "full_train_accuracy"):
    assert summary[key] == ref[key], key
  assert_same_state(wd, ref_wd)  # bit-identical on one platform (constant schedule)
  # The metrics continue: every evaluation of the reference, in order, once.
  assert evals(wd) == evals(ref_wd)
  steps = [r["step"] for r in read_jsonl(os.path.join(wd, "metrics.jsonl"))]
  assert steps == sorted(set(steps)) and steps[-1] == 30
  # Rerunning the longer config is now a complete run: nothing to do.
  assert train.train_and_evaluate(longer_cfg, wd) == summary


def test_a_finished_run_cannot_be_shortened(idx_dir, tmp_path):
  wd = str(tmp_path / "run")
  train.train_and_evaluate(tiny(idx_dir, num_epochs=2), wd)
  with pytest.raises(config_lib.ConfigError, match="train.num_epochs=1 .* extended, not shortened"):
    train.train_and_evaluate(tiny(idx_dir, num_epochs=1), wd)


def test_an_unfinished_run_past_the_new_length_is_refused(idx_dir, tmp_path):
  wd = str(tmp_path / "run")
  train.train_and_evaluate(tiny(idx_dir, num_epochs=2), wd)
  os.remove(os.path.join(wd, "summary.json"))
  before = open(os.path.join(wd, "metrics.jsonl")).read()
  with pytest.raises(config_lib.ConfigError, match="at step 20, beyond the 15 steps"):
    train.train_and_evaluate(tiny(idx_dir, num_epochs=0, num_steps=15), wd)
  assert open(os.path.join(wd, "metrics.jsonl")).read() == before


@pytest.mark.parametrize("schedule", ["cosine", "warmup_cosine"])
def test_a_schedule_over_the_run_length_cannot_be_extended(idx_dir, tmp_path, schedule):
  wd = str(tmp_path / "run")
  cfg = tiny(idx_dir, num_epochs=1)
  cfg.optimizer.schedule, cfg.optimizer.warmup_steps = schedule, 2
  train.train_and_evaluate(cfg, wd)
  cfg.train.num_epochs = 2
  with pytest.raises(config_lib.ConfigError,
                     match=f"train.num_epochs: 1 -> 2: .*schedule='{schedule}'"):
    train.train_and_evaluate(cfg, wd)


def test_a_warmup_into_a_constant_rate_can_be_extended(idx_dir, tmp_path):
  cfg = tiny(idx_dir, num_epochs=1)
  cfg.optimizer.warmup_steps = 4
  wd = str(tmp_path / "run")
  train.train_and_evaluate(cfg, wd)
  cfg.train.num_epochs = 2
  assert train.train_and_evaluate(cfg, wd)["final_step"] == 20


def test_changes_that_alter_the_model_are_still_refused(idx_dir, tmp_path):
  wd = str(tmp_path / "run")
  train.train_and_evaluate(tiny(idx_dir, num_epochs=1), wd)
  for key, value in (("optimizer.learning_rate", 0.2), ("train.batch_size", 16),
                     ("train.log_every_steps", 10), ("model.norm", "none")):
    cfg = tiny(idx_dir, num_epochs=2)
    section, name = key.rsplit(".", 1)
    cfg[section][name] = value
    with pytest.raises(config_lib.ConfigError, match=f"different config \\({key}"):
      train.train_and_evaluate(cfg, wd)
  assert config_lib.RESUME_SAFE_KEYS  # documented in one place


def test_changes_to_what_a_record_means_are_refused(idx_dir, tmp_path):
  # Records before and after would hold two definitions under one name.
  wd = str(tmp_path / "run")
  train.train_and_evaluate(tiny(idx_dir, num_epochs=1), wd)
  for key, value in (("analysis.percentiles", (5.0, 50.0, 95.0)),
                     ("analysis.num_examples", 7), ("train.population_examples", 64)):
    cfg = tiny(idx_dir, num_epochs=2)
    section, name = key.rsplit(".", 1)
    cfg[section][name] = value
    with pytest.raises(config_lib.ConfigError, match=f"different config \\({key}"):
      train.train_and_evaluate(cfg, wd)


def test_a_stopped_extension_is_not_undone_by_the_shorter_command(idx_dir, tmp_path):
  # Made longer, stopped midway, then the old command: the run is past its summary's step.
  wd = str(tmp_path / "run")
  train.train_and_evaluate(tiny(idx_dir, num_epochs=1), wd)
  config_before = open(os.path.join(wd, "config.json")).read()
  with pytest.raises(config_lib.ConfigError, match="can be extended, not shortened"):
    train.train_and_evaluate(tiny(idx_dir, num_epochs=1, num_steps=3), wd)
  assert open(os.path.join(wd, "config.json")).read() == config_before  # refused: unchanged
  records = read_jsonl(os.path.join(wd, "metrics.jsonl"))
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:  # what the stopped extension wrote
    f.write(json.dumps({**records[-1], "step": records[-1]["step"] + 5}) + "\n")
  with pytest.raises(config_lib.ConfigError, match=f"was being made longer and is at step "
                     f"{records[-1]['step'] + 5}"):
    train.train_and_evaluate(tiny(idx_dir, num_epochs=1), wd)


def test_a_statistic_left_out_on_resume_has_no_final_value(idx_dir, tmp_path):
  # eval_statistics may change on resume; the summary reports the last evaluation's only.
  wd = str(tmp_path / "run")
  cfg = tiny(idx_dir, num_epochs=1, eval_statistics=("running", "batch"))
  assert "test_accuracy_batch" in train.train_and_evaluate(cfg, wd)
  summary = train.train_and_evaluate(tiny(idx_dir, num_epochs=2), wd)
  assert summary["final_step"] > 0 and "test_accuracy" in summary
  assert not any(k.startswith(("test_accuracy_", "test_loss_")) for k in summary)


def test_eval_batch_size_may_change_on_resume(idx_dir, tmp_path, three_epochs):
  ref_wd, ref = three_epochs
  wd = str(tmp_path / "run")
  shutil.copytree(ref_wd, wd)
  os.remove(os.path.join(wd, "summary.json"))  # killed after its first epoch
  for step in (20, 30):
    shutil.rmtree(os.path.join(wd, "checkpoints", str(step)))
  summary = train.train_and_evaluate(
      tiny(idx_dir, eval_batch_size=7, final_train_eval=False), wd)
  assert summary["test_accuracy"] == ref["test_accuracy"]
  assert summary["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-5)
  assert "full_train_accuracy" not in summary
  assert_same_state(wd, ref_wd)
  assert json.load(open(os.path.join(wd, "config.json")))["train"]["eval_batch_size"] == 7


def test_a_grouped_sweep_extends_with_its_members(idx_dir, tmp_path):
  base = tiny(idx_dir, num_epochs=1)
  members = sweep.seeds(2)
  wd = str(tmp_path / "sw")
  sweep.run_sweep(base, members, wd)
  groups = os.listdir(os.path.join(wd, "_groups"))
  base.train.num_epochs = 2
  rows = sweep.run_sweep(base, members, wd)
  assert [r["final_step"] for r in rows] == [20, 20]
  assert os.listdir(os.path.join(wd, "_groups")) == groups  # resumed in the same directory
  solo = train.train_and_evaluate(sweep.apply_overrides(base, members[1]),
                                  str(tmp_path / "solo"))
  assert rows[1]["test_accuracy"] == pytest.approx(solo["test_accuracy"], abs=1e-6)
  records = read_jsonl(os.path.join(wd, "seed=1", "metrics.jsonl"))
  assert [r["step"] for r in records if "test_accuracy" in r] == [0, 10, 20]


MOVE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    import tiny_mnist
    from run_files import final_state
    from bnlab import config as config_lib
    from bnlab.engine import train
    assert len(jax.devices()) == 4, jax.devices()
    tiny_mnist.write_mnist_dir({data!r}, num_train=256, num_test=64)

    def cfg(devices, epochs):
      c = config_lib.base_config()
      c.data.source, c.data.dir = "idx", {data!r}
      c.model.name, c.model.bn_position, c.model.norm = "seed1_mlp", "before", "batch"
      c.optimizer.learning_rate = 0.05
      c.train.batch_size, c.train.num_epochs, c.train.num_devices = 32, epochs, devices
      return c

    out = {{}}
    ref = train.train_and_evaluate(cfg(1, 2), {work!r} + "/ref")
    # One device for an epoch, then extended on 4; and 4 devices, then 1.
    for first, then in ((1, 4), (4, 1)):
      wd = {work!r} + f"/{{first}}_{{then}}"
      train.train_and_evaluate(cfg(first, 1), wd)
      s = train.train_and_evaluate(cfg(then, 2), wd)
      out[f"{{first}}_{{then}}"] = {{
          "num_devices": s["num_devices"], "final_step": s["final_step"],
          "test_accuracy": s["test_accuracy"], "ref_accuracy": ref["test_accuracy"],
          "max_diff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                          for a, b in zip(jax.tree.leaves(final_state(wd)[1]["params"]),
                                          jax.tree.leaves(final_state({work!r} + "/ref")[1]["params"])))}}
    print("RESULT" + json.dumps(out))
""")


def test_a_run_moves_to_another_device_count_on_resume(tmp_path):
  script = MOVE_SCRIPT.format(tests=os.path.join(ROOT, "tests"), data=str(tmp_path / "data"),
                              work=str(tmp_path / "work"))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                     env=env, cwd=ROOT, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.split("RESULT", 1)[1])
  for key, then in (("1_4", 4), ("4_1", 1)):
    r = out[key]
    assert r["num_devices"] == then and r["final_step"] == 16
    assert r["max_diff"] < 1e-4  # the same run, up to the rounding of another layout
    assert abs(r["test_accuracy"] - r["ref_accuracy"]) <= 1 / 64
