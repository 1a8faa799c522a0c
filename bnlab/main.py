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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir_lib.quiet_library_logs()
  from bnlab import train  # pylint: disable=g-import-not-at-top
  cfg = _CONFIG.value
  try:
    cfg.keys()
  except OSError as e:  # config_flags defers load failures to first use
    detail = " ".join(str(e).split())
    print(f"error: --config={flags.FLAGS['config'].config_filename!r} could not be "
          f"loaded: {detail}", file=sys.stderr)
    sys.exit(2)
  try:
    summary = train.train_and_evaluate(cfg, _WORKDIR.value)
  except USER_ERRORS as e:
    if logging.get_verbosity() >= logging.DEBUG:
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  shown = {k: summary[k] for k in ("diverged", "final_step", "test_accuracy", "train_loss",
                                   "full_train_accuracy", "wall_time") if k in summary}
  print(json.dumps(shown))


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors for bad flags and config keys."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    lines = [line for line in str(e).splitlines() if line.strip()]
    message = lines[0] + (f" {lines[-1].strip()}" if "Traceback" in str(e) else "")
  except (AttributeError, KeyError) as e:
    key = str(e).strip("'\"")
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.")
                 and a.split("=")[0].endswith("." + key)), key)
    message = (f"{flag} names no key of the config: check its spelling against the "
               "config file; keys and defaults are listed in bnlab/config.py")
  except (TypeError, ValueError) as e:
    message = f"bad config override: {e}"
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
