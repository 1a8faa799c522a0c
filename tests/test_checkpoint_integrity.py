"""Checkpoints carry checksums of every file and are verified before they are restored:
a damaged or unverifiable one is named and an older one used. No training.
"""

import glob
import json
import logging
import os

import numpy as np
import pytest

from bnlab.rundir import checkpoints as checkpoints_lib
from bnlab.rundir import workdir as workdir_lib
from run_files import damage_checkpoint_payload
from rundirs import strict_json as _strict
from rundirs import (config as _cfg, open_workdir as _open, saved as _saved, tree as _tree,
                     warnings_of as _warnings)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    manifest = _strict((step_dir / checkpoints_lib.CHECKSUMS).read_text())
    assert manifest["step"] == step and manifest["files"]
    assert any("/d/" in rel for rel in manifest["files"])
    assert checkpoints_lib._verify_checkpoint(str(step_dir))  # pylint: disable=protected-access


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
    (step_dir / checkpoints_lib.CHECKSUMS).write_text('{"files": ')
  elif damage == "extra_file":
    (step_dir / "default" / "stray").write_text("x")
  else:
    manifest = json.loads((step_dir / checkpoints_lib.CHECKSUMS).read_text())
    os.remove(step_dir / sorted(manifest["files"])[-1])
  restored = _restore(tmp_path, caplog)
  np.testing.assert_array_equal(restored["b"], _tree(1.0)["b"])
  assert any(str(step_dir) in m and "unreadable" in m for m in _warnings(caplog))


def test_checkpoint_without_checksums_restores_with_a_warning(tmp_path, caplog):
  """As bnlab wrote them before checksums: restored, but said to be unverified."""
  _saved(tmp_path, [1, 2])
  for path in glob.glob(str(tmp_path / "checkpoints" / "*" / checkpoints_lib.CHECKSUMS)):
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
