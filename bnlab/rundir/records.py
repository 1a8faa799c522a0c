"""A run's records: metrics.jsonl, summary.json and TensorBoard events.

metrics.jsonl is the record a resume, a sweep and a study read back, so no
record is dropped silently: a line that is no record (a torn write) is moved
aside, never lost with the rest. TensorBoard gets the same numbers, under
namespaced tags, with the run's config as its hyperparameters.
"""

from __future__ import annotations

import json
import os
import sys

from absl import logging

from bnlab.config import flatten
from bnlab.rundir.errors import WorkDirError, io_error
from bnlab.rundir.files import aside_path, atomic_write, no_follow, read_json_object
from bnlab.rundir.strict_json import decode_nonfinite, dumps


# TensorBoard tags of the metrics records' keys: train_* and test_* under train/
# and test/, and these; other keys (e.g. lists of percentiles) are not written.
TENSORBOARD_TAGS = {"learning_rate": "train/learning_rate", "epoch": "progress/epoch",
                    "examples_per_sec": "progress/examples_per_sec",
                    "wall_time": "progress/wall_time"}
# The metrics the HParams dashboard shows for each run.
HPARAM_METRICS = ("test/accuracy", "test/loss", "train/accuracy", "train/loss")


def tensorboard_tag(key: str) -> str | None:
  """The TensorBoard tag of a metrics record's key, or None (not written)."""
  for prefix in ("train_", "test_", "val_"):
    if key.startswith(prefix):
      return f"{prefix[:-1]}/{key[len(prefix):]}"
  return TENSORBOARD_TAGS.get(key)


def hparams_of(config: dict) -> dict:
  """A run's config as TensorBoard hyperparameters: dotted keys, scalar values.

  Sequences become their text (e.g. "(100, 100)"); empty sections are left out.
  """
  out = {}
  for key, value in flatten(config).items():
    if isinstance(value, (bool, int, float, str)):
      out[key] = value
    elif isinstance(value, (list, tuple)):
      out[key] = str(tuple(value))
    elif value is not None and value != {}:
      out[key] = str(value)
  return out


