"""Sweeps: combinators, member names, the runner, and grouped runs against solo runs."""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from bnlab.engine import members as members_lib
from bnlab import config as config_lib
from bnlab import sweep
from bnlab.engine import train
from bnlab.rundir import workdir as workdir_lib
from run_files import final_state, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_base(idx_dir):
  c = config_lib.base_config()
  c.data.source = "idx"
  c.data.dir = idx_dir
  c.model.name = "seed1_mlp"
  c.model.norm = "none"
  c.model.bn_position = "before"
  c.train.batch_size = 32
  c.train.num_epochs = 3
  c.train.log_every_steps = 5
  c.train.keep_checkpoints = 50
  c.train.checkpoint_min_interval_secs = 0  # a checkpoint at every evaluation
  return c


# -- combinators and names -------------------------------------------------------

def test_combinators():
  assert sweep.axis("a.b", [1, 2]) == [{"a.b": 1}, {"a.b": 2}]
  assert sweep.seeds(2) == [{"seed": 0}, {"seed": 1}]
  assert sweep.product(sweep.axis("x", [1, 2]), sweep.axis("y", "ab")) == [
      {"x": 1, "y": "a"}, {"x": 1, "y": "b"}, {"x": 2, "y": "a"}, {"x": 2, "y": "b"}]
  assert sweep.zip_(sweep.axis("x", [1, 2]), sweep.axis("y", [3, 4])) == [
      {"x": 1, "y": 3}, {"x": 2, "y": 4}]
  with pytest.raises(ValueError, match="equal length"):
    sweep.zip_(sweep.axis("x", [1, 2]), sweep.axis("y", [3]))
  v = sweep.variants("model", {"small": {"model.name": "seed1_mlp"}})
  assert v[0]["model"].label == "small" and v[0]["model"].overrides == {"model.name": "seed1_mlp"}


def test_member_names_are_readable_and_deterministic():
  assert sweep.member_name({"optimizer.learning_rate": 0.01, "seed": 2}) == \
      "learning_rate=0.01,seed=2"
  assert sweep.member_name({"optimizer.learning_rate": 1e9}) == "learning_rate=1e+09"
  assert sweep.member_name({"optimizer.momentum": 0.9, "model.bn.momentum": 0.99}) == \
      "optimizer.momentum=0.9,model.bn.momentum=0.99"
  assert sweep.member_name({"m": sweep.Variant("paper", {}), "model.widths": (4, 8)}) == \
      "paper,widths=4-8"
  assert sweep.member_name({}) == "base"


def test_bad_key_or_value_fails_before_any_training(idx_dir, tmp_path):
  base = tiny_base(idx_dir)
  bad = sweep.seeds(2) + [{"optimizer.learning_rat": 0.1}]
  with pytest.raises(config_lib.ConfigError, match=r"member 2 .*'optimizer.learning_rat'"):
    sweep.run_sweep(base, bad, str(tmp_path / "sw"))
  assert not os.path.exists(tmp_path / "sw")
  with pytest.raises(config_lib.ConfigError, match=r"member 1 .*optimizer.learning_rate"):
    sweep.resolve_members(base, sweep.axis("optimizer.learning_rate", [0.1, -1.0]))
  with pytest.raises(config_lib.ConfigError, match="same name"):
    sweep.resolve_members(base, sweep.seeds(1) + sweep.seeds(1))


