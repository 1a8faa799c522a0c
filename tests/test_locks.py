"""One writer per work directory: the lock names a live holder, is taken over after a kill,
is not kept by a reused pid, and a second open in one process is refused.
"""

import logging
import os
import signal
import subprocess
import sys

import pytest

from bnlab.rundir import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


HOLD = ("import sys, time\nfrom bnlab import config\nfrom bnlab.rundir import workdir\n"
        "w = workdir.WorkDir(sys.argv[1], config.base_config())\n"
        "print('locked', flush=True)\ntime.sleep(300)\n")


def test_lock_names_a_live_holder_and_is_taken_over_after_a_kill(tmp_path, caplog):
  from bnlab import config as config_lib
  wd = str(tmp_path / "wd")
  p = subprocess.Popen([sys.executable, "-c", HOLD, wd], cwd=ROOT, stdout=subprocess.PIPE,
                       text=True)
  try:
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkDirError, match=f"in use by process {p.pid}"):
      workdir_lib.WorkDir(wd, config_lib.base_config())
  finally:
    p.send_signal(signal.SIGKILL)
    p.wait()
  assert str(p.pid) in open(os.path.join(wd, ".lock")).read()  # stale, left by the kill
  with caplog.at_level(logging.WARNING):
    w = workdir_lib.WorkDir(wd, config_lib.base_config())
  w.close()
  assert any("Taking over" in r.getMessage() and str(p.pid) in r.getMessage()
             for r in caplog.records)
  assert not os.path.exists(os.path.join(wd, ".lock"))


def test_lock_naming_a_live_pid_but_not_held_is_stale(tmp_path):
  """A reused pid (here: a live unrelated process) does not keep a dead run's lock."""
  from bnlab import config as config_lib
  wd = tmp_path / "wd"
  wd.mkdir()
  sleeper = subprocess.Popen(["sleep", "30"])
  try:
    (wd / ".lock").write_text(str(sleeper.pid))
    w = workdir_lib.WorkDir(str(wd), config_lib.base_config())
    w.close()
  finally:
    sleeper.kill()
    sleeper.wait()


def test_second_open_in_the_same_process_is_refused(tmp_path):
  from bnlab import config as config_lib
  w = workdir_lib.WorkDir(str(tmp_path), config_lib.base_config())
  try:
    with pytest.raises(workdir_lib.WorkDirError, match=f"process {os.getpid()}"):
      workdir_lib.WorkDir(str(tmp_path), config_lib.base_config())
  finally:
    w.close()


