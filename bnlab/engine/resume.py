"""Where a resumed run picks up: each member's records checked against the checkpoint and replayed.

The checkpoint says where the state is; metrics.jsonl says what each member has
reported. They must agree before training goes on, and a member's collapse
history and its stop (diverged, or collapsed with `train.stop_on_collapse`) come
back from its records, so an interrupted run ends as the uninterrupted one would.
"""

from __future__ import annotations

import os

from bnlab.rundir import errors as rundir_errors


def stopped_by(record: dict, stop_on_collapse: bool) -> bool:
  """Whether `record` stopped its member: diverged, or collapsed with `train.stop_on_collapse`."""
  return "diverged_at_step" in record or bool(record.get("collapsed") and stop_on_collapse)


def check_records_reach(members, want: int, step: int, ckpt_path: str, stacked: bool,
                        stop_on_collapse: bool) -> None:
  """WorkDirError when a recording member's records stop before step `want`, the last log
  step of the checkpoint at `step` in `ckpt_path`.

  Its metrics.jsonl was deleted, cut short, or its directory made anew (e.g. a
  finished member's removed to redo it): resuming would leave those steps out of
  its records for good. A member that stopped (`stopped_by`) has its last
  record where it stopped.
  """
  for m in members:
    if not m.recording:
      continue
    records = m.wd.read_metrics()
    last = records[-1] if records else {}
    if stopped_by(last, stop_on_collapse):
      continue
    have = last.get("step", -1)
    if have < want:
      where = f"records up to step {have}" if records else "no records"
      raise rundir_errors.WorkDirError(
          f"{m.wd.metrics_path} holds {where}, but the run resumes from its "
          f"checkpoint at step {step} in {ckpt_path}: the records between are "
          "gone (the file removed or cut short, or the directory made anew) and resuming "
          "would leave them out. Put the records back, or move "
          f"{os.path.join(ckpt_path, 'checkpoints')} aside to retrain from step "
          "0" + (" (members already finished keep their results)" if stacked else ""))


def replay_records(m, step: int) -> dict | None:
  """Member `m`'s records cut back to `step` and replayed into its collapse watch; its last
  record (None when it has none: a fresh start, step 0, keeps no records at all)."""
  m.wd.truncate_metrics_after(step if step > 0 else -1)
  records = m.wd.read_metrics() if step > 0 else []
  for r in records:
    m.watch.update(r)
    if r.get("collapsed") and m.collapsed_at is None:
      m.collapsed_at, m.collapse_reason = r["collapsed_at_step"], r.get("collapse_reason")
  return records[-1] if records else None
