"""Helpers of the study scripts not yet on `bnlab.study` (why_bn, paper_figure1): run, read, time."""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import matplotlib  # noqa: E402

matplotlib.use("Agg")

from bnlab import train  # noqa: E402


def run(cfg, workdir: str) -> dict:
  """Runs (or resumes, or skips if finished) one config; returns its summary."""
  return train.train_and_evaluate(cfg, workdir)


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


class Timer:
  """Wall time of a study, for its report."""

  def __init__(self):
    self.start = time.perf_counter()

  def minutes(self) -> float:
    return (time.perf_counter() - self.start) / 60
