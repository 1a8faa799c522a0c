"""A study's stages: train the members that are missing, then write the report.

Each stage is idempotent, so rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time

from bnlab import sweep
from bnlab.rundir import errors as rundir_errors
from bnlab.study import config as study_config
from bnlab.study import files
from bnlab.study import published
from bnlab.study import registration
from bnlab.study import report as report_lib
from bnlab.errors import one_line


LOCK = ".study-lock"
WRITE_LOCK = ".study-write-lock"  # the run stage's workers, each writing a shared file


@contextlib.contextmanager
def holding(workdir: str, shared: bool = False):
  """The study directory's lock held while the block runs; WorkDirError naming the holder
  when another process has it.

  Taken before the stages write anything: a second study on the directory is
  refused before it writes study.json, a registration or a stage record (the
  sweep's own lock on runs/ would refuse it only after the record was begun,
  leaving an "interrupted" stage that never ran). `shared`: the run stage's,
  which any number of workers hold together (they take disjoint groups) and
  which keeps out the register stage.
  """
  from bnlab.rundir import locks  # pylint: disable=g-import-not-at-top
  files.make_dir(workdir)
  path = os.path.join(workdir, LOCK)
  fd = locks.acquire_lock(path, os.path.abspath(workdir), "study directory", shared=shared)
  try:
    yield
  finally:
    locks.release_lock(path, fd, remove=not shared)


def writing(workdir: str):
  """A run-stage worker's turn to write study.json, the registration or stages.json, which
  the other workers read and write too (held for milliseconds)."""
  from bnlab.rundir import locks  # pylint: disable=g-import-not-at-top
  return locks.held_briefly(os.path.join(workdir, WRITE_LOCK))


def run_stage(study: study_config.Study, workdir: str, wait: bool = False,
              workers: dict | None = None) -> None:
  """Trains the members that are not finished; records the stage in stages.json.

  Any number of processes may run it on one directory at once (`bnlab.sweep.run_sweep`'s
  workers); with `wait`, this one returns only when every member is trained (or failed),
  whoever trained it. `workers`: run_sweep's num_workers, launcher and ray_address."""
  from bnlab.engine import backend  # pylint: disable=g-import-not-at-top
  # Deterministic mode is set before anything starts JAX (provenance does).
  backend.configure_run(study.base_run_config())
  with holding(workdir, shared=True):
    _run_stage(study, workdir, wait, workers or {})


def _run_stage(study: study_config.Study, workdir: str, wait: bool, workers: dict) -> None:
  """`run_stage`, the study directory's lock held."""
  from bnlab.engine import backend  # pylint: disable=g-import-not-at-top
  from bnlab.engine import provenance  # pylint: disable=g-import-not-at-top
  stages_path = os.path.join(workdir, "stages.json")
  files.read_json(stages_path, [])  # damaged: stop before anything trains
  runs_dir = os.path.join(workdir, "runs")

  def written(m):  # when the run's summary was written (a run made longer writes it again)
    try:
      return os.stat(os.path.join(runs_dir, m["name"], "summary.json")).st_mtime_ns
    except OSError:
      return None
  before = {m["name"]: written(m) for m in study.members}
  stage = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
           "environment": provenance.environment(backend.deterministic()), "interrupted": True}
  start = time.perf_counter()
  mine: set[str] = set()  # the groups this process trained, not its fellow workers'
  try:
    sweep.run_sweep(study.base_run_config(), study.sweep, runs_dir,
                    grouped=study.config["grouped"], wait=wait,
                    prepare=lambda: _register_as_worker(study, workdir), trained=mine,
                    **workers)
    stage["interrupted"] = False
  finally:
    stage["wall_s"] = time.perf_counter() - start
    # Written during this stage by this process: a group's member finished before is carried
    # along unwritten; a stopped group's finished members count.
    stage["trained"] = sum(m["name"] in mine and written(m) not in (None, before[m["name"]])
                           for m in study.members)
    with writing(workdir):
      stages = files.read_json(stages_path, [])
      files.write_json(stages_path, stages + [stage])


def _register_as_worker(study: study_config.Study, workdir: str) -> None:
  """The run stage's registration, once this worker is admitted (a worker of another study
  config than the live ones' is refused before it could amend the registration)."""
  with writing(workdir):
    register_stage(study, workdir)


