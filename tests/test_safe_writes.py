"""bnlab never writes through a symbolic link, and a write probe that fails on a full disk
leaves nothing behind. Each test opens a WorkDir directly.
"""

import glob
import os
import subprocess
import sys

import pytest

from bnlab.rundir import workdir as workdir_lib
from rundirs import open_workdir as _open

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
