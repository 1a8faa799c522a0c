"""`train.profile_steps`: a JAX profiler trace of some train calls, into WORKDIR/profile/.

Why around whole calls: the loop's calls end at boundaries fixed by the step
alone (`schedule.Schedule`), and moving them would change the compiled programs
and with them the float rounding; so the trace starts before the first call
that runs a step of start+1..stop and stops after the call that reaches stop
(with the log, evaluation and checkpoint due there), and a traced run computes
exactly what an untraced one does. Only the primary process traces (processes
on one host would write the same file names).
"""

from __future__ import annotations

import os

import jax
from absl import logging


class Trace:
  """Starts and stops `jax.profiler`'s trace as the loop passes `steps` = (start, stop)."""

  def __init__(self, steps, wd):
    self.steps = tuple(steps)
    self.dir = os.path.join(wd.path, "profile")
    self.enabled = bool(self.steps) and wd.primary
    self.active = False

  def before(self, step: int, end: int) -> None:
    """Before the call that runs steps step+1..end: starts the trace where it is due."""
    if self.active:
      self.last = end
      return
    if not self.enabled:
      return
    start, stop = self.steps
    if step < stop and end > start:
      os.makedirs(self.dir, exist_ok=True)
      logging.info("Profiling from step %d (train.profile_steps=%s)", step + 1, self.steps)
      try:
        jax.profiler.start_trace(self.dir)
      except RuntimeError as e:  # a trace the caller started runs: it is not cut short
        logging.warning("No trace of train.profile_steps=%s: %s", self.steps, e)
        self.enabled = False
        return
      self.active, self.first, self.last = True, step + 1, end

  def after(self, step: int) -> None:
    """After the work at `step` (its call, log, evaluation, checkpoint): stops at stop."""
    if self.active and step >= self.steps[1]:
      self.stop()
      self.enabled = False  # one trace per run attempt

  def stop(self) -> None:
    """Ends the trace (if one runs) and writes it; also where the loop ends early."""
    if not self.active:
      return
    self.active = False
    jax.profiler.stop_trace()
    logging.info("Profiler trace of steps %d..%d written to %s (TensorBoard: tensorboard "
                 "--logdir %s; Perfetto: open its *.trace.json.gz)", self.first, self.last,
                 self.dir, self.dir)
