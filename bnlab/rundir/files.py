"""How bnlab reads and writes a run's files: never through a link, never half-written.

A kill at any moment leaves the old file or the new, never a part
(`atomic_write`; the next run removes its `.tmp-*` temporaries); a symbolic
link where bnlab's file belongs is refused, not followed (`refuse_link`,
`no_follow`); what bnlab replaces or finds damaged is moved aside, not deleted
(`aside_path`); a JSON file it cannot read is an error that says what that
costs (`read_json_object`).
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from bnlab.rundir.errors import WorkDirError, io_error, link_error
from bnlab.errors import one_line


def refuse_link(path: str) -> None:
  """WorkDirError if `path` is a symbolic link (bnlab writes only its own files)."""
  if os.path.islink(path):
    raise link_error(path)


def no_follow(path: str, flags: int) -> int:
  """An `opener` for open() that does not follow a link in the last component."""
  return os.open(path, flags | os.O_NOFOLLOW, 0o666)


def atomic_write(path: str, text: str) -> None:
  """`path` replaced by `text` at once: a kill leaves the old file or the new, never a part."""
  refuse_link(path)
  tmp = None
  try:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except OSError as e:
    if tmp and os.path.exists(tmp):
      os.remove(tmp)
    raise io_error("writing", path, e) from e
  except BaseException:
    if tmp and os.path.exists(tmp):
      os.remove(tmp)
    raise


def aside_path(path: str, tag: str) -> str:
  """`path`.`tag`-<time>, not yet taken, next to `path`."""
  base = f"{path}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
  dest, n = base, 1
  while os.path.lexists(dest):
    dest, n = f"{base}.{n}", n + 1
  return dest


def read_json_object(path: str, consequence: str) -> dict:
  """The JSON object in `path`; WorkDirError (problem + `consequence`) if it is unreadable."""
  try:
    with open(path) as f:
      value = json.load(f)
    if not isinstance(value, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    raise WorkDirError(
        f"{path} is unreadable ({one_line(e, 120)}){consequence}") from None
  return value
