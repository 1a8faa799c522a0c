"""The step loop shared by solo runs and groups: train, log, evaluate, checkpoint, stop members.

When things happen is `schedule`'s, how a call runs is `calls`'s, what a
collapse is `collapse`'s, the progress line `progress`'s and where a resumed
run picks up `resume`'s; the loop runs them in order and keeps each member's
records.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import numpy as np
from absl import logging

from bnlab import config as config_lib
from bnlab.engine import distributed
from bnlab.engine import evaluation
from bnlab.engine import profiling
from bnlab.engine import resume
from bnlab.engine import timesplit
from bnlab.rundir import per_image
from bnlab.rundir import signals
from bnlab.rundir import workdir as workdir_lib
from bnlab.engine.calls import DeviceData, StepCalls
from bnlab.engine.collapse import CollapseWatch
from bnlab.engine.progress import Clock, log_group_progress, log_progress
from bnlab.engine.schedule import Schedule
from bnlab.engine.state import take


@dataclasses.dataclass
class Member:
  """One run's directory and host-side status inside the step loop."""

  cfg: Any
  wd: workdir_lib.WorkDir
  recording: bool = True  # False once stopped (diverged, or collapsed with
  # train.stop_on_collapse) or finished before
  diverged_at: int | None = None
  collapsed_at: int | None = None  # the first collapse's step (CollapseWatch)
  collapse_reason: str | None = None
  stopped_on_collapse: bool = False
  # Set by `engine.train._train` once the data is loaded: chance depends on its classes.
  watch: CollapseWatch | None = None

  def observe(self, record: dict) -> bool:
    """Feeds `record` to the collapse watch; True at the run's first collapse."""
    reason = self.watch.update(record)
    if reason is None or self.collapsed_at is not None:
      return False
    self.collapsed_at, self.collapse_reason = record["step"], reason
    return True


# -- the loop ----------------------------------------------------------------

# Called once per member when it stops (diverged, or at the end) with
# (member, final step, its full-train evaluation or None, the run's time split).
OnStop = Callable[[Member, int, Any, timesplit.TimeSplit], None]


class Interrupted(KeyboardInterrupt):
  """A KeyboardInterrupt (Ctrl-C, SIGINT) during training, at `step` (None: before it)."""

  def __init__(self, step: int | None):
    super().__init__(step)
    self.step = step

  def __str__(self) -> str:
    where = "before training started" if self.step is None else f"at step {self.step}"
    return f"interrupted {where}; rerun the same command to resume from the last checkpoint"


