"""The sweep command line: overrides that win over members', --dry_run, --only, --helpshort."""

import json
import os
import subprocess
import sys

import pytest

from bnlab import config as config_lib
from bnlab import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Like the shipped sweeps, the members set train.num_steps themselves.
SWEEP_FILE = '''
from bnlab import config, sweep

def get_config():
  c = config.base_config()
  c.data.source = "idx"
  c.model.name = "seed1_mlp"
  c.model.norm = "none"
  c.train.batch_size = 32
  c.train.log_every_steps = 5
  return c

def get_sweep():
  return sweep.product(
      sweep.axis("optimizer.learning_rate", [0.1, 0.3]),
      [{"train.num_steps": 20}],
      sweep.seeds(2))
'''


@pytest.fixture
def sweep_file(tmp_path):
  path = tmp_path / "tiny_sweep.py"
  path.write_text(SWEEP_FILE)
  return str(path)


def run_cli(*args):
  return subprocess.run([sys.executable, "-m", "bnlab.sweep", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def base():
  c = config_lib.base_config()
  c.model.name, c.train.num_steps = "seed1_mlp", 50
  return c


def test_command_line_overrides_win_over_the_members():
  members = [{"train.num_steps": 20, "seed": 0},
             {"v": sweep.Variant("long", {"train.num_steps": 40}), "seed": 1}]
  out = sweep.resolve_members(base(), members, {"train.num_steps": 7})
  assert [m.cfg.train.num_steps for m in out] == [7, 7]
  assert [m.name for m in out] == ["num_steps=20,seed=0", "long,seed=1"]  # names unchanged
  assert [m.cfg.seed for m in out] == [0, 1]
  plain = sweep.resolve_members(base(), members)
  assert [m.cfg.train.num_steps for m in plain] == [20, 40]
  with pytest.raises(config_lib.ConfigError, match="command line: 'train.nonsense'"):
    sweep.resolve_members(base(), members, {"train.nonsense": 1})


def test_only_selects_by_substring_or_glob():
  members = sweep.resolve_members(
      base(), sweep.product(sweep.axis("optimizer.learning_rate", [0.1, 0.3]), sweep.seeds(2)))
  names = lambda ms: [m.name for m in ms]  # noqa: E731
  assert names(sweep.select(members, None)) == names(members)
  assert names(sweep.select(members, "seed=1")) == ["learning_rate=0.1,seed=1",
                                                    "learning_rate=0.3,seed=1"]
  assert names(sweep.select(members, "*0.3*")) == ["learning_rate=0.3,seed=0",
                                                   "learning_rate=0.3,seed=1"]
  assert names(sweep.select(members, "learning_rate=0.[1]*seed=0")) == [
      "learning_rate=0.1,seed=0"]
  with pytest.raises(config_lib.ConfigError, match="--only='seed=9' matches none of the 4"):
    sweep.select(members, "seed=9")


def test_cli_overrides_apply_last_and_only_runs_the_selection(idx_dir, tmp_path, sweep_file):
  wd = tmp_path / "sw"
  p = run_cli(f"--config={sweep_file}", f"--workdir={wd}", f"--config.data.dir={idx_dir}",
              "--config.train.num_steps=5", "--only=seed=1")
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert out["members"] == 4 and out["done"] == 2 and out["unfinished"] == 2
  assert "train.num_steps" in p.stderr and "over the sweep's own values" in p.stderr
  for lr in ("0.1", "0.3"):
    name = f"learning_rate={lr},num_steps=20,seed=1"
    cfg = json.load(open(wd / name / "config.json"))
    assert cfg["train"]["num_steps"] == 5 and cfg["data"]["dir"] == idx_dir
    assert json.load(open(wd / name / "summary.json"))["final_step"] == 5
    assert not (wd / name.replace("seed=1", "seed=0")).exists()
  rows = sweep.load_results(str(wd))
  assert {r["name"]: r["status"] for r in rows} == {
      "learning_rate=0.1,num_steps=20,seed=0": "unfinished",
      "learning_rate=0.1,num_steps=20,seed=1": "done",
      "learning_rate=0.3,num_steps=20,seed=0": "unfinished",
      "learning_rate=0.3,num_steps=20,seed=1": "done"}


def test_dry_run_lists_members_and_groups_and_trains_nothing(idx_dir, tmp_path, sweep_file):
  wd = tmp_path / "sw"
  p = run_cli(f"--config={sweep_file}", f"--workdir={wd}", f"--config.data.dir={idx_dir}",
              "--dry_run", "--only=*seed=0")
  assert p.returncode == 0, p.stderr[-3000:]
  lines = p.stdout.strip().splitlines()
  assert lines[0].split() == ["group", "member", "status"]
  assert lines[1].split() == ["0", "learning_rate=0.1,num_steps=20,seed=0", "to", "train"]
  assert lines[2].split() == ["0", "learning_rate=0.3,num_steps=20,seed=0", "to", "train"]
  assert len(lines) == 4  # the selected members only, then the JSON line
  listing = json.loads(lines[-1])
  assert listing["members"] == 4 and listing["selected"] == 2 and listing["to_train"] == 2
  assert listing["groups"] == 1  # seeds and constant learning rates train as one group
  assert listing["list"][1] == {
      "name": "learning_rate=0.3,num_steps=20,seed=0", "group": 0, "status": "to train",
      "overrides": {"optimizer.learning_rate": 0.3, "train.num_steps": 20, "seed": 0}}
  assert not wd.exists()
  p = run_cli(f"--config={sweep_file}", f"--workdir={wd}", f"--config.data.dir={idx_dir}",
              "--dry_run", "--max_group_size=3")
  assert p.returncode == 0, p.stderr[-3000:]
  listing = json.loads(p.stdout.strip().splitlines()[-1])
  assert listing["groups"] == 2 and [e["group"] for e in listing["list"]] == [0, 0, 1, 1]
  p = run_cli(f"--config={sweep_file}", f"--workdir={wd}", f"--config.data.dir={idx_dir}",
              "--dry_run", "--only=lr=9")
  assert p.returncode == 2 and p.stderr.startswith("error: --only='lr=9' matches none")
  assert p.stderr.count("\n") == 1


def test_helpshort_lists_the_sweep_flags():
  p = run_cli("--helpshort")
  for flag in ("--config", "--workdir", "--[no]grouped", "--max_group_size", "--[no]dry_run",
               "--only"):
    assert flag in p.stdout, p.stdout
  assert "--config_lock" not in p.stdout  # only the sweep's own, not every module's


def test_dry_run_reports_the_status_the_sweep_records(idx_dir, tmp_path):
  # A finished member whose records were cut short: the sweep reports it failed (its
  # records are not its history); the dry run said "done".
  c = base()
  c.data.source, c.data.dir = "idx", idx_dir
  c.model.norm, c.train.batch_size, c.train.num_steps = "none", 32, 10
  c.train.log_every_steps = 5
  overrides = sweep.seeds(2)
  wd = str(tmp_path / "sw")
  rows = sweep.run_sweep(c, overrides, wd)
  path = os.path.join(wd, rows[0]["name"], "metrics.jsonl")
  first = open(path).readline()
  open(path, "w").write(first)
  rows = sweep.run_sweep(c, overrides, wd)
  assert [r["status"] for r in rows] == ["failed", "done"]
  _, listing = sweep.dry_run_listing(*sweep.plan(c, overrides), wd)
  assert [e["status"] for e in listing["list"]] == ["failed", "done"]
  assert listing["list"][0]["error"] == rows[0]["error"] and "ends at step" in rows[0]["error"]
  assert listing["to_train"] == 0 and listing["failed"] == 1