def test_grouping_keys():
  base = config_lib.base_config()
  base.model.name = "paper_mlp"
  members = sweep.resolve_members(base, sweep.product(
      sweep.axis("model.norm", ["batch", "none"]),
      sweep.axis("optimizer.learning_rate", [0.1, 0.2]), sweep.seeds(2)))
  groups = sweep.group_members(members)
  assert [len(g) for g in groups] == [4, 4]
  assert len(sweep.group_members(members, grouped=False)) == 8
  base.optimizer.schedule = "cosine"  # the learning rate is then part of the program
  members = sweep.resolve_members(base, sweep.product(
      sweep.axis("optimizer.learning_rate", [0.1, 0.2]), sweep.seeds(2)))
  assert [len(g) for g in sweep.group_members(members)] == [2, 2]
  base.model.name = "seed_cnn"  # vmapped convolutions are slow on CPU: solo runs there
  members = sweep.resolve_members(base, sweep.seeds(2))
  assert [len(g) for g in sweep.group_members(members)] == [1, 1] or \
      jax.default_backend() != "cpu"


# -- running ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def grouped_sweep(idx_dir, tmp_path_factory):
  """A group of 4 (two of them diverge) and a member that fails, run once."""
  wd = str(tmp_path_factory.mktemp("sweep") / "sw")
  base = tiny_base(idx_dir)
  members = sweep.product(sweep.axis("optimizer.learning_rate", [0.1, 1e9]), sweep.seeds(2))
  members.append({"data.num_train": 5000})  # more than the 320 examples: fails
  # Full float32 products: a group's batched products and a solo run's plain
  # ones round alike only then (GPUs default to TF32; CPUs are unchanged).
  with jax.default_matmul_precision("highest"):
    rows = sweep.run_sweep(base, members, wd)
  return base, members, wd, rows


def test_sweep_records_done_diverged_and_failed(grouped_sweep):
  _, _, wd, rows = grouped_sweep
  by = {r["name"]: r for r in rows}
  assert [r["status"] for r in rows] == ["done", "done", "diverged", "diverged", "failed"]
  for name in ("learning_rate=0.1,seed=0", "learning_rate=0.1,seed=1"):
    assert by[name]["test_accuracy"] > 0.8 and by[name]["final_step"] == 30
    assert by[name]["diverged"] is False
    assert set(os.listdir(os.path.join(wd, name))) >= {
        "config.json", "metrics.jsonl", "summary.json", "checkpoints"}
  for name in ("learning_rate=1e+09,seed=0", "learning_rate=1e+09,seed=1"):
    assert by[name]["diverged"] is True and 0 <= by[name]["diverged_at_step"] < 30
    assert read_jsonl(os.path.join(wd, name, "metrics.jsonl"))[-1]["diverged_at_step"] == \
        by[name]["diverged_at_step"]
  failed = by["num_train=5000"]
  assert "data.num_train" in failed["error"] and "\n" not in failed["error"]
  assert os.listdir(os.path.join(wd, "_groups"))  # the group's checkpoints
  assert sweep.load_results(wd) == json.loads(json.dumps(rows))
  with open(os.path.join(wd, "results.csv")) as f:
    table = list(csv.DictReader(f))
  assert list(table[0]) == ["name", "optimizer.learning_rate", "seed", "status",
                            "test_accuracy", "test_loss", "train_loss", "diverged",
                            "diverged_at_step", "steps_to_97", "final_step", "wall_time",
                            "error", "data.num_train"]
  assert len(table) == 5 and table[4]["status"] == "failed" and table[0]["error"] == ""
  steps = [r["step"] for r in read_jsonl(os.path.join(wd, rows[0]["name"], "metrics.jsonl"))
           if r.get("test_accuracy", 0) >= 0.97]
  assert rows[0]["steps_to_97"] == (steps[0] if steps else None)


