"""A study's stages: train the members that are missing, then write the report.

Each stage is idempotent, so rerunning the same command resumes where it stopped.
"""

from __future__ import annotations

import datetime
import os
import shutil
import time

from bnlab import sweep
from bnlab.study import config as study_config
from bnlab.study import files
from bnlab.study import published
from bnlab.study import registration
from bnlab.study import report as report_lib


def run_stage(study: study_config.Study, workdir: str) -> None:
  """Trains the members that are not finished; records the stage in stages.json."""
  from bnlab.engine import backend  # pylint: disable=g-import-not-at-top
  from bnlab.engine import provenance  # pylint: disable=g-import-not-at-top
  # Deterministic mode is set before anything starts JAX (provenance does).
  backend.configure_run(study.base_run_config())
  register_stage(study, workdir)
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
  try:
    sweep.run_sweep(study.base_run_config(), study.sweep, runs_dir,
                    grouped=study.config["grouped"])
    stage["interrupted"] = False
  finally:
    stage["wall_s"] = time.perf_counter() - start
    stage["trained"] = sum(written(m) not in (None, before[m["name"]]) for m in study.members)
    stages = files.read_json(os.path.join(workdir, "stages.json"), [])
    files.write_json(os.path.join(workdir, "stages.json"), stages + [stage])


def register_stage(study: study_config.Study, workdir: str) -> str:
  """Writes study.json and registers the claims (or amends them) before anything trains."""
  os.makedirs(workdir, exist_ok=True)
  files.write_json(os.path.join(workdir, "study.json"), study.to_json())
  return registration.register(study, workdir)


# What --out publishes: everything a reader needs to check each verdict (`verify`).
PUBLISHED = ("report.md", "results.json", "results.csv", "cells.csv", "claims.json",
             "study.json", published.DATA, registration.FILE)


def run_study(study: study_config.Study, workdir: str, stage: str = "all", out: str = "",
              formats: tuple = ("png",)) -> str:
  """The stages of `study` in `workdir`; returns the report ("" for --stage=run/register)."""
  if stage == "verify":
    return verify_stage(out or workdir)
  if stage == "register":
    return f"{register_stage(study, workdir)}: {os.path.join(workdir, registration.FILE)}"
  if stage in ("run", "all"):
    run_stage(study, workdir)
  if stage == "run":
    return ""
  text = report_lib.report(study, workdir, formats)
  if out:
    os.makedirs(out, exist_ok=True)
    for name in PUBLISHED:
      if os.path.exists(os.path.join(workdir, name)):
        shutil.copy(os.path.join(workdir, name), os.path.join(out, name))
    shutil.copytree(os.path.join(workdir, "figures"), os.path.join(out, "figures"),
                    dirs_exist_ok=True)
  return text


def verify_stage(directory: str) -> str:
  """Recomputes every published verdict in `directory`; ConfigError naming any difference."""
  from bnlab import config as config_lib  # pylint: disable=g-import-not-at-top
  checked, problems = published.verify(directory)
  if problems:
    raise config_lib.ConfigError(
        f"verify {directory}: {len(problems)} problem(s): " + "; ".join(problems[:5])
        + ("; ..." if len(problems) > 5 else ""))
  return f"verified: {checked} verdicts recomputed from {directory} alone, all as published"
