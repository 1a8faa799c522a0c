"""The work directory under damage: torn metrics, symbolic links, damaged checkpoints,
non-finite numbers, a failed start, a full disk. Each test opens a bnlab WorkDir
directly (no training), so each takes about a second.
"""

import glob
import json
import logging
import math
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from bnlab import config as config_lib
from bnlab import sweep
from bnlab.rundir import workdir as workdir_lib
from run_files import damage_checkpoint_payload, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**train):
  c = config_lib.base_config()
  c.train.checkpoint_min_interval_secs = 0  # every checkpoint offered is written
  for key, value in train.items():
    c.train[key] = value
  return c


def _open(path, cfg=None):
  return workdir_lib.WorkDir(str(path), cfg or _cfg())


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _strict(text):
  """json.loads that refuses NaN/Infinity (what other JSON readers do)."""
  def refuse(name):
    raise ValueError(f"not JSON: {name}")
  return json.loads(text, parse_constant=refuse)


# -- metrics.jsonl: no record dropped silently ----------------------------------------

def _metrics_lines(n):
  return [json.dumps({"step": i, "train_loss": 1.0 / i}) for i in range(1, n + 1)]


def test_damaged_middle_metrics_line_keeps_every_record(tmp_path, caplog):
  lines = _metrics_lines(31)
  lines[7] = lines[7][:13]  # line 8 torn, e.g. by another tool writing to the file
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  with caplog.at_level(logging.WARNING):
    wd = _open(tmp_path)
  try:
    assert [r["step"] for r in wd.read_metrics()] == [i for i in range(1, 32) if i != 8]
    wd.truncate_metrics_after(1000)  # what a resume past every record does
  finally:
    wd.close()
  assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 30
  aside = glob.glob(str(tmp_path / "metrics.jsonl.damaged-*"))
  assert len(aside) == 1 and open(aside[0]).read() == lines[7] + "\n"
  assert any(str(tmp_path / "metrics.jsonl") in m and "line 8 " in m and "damaged" in m
             and aside[0] in m for m in _warnings(caplog))


def test_torn_last_metrics_line_is_dropped_with_a_warning_and_kept_aside(tmp_path, caplog):
  lines = _metrics_lines(5)
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "tra')
  with caplog.at_level(logging.WARNING):
    wd = _open(tmp_path)
  wd.close()
  assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines) + "\n"
  aside = glob.glob(str(tmp_path / "metrics.jsonl.damaged-*"))
  assert len(aside) == 1 and open(aside[0]).read() == '{"step": 6, "tra\n'
  assert any("line 6 " in m and "cut off by a kill" in m for m in _warnings(caplog))


