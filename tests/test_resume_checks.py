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
