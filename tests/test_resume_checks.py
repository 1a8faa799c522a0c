"""What a resume must notice before anything is written: a missing or changed config.json,
other data, and which changes a directory without a checkpoint accepts.
"""

import glob
import json
import logging
import os

import numpy as np
import pytest

from bnlab import config as config_lib
from bnlab import data as data_lib
from bnlab.rundir import checkpoints as checkpoints_lib
from bnlab.rundir import workdir as workdir_lib
from run_files import read_jsonl
from rundirs import config as _cfg, open_workdir as _open, saved as _saved, warnings_of as _warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


DATA_A = {"source": "idx:/d", "num_train": 320, "num_test": 100, "sha256": "a" * 64}


DATA_B = dict(DATA_A, sha256="b" * 64)


def _resumable_cfg(lr=0.01):
  c = config_lib.base_config()
  c.optimizer.learning_rate = lr
  c.train.keep_checkpoints = 5
  c.train.checkpoint_min_interval_secs = 0  # a checkpoint at every evaluation
  return c


def _run_with_checkpoint(path, cfg=None, data=DATA_A):
  """A work directory as an interrupted run leaves it: config, data, one sealed checkpoint."""
  wd = workdir_lib.WorkDir(str(path), cfg or _resumable_cfg())
  try:
    wd.check_data(data)
    wd.save(2, {"w": np.arange(5, dtype=np.float32)})
    wd.wait()
  finally:
    wd.close()


def test_checkpoint_carries_the_config_and_the_data_identity(tmp_path):
  _run_with_checkpoint(tmp_path)
  manifest = json.load(open(tmp_path / "checkpoints" / "2" / checkpoints_lib.CHECKSUMS))
  assert manifest["config"]["optimizer"]["learning_rate"] == 0.01
  assert manifest["data"] == DATA_A
  assert json.load(open(tmp_path / "data.json")) == DATA_A


def test_missing_config_json_is_compared_with_the_checkpoints_copy(tmp_path):
  _run_with_checkpoint(tmp_path)
  os.remove(tmp_path / "config.json")
  with pytest.raises(config_lib.ConfigError, match=r"learning_rate: 0.01 -> 0.5.*missing"):
    workdir_lib.WorkDir(str(tmp_path), _resumable_cfg(lr=0.5))
  assert not os.path.exists(tmp_path / "config.json")
  workdir_lib.WorkDir(str(tmp_path), _resumable_cfg()).close()  # the same config resumes ...
  restored = json.load(open(tmp_path / "config.json"))  # ... and config.json is back
  assert restored["optimizer"]["learning_rate"] == 0.01


def test_missing_config_json_without_any_copy_is_refused(tmp_path):
  _run_with_checkpoint(tmp_path)
  os.remove(tmp_path / "config.json")
  path = tmp_path / "checkpoints" / "2" / checkpoints_lib.CHECKSUMS
  manifest = json.load(open(path))
  del manifest["config"]  # as an older bnlab wrote it
  path.write_text(json.dumps(manifest))
  with pytest.raises(workdir_lib.WorkDirError, match="config.json is missing.*new --workdir"):
    workdir_lib.WorkDir(str(tmp_path), _resumable_cfg())


@pytest.mark.parametrize("without_data_json", [False, True])
def test_resume_on_other_data_is_refused(tmp_path, without_data_json):
  _run_with_checkpoint(tmp_path)
  if without_data_json:
    os.remove(tmp_path / "data.json")  # the checkpoint's copy still counts
  wd = workdir_lib.WorkDir(str(tmp_path), _resumable_cfg())
  try:
    with pytest.raises(data_lib.DataError, match=r"sha256: 'a+' -> 'b+'.*new --workdir"):
      wd.check_data(DATA_B)
    wd.check_data(DATA_A)
  finally:
    wd.close()


def test_directory_without_a_checkpoint_accepts_other_data(tmp_path):
  wd = workdir_lib.WorkDir(str(tmp_path), _resumable_cfg())
  wd.check_data(DATA_A)
  wd.close()
  wd = workdir_lib.WorkDir(str(tmp_path), _resumable_cfg())
  wd.check_data(DATA_B)
  wd.close()
  assert json.load(open(tmp_path / "data.json")) == DATA_B


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


