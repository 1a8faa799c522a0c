"""A run resumes bit-identical after faults: kills at random moments, corrupt or cut-off
checkpoints, damaged records, a full disk, a failed start; a sweep after a killed member."""

import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import pytest

from bnlab import sweep
from bnlab.engine import train
from bnlab.rundir import checkpoints as checkpoints_lib
from bnlab.rundir import workdir as workdir_lib
from run_files import damage_checkpoint_payload, files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import kill_soak  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  return kill_soak.make_data(str(tmp_path_factory.mktemp("idx")))


@pytest.fixture(scope="module")
def reference(idx_dir, tmp_path_factory):
  """The kill soak's run, uninterrupted and in-process."""
  wd = str(tmp_path_factory.mktemp("ref") / "run")
  train.train_and_evaluate(kill_soak.config(idx_dir), wd)
  return wd


def test_killed_three_times_resumes_bit_identical(idx_dir, reference, tmp_path):
  wd = str(tmp_path / "killed")
  rng = random.Random(0)
  # Short delays after training starts, so that kills land on fast and slow machines alike.
  delays = [(rng.uniform(0.05, 0.6), True) for _ in range(3)]
  result = kill_soak.attempt(wd, idx_dir, delays)
  assert result["kills"] >= 1, result
  assert kill_soak.differences(kill_soak.snapshot(reference), kill_soak.snapshot(wd)) == []
  assert kill_soak.leftovers(wd) == []


def test_killed_under_the_checkpoint_interval_resumes_bit_identical(idx_dir, tmp_path):
  # Checkpoints offered at every step, orbax's interval policy writing at most one per
  # 0.2 s (which ones depends on timing): a resume from any of them ends the same.
  overrides = {**kill_soak.OVERRIDES, "train.checkpoint_min_interval_secs": 0.2,
               "train.checkpoint_every_steps": 0, "train.eval_every_steps": 1}
  ref = str(tmp_path / "ref")
  train.train_and_evaluate(kill_soak.config(idx_dir, overrides), ref)
  wd = str(tmp_path / "killed")
  rng = random.Random(1)
  result = kill_soak.attempt(wd, idx_dir, [(rng.uniform(0.05, 0.6), True) for _ in range(3)],
                             overrides)
  assert result["kills"] >= 1, result
  assert kill_soak.differences(kill_soak.snapshot(ref), kill_soak.snapshot(wd)) == []
  assert kill_soak.leftovers(wd) == []


def test_same_config_and_seed_are_bit_identical(idx_dir, reference, tmp_path):
  wd = str(tmp_path / "again")
  summary = train.train_and_evaluate(kill_soak.config(idx_dir), wd)
  assert kill_soak.differences(kill_soak.snapshot(reference), kill_soak.snapshot(wd)) == []
  import flax, jaxlib, optax  # pylint: disable=g-import-not-at-top,g-multiple-import
  versions = summary["environment"]["versions"]
  assert versions["jax"] == jax.__version__
  assert versions["jaxlib"] == jaxlib.__version__
  assert versions["flax"] == flax.__version__
  assert versions["optax"] == optax.__version__


def _interrupted_copy(reference, wd, at):
  shutil.copytree(reference, wd)
  os.remove(os.path.join(wd, "summary.json"))
  ck = os.path.join(wd, "checkpoints")
  for name in os.listdir(ck):
    if int(name) > at:
      shutil.rmtree(os.path.join(ck, name))


