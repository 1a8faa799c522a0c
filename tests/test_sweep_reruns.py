"""Sweeps rerun after their config changed or run twice at once, member errors beside old
summaries, and sweep inputs that must end in one error line.
"""

import json
import os
import subprocess
import sys

import pytest

from bnlab import config as config_lib
from bnlab import sweep
from bnlab.sweep import results as sweep_results
from bnlab.rundir import locks as locks_lib
from bnlab.rundir import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _base():
  c = config_lib.base_config()
  c.model.name = "seed1_mlp"
  return c


def _finished_member(workdir, member):
  d = os.path.join(workdir, member.name)
  os.makedirs(d)
  with open(os.path.join(d, "config.json"), "w") as f:
    f.write(member.cfg.to_json_best_effort())
  with open(os.path.join(d, "summary.json"), "w") as f:
    json.dump({"final_step": 10, "test_accuracy": 0.5}, f)


def test_sweep_rerun_after_its_base_config_changed_is_refused(tmp_path):
  members = sweep.resolve_members(_base(), sweep.seeds(2))
  for m in members:
    _finished_member(str(tmp_path), m)
  sweep.check_members_config(members, str(tmp_path))  # unchanged: fine
  changed = _base()
  changed.train.batch_size = 64
  with pytest.raises(config_lib.ConfigError,
                     match=r"2 member\(s\).*seed=0 \(train.batch_size: 32 -> 64\).*new --workdir"):
    sweep.run_sweep(changed, sweep.seeds(2), str(tmp_path))


def test_member_error_wins_over_an_old_summary_and_a_corrupt_summary_is_a_failed_row(tmp_path):
  (m,) = sweep.resolve_members(_base(), sweep.seeds(1))
  _finished_member(str(tmp_path), m)
  row = sweep_results.result_row(m, str(tmp_path / m.name), "WorkDirError: in use")
  assert row["status"] == "failed" and row["error"] == "WorkDirError: in use"
  (tmp_path / m.name / "summary.json").write_text("{\"final_step\": ")
  row = sweep_results.result_row(m, str(tmp_path / m.name), None)
  assert row["status"] == "failed" and "summary.json is unreadable" in row["error"]


@pytest.mark.parametrize("bad, message", [
    ([{"seed": 1}, "seed=2"], r"sweep member 1 is str 'seed=2', not a dict"),
    ([{"data.dir": "a/b"}, {"data.dir": "a_b"}],
     r"members 0 and 1 both get the directory name 'dir=a_b'.*Variant"),
    ([{"seed": 1}, {"seed": 1}], r"member 1 .* same name as member 0: it repeats"),
    ([{"seed": 1, "optimizer.learning_rate": 0.1}, {"optimizer.learning_rate": 0.1, "seed": 1}],
     r"member 1 \(learning_rate=0.1,seed=1\) has the same config as member 0 "
     r"\(seed=1,learning_rate=0.1\): .* counted twice"),
    ([{"seed": 0}, {"model.norm": _base().model.norm}], r"member 1 .* same config as member 0"),
])
def test_bad_sweep_members_are_named(bad, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    sweep.resolve_members(_base(), bad)


def test_too_long_member_name_is_cut_and_stays_distinct():
  names = [sweep.member_name({"data.dir": "x" * 300 + str(i)}) for i in range(2)]
  assert all(len(n) <= sweep.MAX_NAME for n in names) and names[0] != names[1]


@pytest.mark.parametrize("workdir, message", [("", "work directory is empty"),
                                              ("FILE", "is a file, not a directory")])
def test_bad_sweep_workdir_is_one_error(tmp_path, workdir, message):
  if workdir == "FILE":
    workdir = str(tmp_path / "f")
    open(workdir, "w").write("x")
  with pytest.raises(workdir_lib.WorkDirError, match=message):
    sweep.run_sweep(_base(), sweep.seeds(1), workdir)


def test_sweep_cli_get_sweep_raising_is_one_error_line(tmp_path):
  path = tmp_path / "s.py"
  path.write_text("from bnlab import config\n"
                  "def get_config():\n  return config.base_config()\n"
                  "def get_sweep():\n  raise ValueError('no members today')\n")
  p = subprocess.run([sys.executable, "-m", "bnlab.sweep", f"--config={path}",
                      f"--workdir={tmp_path / 'wd'}"], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  assert len(errors) == 1 and "get_sweep() failed (ValueError: no members today)" in errors[0]
def test_second_sweep_on_one_directory_fails(tmp_path):
  lock = locks_lib.acquire_lock(str(tmp_path / ".sweep-lock"), str(tmp_path), "sweep directory")
  try:
    with pytest.raises(workdir_lib.WorkDirError, match="sweep directory .* is in use by process"):
      sweep.run_sweep(_base(), sweep.seeds(1), str(tmp_path))
  finally:
    locks_lib.release_lock(str(tmp_path / ".sweep-lock"), lock)


def test_only_keeps_the_failures_of_the_members_it_leaves_out(idx_dir, tmp_path):
  # A failed member's directory holds no summary: read again, its row would be "unfinished"
  # with no error.
  base = _base()
  base.data.source, base.data.dir = "idx", idx_dir
  members = [{"data.num_train": 5000}, {"data.num_train": 6000}]
  wd = str(tmp_path / "sw")
  first = sweep.run_sweep(base, members, wd)
  assert [r["status"] for r in first] == ["failed", "failed"]
  assert "config.data.num_train=5000" in first[0]["error"]
  rows = sweep.run_sweep(base, members, wd, only="num_train=6000")
  assert rows[0] == first[0]  # left out: kept as it was
  assert sweep.load_results(wd)[0] == first[0]
  assert rows[1]["status"] == "failed" and "config.data.num_train=6000" in rows[1]["error"]
