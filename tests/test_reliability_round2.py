"""Reliability, round two: what a resume must notice (a missing config.json, other data),
sweeps rerun after their config changed or run twice at once, sweep inputs that used to
end in a traceback, and Ctrl-C. Most tests open a WorkDir or plan a sweep without training.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bnlab import config as config_lib
from bnlab import data as data_lib
from bnlab.engine import loop as loop_lib
from bnlab import main as main_lib
from bnlab import sweep
from bnlab.rundir import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_A = {"source": "idx:/d", "num_train": 320, "num_test": 100, "sha256": "a" * 64}
DATA_B = dict(DATA_A, sha256="b" * 64)


def _cfg(lr=0.01):
  c = config_lib.base_config()
  c.optimizer.learning_rate = lr
  c.train.keep_checkpoints = 5
  c.train.checkpoint_min_interval_secs = 0  # a checkpoint at every evaluation
  return c


def _run_with_checkpoint(path, cfg=None, data=DATA_A):
  """A work directory as an interrupted run leaves it: config, data, one sealed checkpoint."""
  wd = workdir_lib.WorkDir(str(path), cfg or _cfg())
  try:
    wd.check_data(data)
    wd.save(2, {"w": np.arange(5, dtype=np.float32)})
    wd.wait()
  finally:
    wd.close()


# -- a resume notices a missing config.json and other data -------------------------------

def test_checkpoint_carries_the_config_and_the_data_identity(tmp_path):
  _run_with_checkpoint(tmp_path)
  manifest = json.load(open(tmp_path / "checkpoints" / "2" / workdir_lib.CHECKSUMS))
  assert manifest["config"]["optimizer"]["learning_rate"] == 0.01
  assert manifest["data"] == DATA_A
  assert json.load(open(tmp_path / "data.json")) == DATA_A


def test_missing_config_json_is_compared_with_the_checkpoints_copy(tmp_path):
  _run_with_checkpoint(tmp_path)
  os.remove(tmp_path / "config.json")
  with pytest.raises(config_lib.ConfigError, match=r"learning_rate: 0.01 -> 0.5.*missing"):
    workdir_lib.WorkDir(str(tmp_path), _cfg(lr=0.5))
  assert not os.path.exists(tmp_path / "config.json")
  workdir_lib.WorkDir(str(tmp_path), _cfg()).close()  # the same config resumes ...
  restored = json.load(open(tmp_path / "config.json"))  # ... and config.json is back
  assert restored["optimizer"]["learning_rate"] == 0.01


def test_missing_config_json_without_any_copy_is_refused(tmp_path):
  _run_with_checkpoint(tmp_path)
  os.remove(tmp_path / "config.json")
  path = tmp_path / "checkpoints" / "2" / workdir_lib.CHECKSUMS
  manifest = json.load(open(path))
  del manifest["config"]  # as an older bnlab wrote it
  path.write_text(json.dumps(manifest))
  with pytest.raises(workdir_lib.WorkDirError, match="config.json is missing.*new --workdir"):
    workdir_lib.WorkDir(str(tmp_path), _cfg())


@pytest.mark.parametrize("without_data_json", [False, True])
def test_resume_on_other_data_is_refused(tmp_path, without_data_json):
  _run_with_checkpoint(tmp_path)
  if without_data_json:
    os.remove(tmp_path / "data.json")  # the checkpoint's copy still counts
  wd = workdir_lib.WorkDir(str(tmp_path), _cfg())
  try:
    with pytest.raises(data_lib.DataError, match=r"sha256: 'a+' -> 'b+'.*new --workdir"):
      wd.check_data(DATA_B)
    wd.check_data(DATA_A)
  finally:
    wd.close()


def test_directory_without_a_checkpoint_accepts_other_data(tmp_path):
  wd = workdir_lib.WorkDir(str(tmp_path), _cfg())
  wd.check_data(DATA_A)
  wd.close()
  wd = workdir_lib.WorkDir(str(tmp_path), _cfg())
  wd.check_data(DATA_B)
  wd.close()
  assert json.load(open(tmp_path / "data.json")) == DATA_B


# -- sweeps ---------------------------------------------------------------------------

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


def test_second_sweep_on_one_directory_fails(tmp_path):
  lock = workdir_lib.acquire_lock(str(tmp_path / ".sweep-lock"), str(tmp_path), "sweep directory")
  try:
    with pytest.raises(workdir_lib.WorkDirError, match="sweep directory .* is in use by process"):
      sweep.run_sweep(_base(), sweep.seeds(1), str(tmp_path))
  finally:
    workdir_lib.release_lock(str(tmp_path / ".sweep-lock"), lock)


def test_member_error_wins_over_an_old_summary_and_a_corrupt_summary_is_a_failed_row(tmp_path):
  (m,) = sweep.resolve_members(_base(), sweep.seeds(1))
  _finished_member(str(tmp_path), m)
  row = sweep._result_row(m, str(tmp_path / m.name), "WorkDirError: in use")  # pylint: disable=protected-access
  assert row["status"] == "failed" and row["error"] == "WorkDirError: in use"
  (tmp_path / m.name / "summary.json").write_text("{\"final_step\": ")
  row = sweep._result_row(m, str(tmp_path / m.name), None)  # pylint: disable=protected-access
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


# -- Ctrl-C ---------------------------------------------------------------------------

def test_ctrl_c_during_training_names_the_step(tmp_path, monkeypatch, capsys):
  import tiny_mnist
  from bnlab.engine import train
  idx = str(tmp_path / "idx")
  tiny_mnist.write_mnist_dir(idx, num_train=96, num_test=32)
  c = config_lib.base_config()
  c.data.source, c.data.dir = "idx", idx
  c.model.name = "seed1_mlp"
  c.train.num_epochs, c.train.checkpoint_every_steps = 1, 1
  c.train.eval_at_start, c.train.final_train_eval = False, False

  def interrupt(self, step, target, **_):
    raise KeyboardInterrupt

  monkeypatch.setattr(workdir_lib.WorkDir, "save", interrupt)
  with pytest.raises(loop_lib.Interrupted, match="interrupted at step 1; rerun"):
    train.train_and_evaluate(c, str(tmp_path / "wd"))
  with pytest.raises(SystemExit) as exit_info:
    main_lib.execute(c, str(tmp_path / "wd2"))
  err = capsys.readouterr().err
  assert exit_info.value.code == 130
  assert [line for line in err.splitlines() if line.startswith("error: ")] == [
      "error: interrupted at step 1; rerun the same command to resume from the last checkpoint"]


@pytest.mark.parametrize("sweep_body, workdir, message", [
    ("raise ValueError('no members today')", "wd",
     "failed to load (ValueError: no members today); fix the file"),
    ("return [{}]", "FILE", "is a file, not a directory; choose another --workdir"),
])
def test_study_cli_bad_file_or_workdir_is_one_error_line(tmp_path, sweep_body, workdir, message):
  path = tmp_path / "study_cfg.py"
  path.write_text("from bnlab import study\n\ndef get_config(arg=None):\n"
                  f"  return study.base_config()\n\ndef get_sweep(arg=None):\n  {sweep_body}\n")
  workdir = tmp_path / workdir
  if workdir.name == "FILE":
    workdir.write_text("x")
  p = subprocess.run([sys.executable, "-m", "bnlab.study", f"--config={path}",
                      f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  assert len(errors) == 1 and message in errors[0], p.stderr
