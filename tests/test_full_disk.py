"""A full disk while checkpointing ends in one line naming the step.

A full disk is a file size limit (RLIMIT_FSIZE, so writes fail with EFBIG as
they would with ENOSPC) set in the process just before checkpoint 4 is saved:
the write fails inside orbax's and tensorstore's threads, as on a real disk.
"""

import os
import subprocess
import sys


import tiny_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FULL_AT_STEP = """
import resource, signal, sys
from bnlab import main
from bnlab.rundir import workdir
full_at = int(sys.argv.pop(1))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
real_save = workdir.WorkDir.save

def save(self, step, target, **kwargs):
  if step == full_at:
    self.wait()  # the checkpoints before are complete
    resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
  return real_save(self, step, target, **kwargs)

workdir.WorkDir.save = save
main.run()
"""


def _args(idx, wd):
  return ["--config=configs/seed1_mlp.py", f"--workdir={wd}", "--config.data.source=idx",
          f"--config.data.dir={idx}", "--config.train.num_epochs=1",
          "--config.train.log_every_steps=2", "--config.train.checkpoint_every_steps=2",
          "--config.train.keep_checkpoints=10"]


def test_full_disk_while_checkpointing_is_one_line_naming_the_step(tmp_path):
  idx, wd = str(tmp_path / "idx"), str(tmp_path / "wd")
  tiny_mnist.write_mnist_dir(idx, num_train=320, num_test=100)
  p = subprocess.run([sys.executable, "-c", FULL_AT_STEP, "4", *_args(idx, wd)], cwd=ROOT,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
  assert p.returncode == 2, p.stderr
  assert "Traceback" not in p.stderr and "ERROR" not in p.stderr, p.stderr[-3000:]
  lines = [x for x in p.stderr.splitlines() if not x.startswith("I")]  # the progress log
  assert len(lines) == 1, p.stderr[-3000:]
  (line,) = lines
  assert line.startswith("error: saving checkpoint 4 in "), line
  assert "free space on that disk" in line, line
  assert "resume from the last complete checkpoint (step 2)" in line, line
  # and the advice holds: the rerun resumes and finishes
  p = subprocess.run([sys.executable, "-m", "bnlab.main", *_args(idx, wd)], cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert os.path.exists(os.path.join(wd, "summary.json"))