# -- the checkpoint's copy is the truth, not config.json or data.json ---------------------

def _edit_json(path, change):
  value = json.load(open(path))
  change(value)
  open(path, "w").write(json.dumps(value, indent=2, sort_keys=True) + "\n")


def _set_lr(lr):
  return lambda c: c["optimizer"].update(learning_rate=lr)


def test_config_json_edited_to_match_a_new_command_is_refused(tmp_path):
  # The run would otherwise continue at 0.5, its records labelled as if it always had.
  _run_with_checkpoint(tmp_path)
  _edit_json(tmp_path / "config.json", _set_lr(0.5))
  edited = (tmp_path / "config.json").read_text()
  with pytest.raises(config_lib.ConfigError) as e:
    workdir_lib.WorkDir(str(tmp_path), _resumable_cfg(lr=0.5))
  message = str(e.value)
  assert "different config (optimizer.learning_rate: 0.01 -> 0.5)" in message
  assert f"{tmp_path / 'config.json'} was edited (optimizer.learning_rate: 0.01 -> 0.5)" \
      in message and "use a new --workdir" in message
  assert (tmp_path / "config.json").read_text() == edited  # refused: nothing touched
  assert not glob.glob(str(tmp_path / "config.json.*"))


def test_config_json_edited_is_restored_for_the_runs_own_config(tmp_path, caplog):
  _run_with_checkpoint(tmp_path)
  _edit_json(tmp_path / "config.json", _set_lr(0.5))
  with caplog.at_level(logging.WARNING):
    workdir_lib.WorkDir(str(tmp_path), _resumable_cfg()).close()
  assert json.load(open(tmp_path / "config.json"))["optimizer"]["learning_rate"] == 0.01
  (kept,) = glob.glob(str(tmp_path / "config.json.edited-*"))
  assert json.load(open(kept))["optimizer"]["learning_rate"] == 0.5  # no record lost
  assert any("config.json was edited (optimizer.learning_rate: 0.01 -> 0.5): restored "
             "from the copy" in m and os.path.basename(kept) in m for m in _warnings(caplog))


def test_config_json_missing_a_section_accepts_no_other_value_for_it(tmp_path, caplog):
  _run_with_checkpoint(tmp_path)
  _edit_json(tmp_path / "config.json", lambda c: c.pop("optimizer"))
  with pytest.raises(config_lib.ConfigError,
                     match=r"learning_rate: 0.01 -> 0.5\); .*config.json lacks optimizer\.\*"):
    workdir_lib.WorkDir(str(tmp_path), _resumable_cfg(lr=0.5))
  with caplog.at_level(logging.WARNING):  # the run's own config: restored
    workdir_lib.WorkDir(str(tmp_path), _resumable_cfg()).close()
  assert json.load(open(tmp_path / "config.json"))["optimizer"]["learning_rate"] == 0.01
  assert any("lacks optimizer.*: restored" in m for m in _warnings(caplog))
  assert glob.glob(str(tmp_path / "config.json.damaged-*"))


def test_damaged_config_json_is_restored_from_the_checkpoints_copy(tmp_path, caplog):
  _run_with_checkpoint(tmp_path)
  (tmp_path / "config.json").write_text('{"seed": ')
  with pytest.raises(config_lib.ConfigError, match="config.json is unreadable"):
    workdir_lib.WorkDir(str(tmp_path), _resumable_cfg(lr=0.5))
  assert (tmp_path / "config.json").read_text() == '{"seed": '
  with caplog.at_level(logging.WARNING):
    workdir_lib.WorkDir(str(tmp_path), _resumable_cfg()).close()
  assert json.load(open(tmp_path / "config.json"))["optimizer"]["learning_rate"] == 0.01
  (kept,) = glob.glob(str(tmp_path / "config.json.damaged-*"))
  assert open(kept).read() == '{"seed": '


