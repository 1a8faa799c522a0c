"""Shared pieces of the studies: running configs into sub-directories, reading metrics."""

from __future__ import annotations

import json
import math
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


def epoch_curve(records: list[dict], key: str = "train_loss") -> list[float]:
  """Per-epoch means of a train metric, weighting each record by its steps."""
  sums: dict[int, list[float]] = {}
  for r in records:
    if key not in r:
      continue
    epoch = math.ceil(r["epoch"] - 1e-9)  # records in (k-1, k] belong to epoch k
    s = sums.setdefault(epoch, [0.0, 0.0])
    w = r.get("interval_steps", 1)
    s[0] += r[key] * w
    s[1] += w
  return [sums[e][0] / sums[e][1] for e in sorted(sums)]


class Timer:
  """Wall time of a study, for its report."""

  def __init__(self):
    self.start = time.perf_counter()

  def minutes(self) -> float:
    return (time.perf_counter() - self.start) / 60