def test_foreign_and_undecodable_lines_are_kept_aside_too(tmp_path):
  lines = [ln.encode() for ln in _metrics_lines(4)]
  lines[1:1] = [b"[1, 2]", b'{"step": "3"}', b"\xff\xfe{"]
  (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  wd = _open(tmp_path)
  try:
    assert [r["step"] for r in wd.read_metrics()] == [1, 2, 3, 4]
  finally:
    wd.close()
  (aside,) = glob.glob(str(tmp_path / "metrics.jsonl.damaged-*"))
  assert open(aside, "rb").read() == b"[1, 2]\n{\"step\": \"3\"}\n\xff\xfe{\n"


def test_intact_metrics_are_not_rewritten(tmp_path):
  text = "\n".join(_metrics_lines(3)) + "\n"
  (tmp_path / "metrics.jsonl").write_text(text)
  before = os.stat(tmp_path / "metrics.jsonl").st_ino
  _open(tmp_path).close()
  assert os.stat(tmp_path / "metrics.jsonl").st_ino == before
  assert not glob.glob(str(tmp_path / "metrics.jsonl.*"))


# -- symbolic links: bnlab never writes through one ---------------------------------------

LINKED = [".lock", "config.json", "metrics.jsonl", "summary.json", "checkpoints",
          "tensorboard", "unreadable_checkpoints"]


@pytest.mark.parametrize("name", LINKED)
def test_link_where_a_bnlab_file_belongs_is_refused(tmp_path, name):
  outside = tmp_path / "outside"
  outside.mkdir()
  target = outside / "precious"
  if name in ("checkpoints", "tensorboard", "unreadable_checkpoints"):
    target.mkdir()
    (target / "keep").write_text("mine")
  else:
    target.write_text("mine")
  wd = tmp_path / "wd"
  wd.mkdir()
  os.symlink(target, wd / name)
  with pytest.raises(workdir_lib.WorkDirError) as e:
    _open(wd)
  message = str(e.value)
  assert str(wd / name) in message and "symbolic link" in message and "remove" in message
  assert "\n" not in message
  if target.is_dir():
    assert os.listdir(target) == ["keep"] and (target / "keep").read_text() == "mine"
  else:
    assert target.read_text() == "mine"
  assert os.path.islink(wd / name)  # the user's link is left for them to remove
  assert name == ".lock" or not os.path.lexists(wd / ".lock")


def test_link_inside_checkpoints_is_refused(tmp_path):
  (tmp_path / "elsewhere").mkdir()
  wd = tmp_path / "wd"
  (wd / "checkpoints").mkdir(parents=True)
  os.symlink(tmp_path / "elsewhere", wd / "checkpoints" / "7")
  with pytest.raises(workdir_lib.WorkDirError, match="checkpoints/7 is a symbolic link"):
    _open(wd)


@pytest.mark.parametrize("name", ["metrics.jsonl", "summary.json"])
def test_link_placed_while_the_run_is_open_is_not_written_through(tmp_path, name):
  target = tmp_path / "precious"
  target.write_text("mine")
  wd = _open(tmp_path / "wd")
  try:
    os.symlink(target, tmp_path / "wd" / name)
    with pytest.raises(workdir_lib.WorkDirError, match=f"{name} is a symbolic link.*remove"):
      if name == "metrics.jsonl":
        wd.write_metrics({"step": 1, "train_loss": 0.5})
      else:
        wd.write_summary({"final_step": 1})
    if name == "metrics.jsonl":
      with pytest.raises(workdir_lib.WorkDirError, match="symbolic link"):
        wd.truncate_metrics_after(0)
  finally:
    wd.close()
  assert target.read_text() == "mine"


def test_write_probe_does_not_follow_a_link(tmp_path):
  """A link named as this process's write probe (a pid reused) is removed, not written."""
  target = tmp_path / "precious"
  target.write_text("mine")
  wd = tmp_path / "wd"
  wd.mkdir()
  os.symlink(target, wd / f".write-probe-{os.getpid()}")
  _open(wd).close()
  assert target.read_text() == "mine"
  assert not glob.glob(str(wd / ".write-probe-*"))


# -- checkpoints: verified before they are restored -------------------------------------

def _tree(value):
  return {"w": np.full(2000, value, np.float32), "b": np.arange(7, dtype=np.int32) * value}


def _saved(path, steps):
  wd = _open(path, _cfg(keep_checkpoints=10))
  try:
    for step in steps:
      wd.save(step, _tree(float(step)))
    wd.wait()
  finally:
    wd.close()


def _restore(path, caplog):
  """What a resume restores from `path` (its warnings into `caplog`)."""
  wd = _open(path, _cfg(keep_checkpoints=10))
  try:
    with caplog.at_level(logging.WARNING):
      return wd.restore_latest(_tree(0.0))
  finally:
    wd.close()


def test_checkpoints_carry_checksums_of_every_file(tmp_path):
  _saved(tmp_path, [1, 2])
  for step in (1, 2):
    step_dir = tmp_path / "checkpoints" / str(step)
    manifest = _strict((step_dir / workdir_lib.CHECKSUMS).read_text())
    assert manifest["step"] == step and manifest["files"]
    assert any("/d/" in rel for rel in manifest["files"])
    assert workdir_lib._verify_checkpoint(str(step_dir))  # pylint: disable=protected-access


def test_ctrl_c_during_a_checkpoint_write_stops_just_after_it(tmp_path, monkeypatch):
  # Interrupted midway, orbax's save threads waited on each other for ~300 s before exit.
  real = workdir_lib.ocp.CheckpointManager.save

  def save_interrupted(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the write
    return real(self, *args, **kwargs)
  monkeypatch.setattr(workdir_lib.ocp.CheckpointManager, "save", save_interrupted)
  wd = _open(tmp_path, _cfg(keep_checkpoints=10))
  try:
    with pytest.raises(KeyboardInterrupt):
      wd.save(1, _tree(1.0))
  finally:
    wd.close()
  step_dir = str(tmp_path / "checkpoints" / "1")
  assert workdir_lib._verify_checkpoint(step_dir)  # pylint: disable=protected-access
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_damaged_checkpoint_payload_is_unreadable_and_an_older_one_is_used(tmp_path, caplog):
  _saved(tmp_path, [1, 2])
  newest = str(tmp_path / "checkpoints" / "2")
  damaged_file = damage_checkpoint_payload(newest)
  restored = _restore(tmp_path, caplog)
  np.testing.assert_array_equal(restored["w"], _tree(1.0)["w"])  # step 1's values
  assert any(newest in m and "unreadable" in m and damaged_file in m
             for m in _warnings(caplog))
  assert os.path.isdir(tmp_path / "unreadable_checkpoints" / "2")


def test_only_checkpoint_damaged_is_an_error_naming_step_and_file(tmp_path, caplog):
  _saved(tmp_path, [3])
  damaged_file = damage_checkpoint_payload(str(tmp_path / "checkpoints" / "3"))
  with pytest.raises(workdir_lib.WorkDirError) as e:
    _restore(tmp_path, caplog)
  assert "step 3" in str(e.value) and damaged_file in str(e.value)
  assert os.path.isdir(tmp_path / "checkpoints" / "3")  # touched nothing


@pytest.mark.parametrize("damage", ["unreadable", "extra_file", "missing_file"])
def test_unverifiable_checkpoint_is_unreadable(tmp_path, damage, caplog):
  _saved(tmp_path, [1, 2])
  step_dir = tmp_path / "checkpoints" / "2"
  if damage == "unreadable":
    (step_dir / workdir_lib.CHECKSUMS).write_text('{"files": ')
  elif damage == "extra_file":
    (step_dir / "default" / "stray").write_text("x")
  else:
    manifest = json.loads((step_dir / workdir_lib.CHECKSUMS).read_text())
    os.remove(step_dir / sorted(manifest["files"])[-1])
  restored = _restore(tmp_path, caplog)
  np.testing.assert_array_equal(restored["b"], _tree(1.0)["b"])
  assert any(str(step_dir) in m and "unreadable" in m for m in _warnings(caplog))


def test_checkpoint_without_checksums_restores_with_a_warning(tmp_path, caplog):
  """As bnlab wrote them before checksums: restored, but said to be unverified."""
  _saved(tmp_path, [1, 2])
  for path in glob.glob(str(tmp_path / "checkpoints" / "*" / workdir_lib.CHECKSUMS)):
    os.remove(path)
  restored = _restore(tmp_path, caplog)
  np.testing.assert_array_equal(restored["w"], _tree(2.0)["w"])
  assert any(str(tmp_path / "checkpoints" / "2") in m and "unverified" in m
             for m in _warnings(caplog))
  assert not os.path.exists(tmp_path / "unreadable_checkpoints")


def test_checksum_temporary_left_by_a_kill_is_removed(tmp_path, caplog):
  _saved(tmp_path, [1])
  stray = tmp_path / "checkpoints" / "1" / ".tmp-abc123"
  stray.write_text("{")
  assert _restore(tmp_path, caplog) is not None
  assert not stray.exists()


# -- non-finite numbers: strict JSON ------------------------------------------------------

def test_nonfinite_numbers_are_written_as_null_and_named(tmp_path):
  wd = _open(tmp_path)
  try:
    wd.write_metrics({"step": 2, "train_loss": math.nan, "test_accuracy": 0.5,
                      "layer/percentiles": [[0.0, math.inf], [-math.inf, 1.0]]})
    wd.write_metrics({"step": 4, "train_loss": math.inf, "test_accuracy": 0.98})
    wd.write_summary({"train_loss_before_divergence": -math.inf, "final_step": 4})
    records = wd.read_metrics()
    summary = wd.read_summary()
  finally:
    wd.close()
  first = _strict((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
  assert first["train_loss"] is None and first["nonfinite"]["train_loss"] == "NaN"
  assert first["layer/percentiles"] == [[0.0, None], [None, 1.0]]
  saved = _strict((tmp_path / "summary.json").read_text())
  assert saved["train_loss_before_divergence"] is None
  assert saved["nonfinite"] == {"train_loss_before_divergence": "-Infinity"}
  # bnlab's readers give the numbers back.
  assert math.isnan(records[0]["train_loss"]) and records[1]["train_loss"] == math.inf
  assert records[0]["layer/percentiles"] == [[0.0, math.inf], [-math.inf, 1.0]]
  assert "nonfinite" not in records[0]
  assert summary == {"train_loss_before_divergence": -math.inf, "final_step": 4}
  # The other readers of these files cope.
  swept = sweep._read_jsonl(str(tmp_path / "metrics.jsonl"))  # pylint: disable=protected-access
  assert sweep.steps_to_accuracy(swept) == 4 and math.isnan(swept[0]["train_loss"])
  assert math.isnan(read_jsonl(tmp_path / "metrics.jsonl")[0]["train_loss"])


def test_old_bare_nan_records_still_read(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": NaN}\n')
  wd = _open(tmp_path)
  try:
    (record,) = wd.read_metrics()
    assert math.isnan(record["train_loss"])
    wd.truncate_metrics_after(5)
  finally:
    wd.close()
  assert _strict((tmp_path / "metrics.jsonl").read_text())["nonfinite"] == {
      "train_loss": "NaN"}


# -- a failed start costs nothing ------------------------------------------------------

def test_directory_without_a_checkpoint_accepts_a_new_config(tmp_path, caplog):
  """A start that failed after the directory opened (bad batch size, data, device...)."""
  _open(tmp_path, _cfg(batch_size=7)).close()
  with caplog.at_level(logging.WARNING):
    _open(tmp_path, _cfg(batch_size=8)).close()
  assert json.loads((tmp_path / "config.json").read_text())["train"]["batch_size"] == 8
  assert any("no checkpoint" in m and "batch_size" in m for m in _warnings(caplog))
  assert not glob.glob(str(tmp_path / "*.replaced-*"))  # nothing recorded: nothing kept


def test_new_config_keeps_an_earlier_attempts_records_aside(tmp_path):
  wd = _open(tmp_path, _cfg(batch_size=7))
  wd.write_metrics({"step": 0, "test_loss": 2.3})
  wd.close()
  _open(tmp_path, _cfg(batch_size=8)).close()
  (old_config,) = glob.glob(str(tmp_path / "config.json.replaced-*"))
  (old_metrics,) = glob.glob(str(tmp_path / "metrics.jsonl.replaced-*"))
  assert json.loads(open(old_config).read())["train"]["batch_size"] == 7
  assert read_jsonl(old_metrics) == [{"step": 0, "test_loss": 2.3}]
  assert not (tmp_path / "metrics.jsonl").exists()
  assert json.loads((tmp_path / "config.json").read_text())["train"]["batch_size"] == 8


def test_unreadable_config_without_a_checkpoint_is_replaced(tmp_path):
  (tmp_path / "config.json").write_text('{"seed": ')
  _open(tmp_path).close()
  assert json.loads((tmp_path / "config.json").read_text())["seed"] == _cfg().seed


def test_directory_with_a_checkpoint_still_refuses_another_config(tmp_path):
  _saved(tmp_path, [1])
  with pytest.raises(config_lib.ConfigError, match="holds a run with a different config"):
    _open(tmp_path, _cfg(keep_checkpoints=10, batch_size=8))
  assert json.loads((tmp_path / "config.json").read_text())["train"]["keep_checkpoints"] == 10


def test_finished_directory_still_refuses_another_config(tmp_path):
  wd = _open(tmp_path, _cfg(batch_size=7))
  wd.write_summary({"final_step": 0})
  wd.close()
  with pytest.raises(config_lib.ConfigError, match="holds a run with a different config"):
    _open(tmp_path, _cfg(batch_size=8))


# -- a full disk leaves no write probe ----------------------------------------------------

FULL_DISK = """
import os, resource, signal, sys
from bnlab import config
from bnlab.rundir import workdir
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
  workdir.WorkDir(sys.argv[1], config.base_config())
except workdir.WorkDirError as e:
  print("error:", e)
"""


def test_failed_write_probe_is_removed(tmp_path):
  wd = tmp_path / "wd"
  p = subprocess.run([sys.executable, "-c", FULL_DISK, str(wd)], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert "is not writable" in p.stdout, p.stdout + p.stderr
  assert os.listdir(wd) == []
