"""What a study publishes so anyone can recompute every verdict: data.json.gz, and the check.

data.json.gz holds, per run, every value the claims read (series included) and the per-image
results of the test accuracies they compare. The report stage judges the claims from this
data and nothing else, and `verify` judges them again from the published copy, so a verdict
that cannot be recomputed from `results/NAME/` cannot be printed.
"""

from __future__ import annotations

import gzip
import io
import json
import os

from bnlab.study import cells as cells_lib
from bnlab.study import config as study_config
from bnlab.study import rules as rules_lib

FORMAT = "bnlab-study-data/1"
DATA = "data.json.gz"
# The recorded keys that are test accuracies (their noise includes the test set's).
TEST_ACCURACIES = ("test_accuracy", "test_accuracy_population", "test_accuracy_batch")


def test_accuracy_metrics(metrics: dict, kinds=("summary", "last", "max", "series")) -> list:
  """The study's metrics that read a recorded test accuracy."""
  return [n for n, s in metrics.items() if len(s) > 1 and s[1] in TEST_ACCURACIES
          and s[0] in kinds]


def read_metrics(cfg: dict) -> list[str]:
  """The metrics the claims read, with every metric those derive from, in config order."""
  want: set[str] = set()
  todo = [m for spec in cfg["claims"].values() for m in study_config.claim_metrics(spec)]
  while todo:
    m = todo.pop()
    if m not in want:
      want.add(m)
      todo += list(study_config.metric_refs(tuple(cfg["metrics"][m])))
  return [m for m in cfg["metrics"] if m in want]


def data_of(rows: list[dict], cfg: dict, members: list[dict]) -> dict:
  """The published data of `rows` (one per run): their keys, the claims' metric values and
  the per-image results of those that are test accuracies."""
  metrics = read_metrics(cfg)
  keys = list(dict.fromkeys(k for m in members for k in m["key"]))
  out = []
  for r in rows:
    row = {k: r.get(k) for k in ("name", "status", *keys)}
    row.update({m: r.get(m) for m in metrics}, n_test=r.get("n_test"))
    images = {m: v for m, v in (r.get("per_image") or {}).items() if m in metrics}
    if images:
      row["per_image"] = images
    out.append(row)
  return {"format": FORMAT, "cells": list(cfg["cells"]),
          "metrics": {m: list(cfg["metrics"][m]) for m in metrics}, "rows": out}


def annotate_test_sets(cells: list[dict], metrics: dict) -> list[dict]:
  """Adds to each test-accuracy statistic of `cells` its test-set size `n_test` and binomial
  standard error (the rules' unpaired fallback reads n_test)."""
  for c in cells:
    for m in test_accuracy_metrics(metrics):
      st = c["stats"].get(m)
      if st is None or not st["n"]:
        continue
      st["n_test"] = n = next((r.get("n_test") for r in c["rows"] if r.get("n_test")), None)
      if n and "mean" in st:
        st["binomial_se"] = cells_lib.binomial_se(st["mean"], n)
  return cells


def verdicts(cfg: dict, data: dict) -> list[dict]:
  """The claims' verdicts from the published data alone."""
  metrics = {m: tuple(s) for m, s in data["metrics"].items()}
  cells = cells_lib.make_cells(data["rows"], cfg["cells"], list(metrics))
  return rules_lib.judge(cfg["claims"], annotate_test_sets(cells, metrics))


def normal(value):
  """`value` as it reads back from JSON (tuples as lists, keys as strings)."""
  return json.loads(json.dumps(value, default=str))


def write(path: str, data: dict) -> None:
  """`data` as gzip-compressed JSON, the same bytes for the same data (no time stamp)."""
  raw = io.BytesIO()
  with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as f:
    f.write(json.dumps(data, separators=(",", ":"), default=str).encode())
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(raw.getvalue())
  os.replace(tmp, path)


def read(path: str) -> dict:
  with gzip.open(path, "rt") as f:
    data = json.load(f)
  if data.get("format") != FORMAT:
    raise ValueError(f"{path} is not bnlab study data ({FORMAT}); got {data.get('format')!r}")
  return data


def verify(directory: str) -> tuple[int, list[str]]:
  """(verdicts checked, problems): every verdict in `directory`'s claims.json recomputed from
  its study.json and data.json.gz alone, and its registration's hashes checked."""
  from bnlab.study import registration  # pylint: disable=g-import-not-at-top
  problems = []
  paths = {n: os.path.join(directory, n) for n in ("study.json", DATA, "claims.json")}
  missing = [n for n, p in paths.items() if not os.path.exists(p)]
  if missing:
    return 0, [f"{directory} has no {', '.join(missing)}: publish the study with --out"]
  with open(paths["study.json"]) as f:
    cfg = json.load(f)["config"]
  with open(paths["claims.json"]) as f:
    published = json.load(f)
  again = normal(verdicts(cfg, read(paths[DATA])))
  if len(again) != len(published):
    problems.append(f"{len(published)} verdicts published, {len(again)} recomputed")
  for old, new in zip(published, again):
    where = f"{old.get('claim')} ({old.get('where') or 'all'})"
    for key in ("claim", "where", "verdict", "corrected", "numbers"):
      if old.get(key) != new.get(key):
        problems.append(f"{where}: {key} published {_short(old.get(key))}, recomputed "
                        f"{_short(new.get(key))}")
  problems += registration.problems(directory)
  return len(published), problems


def _short(value) -> str:
  text = json.dumps(value, default=str)
  return text if len(text) < 160 else text[:157] + "..."