class Loop:
  """The step loop of a solo run (one member, not stacked) or of a group.

  Trains, logs and evaluates every recording member, checkpoints into
  `ckpt_wd`, and calls `on_stop` for each member when it stops. A member whose
  loss turns non-finite is recorded as diverged at that log step and stops;
  the others go on (vmapped members are independent). A member that
  collapses (`CollapseWatch`: a finite loss that explodes, or accuracy back
  near chance) gets `collapsed`, `collapsed_at_step` and `collapse_reason`
  in the record where it is detected and in its summary, and by default
  keeps training (a collapse may recover); with `train.stop_on_collapse` it
  stops there like a diverged run, its last records kept.
  """

  def __init__(self, members: list[Member], ckpt_wd: workdir_lib.WorkDir, plan: Schedule,
               calls: StepCalls, data: DeviceData, zero_sums, on_stop: OnStop,
               split: timesplit.TimeSplit | None = None, stream=None):
    self.members, self.ckpt_wd, self.plan, self.calls = members, ckpt_wd, plan, calls
    # The training split streamed through grain (`bnlab.data.grain_source`), else None:
    # data.train_images then holds nothing.
    self.stream = stream
    self.data, self.zero_sums, self.on_stop = data, zero_sums, on_stop
    self.split = split or timesplit.TimeSplit()
    self.cfg = members[0].cfg
    self.eval_batch_size = min(self.cfg.train.eval_batch_size, len(data.test_labels))
    # The held-out validation examples (data.validation_size), scored beside the test set.
    self.val_batch_size = (None if data.val_labels is None else
                           min(self.cfg.train.eval_batch_size, len(data.val_labels)))
    # Seconds per example of the last evaluation, compiling apart (None: none yet): what
    # the final evaluation's announced duration is estimated from.
    self.eval_seconds_per_example: float | None = None

  def run(self, state) -> None:
    """Trains `state` (resumed from the latest checkpoint, if any) to the end.

    Ctrl-C (KeyboardInterrupt) comes out as `Interrupted`, naming the step.
    SIGTERM or SIGUSR1, caught while `signals.stop_signals_caught` holds (the
    entry points in `train` hold it), stops the loop at the next step
    boundary with a checkpoint there (`_stop_if_requested`): `signals.Preempted`.
    """
    self.step = None
    try:
      self._run(state)
    except (Interrupted, signals.Preempted):
      raise
    except KeyboardInterrupt:
      raise Interrupted(self.step) from None

  def _run(self, state) -> None:
    split = self.split
    state, sums, step = self._resume(state)
    self.step = step
    saved = step  # the newest checkpoint's step (0: none yet, nothing to keep)
    split.mark_startup()
    clock = Clock(step, split.start)
    self._stop_if_requested(step, state, sums, saved)  # came during the start-up
    if step == 0 and self.cfg.train.eval_at_start:
      self._record_start(state, clock)
    perm_epoch, perm = None, None
    trace = profiling.Trace(self.cfg.train.profile_steps, self.ckpt_wd)
    try:
      while step < self.plan.total_steps:
        self._stop_if_requested(step, state, sums, saved)
        end = self.plan.next_boundary(step)
        trace.before(step, end)
        with split.phase("train"):
          epoch = step // self.plan.steps_per_epoch
          if epoch != perm_epoch:
            perm, perm_epoch = self.calls.permutation(state, epoch), epoch
            if self.stream is not None:  # the host reads in this order
              perm = np.asarray(jax.device_get(perm))
          if self.stream is not None:
            state, sums, timed, seconds = self.calls.train_streamed(
                state, sums, self.stream, perm, step, end - step)
          else:
            state, sums, timed, seconds = self.calls.train(
                state, sums, self.data.train_images, self.data.train_labels, perm, end - step)
        clock.add(timed, seconds)
        step = self.step = end
        if self.plan.is_log(step):
          self._log(step, state, sums, clock)
          sums = self.zero_sums
        if not any(m.recording for m in self.members):
          break
        if self.plan.is_checkpoint(step):
          with split.phase("checkpoint"):
            if self.ckpt_wd.save(step, {"state": state, "sums": sums},
                                 force=step == self.plan.total_steps):
              saved = step
        trace.after(step)
    finally:
      trace.stop()
    with split.phase("checkpoint"):
      self.ckpt_wd.wait()
    self._finish(step, state, sums, clock)
    logging.info("Wall time %s", timesplit.describe(split.as_dict()))

  def _stop_if_requested(self, step: int, state, sums, saved: int) -> None:
    """At a step boundary: when SIGTERM or SIGUSR1 came (on any process), a checkpoint
    of this step (unless `saved`, the newest, is at it), then `signals.Preempted`.

    The checkpoint holds what a periodic one does (the state and the metric sums
    of the interval not yet logged), and the call boundaries depend on the step
    alone, so the resumed run ends bit-identical. The records are written up to
    the last log step; the checkpoint is sealed with its checksums before the
    exception leaves.
    """
    signum = signals.stop_requested() or 0
    if distributed.process_count() > 1:  # every process stops at the same step
      signum = distributed.agreed_max(signum)
    if not signum:
      return
    stop = signals.Preempted(signum, step)
    logging.warning("%s received: stopping at step %d%s.", stop.signal_name, step,
                    " after writing its checkpoint" if step > saved else "")
    with self.split.phase("checkpoint"):
      if step > saved:
        self.ckpt_wd.save(step, {"state": state, "sums": sums}, force=True)
      self.ckpt_wd.wait()
    raise stop

  def _resume(self, state):
    """(state, metric sums, step) from the latest checkpoint, or from the start."""
    sums = self.zero_sums
    restored = self.ckpt_wd.restore_latest({"state": state, "sums": sums})
    if restored is not None:
      state, sums = restored["state"], restored["sums"]
    step = int(np.max(jax.device_get(state.step)))
    if step > self.plan.total_steps:
      raise config_lib.ConfigError(
          f"the run in {self.ckpt_wd.path} is at step {step}, beyond the "
          f"{self.plan.total_steps} steps of this config's train.num_steps/num_epochs: a run "
          "can be extended, not shortened; raise them back, or use a new --workdir")
    stop_on_collapse = self.cfg.train.stop_on_collapse
    if step > 0:
      resume.check_records_reach(self.members, self.plan.last_log_at_or_before(step), step,
                                 self.ckpt_wd.path, self.calls.stacked, stop_on_collapse)
    if restored is not None:
      logging.info("Resumed from step %d in %s", step, self.ckpt_wd.path)
    for m in self.members:
      if m.recording:
        last = resume.replay_records(m, step)
        if last is not None and resume.stopped_by(last, stop_on_collapse):
          self._stop_again(m, last)
    return state, sums, step

  def _stop_again(self, m: Member, last: dict) -> None:
    """A member whose last record stopped it but has no summary (the attempt ended before
    it was written, or it was removed) stops there again, its summary written from its
    records."""
    if "diverged_at_step" in last:
      m.diverged_at = last["diverged_at_step"]
    else:
      m.stopped_on_collapse = True
    m.recording = False
    self.on_stop(m, last["step"], None, self.split)

  def _scores(self, state, images, labels, batch_size: int) -> dict:
    """{"running": .., kind: ..}: `images` scored with each of train.eval_statistics."""
    out = {"running": self.calls.evaluate(state, images, labels, batch_size)}
    out.update(self.calls.evaluate_others(state, images, labels, self.data.train_images,
                                          batch_size))
    return out

  def _evaluate(self, state) -> dict:
    """The evaluations of every member, on the device: {"running": .., kind: .., "analysis": ..},
    and {"val": {"running": .., kind: ..}} of the held-out validation examples, scored with the
    same statistics, where the data has them."""
    out = self._scores(state, self.data.test_images, self.data.test_labels,
                       self.eval_batch_size)
    if self.val_batch_size is not None:
      out["val"] = self._scores(state, self.data.val_images, self.data.val_labels,
                                self.val_batch_size)
    apply, _, params = self.calls.eval_inputs(state)
    out["analysis"] = evaluation.analysis_outputs(
        self.cfg.analysis, apply, params, state.batch_stats, self.data.test_images,
        self.calls.stacked)
    return out

  def _timed(self, start: float, compiled: float) -> None:
    """Records the duration per example forward of the evaluation begun at `start` (a
    `time.perf_counter()`; `compiled`: `timesplit.compile_seconds()` then), now done."""
    seconds = time.perf_counter() - start - (timesplit.compile_seconds() - compiled)
    sets = [len(self.data.test_labels)]
    if self.data.val_labels is not None:
      sets.append(len(self.data.val_labels))
    forwards = sum(sets) * (1 + len(self.calls.eval_statistics))
    if "population" in self.calls.eval_statistics:  # the statistics' recomputation too
      forwards += len(sets) * min(self.calls.population_examples, self.calls.num_train)
    self.eval_seconds_per_example = max(seconds, 0.0) / forwards

  def _eval_records(self, host: dict) -> list[dict]:
    """Each member's test loss, accuracy, per-image results (`per_image`: which test images
    it classified correctly), the same of the validation examples (val_*) where there are
    some, and analysis recordings from `_evaluate`'s host copy."""
    analysis = evaluation.analysis_records(host.pop("analysis"), len(self.members),
                                           self.calls.stacked)
    sets = [("test", host)] + ([("val", host.pop("val"))] if "val" in host else [])
    results = []
    for i in range(len(self.members)):
      result = {}
      for name, scores in sets:
        for kind, e in scores.items():
          e = self.calls.member(e, i)
          suffix = "" if kind == "running" else f"_{kind}"
          result.update({f"{name}_loss{suffix}": float(e["loss"]),
                         f"{name}_accuracy{suffix}": float(e["accuracy"]),
                         f"{name}_correct{suffix}": per_image.encode(np.asarray(e["correct"]))})
      results.append({**result, **analysis[i]})
    return results

  def _record_start(self, state, clock: Clock) -> None:
    """The evaluation before training (`train.eval_at_start`), recorded as step 0 by each
    recording member (a finished member carried along in a group keeps its records)."""
    if not any(m.recording for m in self.members):
      return
    with self.split.phase("evaluate"):
      start, compiled = time.perf_counter(), timesplit.compile_seconds()
      host = jax.device_get(self._evaluate(state))
      self._timed(start, compiled)
      evals = self._eval_records(host)
    with self.split.phase("log"):
      for m, e in zip(self.members, evals):
        if m.recording:
          m.wd.write_metrics({"step": 0, "epoch": 0.0, **e, "wall_time": clock.elapsed()})

  def _log(self, step: int, state, sums, clock: Clock) -> None:
    """The log action: records the interval's training metrics (and an evaluation when due).

    The interval's metric sums, learning rates and evaluations come to the
    host in one transfer. A group's evaluation runs even if some members
    diverged (their results are not recorded).
    """
    device = {"sums": sums, "lrs": self.calls.learning_rates(state)}
    with self.split.phase("evaluate"):
      start, compiled = time.perf_counter(), timesplit.compile_seconds()
      if self.plan.is_eval(step) and any(m.recording for m in self.members):
        device["evals"] = self._evaluate(state)
      host = jax.device_get(device)
      evals = None
      if "evals" in host:
        self._timed(start, compiled)
        evals = self._eval_records(host["evals"])
    with self.split.phase("log"):
      lrs = None if host["lrs"] is None else np.asarray(host["lrs"], np.float32)
      records = self._write_records(step, host["sums"], lrs, evals, clock)
      self._report_progress(records, step, clock)
    clock.next_interval()

  def _write_records(self, step: int, host, lrs, evals, clock: Clock) -> list[dict]:
    """Each recording member's metrics record; stops the members that diverged."""
    bs = self.cfg.train.batch_size
    records = []
    for i, m in enumerate(self.members):
      if not m.recording:
        continue
      h = self.calls.member(host, i)
      count = max(float(h["count"]), 1.0)
      record = {"step": step, "epoch": step / self.plan.steps_per_epoch,
                # Steps averaged in this record (its sums survive a resume).
                "interval_steps": int(h["count"]),
                "train_loss": float(h["loss"]) / count,
                "train_accuracy": float(h["correct"]) / (count * bs),
                # Of the timed train calls only (None when each of them compiled).
                "examples_per_sec": clock.examples_per_sec(bs)}
      if lrs is not None:  # the learning rate of the interval's last step
        # The float32 value's shortest decimal (0.05, not 0.05000000074505806).
        record["learning_rate"] = float(str(lrs[i] if self.calls.stacked else lrs[()]))
      if h["first_nonfinite_step"] >= 0:
        m.diverged_at = int(h["first_nonfinite_step"])
        record["diverged_at_step"] = m.diverged_at
      elif evals is not None:
        record.update(evals[i])
      collapsed = m.diverged_at is None and m.observe(record)
      if collapsed:
        record.update(collapsed=True, collapsed_at_step=step,
                      collapse_reason=m.collapse_reason)
      record["wall_time"] = clock.elapsed()
      m.wd.write_metrics(record)
      records.append(record)
      if m.diverged_at is not None:
        logging.warning("Loss became non-finite at step %d: run %s stopped (diverged).",
                        m.diverged_at, m.wd.path)
        m.recording = False
        self.on_stop(m, step, None, self.split)
      elif collapsed:
        stop = self.cfg.train.stop_on_collapse
        logging.warning("Run %s collapsed at step %d (%s); %s.", m.wd.path, step,
                        m.collapse_reason, "stopped (train.stop_on_collapse)" if stop
                        else "training goes on (train.stop_on_collapse=False)")
        if stop:
          m.recording, m.stopped_on_collapse = False, True
          self.on_stop(m, step, None, self.split)
    return records

  def _report_progress(self, records: list[dict], step: int, clock: Clock) -> None:
    """The progress action: one log line with the position, latest metrics and ETA."""
    seconds, steps_done = time.perf_counter() - clock.loop_start, step - clock.first_step
    if self.calls.stacked:
      log_group_progress(records, self.members, self.plan, seconds, steps_done, step)
    elif records:
      log_progress(records[0], self.plan, seconds, steps_done, step)

  def _announce_final_evaluation(self) -> None:
    """A line before the full-train-set evaluation (`train.final_train_eval`), which takes
    as long as several test evaluations and would otherwise run unannounced after the
    progress lines' "ETA 0:00:00"; its duration from the last test evaluation's rate."""
    n = self.calls.num_train
    per = self.eval_seconds_per_example
    guess = ("time unknown" if per is None else
             f"about {max(per * n, 0.1):.1f} s (at the last test evaluation's rate) plus "
             "its compiling")
    who = f"{len(self.members)} members'" if self.calls.stacked else "the run's"
    logging.info("Final evaluation (train.final_train_eval): %s weights on the %s training "
                 "images with the running averages, %s", who, f"{n:,}", guess)

  def _finish(self, step: int, state, sums, clock: Clock) -> None:
    """The members still recording at the end: full-train evaluation, final state, stop."""
    live = [i for i, m in enumerate(self.members) if m.recording]
    if not live:
      return
    full = None
    if self.cfg.train.final_train_eval:
      self._announce_final_evaluation()
      start = time.perf_counter()
      with self.split.phase("evaluate"):
        batch = min(self.cfg.train.eval_batch_size, self.calls.num_train)
        if self.stream is not None:
          full = self.calls.evaluate_streamed(state, self.stream, batch)
        else:
          full = jax.device_get(self.calls.evaluate(
              state, self.data.train_images, self.data.train_labels, batch, per_image=False))
      logging.info("Final evaluation done in %.1f s", time.perf_counter() - start)
    if self.calls.stacked:  # each member's final state where a solo run keeps it
      with self.split.phase("checkpoint"):
        # One transfer, then each member's part from the host copy (orbax writes
        # host arrays 2x faster than device ones, and nothing is sliced on the device).
        host = jax.device_get({"state": state, "sums": sums})
        for i in live:  # a killed attempt may have written some of them already
          self.members[i].wd.save(
              step, {"state": take(host["state"], i), "sums": take(host["sums"], i)},
              force=True, replace=True)
    with self.split.phase("log"):
      for i in live:
        self.on_stop(self.members[i], step,
                     None if full is None else self.calls.member(full, i), self.split)
