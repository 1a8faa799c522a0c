"""The command line, `python -m bnlab.study`: its flags, and errors as one-line fixes.

Apart from the runner so that programs and tests call `run_study` without absl's flags.
"""

from __future__ import annotations

import os
import re
import sys

from bnlab import config as config_lib
from bnlab.rundir import signals
from bnlab.study import config as study_config
from bnlab.study import figures
from bnlab.study import report as report_lib
from bnlab.study import runner
from bnlab.errors import one_line


def main(argv):
  """`python -m bnlab.study`: see the docstring of `bnlab.study`."""
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from bnlab import data as data_lib  # pylint: disable=g-import-not-at-top
  from bnlab import main as main_lib  # pylint: disable=g-import-not-at-top
  from bnlab.rundir import errors as rundir_errors  # pylint: disable=g-import-not-at-top
  from bnlab.rundir import logs as rundir_logs  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  rundir_logs.quiet_library_logs()
  f = flags.FLAGS
  study, path = None, ""
  try:
    path, _, arg = f["config"].config_filename.partition(":")
    cfg = main_lib.loaded_config()
    try:
      study = study_config.Study.from_file(path, arg, cfg)
      study.flags = tuple(f"--config.{k}={v}" for k, v in
                          config_flags.get_override_values(f["config"]).items())
    except (config_lib.ConfigError, data_lib.DataError, rundir_errors.WorkDirError):
      raise
    except Exception as e:  # pylint: disable=broad-except  # get_config/get_sweep raised
      detail = one_line(e)
      raise config_lib.ConfigError(
          f"study config {path} failed to load ({type(e).__name__}: {detail}); fix the "
          "file (its get_config() and get_sweep())") from None
    workdir = f.workdir or ""
    if not workdir.strip():
      raise rundir_errors.WorkDirError(
          f"the work directory is empty ({workdir!r}); give one with --workdir=DIR")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise rundir_errors.WorkDirError(
          f"--workdir={workdir} is a file, not a directory; choose another --workdir")
    try:
      # The report embeds the PNG, so it is always drawn.
      formats = tuple(dict.fromkeys(("png",) + figures.parse_formats(f.figure_format)))
    except ValueError as e:
      raise config_lib.ConfigError(f"--figure_format: {e}") from None
    text = runner.run_study(study, workdir, f.stage, f.out, formats,
                            workers={"num_workers": f.num_workers, "launcher": f.launcher,
                                     "ray_address": f.ray_address})
    if f.stage in ("all", "report"):  # the report is in report.md; the console gets its gist
      text = report_lib.console_summary(workdir, f.out)
  except KeyboardInterrupt as e:
    if isinstance(e, signals.Preempted):  # SIGTERM, SIGUSR1: stages.json says interrupted
      main_lib.preempted(e)
    if study is None:
      print("error: interrupted before the study started; rerun the same command",
            file=sys.stderr)
    else:
      print(f"interrupted: rerun the same command to resume ({study.command(f.workdir)})",
            file=sys.stderr)
    sys.exit(130)
  except (config_lib.ConfigError, data_lib.DataError, rundir_errors.WorkDirError) as e:
    if logging.get_verbosity() >= logging.DEBUG:
      raise
    print(f"error: {study_fix(' '.join(str(e).split()), path)}", file=sys.stderr)
    sys.exit(2)
  print(text or f"runs are in {os.path.join(f.workdir, 'runs')}")


def study_fix(message: str, path: str) -> str:
  """`message` with a run-config flag it suggests (not a study flag) replaced by the study's fix."""
  flag = re.search(r"Set it with --config\.([\w.]+)=\.\.\.", message)
  if flag is None or flag.group(1) in config_lib.flatten(study_config.base_config().to_dict()):
    return message
  return message.replace(flag.group(0), (
      f"The study sets config.{flag.group(1)} of its runs: change it through the study's "
      f"arguments (after ':' in --config={path}:...) or its run.overrides"))


def run():
  """The entry point: bnlab.main's --config and --workdir, plus --stage and --out."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from bnlab import main as main_lib  # pylint: disable=g-import-not-at-top
  flags.FLAGS["config"].help = "Study config file (configs/studies/*.py)[:ARGS]."
  flags.DEFINE_enum("stage", "all", ["all", "register", "run", "report", "verify"],
                    "register: fix the claims before training (run and all do it first); "
                    "run: train what is missing; report: rebuild the report from the files; "
                    "verify: recompute every verdict from the published files (--out, or "
                    "--workdir) alone.")
  flags.DEFINE_string("out", "", "Publish the report, data, registration and figures here.")
  flags.DEFINE_string("figure_format", "png", "Figure files to write: any of png,pdf,svg.")
  from bnlab.sweep import cli as sweep_cli  # pylint: disable=g-import-not-at-top
  sweep_cli.define_scale_flags()
  app.run(main, flags_parser=main_lib.parse_flags)
