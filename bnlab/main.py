"""Command line: `python -m bnlab.main --config=configs/NAME.py --workdir=DIR`.

Any config field can be overridden, e.g. `--config.optimizer.learning_rate=0.1`.
This module only parses flags; `bnlab.engine.train.train_and_evaluate` does the work.
Every problem that is the user's to fix ends the run with exit status 2 and
one line `error: <problem>; <fix>` on stderr; `--verbosity=1` adds the traceback.
SIGTERM, SIGUSR1 (preemption) and SIGHUP (a closed terminal) stop the run at the next
step boundary with a checkpoint there, and one line `preempted: ...; resume with: <this
command>` (exit status 143, 138 and 129; see bnlab/rundir/signals.py).

Several processes (one per host, or several on one machine) run one
data-parallel training when the config's `distributed` section says so: each
process runs this same command with its own `--config.distributed.process_id`
(or none, on a cluster JAX detects); see docs/multi-device.md.
"""

from __future__ import annotations

import ast
import difflib
import json
import os
import shlex
import sys

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from bnlab.engine import backend
from bnlab import config as config_lib
from bnlab import data as data_lib
from bnlab.engine import distributed
from bnlab.rundir import errors as rundir_errors
from bnlab.rundir import logs as rundir_logs
from bnlab.rundir import signals
from bnlab.errors import one_line

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for the run's outputs.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors that are the user's to fix: one line, no traceback (unless --verbosity>=1).
USER_ERRORS = (config_lib.ConfigError, data_lib.DataError, rundir_errors.WorkDirError,
               distributed.DistributedError, backend.BackendError)


def _fail(message: str) -> None:
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(2)


def check_config(cfg) -> None:
  """`config_lib.validate`, with a malformed config (missing keys, wrong types) as ConfigError."""
  try:
    config_lib.validate(cfg)
  except config_lib.ConfigError:
    raise
  except (KeyError, AttributeError, TypeError) as e:
    detail = one_line(e)
    raise config_lib.ConfigError(
        f"the config is malformed ({type(e).__name__}: {detail}); build it from "
        "bnlab.config.base_config() and check each key's type against it") from e


def execute(cfg, workdir: str) -> dict:
  """Validates `cfg` and runs it in `workdir`; a user error exits with one line."""
  from bnlab.engine import train  # pylint: disable=g-import-not-at-top
  try:
    check_config(cfg)
    backend.configure_run(cfg)  # before JAX starts
    # Starts jax.distributed first thing when the config asks for it.
    return train.train_and_evaluate(cfg, workdir)
  except USER_ERRORS as e:
    if logging.get_verbosity() >= logging.DEBUG:
      raise
    _fail(e)
  except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGUSR1, SIGHUP: what was checkpointed is kept
    if logging.get_verbosity() >= logging.DEBUG:
      raise
    interrupted(e)


def interrupted(e: KeyboardInterrupt) -> None:
  """Ends the process after Ctrl-C with one line (exit status 130, as a shell's); after
  SIGTERM or SIGUSR1 (`signals.Preempted`), with `preempted(e)`."""
  if isinstance(e, signals.Preempted):
    preempted(e)
  text = str(e) if str(e).startswith("interrupted") else (
      "interrupted; rerun the same command to resume from the last checkpoint")
  print(f"error: {text}", file=sys.stderr)
  sys.exit(130)


def preempted(e: signals.Preempted, command: str | None = None) -> None:
  """Ends the process after SIGTERM or SIGUSR1 with one line naming the command that
  resumes (`command`, default this process's own), exit status 128 + the signal's number
  (SIGTERM 143, SIGUSR1 138, SIGHUP 129)."""
  command = command or shlex.join(sys.orig_argv)
  print(f"preempted: {e.what}; resume with: {command}", file=sys.stderr)
  sys.exit(e.exit_status)


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {argv[1:]}: every option is a --flag=value "
          "(see --helpfull)")
  rundir_logs.quiet_library_logs()
  try:
    cfg = loaded_config()
  except config_lib.ConfigError as e:
    _fail(e)
  summary = execute(cfg, _WORKDIR.value)
  shown = {k: summary[k] for k in ("diverged", "final_step", "test_accuracy", "train_loss",
                                   "full_train_accuracy", "wall_time") if k in summary}
  print(json.dumps(shown))


def loaded_config():
  """The --config flag's config; ConfigError naming the path when the file cannot be loaded."""
  try:
    cfg = flags.FLAGS.config
    cfg.keys()
  except OSError as e:  # config_flags defers load failures to first use
    raise config_lib.ConfigError(
        f"--config={flags.FLAGS['config'].config_filename!r} could not be loaded ({e}); "
        "check the path") from None
  return cfg


# The --config.KEY=VALUE flags of free-form sections, set by `parse_flags` after the file loads.
FREE_FORM_VALUES: dict = {}