def test_config_json_a_resume_rewrote_is_not_an_edit(tmp_path, caplog):
  # A resume with another resume-safe key writes config.json at its first record; killed
  # before its next checkpoint, config.json and the checkpoint's copy differ in that key.
  _run_with_checkpoint(tmp_path)
  _edit_json(tmp_path / "config.json", lambda c: c["train"].update(keep_checkpoints=9))
  with caplog.at_level(logging.WARNING):
    workdir_lib.WorkDir(str(tmp_path), _resumable_cfg()).close()
  assert not _warnings(caplog) and not glob.glob(str(tmp_path / "config.json.*"))


def test_data_json_edited_does_not_block_a_run_whose_data_is_unchanged(tmp_path, caplog):
  _run_with_checkpoint(tmp_path)
  _edit_json(tmp_path / "data.json", lambda d: d.update(sha256="e" * 64))
  wd = workdir_lib.WorkDir(str(tmp_path), _resumable_cfg())
  try:
    with caplog.at_level(logging.WARNING):
      wd.check_data(DATA_A)
  finally:
    wd.close()
  assert json.load(open(tmp_path / "data.json")) == DATA_A
  (kept,) = glob.glob(str(tmp_path / "data.json.edited-*"))
  assert json.load(open(kept))["sha256"] == "e" * 64
  assert any("data.json was edited (sha256: 'aaa" in m and "restored from the copy" in m
             for m in _warnings(caplog))


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_data_json_missing_or_damaged_is_restored(tmp_path, damage):
  _run_with_checkpoint(tmp_path)
  if damage == "missing":
    os.remove(tmp_path / "data.json")
  else:
    (tmp_path / "data.json").write_text("\0garbage{")
  wd = workdir_lib.WorkDir(str(tmp_path), _resumable_cfg())
  try:
    wd.check_data(DATA_A)
  finally:
    wd.close()
  assert json.load(open(tmp_path / "data.json")) == DATA_A
  assert len(glob.glob(str(tmp_path / "data.json.damaged-*"))) == (damage == "garbage")


def test_data_json_edited_to_match_other_data_is_refused_naming_it(tmp_path):
  _run_with_checkpoint(tmp_path)
  _edit_json(tmp_path / "data.json", lambda d: d.update(DATA_B))
  wd = workdir_lib.WorkDir(str(tmp_path), _resumable_cfg())
  try:
    with pytest.raises(data_lib.DataError) as e:
      wd.check_data(DATA_B)
  finally:
    wd.close()
  assert "sha256: 'aaa" in str(e.value) and "data.json was edited" in str(e.value)
  assert json.load(open(tmp_path / "data.json")) == DATA_B  # refused: nothing touched


def _run_of(path, cfg):
  """A finished run's directory: config.json, data.json, a sealed checkpoint, a summary."""
  _run_with_checkpoint(path, cfg)
  (path / "metrics.jsonl").write_text(json.dumps({"step": 2, "test_accuracy": 0.5}) + "\n")
  (path / "summary.json").write_text(json.dumps({"final_step": 2, "steps_per_epoch": 10}))


def test_sweep_and_study_compare_with_the_checkpoints_copy_not_an_edited_config_json(
    tmp_path):
  from bnlab import sweep  # pylint: disable=g-import-not-at-top
  from bnlab.study import runs as study_runs  # pylint: disable=g-import-not-at-top
  (m,) = sweep.resolve_members(_resumable_cfg(), sweep.seeds(1))
  _run_of(tmp_path / m.name, m.cfg)
  (changed,) = sweep.resolve_members(_resumable_cfg(lr=0.5), sweep.seeds(1))
  _edit_json(tmp_path / m.name / "config.json", _set_lr(0.5))  # "matches" the changed sweep
  with pytest.raises(config_lib.ConfigError, match=r"seed=0 \(optimizer.learning_rate: "
                                                   r"0.01 -> 0.5\)"):
    sweep.check_members_config([changed], str(tmp_path))
  configured = config_lib.flatten(json.loads(changed.cfg.to_json_best_effort()))
  run = study_runs.read_run(str(tmp_path / m.name), m.name, {}, configured)
  assert run.summary is None and "optimizer.learning_rate (0.01 -> 0.5)" in run.error