def test_corrupt_newest_checkpoint_is_reported_and_skipped(idx_dir, reference, tmp_path,
                                                           caplog):
  wd = str(tmp_path / "corrupt")
  _interrupted_copy(reference, wd, at=20)  # keeps 19 and 20 (keep_checkpoints=2)
  newest = os.path.join(wd, "checkpoints", "20")
  damaged = 0
  for dirpath, _, files in os.walk(os.path.join(newest, "default")):
    for name in files:
      if name in ("manifest.ocdbt", "_METADATA"):
        with open(os.path.join(dirpath, name), "r+b") as f:
          f.truncate(os.path.getsize(f.name) // 2)
        damaged += 1
  assert damaged
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write('{"step": 21, "tor')  # a torn line past every checkpoint
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(kill_soak.config(idx_dir), wd)
  assert any(newest in r.getMessage() and "unreadable" in r.getMessage()
             for r in caplog.records)
  assert os.path.isdir(os.path.join(wd, "unreadable_checkpoints", "20"))
  assert kill_soak.differences(kill_soak.snapshot(reference), kill_soak.snapshot(wd)) == []


def test_damaged_checkpoint_payload_is_reported_and_skipped(idx_dir, reference, tmp_path,
                                                           caplog):
  """Bytes of an array flipped: orbax alone restores it; its checksums do not match."""
  wd = str(tmp_path / "damaged")
  _interrupted_copy(reference, wd, at=20)
  newest = os.path.join(wd, "checkpoints", "20")
  damaged = damage_checkpoint_payload(newest)
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(kill_soak.config(idx_dir), wd)
  assert any(newest in r.getMessage() and "unreadable" in r.getMessage()
             and damaged in r.getMessage() for r in caplog.records)
  assert os.path.isdir(os.path.join(wd, "unreadable_checkpoints", "20"))
  assert kill_soak.differences(kill_soak.snapshot(reference), kill_soak.snapshot(wd)) == []


def test_checkpoints_without_checksums_resume_exactly(idx_dir, reference, tmp_path, caplog):
  """A run interrupted before bnlab wrote checksums resumes (unverified, with a warning)."""
  wd = str(tmp_path / "unsealed")
  _interrupted_copy(reference, wd, at=19)  # keeps 19 only
  for step in os.listdir(os.path.join(wd, "checkpoints")):
    os.remove(os.path.join(wd, "checkpoints", step, checkpoints_lib.CHECKSUMS))
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(kill_soak.config(idx_dir), wd)
  assert any("unverified" in r.getMessage() for r in caplog.records)
  assert kill_soak.differences(kill_soak.snapshot(reference), kill_soak.snapshot(wd)) == []
  assert kill_soak.leftovers(wd) == []
  assert os.path.exists(os.path.join(wd, "checkpoints", "20", checkpoints_lib.CHECKSUMS))


def test_damaged_metrics_line_loses_no_record(idx_dir, reference, tmp_path, caplog):
  """A line in the middle of metrics.jsonl torn (another tool): every other record stays."""
  wd = str(tmp_path / "torn")
  _interrupted_copy(reference, wd, at=20)
  path = os.path.join(wd, "metrics.jsonl")
  lines = open(path).read().splitlines()
  assert len(lines) > 12
  lines[6] = lines[6][:10]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(kill_soak.config(idx_dir), wd)
  assert any(path in r.getMessage() and "line 7 " in r.getMessage() for r in caplog.records)
  got = kill_soak.snapshot(wd)["metrics"]
  ref = kill_soak.snapshot(reference)["metrics"]
  assert got == ref[:6] + ref[7:]  # all but the damaged one, which is kept aside
  (aside,) = [n for n in os.listdir(wd) if n.startswith("metrics.jsonl.damaged-")]
  assert open(os.path.join(wd, aside)).read() == lines[6] + "\n"


@pytest.mark.parametrize("keep", [0, 5])
def test_records_missing_before_the_checkpoint_stop_the_resume_and_name_the_fix(
    idx_dir, reference, tmp_path, keep):
  """metrics.jsonl removed (keep=0) or cut short: resuming would lose those records for good."""
  wd = str(tmp_path / "lost")
  _interrupted_copy(reference, wd, at=20)
  path = os.path.join(wd, "metrics.jsonl")
  lines = open(path).read().splitlines()
  with open(path, "w") as f:
    f.write("".join(line + "\n" for line in lines[:keep]))
  before = files(wd)
  with pytest.raises(workdir_lib.WorkDirError) as e:
    train.train_and_evaluate(kill_soak.config(idx_dir), wd)
  held = f"records up to step {json.loads(lines[keep - 1])['step']}" if keep else "no records"
  assert (f"{path} holds {held}, but the run resumes from its checkpoint at step 20" in
          str(e.value))
  assert f"move {os.path.join(wd, 'checkpoints')} aside to retrain from step 0" in str(e.value)
  assert files(wd) == before  # nothing written
  shutil.move(os.path.join(wd, "checkpoints"), str(tmp_path / "aside"))
  train.train_and_evaluate(kill_soak.config(idx_dir), wd)  # the fix it names
  assert kill_soak.differences(kill_soak.snapshot(reference), kill_soak.snapshot(wd)) == []


def test_checkpoint_cut_off_mid_write_is_discarded_and_run_resumes_exactly(
    idx_dir, reference, tmp_path):
  """The state a kill during a checkpoint write leaves: orbax's half-written temporary."""
  wd = str(tmp_path / "midwrite")
  _interrupted_copy(reference, wd, at=19)
  ck = os.path.join(wd, "checkpoints")
  partial = os.path.join(ck, "20.orbax-checkpoint-tmp-1234")
  shutil.copytree(os.path.join(reference, "checkpoints", "20"), partial)
  for dirpath, _, files in os.walk(partial):  # cut every file short, as a kill would
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 3)
  train.train_and_evaluate(kill_soak.config(idx_dir), wd)
  assert not os.path.exists(partial)
  assert kill_soak.differences(kill_soak.snapshot(reference), kill_soak.snapshot(wd)) == []
  assert kill_soak.leftovers(wd) == []