def split_free_form(argv: list[str]) -> tuple[list[str], dict[str, str]]:
  """(`argv` without its `--config.SECTION.KEY=VALUE` flags for the free-form sections
  (`config_lib.FREE_FORM`: `model.options`, `optimizer.kwargs`), those as {key: text}).

  config_flags sets only keys the config file defines; a free-form section's keys are
  the user's own (an optax optimizer's arguments), so they are set after it loads.
  """
  rest, free = [], {}
  for arg in argv:
    key, eq, text = arg.partition("=")
    dotted = key[len("--config."):]
    if (eq and key.startswith("--config.")
        and any(dotted.startswith(f + ".") for f in config_lib.FREE_FORM)):
      free[dotted] = text
    else:
      rest.append(arg)
  return rest, free


def free_form_value(text: str, current=None):
  """A flag's text as a Python value: a literal (3, 0.9, (1, 2), 'x', True/true), else the
  text; a float where the config already holds a float, the text where it holds a string."""
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = {"true": True, "false": False}.get(text.lower(), text)
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  return value


def set_free_form(cfg, values: dict[str, str]) -> None:
  """Sets each {dotted key: text} of `split_free_form` in `cfg` (keys may be new)."""
  for dotted, text in values.items():
    *path, last = dotted.split(".")
    node = cfg
    for part in path:
      node = node[part]
    with cfg.unlocked():
      node[last] = free_form_value(text, node.get(last))


def located_config_flag(arg: str) -> str:
  """`--config=PATH[:ARG]` with PATH where `config_lib.find_config` finds it: as given if it
  exists, else bnlab's own configs (`--config=configs/paper_mlp.py` from any directory
  with bnlab installed); ConfigError, one line, if nowhere. Other arguments unchanged."""
  if not arg.startswith("--config="):
    return arg
  path, colon, config_arg = arg[len("--config="):].partition(":")
  if not path or os.path.exists(path):
    return arg
  return f"--config={config_lib.find_config(path)}{colon}{config_arg}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with one-line errors for bad flags, config files and keys."""
  config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?")
  try:
    argv = [located_config_flag(a) for a in argv]
    rest, free = split_free_form(argv)
    FREE_FORM_VALUES.clear()
    saved, sys.argv = sys.argv, rest  # config_flags reads its overrides from sys.argv
    try:
      remaining = flags.FLAGS(rest)
      if free:
        set_free_form(flags.FLAGS.config, free)
        FREE_FORM_VALUES.update({k: free_form_value(v) for k, v in free.items()})
    finally:
      sys.argv = saved
    return remaining
  except flags.Error as e:
    message = unknown_config_key(argv)
    if message is None and config_file != "?" and "--config=None" in str(e):
      message = (f"config file {config_file}: get_config() returned None; make it return the "
                 "config (e.g. `return c` at its end)")
    if message is None:
      lines = [line for line in str(e).splitlines() if line.strip()]
      message = lines[0] + (f" {lines[-1].strip()}" if "Traceback" in str(e) else "")
      message += "; see --helpfull for the flags and bnlab/config.py for the config keys"
  except SyntaxError as e:
    message = (f"config file {e.filename or config_file} has a syntax error at line "
               f"{e.lineno}: {e.msg}; fix the file")
  except (AttributeError, KeyError) as e:
    if "'NoneType'" in str(e) and config_file != "?":
      message = (f"config file {config_file}: get_config() returned None; make it return the "
                 "config (e.g. `return c` at its end)")
    elif "get_config" in str(e):
      message = f"config file {config_file} defines no get_config(); add one (see configs/)"
    else:
      message = unknown_config_key(argv) or (
          f"{' '.join(str(e).split())}: a --config.KEY override names no key of the config; "
          "keys and defaults are listed in bnlab/config.py")
  except config_lib.ConfigError as e:  # a --config file found nowhere
    message = str(e)
  except (TypeError, ValueError) as e:
    message = f"bad config override: {e}"
  except OSError:  # an override made config_flags load the file while parsing
    message = f"--config={config_file!r} could not be loaded; check the path"
  except ImportError as e:
    message = f"config file {config_file} could not be imported ({e}); fix its imports"
  except Exception as e:  # pylint: disable=broad-except
    # The config file (or its get_config()) raised while being loaded.
    message = (f"config file {config_file} raised {type(e).__name__} when loaded "
               f"({one_line(e)}); fix the file")
  _fail(message)


def unknown_config_key(argv: list[str]) -> str | None:
  """The message for the first `--config.KEY=...` whose KEY the config lacks, or None.

  Names the flag and suggests the closest existing key at the level where the
  path stops matching (every config has `base_config()`'s keys).
  """
  base = config_lib.base_config()
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    path = arg.split("=", 1)[0][len("--config."):].split(".")
    node = base
    for i, part in enumerate(path):
      if isinstance(node, ml_collections.ConfigDict) and part in node:
        node = node[part]
        continue
      if ".".join(path[:i]) in config_lib.FREE_FORM:  # the user's own keys
        break
      flag = "--config." + ".".join(path)
      known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, known, n=1)
      if close:
        fix = "did you mean --config." + ".".join([*path[:i], close[0], *path[i + 1:]]) + "?"
      elif known:
        where = "config." + ".".join(path[:i]) if i else "the config"
        fix = f"the keys of {where} are {', '.join(sorted(known))}"
      else:
        fix = f"config.{'.'.join(path[:i])} is a value, not a section"
      return (f"{flag} names no key of the config; check its spelling: {fix} (keys and "
              "defaults: bnlab/config.py)")
  return None


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
