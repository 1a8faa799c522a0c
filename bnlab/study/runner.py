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
from bnlab.study import report as report_lib


def run_stage(study: study_config.Study, workdir: str) -> None:
  """Trains the members that are not finished; records the stage in stages.json."""
  from bnlab.engine import backend  # pylint: disable=g-import-not-at-top
  from bnlab.engine import provenance  # pylint: disable=g-import-not-at-top
  # Deterministic mode is set before anything starts JAX (provenance does).
  backend.configure_run(study.base_run_config())
  os.makedirs(workdir, exist_ok=True)
  files.write_json(os.path.join(workdir, "study.json"), study.to_json())
  registered = os.path.join(workdir, "claims_registered.json")
  if not os.path.exists(registered):
    files.write_json(registered, study.config["claims"])
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


def run_study(study: study_config.Study, workdir: str, stage: str = "all", out: str = "") -> str:
  """The stages of `study` in `workdir`; returns the report ("" for --stage=run)."""
  if stage in ("run", "all"):
    run_stage(study, workdir)
  if stage == "run":
    return ""
  text = report_lib.report(study, workdir)
  if out:
    os.makedirs(out, exist_ok=True)
    for name in ("report.md", "results.json", "results.csv", "cells.csv", "claims.json"):
      shutil.copy(os.path.join(workdir, name), os.path.join(out, name))
    shutil.copytree(os.path.join(workdir, "figures"), os.path.join(out, "figures"),
                    dirs_exist_ok=True)
  return text
