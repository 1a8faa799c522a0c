"""Progress: a run's clock and its line at each log (position, metrics, rate, ETA), and a
sweep's position over its groups with the sweep's ETA (`SweepProgress`).

What the loop and the sweep runner report of themselves to the log, apart from the records.
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


def _duration(seconds: float) -> str:
  s = int(max(seconds, 0) + 0.5)
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class SweepProgress:
  """A sweep's position over its groups, and its ETA from the groups trained so far.

  Why member-steps: groups differ in members and length, and a vmapped group of
  m members training s steps costs about m x s solo steps (`members.grouping_helps`),
  so the rate (member-steps per second) of the groups done carries over to the
  rest. Compiling is measured apart (`timesplit.compile_seconds`): the first
  group's compile would otherwise make the rate, and the ETA, several times too
  pessimistic for the groups that reuse its programs; each group left that needs
  new programs is charged the mean compile time of the groups that compiled.
  """

  def __init__(self, groups: list[dict]):
    """`groups`: per group {"members": names, "steps": steps left, "compiles": bool (it
    needs other programs than the group before it), "done": bool (nothing to train),
    "elsewhere": bool (another worker trains it)}."""
    self.groups = groups
    self.total_members = sum(len(g["members"]) for g in groups)
    self.trained_groups, self.trained_work, self.trained_seconds = 0, 0, 0.0  # trained here
    self.compile_seconds: list[float] = []  # of each group trained here that compiled

  def work(self, i: int) -> int:
    g = self.groups[i]
    return len(g["members"]) * g["steps"]

  def start(self, i: int, resumed_at: int = 0) -> None:
    """Logs "Sweep group k/N: its members and steps" as group `i` begins."""
    g = self.groups[i]
    names = g["members"]
    shown = ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")
    resumed = f", resumed at step {resumed_at}" if resumed_at else ""
    logging.info("Sweep group %d/%d: %d member(s) (%s), %s steps left%s", i + 1,
                 len(self.groups), len(names), shown, f"{g['steps']:,}", resumed)

  def finish(self, i: int, seconds: float, compiled: float, once: float = 0.0,
             trained: bool = True) -> None:
    """Logs group `i`'s time, the members done and the sweep's ETA. `once`: seconds of
    `seconds` that later groups do not repeat (loading the data); `trained`: False for a
    group that failed (its time says nothing of the rate)."""
    g = self.groups[i]
    g["done"] = True
    if trained:
      self.trained_groups += 1
      self.trained_work += self.work(i)
      self.trained_seconds += max(seconds - compiled - once, 1e-9)
      if g["compiles"]:
        self.compile_seconds.append(compiled)
    done = sum(len(x["members"]) for x in self.groups if x["done"])
    parts = [f"Sweep group {i + 1}/{len(self.groups)} done in {seconds:.1f} s "
             f"({compiled:.1f} s compiling)", f"{done}/{self.total_members} members done"]
    # Groups another worker trains (`bnlab.sweep.claims`) are not this worker's to time.
    left = [j for j, x in enumerate(self.groups) if not x["done"] and not x.get("elsewhere")]
    if not left:
      logging.info(" | ".join(parts + ["sweep finished"]))
      return
    if not self.trained_work:
      logging.info(" | ".join(parts + ["ETA unknown (no group trained yet)"]))
      return
    rate = self.trained_work / self.trained_seconds
    compile_each = (sum(self.compile_seconds) / len(self.compile_seconds)
                    if self.compile_seconds else 0.0)
    compiling = compile_each * sum(self.groups[j]["compiles"] for j in left)
    eta = sum(self.work(j) for j in left) / rate + compiling
    parts += [f"{rate:,.0f} member-steps/s over {self.trained_groups} group(s) trained, "
              "compiling apart", f"sweep ETA {_duration(eta)} ({len(left)} group(s) left; "
              f"{compile_each:.1f} s compiling added for each that needs new programs)"]
    logging.info(" | ".join(parts))