def read_summary_file(path: str) -> dict:
  """A run's summary.json; WorkDirError naming the fix when it is unreadable or holds no
  final step (e.g. `{}`), which would otherwise stand for a finished run."""
  fix = "; delete it and rerun to redo the final evaluation from the last checkpoint"
  summary = read_json_object(path, fix)
  final = summary.get("final_step")
  if not isinstance(final, int) or isinstance(final, bool) or final < 0:
    raise WorkDirError(f"{path} is unreadable (its final_step is {final!r}, not a step){fix}")
  return decode_nonfinite(summary)


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without importing torch.

  tensorboardX imports torch, if installed, only to accept its tensors; bnlab
  writes plain floats, and importing torch costs ~2-3 s at every run's start.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class Records:
  """metrics.jsonl, summary.json and tensorboard/ of a run.

  Only the primary process writes them; the others keep their records in
  memory (and read them back from there).
  """

  def __init__(self, path: str, primary: bool):
    self.path = path
    self.primary = primary
    self.metrics_path = os.path.join(path, "metrics.jsonl")
    self.hparams: dict = {}  # the config as TensorBoard hyperparameters
    self._records: list[dict] | None = None
    self._summary: dict | None = None
    self._tb = None
    # The first step whose TensorBoard events, left by an earlier attempt, TensorBoard
    # is to discard (set when a resume cuts the records back; None: nothing to discard).
    self._tb_purge_step: int | None = None
    self._tb_suffix = ""

  def _scan_metrics(self) -> tuple[list[dict], list[tuple[int, bytes]],
                                   list[tuple[int, bytes]]]:
    """(records, [(line number, line)] of the records, the same of the lines that are not)."""
    if not os.path.exists(self.metrics_path):
      return [], [], []
    try:
      with open(self.metrics_path, "rb") as f:
        data = f.read()
    except OSError as e:
      raise io_error("reading", self.metrics_path, e) from e
    records, good, bad = [], [], []
    for number, line in enumerate(data.split(b"\n"), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line.decode())
      except ValueError:  # JSONDecodeError and UnicodeDecodeError
        record = None
      if not isinstance(record, dict) or type(record.get("step")) is not int:
        bad.append((number, line))
        continue
      records.append(decode_nonfinite(record))
      good.append((number, line))
    return records, good, bad

  def read_metrics(self) -> list[dict]:
    """Every record (the lines that are no record, e.g. torn writes, are left out)."""
    if self._records is not None:
      return list(self._records)
    return self._scan_metrics()[0]

  def repair_metrics(self) -> None:
    """Moves the lines of metrics.jsonl that are no record aside, keeping every record.

    A torn last line is what a kill during a write leaves; a damaged line
    before it is not, and the warning says which. Either way the lines are
    kept in metrics.jsonl.damaged-<time> and every record stays.
    """
    _, good, bad = self._scan_metrics()
    if not bad:
      return
    dest = aside_path(self.metrics_path, "damaged")
    try:
      with open(dest, "xb", opener=no_follow) as f:
        f.write(b"".join(line + b"\n" for _, line in bad))
    except OSError as e:
      raise io_error("writing", dest, e) from e
    atomic_write(self.metrics_path, "".join(line.decode() + "\n" for _, line in good))
    numbers = ", ".join(str(n) for n, _ in bad[:20]) + (", ..." if len(bad) > 20 else "")
    last_only = len(bad) == 1 and (not good or bad[0][0] > good[-1][0])
    logging.warning(
        "%s: line%s %s %s no record (%s); moved %s to %s and kept every other record (%d)",
        self.metrics_path, "s" if len(bad) > 1 else "", numbers,
        "are" if len(bad) > 1 else "is",
        "a write cut off by a kill" if last_only else "damaged",
        "them" if len(bad) > 1 else "it", dest, len(good))

  def truncate_metrics_after(self, step: int) -> None:
    """Keeps the records up to `step` (the checkpoint resumed from), each step once.

    TensorBoard's events after `step` cannot be cut out of its files in the
    same way; the writer opened next marks them to be discarded instead
    (`_write_tensorboard`).
    """
    tb_dir = os.path.join(self.path, "tensorboard")
    try:
      earlier = len(os.listdir(tb_dir))
    except OSError:
      earlier = 0
    if earlier:
      self._tb_purge_step = max(step + 1, 0)
      # tensorboardX names its file by the second and the host, and truncates a file
      # of that name: a new attempt's file gets a suffix that also sorts it last.
      self._tb_suffix = f".{earlier:04d}"
      if self._tb is not None:
        self._tb.close()
        self._tb = None
    records, last = [], None
    for r in self.read_metrics():
      if r["step"] > step:
        break
      if last is not None and r["step"] <= last:
        continue
      records.append(r)
      last = r["step"]
    if not self.primary:
      self._records = records
      return
    atomic_write(self.metrics_path, "".join(dumps(r) + "\n" for r in records))

  def write_metrics(self, record: dict) -> None:
    if not self.primary:
      if self._records is None:
        self._records = self.read_metrics()
      self._records.append(record)
      return
    try:  # the run's first record: nothing recorded before it
      first = os.path.getsize(self.metrics_path) == 0
    except OSError:
      first = True
    try:
      with open(self.metrics_path, "a", opener=no_follow) as f:
        f.write(dumps(record) + "\n")
        f.flush()
    except OSError as e:
      raise io_error("appending to", self.metrics_path, e) from e
    self._write_tensorboard(record, first=first)

  def _write_tensorboard(self, record: dict, first: bool) -> None:
    """The record's scalars under namespaced tags; the run's hyperparameters with its first."""
    tb_dir = os.path.join(self.path, "tensorboard")
    try:
      if self._tb is None:
        # purge_step: the new event file starts with a SessionLog START at that step,
        # on which TensorBoard discards the events of that step and later read before
        # it, i.e. those of an attempt that was stopped after its last checkpoint.
        self._tb = _summary_writer_class()(tb_dir, purge_step=self._tb_purge_step,
                                           filename_suffix=self._tb_suffix)
      if first and self.hparams:
        # Written into the run's own event file (tensorboardX's add_hparams would
        # open a sub-directory), so the HParams dashboard pairs them with its scalars.
        from tensorboardX.summary import hparams  # pylint: disable=g-import-not-at-top
        for summary in hparams(self.hparams, {tag: 0.0 for tag in HPARAM_METRICS}):
          self._tb.file_writer.add_summary(summary)
      for key, value in record.items():
        tag = tensorboard_tag(key)
        if tag and isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(tag, value, record["step"])
      self._tb.flush()
    except OSError as e:
      raise io_error("writing TensorBoard events to", tb_dir, e) from e

  def read_summary(self) -> dict | None:
    if self._summary is not None:
      return dict(self._summary)
    path = os.path.join(self.path, "summary.json")
    if not os.path.exists(path):
      return None
    return read_summary_file(path)

  def write_summary(self, summary: dict) -> None:
    if not self.primary:
      self._summary = dict(summary)
      return
    atomic_write(os.path.join(self.path, "summary.json"),
                 dumps(summary, indent=2, sort_keys=True) + "\n")

  def close(self) -> None:
    """Closes the TensorBoard writer, if one is open (an error closing it is ignored)."""
    if self._tb is not None:
      try:
        self._tb.close()
      except Exception:  # pylint: disable=broad-except
        pass
      self._tb = None