def assert_member_equals_solo(cfg, group_dir, solo_dir, num_steps):
  """The grouped member's summary, metrics and final state equal its solo run's."""
  with jax.default_matmul_precision("highest"):
    solo = train.train_and_evaluate(cfg, solo_dir)
  group = json.load(open(os.path.join(group_dir, "summary.json")))
  assert solo["diverged"] == group["diverged"]
  assert solo["diverged_at_step"] == group["diverged_at_step"]
  for key in ("test_accuracy", "test_loss", "train_loss", "full_train_loss", "final_step"):
    if key in solo and np.isfinite(solo[key]):
      assert group[key] == pytest.approx(solo[key], rel=1e-4, abs=1e-6), key
  a = read_jsonl(os.path.join(solo_dir, "metrics.jsonl"))
  b = read_jsonl(os.path.join(group_dir, "metrics.jsonl"))
  assert [r["step"] for r in a] == [r["step"] for r in b]
  for x, y in zip(a, b):
    # The interval in which a member diverges (lr 1e9) ends on huge logits whose
    # argmax flips with the last bit: equal only where a group's batched products
    # and a solo run's round alike, as on CPU (not on GPU, whatever the precision).
    loss = x.get("train_loss", 0.0)
    if (loss is None or not np.isfinite(loss)) and jax.default_backend() != "cpu":
      continue
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
      if key in x and np.isfinite(x[key]):
        assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6)
  if not solo["diverged"]:
    step_a, sa = final_state(solo_dir)
    step_b, sb = final_state(group_dir)
    assert step_a == step_b == num_steps
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), sa, sb)


def test_grouped_members_equal_their_solo_runs(grouped_sweep, tmp_path):
  base, members, wd, rows = grouped_sweep
  # lr 0.1 seed 0, lr 1e9 seed 1
  assert_members_equal_solo(base, members, rows, wd, str(tmp_path), (0, 3), 30)


def momenta_base(idx_dir):
  """SGD with momentum and BN: members may differ in both momenta."""
  c = tiny_base(idx_dir)
  c.model.norm = "batch"
  c.optimizer.name = "momentum"
  c.train.num_epochs = 2
  return c


MOMENTA = sweep.zip_(sweep.axis("optimizer.momentum", [0.9, 0.5, 0.0]),
                     sweep.axis("model.bn.momentum", [0.99, 0.9, 0.5]),
                     sweep.axis("optimizer.learning_rate", [0.05, 0.1, 0.05]))


def run_one_group(base, overrides, wd):
  """The sweep of `overrides` over `base`, checked to train as one group of distinct members."""
  members = sweep.resolve_members(base, overrides)
  assert [len(g) for g in sweep.group_members(members)] == [len(overrides)]
  with jax.default_matmul_precision("highest"):
    rows = sweep.run_sweep(base, overrides, wd)
  assert [r["status"] for r in rows] == ["done"] * len(overrides)
  summaries = [json.load(open(os.path.join(wd, r["name"], "summary.json"))) for r in rows]
  assert {s["group_size"] for s in summaries} == {len(overrides)}
  assert len({r["test_loss"] for r in rows}) == len(overrides)
  return rows


def assert_members_equal_solo(base, overrides, rows, wd, solo_root, indices, num_steps):
  """`assert_member_equals_solo` for the sweep members `indices`; their names."""
  names = [rows[i]["name"] for i in indices]
  for i, name in zip(indices, names):
    assert_member_equals_solo(sweep.apply_overrides(base, overrides[i]),
                              os.path.join(wd, name), os.path.join(solo_root, name), num_steps)
  return names


def test_members_differing_in_momenta_group_and_equal_their_solo_runs(idx_dir, tmp_path):
  base = momenta_base(idx_dir)
  wd = str(tmp_path / "sw")
  rows = run_one_group(base, MOMENTA, wd)
  assert_members_equal_solo(base, MOMENTA, rows, wd, str(tmp_path), (0, 2), 20)


