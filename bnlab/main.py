"""Command line: `python -m bnlab.main --config=configs/NAME.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.optimizer.learning_rate=0.1`.
This module only parses flags; `bnlab.train.train_and_evaluate` does the work.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bnlab import config as config_lib
from bnlab import data as data_lib
from bnlab import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the run's outputs.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors that are the user's to fix: one line, no traceback (unless --verbosity>=1).
USER_ERRORS = (config_lib.ConfigError, data_lib.DataError, workdir_lib.WorkDirError)


class _QuietLibraries:
  """Drops INFO chatter of checkpointing libraries from the progress log."""

  def filter(self, record) -> bool:
    path = record.pathname.replace("\\", "/")
    return record.levelno >= 30 or not ("/orbax/" in path or "/etils/" in path)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if logging.get_verbosity() < logging.DEBUG:
    logging.get_absl_handler().addFilter(_QuietLibraries())
  from bnlab import train  # pylint: disable=g-import-not-at-top
  try:
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except USER_ERRORS as e:
    if logging.get_verbosity() >= logging.DEBUG:
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  shown = {k: summary[k] for k in ("diverged", "final_step", "test_accuracy", "train_loss",
                                   "full_train_accuracy", "wall_time") if k in summary}
  print(json.dumps(shown))


def run():
  app.run(main)


if __name__ == "__main__":
  run()