def test_disk_full_then_rerun_resumes_exactly(idx_dir, reference, tmp_path, monkeypatch):
  import errno
  import orbax.checkpoint as ocp
  wd = str(tmp_path / "full")
  _interrupted_copy(reference, wd, at=0)
  shutil.rmtree(os.path.join(wd, "checkpoints"))
  os.remove(os.path.join(wd, "metrics.jsonl"))
  real = ocp.CheckpointManager.save

  def save(self, step, *a, **k):
    if step == 12:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(self, step, *a, **k)
  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  with pytest.raises(workdir_lib.WorkDirError, match="free space"):
    train.train_and_evaluate(kill_soak.config(idx_dir), wd)
  monkeypatch.undo()
  assert not os.path.exists(os.path.join(wd, ".lock"))
  train.train_and_evaluate(kill_soak.config(idx_dir), wd)
  assert kill_soak.differences(kill_soak.snapshot(reference), kill_soak.snapshot(wd)) == []


def test_failed_start_then_the_fix_runs_in_the_same_directory(idx_dir, reference, tmp_path):
  """A start that fails before its first checkpoint (here: no data) costs nothing."""
  wd = str(tmp_path / "failed_start")
  with pytest.raises(Exception, match="does not exist"):
    train.train_and_evaluate(kill_soak.config(str(tmp_path / "no_such_dir")), wd)
  train.train_and_evaluate(kill_soak.config(idx_dir), wd)
  assert kill_soak.differences(kill_soak.snapshot(reference), kill_soak.snapshot(wd)) == []
  assert kill_soak.leftovers(wd) == []


# -- one writer per work directory ------------------------------------------------


# -- sweeps survive a killed member -------------------------------------------------

SWEEP_FILE = '''
from bnlab import config, sweep

def get_config():
  c = config.base_config()
  c.data.source = "idx"
  c.model.name = "seed1_mlp"
  c.model.norm = "batch"
  c.model.bn_position = "before"
  c.train.batch_size = 32
  c.train.num_epochs = 2
  c.train.checkpoint_every_steps = 2
  c.train.log_every_steps = 2
  return c

def get_sweep():
  return sweep.axis("optimizer.learning_rate", [0.1, 0.05])
'''


def test_sweep_killed_mid_member_reruns_only_what_is_missing(idx_dir, tmp_path):
  path = tmp_path / "sweep_file.py"
  path.write_text(SWEEP_FILE)
  wd = tmp_path / "sw"
  args = [sys.executable, "-m", "bnlab.sweep", f"--config={path}", f"--workdir={wd}",
          f"--config.data.dir={idx_dir}", "--nogrouped"]
  first, second = wd / "learning_rate=0.1", wd / "learning_rate=0.05"
  p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 240
  while p.poll() is None and not (second / "metrics.jsonl").exists():
    assert time.monotonic() < deadline
    time.sleep(0.01)
  time.sleep(0.3)
  p.send_signal(signal.SIGKILL)
  p.wait()
  assert (first / "summary.json").exists() and not (second / "summary.json").exists()
  done_stamp = os.path.getmtime(first / "summary.json")
  q = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert q.returncode == 0, q.stderr
  assert json.loads(q.stdout.strip().splitlines()[-1])["done"] == 2
  assert os.path.getmtime(first / "summary.json") == done_stamp  # not rerun
  # The killed member ends as its uninterrupted solo run.
  module = sweep.load_config_file(str(path))
  base = module.get_config()
  base.data.dir = idx_dir
  cfg = sweep.apply_overrides(base, {"optimizer.learning_rate": 0.05})
  solo = str(tmp_path / "solo")
  train.train_and_evaluate(cfg, solo)
  assert kill_soak.differences(kill_soak.snapshot(solo), kill_soak.snapshot(str(second))) == []
  assert kill_soak.leftovers(str(second)) == []
