"""The work directory's JSON and CSV files: how the run and report stages read and write them.

One reader and writer per format, shared by the run stage (study.json, stages.json) and the
report stage (results, cells, claims).
"""

from __future__ import annotations

import csv
import json
import os


def read_json(path: str, default):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value) -> None:
  """Written whole or not at all (a temporary file renamed over `path`)."""
  from bnlab.rundir import files as rundir_files  # pylint: disable=g-import-not-at-top
  rundir_files.atomic_write(path, json.dumps(value, indent=1, default=str) + "\n")


def write_csv(path: str, rows: list[dict]) -> None:
  columns = list(dict.fromkeys(k for r in rows for k in r))
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: "" if r.get(k) is None else r[k] for k in columns})
