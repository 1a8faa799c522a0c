"""The work directory's JSON and CSV files: how the run and report stages read and write them.

One reader and writer per format, shared by the run stage (study.json, stages.json) and the
report stage (results, cells, claims). Every write is whole or not at all (a temporary file
renamed over the old one), so a kill leaves the old file or the new; a file that cannot be
read, written or made is one `WorkDirError` naming it and the fix.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile

from bnlab.rundir import errors as rundir_errors
from bnlab.rundir import files as rundir_files
from bnlab.errors import one_line

_REDO = "rerun the study without --stage=report (finished runs are not trained again)"
# File name -> (the JSON type it holds, what to do when it is damaged).
_KNOWN = {
    "registration.json": (dict, (
        "it is the claims' registration and cannot be made again: restore it (e.g. from the "
        "published results/NAME/registration.json), or move it aside to register anew (the "
        "report then shows the claims registered now, after the results)")),
    "stages.json": (list, (
        "it records each run stage's time and machine: restore it, or move it aside (the "
        "report then lacks those stages), then rerun")),
    "study.json": (dict, "it is written from the study config: delete it and " + _REDO),
    "runs/results.json": (list, f"the run stage writes it again: {_REDO}"),
    "summary.json": (dict, (
        "delete it and " + _REDO + ": the run redoes its final evaluation from its last "
        "checkpoint")),
    "config.json": (dict, (
        "delete it and " + _REDO + ": the run restores it from its checkpoints")),
    "claims.json": (list, "publish the study again with --out"),
}


def _known(path: str):
  name = os.path.basename(path)
  runs = os.path.basename(os.path.dirname(os.path.abspath(path))) == "runs"
  return _KNOWN.get(f"runs/{name}" if runs and name == "results.json" else name,
                    (None, "move it aside, then rerun"))


def damage(path: str) -> str:
  """Why the JSON file `path` cannot be used ("" when it can): unreadable, not JSON, or not
  the type its name holds."""
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError) as e:
    return getattr(e, "strerror", None) or one_line(e, 120)
  kind = _known(path)[0]
  if kind is not None and not isinstance(value, kind):
    return f"it holds a {type(value).__name__}, not a JSON {kind.__name__}"
  if isinstance(value, list) and not all(isinstance(v, dict) for v in value):
    return "not every entry is a JSON object"
  return ""


def read_json(path: str, default, fix: str = ""):
  """`path`'s JSON value, `default` when there is none; WorkDirError naming the file and the
  fix (`fix`, else the one its name calls for) when it is damaged."""
  if not os.path.exists(path):
    return default
  problem = damage(path)
  if problem:
    raise rundir_errors.WorkDirError(
        f"{path} is damaged ({problem}); {fix or _known(path)[1]}")
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value) -> None:
  """Written whole or not at all (a temporary file renamed over `path`)."""
  rundir_files.atomic_write(path, json.dumps(value, indent=1, default=str) + "\n")


def write_csv(path: str, rows: list[dict]) -> None:
  """Written whole or not at all; None as an empty field."""
  columns = list(dict.fromkeys(k for r in rows for k in r))
  text = io.StringIO(newline="")
  writer = csv.DictWriter(text, fieldnames=columns)
  writer.writeheader()
  for r in rows:
    writer.writerow({k: "" if r.get(k) is None else r[k] for k in columns})
  rundir_files.atomic_write(path, text.getvalue())


def make_dir(path: str) -> str:
  """`path` as a directory (made if missing); WorkDirError when a file stands there or it
  cannot be made."""
  if os.path.lexists(path) and not os.path.isdir(path):
    raise rundir_errors.WorkDirError(
        f"{path} is a file, where the study keeps a directory; move it aside, then rerun")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise rundir_errors.io_error("making", path, e) from None
  return path


@contextlib.contextmanager
def replacing(path: str):
  """A temporary file name next to `path` to write into; renamed over `path` when the block
  ends, removed when it fails. An OSError is a WorkDirError naming `path`."""
  rundir_files.refuse_link(path)
  tmp = None
  try:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    os.close(fd)
    yield tmp
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except OSError as e:
    raise rundir_errors.io_error("writing", path, e) from None
  finally:
    if tmp and os.path.exists(tmp):
      os.remove(tmp)


def copy_file(src: str, dest: str) -> None:
  """`src` copied over `dest`, whole or not at all."""
  with replacing(dest) as tmp:
    try:
      shutil.copyfile(src, tmp)
    except OSError as e:
      raise rundir_errors.io_error("copying", src, e) from None
