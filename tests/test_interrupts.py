"""Ctrl-C: during training it names the step to resume from; during a checkpoint write the
run stops just after the write.
"""

import os
import signal

import pytest

from bnlab import config as config_lib
from bnlab import main as main_lib
from bnlab.engine import loop as loop_lib
from bnlab.rundir import checkpoints as checkpoints_lib
from bnlab.rundir import workdir as workdir_lib
from rundirs import config as _cfg, open_workdir as _open, tree as _tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def test_ctrl_c_during_a_checkpoint_write_stops_just_after_it(tmp_path, monkeypatch):
  # Interrupted midway, orbax's save threads waited on each other for ~300 s before exit.
  real = checkpoints_lib.ocp.CheckpointManager.save

  def save_interrupted(self, *args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the write
    return real(self, *args, **kwargs)
  monkeypatch.setattr(checkpoints_lib.ocp.CheckpointManager, "save", save_interrupted)
  # Python's own Ctrl-C handler, as in a terminal: a shell that starts the tests in the
  # background has SIGINT ignored, and the deferral rightly restores that instead.
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    wd = _open(tmp_path, _cfg(keep_checkpoints=10))
    try:
      with pytest.raises(KeyboardInterrupt):
        wd.save(1, _tree(1.0))
    finally:
      wd.close()
    step_dir = str(tmp_path / "checkpoints" / "1")
    assert checkpoints_lib._verify_checkpoint(step_dir)  # pylint: disable=protected-access
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, previous)