def register_stage(study: study_config.Study, workdir: str) -> str:
  """Writes study.json and registers the claims (or amends them) before anything trains."""
  files.make_dir(workdir)
  files.write_json(os.path.join(workdir, "study.json"), study.to_json())
  return registration.register(study, workdir)


# What --out publishes: everything a reader needs to check each verdict (`verify`).
PUBLISHED = ("report.md", "results.json", "results.csv", "cells.csv", "claims.json",
             "study.json", published.DATA, registration.FILE)


def run_study(study: study_config.Study, workdir: str, stage: str = "all", out: str = "",
              formats: tuple = ("png",), workers: dict | None = None) -> str:
  """The stages of `study` in `workdir`; returns the report ("" for --stage=run/register).

  Where the report or `out` cannot be written (`out` is the work directory, a file stands
  where a directory belongs) it stops before anything trains, with a WorkDirError.
  `workers`: how the run stage spreads (`run_stage`); with "all", a worker reports once
  every member is trained, whichever worker trained it."""
  if stage == "verify":
    return verify_stage(out or workdir)
  if stage in ("report", "all"):
    _check_destinations(workdir, out)
  if stage == "register":
    with holding(workdir):
      return f"{register_stage(study, workdir)}: {os.path.join(workdir, registration.FILE)}"
  if stage in ("run", "all"):
    run_stage(study, workdir, wait=stage == "all", workers=workers)
  if stage == "run":
    return ""
  files.make_dir(os.path.join(workdir, "figures"))
  try:
    text = report_lib.report(study, workdir, formats)
  except OSError as e:  # a file the report opens itself (e.g. writing data.json.gz)
    raise rundir_errors.io_error("reading or writing", e.filename or workdir, e) from None
  if out:
    publish(workdir, out)
  return text


def _check_destinations(workdir: str, out: str) -> None:
  """WorkDirError when the report or its publication in `out` could not be written."""
  if out and os.path.realpath(out) == os.path.realpath(workdir):
    raise rundir_errors.WorkDirError(
        f"--out={out} is the work directory, where the report is written anyway; publish "
        "into another directory (e.g. --out=results/NAME), or leave --out out")
  for path in [os.path.join(workdir, "figures")] + (
      [out, os.path.join(out, "figures")] if out else []):
    if os.path.lexists(path) and not os.path.isdir(path):
      raise rundir_errors.WorkDirError(
          f"{path} is a file, where the study writes a directory; move it aside, then rerun")


def publish(workdir: str, out: str) -> None:
  """Copies what a reader needs to check the report (PUBLISHED, figures/) into `out`, each
  file whole or not at all."""
  files.make_dir(out)
  for name in PUBLISHED:
    if os.path.exists(os.path.join(workdir, name)):
      files.copy_file(os.path.join(workdir, name), os.path.join(out, name))
  figures = os.path.join(workdir, "figures")
  for folder, _, names in os.walk(figures):
    target = files.make_dir(os.path.join(out, "figures", os.path.relpath(folder, figures)))
    for name in (n for n in names if not n.startswith(".tmp-")):  # a killed write's leftover
      files.copy_file(os.path.join(folder, name), os.path.join(target, name))


def verify_stage(directory: str) -> str:
  """Recomputes every published verdict in `directory`; ConfigError naming any difference."""
  from bnlab import config as config_lib  # pylint: disable=g-import-not-at-top
  again = "publish the study again with --out"
  study_json = files.read_json(os.path.join(directory, "study.json"), {}, again)
  if study_json and not isinstance(study_json.get("config"), dict):
    raise rundir_errors.WorkDirError(
        f"{os.path.join(directory, 'study.json')} is damaged (it holds no config); {again}")
  files.read_json(os.path.join(directory, "claims.json"), [], again)
  data = os.path.join(directory, published.DATA)
  if os.path.exists(data):
    try:
      published.read(data)
    except (OSError, EOFError, ValueError) as e:
      raise rundir_errors.WorkDirError(
          f"{data} is damaged ({one_line(e, 120)}); {again}") from None
  checked, problems = published.verify(directory)
  if problems:
    raise config_lib.ConfigError(
        f"verify {directory}: {len(problems)} problem(s): " + "; ".join(problems[:5])
        + ("; ..." if len(problems) > 5 else ""))
  return f"verified: {checked} verdicts recomputed from {directory} alone, all as published"
