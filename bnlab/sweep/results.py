"""A sweep's results: each member's row, read from its directory, and the results files.

Apart from the running: `bnlab.study` reads and checks its runs' records with
the same functions, and runs nothing.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Iterable

from bnlab.sweep.combinators import Variant, format_value
from bnlab.sweep.groups import Member

TARGET_ACCURACY = 0.97
RESULT_FIELDS = ("test_accuracy", "test_loss", "train_loss", "diverged", "diverged_at_step",
                 "steps_to_97", "final_step", "wall_time")


def steps_to_accuracy(records: Iterable[dict], target: float = TARGET_ACCURACY):
  """The first step whose test accuracy is >= `target`, or None."""
  for r in records:
    if r.get("test_accuracy") is not None and r["test_accuracy"] >= target:
      return r["step"]
  return None


def records_cut_short(path: str, summary: dict, records: list[dict]) -> str | None:
  """Why a finished run's records in `path` cannot be read as its history, or None.

  A run's last record is at the step it finished (or stopped) at, summary.json's
  `final_step`; records ending before it were cut short, replaced or removed.
  """
  final = summary.get("final_step")
  last = records[-1].get("step") if records else None
  if final is None or last == final:
    return None
  metrics = os.path.join(path, "metrics.jsonl")
  if records and last > final:
    return (f"{metrics} goes on to step {last}, past the step {final} the run finished at "
            "(summary.json): a longer run was started there and stopped; rerun it with "
            "that length to finish it")
  held = f"ends at step {last}" if records else "holds no records"
  return (f"{metrics} {held}, but the run finished at step {final} (summary.json): its "
          "records were cut short or replaced; put them back, or move the run's directory "
          "aside and rerun to train it again")


def read_jsonl(path: str) -> list[dict]:
  """The records of a metrics.jsonl, NaN/inf restored (stored as null: bnlab.rundir.workdir)."""
  from bnlab.rundir import strict_json  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(strict_json.decode_nonfinite(json.loads(line)))
      except json.JSONDecodeError:
        break
  return out


def result_row(m: Member, path: str, error: str | None) -> dict:
  row: dict[str, Any] = {"name": m.name}
  for key, value in m.overrides.items():
    row[key] = format_value(value) if isinstance(value, Variant) else value
  summary = None
  summary_path = os.path.join(path, "summary.json")
  if os.path.exists(summary_path):
    from bnlab.rundir import errors as rundir_errors  # pylint: disable=g-import-not-at-top
    from bnlab.rundir import records as rundir_records  # pylint: disable=g-import-not-at-top
    try:
      summary = rundir_records.read_summary_file(summary_path)
    except rundir_errors.WorkDirError as e:
      error = error or str(e)
  records = read_jsonl(os.path.join(path, "metrics.jsonl"))
  if summary is not None:
    error = error or records_cut_short(path, summary, records)
  if error is not None or summary is None:
    row["status"] = "failed" if error else "unfinished"
    row.update({k: None for k in RESULT_FIELDS})
  else:
    row["status"] = "diverged" if summary.get("diverged") else "done"
    for key in RESULT_FIELDS:
      value = summary.get(key)
      row[key] = None if isinstance(value, float) and not math.isfinite(value) else value
    row["steps_to_97"] = steps_to_accuracy(records)
  row["error"] = error
  return row


def kept_errors(workdir: str, selected: set[str]) -> dict[str, str]:
  """{name: error} of the members the last results.json records failed, `selected` aside.

  A run with `--only` trains the selected members; the others' rows are read
  from their directories again, where a failure leaves no trace (no summary:
  the row would read "unfinished", its error lost). So their errors are
  carried over from the results they had. An unreadable results.json keeps
  nothing (the rows are then what the directories say).
  """
  try:
    rows = load_results(workdir)
  except (OSError, ValueError):
    return {}
  if not isinstance(rows, list):
    return {}
  return {r["name"]: r["error"] for r in rows
          if isinstance(r, dict) and r.get("status") == "failed" and r.get("error")
          and isinstance(r.get("name"), str) and r["name"] not in selected}


def write_results(workdir: str, rows: list[dict]) -> None:
  """`results.json` (a list of rows) and `results.csv` (empty cells for None), each whole
  or not at all: the workers of one sweep may write them at the same moment."""
  from bnlab.rundir import files as rundir_files  # pylint: disable=g-import-not-at-top
  columns: list[str] = []
  for row in rows:
    columns.extend(k for k in row if k not in columns)
  rundir_files.atomic_write(os.path.join(workdir, "results.json"),
                            json.dumps(rows, indent=1) + "\n")
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=columns)
  writer.writeheader()
  for row in rows:
    writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
  rundir_files.atomic_write(os.path.join(workdir, "results.csv"), text.getvalue())


def load_results(workdir: str) -> list[dict]:
  """The rows of a sweep's results.json."""
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)