def test_members_differing_in_bn_epsilon_group_and_equal_their_solo_runs(idx_dir, tmp_path):
  # Epsilon enters training and every evaluation (running, population and test-batch
  # statistics, and the sown x-hat), so each member's must reach each of them.
  base = momenta_base(idx_dir)
  base.train.num_epochs = 1
  base.train.eval_statistics = ("running", "population", "batch")
  base.train.population_examples = 96
  base.analysis.layers = ("xhat_0",)
  base.analysis.num_examples = 50
  overrides = sweep.axis("model.bn.epsilon", [1e-5, 0.5, 5.0])
  wd = str(tmp_path / "sw")
  rows = run_one_group(base, overrides, wd)
  for name in assert_members_equal_solo(base, overrides, rows, wd, str(tmp_path), (1, 2), 10):
    group = read_jsonl(os.path.join(wd, name, "metrics.jsonl"))
    solo = read_jsonl(str(tmp_path / name / "metrics.jsonl"))
    for x, y in zip(solo, group):
      for key in ("test_accuracy_population", "test_accuracy_batch", "test_loss_population",
                  "test_loss_batch"):
        if key in x:
          assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key
      if "xhat_0/percentiles" in x:
        np.testing.assert_allclose(y["xhat_0/percentiles"], x["xhat_0/percentiles"],
                                   rtol=1e-4, atol=1e-5)


def test_members_differing_in_initializer_group_and_equal_their_solo_runs(idx_dir, tmp_path):
  # Interleaved initializers: each part is initialized with its own model, then put back
  # in member order; the initial parameters must be each solo run's.
  base = momenta_base(idx_dir)
  base.train.num_epochs = 1
  overrides = sweep.product(sweep.seeds(2), sweep.zip_(
      sweep.axis("model.kernel_init", ["normal", "lecun_normal"]),
      sweep.axis("model.init_std", [0.5, 0.01])))
  assert [o["model.kernel_init"] for o in overrides] == ["normal", "lecun_normal"] * 2
  wd = str(tmp_path / "sw")
  rows = run_one_group(base, overrides, wd)
  assert_members_equal_solo(base, overrides, rows, wd, str(tmp_path), (1, 2), 10)


