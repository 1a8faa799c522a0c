"""A run's progress: its clock, and the progress line (position, metrics, rate, ETA) at each log.

What the loop reports of itself to the log, apart from the records it writes.
"""

from __future__ import annotations

import time

from absl import logging

from bnlab.engine.schedule import Schedule


class Clock:
  """Wall time since the run started (`run_start`) and the log interval's train steps."""

  def __init__(self, first_step: int, run_start: float):
    self.first_step = first_step
    self.run_start = run_start
    self.loop_start = time.perf_counter()  # the progress lines' rate: steps since here
    # Train steps timed in the current log interval and their seconds
    # (StepCalls.train: calls that compiled are not timed).
    self.timed_steps, self.timed_seconds = 0, 0.0

  def elapsed(self) -> float:
    return time.perf_counter() - self.run_start

  def add(self, steps: int, seconds: float) -> None:
    self.timed_steps += steps
    self.timed_seconds += seconds

  def examples_per_sec(self, batch_size: int) -> float | None:
    """Training examples per second over the interval's timed steps (None: none timed)."""
    if not self.timed_steps:
      return None
    return self.timed_steps * batch_size / max(self.timed_seconds, 1e-9)

  def next_interval(self) -> None:
    self.timed_steps, self.timed_seconds = 0, 0.0


def _position(label: str, plan: Schedule, step: int) -> str:
  return f"{label} {step}/{plan.total_steps} ({100 * step / plan.total_steps:.0f}%)"


def _eta(plan: Schedule, seconds: float, steps_done: int, step: int) -> str:
  """Time left at the rate so far, as H:MM:SS."""
  left = int(max(seconds / max(steps_done, 1) * (plan.total_steps - step), 0))
  return f"ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"


def log_group_progress(records, members, plan: Schedule, seconds: float, steps_done: int,
                        step: int) -> None:
  live = sum(m.recording for m in members)
  parts = [_position("group step", plan, step), f"{live}/{len(members)} members training"]
  accs = [r["test_accuracy"] for r in records if "test_accuracy" in r]
  if accs:
    parts.append(f"test acc {min(accs):.4f}..{max(accs):.4f}")
  if records and records[0].get("examples_per_sec") is not None:
    parts.append(f"{records[0]['examples_per_sec'] * len(members):,.0f} ex/s")
  parts.append(_eta(plan, seconds, steps_done, step))
  logging.info(" | ".join(parts))


def log_progress(record, plan: Schedule, seconds: float, steps_done: int,
                  step: int) -> None:
  parts = [_position("step", plan, step), f"epoch {record['epoch']:.2f}"]
  if "train_loss" in record:
    parts.append(f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}")
  if "test_accuracy" in record:
    parts.append(f"test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}")
  if record.get("examples_per_sec") is not None:
    parts.append(f"{record['examples_per_sec']:,.0f} ex/s")
  parts.append(_eta(plan, seconds, steps_done, step))
  logging.info(" | ".join(parts))