@pytest.mark.parametrize("name", ["paper_mlp", "seed_cnn", "resnet20"])
def test_a_members_bn_values_reach_every_built_in_model(name):
  # On accelerators every model groups (`grouping_helps`), ResNet-20 included, so a member's
  # BN momentum and epsilon must reach each built-in network as the model built with them.
  from bnlab.engine import state as state_lib
  from bnlab.models import networks
  base = config_lib.base_config().model
  base.name, base.norm, base.bn_position = name, "batch", "before"
  if name == "resnet20":
    base.widths = (4, 4, 4)
  values = {"model.bn.momentum": 0.5, "model.bn.epsilon": 0.5}
  theirs = base.copy_and_resolve_references()
  theirs.bn.momentum, theirs.bn.epsilon = 0.5, 0.5
  built = networks.build_model(theirs)
  member = networks.build_model(base)
  assert state_lib.with_model_values(member, values) == built
  x = jax.random.uniform(jax.random.key(1), (8, 28, 28)) * 255
  variables = built.init(networks.init_rngs(jax.random.key(0)), x, train=False)
  expect, updates = built.apply(variables, x, train=True, mutable=["batch_stats"])
  got, got_updates = state_lib.with_model_values(member, values).apply(
      variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_array_equal(got, expect)
  jax.tree.map(np.testing.assert_array_equal, got_updates, updates)
  # Evaluations map one apply over members whose values ride in their params.
  apply = state_lib.MemberApply(member)
  params = state_lib.with_member_values(variables["params"], values)
  np.testing.assert_array_equal(apply({**variables, "params": params}, x, train=False),
                                built.apply(variables, x, train=False))
  assert not np.array_equal(member.apply(variables, x, train=False),
                            built.apply(variables, x, train=False))  # epsilon 0.5 shows


def test_grouped_cnn_members_equal_their_solo_runs(idx_dir, tmp_path):
  # Grouping is off for CNNs on CPU (slower there), so the group is trained directly.
  base = momenta_base(idx_dir)
  base.model.name = "seed1_cnn"
  base.model.widths = (4, 4)
  base.train.num_epochs = 1
  overrides = MOMENTA[:2]
  cfgs = [sweep.apply_overrides(base, o) for o in overrides]
  assert len({members_lib.group_key(c) for c in cfgs}) == 1
  names = ["a", "b"]
  with jax.default_matmul_precision("highest"):
    train.train_group(cfgs, [str(tmp_path / "g" / n) for n in names], str(tmp_path / "g" / "_g"))
  for cfg, name in zip(cfgs, names):
    assert_member_equals_solo(cfg, str(tmp_path / "g" / name), str(tmp_path / "solo" / name), 10)


def test_a_finished_member_carried_in_a_new_group_keeps_its_records(idx_dir, tmp_path):
  # A rerun may group a finished member with unfinished ones (another --max_group_size, or
  # grouping rules that changed): the new group starts at step 0 and carries it along.
  base = tiny_base(idx_dir)
  base.train.num_epochs = 1
  assert base.train.eval_at_start
  cfgs = [sweep.apply_overrides(base, o) for o in sweep.seeds(2)]
  dirs = [str(tmp_path / "a"), str(tmp_path / "b")]
  train.train_and_evaluate(cfgs[0], dirs[0])
  files = ("metrics.jsonl", "summary.json")
  before = {f: open(os.path.join(dirs[0], f), "rb").read() for f in files}
  train.train_group(cfgs, dirs, str(tmp_path / "_g"))
  assert {f: open(os.path.join(dirs[0], f), "rb").read() for f in files} == before
  steps = [r["step"] for r in read_jsonl(os.path.join(dirs[1], "metrics.jsonl"))]
  assert steps == sorted(steps) and steps.count(0) == 1


def test_a_removed_member_of_a_finished_group_fails_alone_until_the_group_restarts(
    idx_dir, tmp_path):
  # The group's checkpoint is at its last step; the removed member's records from step 0
  # are gone, so it cannot resume there. It alone is reported failed, naming the fix;
  # the others keep their results.
  base = tiny_base(idx_dir)
  base.train.num_epochs = 1
  overrides = sweep.seeds(3)
  wd = str(tmp_path / "sw")
  rows = sweep.run_sweep(base, overrides, wd)
  assert [r["status"] for r in rows] == ["done"] * 3
  removed = os.path.join(wd, rows[1]["name"])
  shutil.rmtree(removed)
  rows = sweep.run_sweep(base, overrides, wd)
  assert [r["status"] for r in rows] == ["done", "failed", "done"]
  (group,) = os.listdir(os.path.join(wd, "_groups"))
  checkpoints = os.path.join(wd, "_groups", group, "checkpoints")
  assert "metrics.jsonl holds no records" in rows[1]["error"]
  assert f"move {checkpoints} aside to retrain from step 0" in rows[1]["error"]
  shutil.move(checkpoints, str(tmp_path / "aside"))
  with jax.default_matmul_precision("highest"):
    rows = sweep.run_sweep(base, overrides, wd)
  assert [r["status"] for r in rows] == ["done"] * 3
  assert_member_equals_solo(sweep.apply_overrides(base, overrides[1]), removed,
                            str(tmp_path / "solo"), 10)


def test_a_finished_member_whose_records_were_cut_short_is_reported_failed(idx_dir, tmp_path):
  base = tiny_base(idx_dir)
  base.train.num_epochs = 1
  wd = str(tmp_path / "sw")
  rows = sweep.run_sweep(base, sweep.seeds(2), wd)
  path = os.path.join(wd, rows[0]["name"], "metrics.jsonl")
  records = read_jsonl(path)
  with open(path, "w") as f:
    f.write(json.dumps(records[0]) + "\n")
  rows = sweep.run_sweep(base, sweep.seeds(2), wd)  # nothing left to train
  assert [r["status"] for r in rows] == ["failed", "done"]
  assert rows[0]["test_accuracy"] is None
  assert (f"{path} ends at step {records[0]['step']}, but the run finished at step "
          f"{records[-1]['step']}") in rows[0]["error"]


def _without_times(records):
  return [{k: v for k, v in r.items() if k not in ("wall_time", "examples_per_sec")}
          for r in records]


def test_a_group_stopped_between_its_final_checkpoints_and_summaries_finishes_on_rerun(
    idx_dir, tmp_path, monkeypatch):
  # Every member's final checkpoint is written, then the attempt stops after one summary
  # (a kill there leaves the same): the rerun writes those checkpoints again.
  base = tiny_base(idx_dir)
  base.train.num_epochs = 1
  clean = sweep.run_sweep(base, sweep.seeds(3), str(tmp_path / "clean"))
  real, written = workdir_lib.WorkDir.write_summary, []

  def stop_after_one(self, summary):
    if written:
      raise OSError("stopped")
    written.append(real(self, summary))
  monkeypatch.setattr(workdir_lib.WorkDir, "write_summary", stop_after_one)
  wd = str(tmp_path / "sw")
  assert [r["status"] for r in sweep.run_sweep(base, sweep.seeds(3), wd)] == [
      "done", "failed", "failed"]
  monkeypatch.undo()
  rows = sweep.run_sweep(base, sweep.seeds(3), wd)
  assert [r["status"] for r in rows] == ["done"] * 3
  for a, b in zip(clean, rows):
    assert (a["test_accuracy"], a["test_loss"]) == (b["test_accuracy"], b["test_loss"])
    assert _without_times(read_jsonl(os.path.join(wd, b["name"], "metrics.jsonl"))) == \
        _without_times(read_jsonl(os.path.join(str(tmp_path / "clean"), a["name"],
                                               "metrics.jsonl")))


def test_a_diverged_member_without_its_summary_gets_the_same_summary_again(idx_dir, tmp_path):
  # Its summary removed (or the attempt ended before writing it) while the group went on:
  # its last record says where it stopped, and the rerun writes that summary again.
  base = tiny_base(idx_dir)
  base.train.num_epochs = 1
  overrides = sweep.axis("optimizer.learning_rate", [0.1, 1e9])
  wd = str(tmp_path / "sw")
  rows = sweep.run_sweep(base, overrides, wd)
  assert [r["status"] for r in rows] == ["done", "diverged"]
  path = os.path.join(wd, rows[1]["name"], "summary.json")
  volatile = ("time", "wall_time", "environment")
  before = {k: v for k, v in json.load(open(path)).items() if k not in volatile}
  os.remove(path)
  again = sweep.run_sweep(base, overrides, wd)
  assert [{**r, "wall_time": None} for r in again] == [{**r, "wall_time": None} for r in rows]
  assert {k: v for k, v in json.load(open(path)).items() if k not in volatile} == before


def test_a_sweep_drops_each_groups_programs(idx_dir, tmp_path, monkeypatch):
  # A long sweep in one process must not keep every group's compiled programs: on CPU
  # each maps memory, and ~40 groups once exhausted Linux's 65,530 mappings.
  from bnlab.engine import calls  # pylint: disable=g-import-not-at-top
  base = tiny_base(idx_dir)
  base.train.num_epochs = 1
  jax.clear_caches()
  sweep.run_sweep(base, sweep.axis("model.norm", ["batch"]), str(tmp_path / "one"))
  one_model = calls.run_steps._cache_size()  # pylint: disable=protected-access
  clears = []
  real_clear = jax.clear_caches
  monkeypatch.setattr(jax, "clear_caches", lambda: (clears.append(1), real_clear()))
  sweep.run_sweep(base, sweep.axis("model.norm", ["none", "layer", "batch"]),
                  str(tmp_path / "sw"))
  assert len(clears) == 2  # before each model but the first
  assert calls.run_steps._cache_size() == one_model  # pylint: disable=protected-access
  # Runs of one model one after another keep their programs, and share them
  # across constant learning rates (one optimizer: optim.shared_optimizer).
  clears.clear()
  real_clear()
  sweep.run_sweep(base, sweep.axis("optimizer.learning_rate", [0.05]), str(tmp_path / "lr1"),
                  grouped=False)
  one_run = calls.run_steps._cache_size()  # pylint: disable=protected-access
  sweep.run_sweep(base, sweep.product(sweep.axis("optimizer.learning_rate", [0.1, 0.2]),
                                      sweep.seeds(2)), str(tmp_path / "lrs"), grouped=False)
  assert not clears
  assert calls.run_steps._cache_size() == one_run  # pylint: disable=protected-access


def test_rerun_skips_finished_members(grouped_sweep):
  base, members, wd, rows = grouped_sweep
  done = [r["name"] for r in rows if r["status"] != "failed"]
  stamps = {n: os.path.getmtime(os.path.join(wd, n, "summary.json")) for n in done}
  again = sweep.run_sweep(base, members, wd)
  assert {n: os.path.getmtime(os.path.join(wd, n, "summary.json")) for n in done} == stamps
  assert [r["status"] for r in again] == [r["status"] for r in rows]
  assert [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in rows]


def test_group_resumes_to_the_same_results(idx_dir, tmp_path):
  cfgs = [sweep.apply_overrides(tiny_base(idx_dir), o) for o in sweep.product(
      sweep.axis("optimizer.learning_rate", [0.05, 0.2]), sweep.seeds(1))]
  for c in cfgs:
    c.train.checkpoint_every_steps = 5
  names = ["a", "b"]
  full = tmp_path / "full"
  train.train_group(cfgs, [str(full / n) for n in names], str(full / "g"))
  part = tmp_path / "part"
  shutil.copytree(full, part)
  for n in names:  # interrupted at step 10: later checkpoints and the summaries gone
    os.remove(part / n / "summary.json")
    shutil.rmtree(part / n / "checkpoints" / "30")
  for step in (15, 20, 25, 30):
    shutil.rmtree(part / "g" / "checkpoints" / str(step))
  train.train_group(cfgs, [str(part / n) for n in names], str(part / "g"))
  for n in names:
    a, b = read_jsonl(full / n / "metrics.jsonl"), read_jsonl(part / n / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
      for key in ("train_loss", "test_loss", "test_accuracy"):
        assert x.get(key) == y.get(key)
    _, sa = final_state(str(full / n))
    _, sb = final_state(str(part / n))
    jax.tree.map(np.testing.assert_array_equal, sa, sb)


# -- command line ------------------------------------------------------------------

SWEEP_FILE = '''
from bnlab import config, sweep

def get_config():
  c = config.base_config()
  c.data.source = "idx"
  c.model.name = "seed1_mlp"
  c.model.norm = "none"
  c.train.batch_size = 32
  c.train.num_epochs = 1
  return c

def get_sweep():
  return sweep.product(sweep.axis("optimizer.learning_rate", [0.1, 0.3]), sweep.seeds(1))
'''


def test_cli(idx_dir, tmp_path):
  path = tmp_path / "tiny_sweep.py"
  path.write_text(SWEEP_FILE)
  wd = tmp_path / "sw"
  args = [sys.executable, "-m", "bnlab.sweep", f"--config={path}", f"--workdir={wd}",
          f"--config.data.dir={idx_dir}", "--config.train.eval_every_epochs=1"]
  p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr
  assert json.loads(p.stdout.strip().splitlines()[-1])["done"] == 2
  cfg = json.load(open(wd / "learning_rate=0.3,seed=0" / "config.json"))
  assert cfg["data"]["dir"] == idx_dir and cfg["optimizer"]["learning_rate"] == 0.3
  p = subprocess.run(args[:-1] + ["--config.train.nonsense=1"], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode != 0 and "nonsense" in p.stderr and "Traceback" not in p.stderr
