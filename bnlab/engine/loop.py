"""The step loop shared by solo runs and groups: schedule plan, trigger predicate, periodic actions."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from absl import logging

from bnlab import config as config_lib
from bnlab.engine import distributed
from bnlab.engine import evaluation
from bnlab.engine import members as members_lib
from bnlab.models import networks as models
from bnlab.engine import state as state_lib
from bnlab.engine import steps as steps_lib
from bnlab.engine import timesplit
from bnlab.rundir import workdir as workdir_lib
from bnlab.engine.state import take

# -- compiled forms: the one place where the step functions are jitted -------

run_steps = jax.jit(steps_lib.scan_steps,
                    static_argnames=("length", "batch_size", "unroll", "batch_sharding"))
run_one_step = jax.jit(steps_lib.one_step, static_argnames=("batch_size", "batch_sharding"))
run_permutation = jax.jit(steps_lib.permutation, static_argnames=("num_examples",))
group_permutations = jax.jit(members_lib.permutations, static_argnames=("num_examples",))
run_steps_group = jax.jit(members_lib.scan_steps,
                          static_argnames=("length", "batch_size", "unroll"))
run_one_step_group = jax.jit(members_lib.one_step, static_argnames=("batch_size",))


# -- the schedule plan and its trigger ---------------------------------------

@dataclasses.dataclass(frozen=True)
class Schedule:
  """Where a run's steps are grouped into compiled calls and what happens after.

  Call boundaries are a fixed function of the absolute step (epoch ends,
  log/eval/checkpoint steps, `steps_per_call` multiples), so a resumed run
  executes exactly the same compiled programs on the same data as an
  uninterrupted one and ends bit-identical on the same platform.
  """

  total_steps: int
  steps_per_epoch: int
  steps_per_call: int
  eval_every: int
  log_every: int
  checkpoint_every: int

  def next_boundary(self, step: int) -> int:
    """The first step after `step` at which a call ends."""
    candidates = [self.total_steps]
    for every in (self.steps_per_epoch, self.eval_every, self.log_every,
                  self.checkpoint_every):
      candidates.append((step // every + 1) * every)
    epoch_start = step // self.steps_per_epoch * self.steps_per_epoch
    k = self.steps_per_call
    candidates.append(epoch_start + ((step - epoch_start) // k + 1) * k)
    return min(candidates)

  def due(self, step: int, every: int) -> bool:
    """The trigger of all periodic work: every `every` steps, and at the final step."""
    return step % every == 0 or step == self.total_steps

  def is_eval(self, step: int) -> bool:
    return self.due(step, self.eval_every)

  def is_log(self, step: int) -> bool:
    return self.due(step, self.log_every) or self.is_eval(step)

  def is_checkpoint(self, step: int) -> bool:
    return self.due(step, self.checkpoint_every)

  def last_log_at_or_before(self, step: int) -> int:
    """The last step up to `step` with a record (`is_log`); 0 if none."""
    return max(step // self.log_every * self.log_every,
               step // self.eval_every * self.eval_every,
               step if step == self.total_steps else 0)


def make_schedule_plan(cfg, num_train: int) -> Schedule:
  """The step schedule for the `train` config section over `num_train` examples.

  `train.steps_per_call=0`: calls of the greatest common divisor of the
  epoch, log, evaluation and checkpoint intervals when it is at least a
  quarter epoch, so that every call but the last has one length and
  compiles one program (epochs of 1,000 steps evaluated every 2,500: calls of
  500, not of 1,000 and 500); else of an epoch.
  """
  t = cfg.train
  spe = num_train // t.batch_size
  total = t.num_steps or t.num_epochs * spe
  eval_every = t.eval_every_steps or t.eval_every_epochs * spe
  log_every = t.log_every_steps or eval_every
  ckpt_every = t.checkpoint_every_steps or eval_every
  per_call = t.steps_per_call
  if not per_call:
    common = math.gcd(spe, eval_every, log_every, ckpt_every)
    per_call = common if common >= spe / 4 else spe
  return Schedule(total, spe, per_call, eval_every, log_every, ckpt_every)


# -- the pieces the loop runs ------------------------------------------------

def data_parallel_mesh(num_devices: int) -> jax.sharding.Mesh | None:
  """A 1-D mesh ("batch") over `num_devices` devices (0: all), or None for one.

  The devices of every process of a multi-process run (`bnlab.engine.distributed`),
  the same number from each.
  """
  devices = distributed.mesh_devices(num_devices)
  if len(devices) == 1:
    return None
  return jax.sharding.Mesh(np.array(devices), ("batch",))


class DeviceData(NamedTuple):
  """The dataset on the device(s), labels as int32."""

  train_images: jax.Array
  train_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array

  @classmethod
  def place(cls, ds, mesh=None) -> DeviceData:
    """`ds` on the device, or replicated over `mesh` (on every process's devices)."""
    place = functools.partial(distributed.replicate, mesh=mesh)
    return cls(place(ds.train_images), place(ds.train_labels.astype(np.int32)),
               place(ds.test_images), place(ds.test_labels.astype(np.int32)))


def _cache_size(fn) -> int:
  """How many programs the jitted `fn` has compiled (-1 where JAX does not say)."""
  size = getattr(fn, "_cache_size", None)
  return size() if callable(size) else -1


class StepCalls:
  """The compiled calls of a run: one state, or a stack of members (`stacked`)."""

  def __init__(self, cfg, eval_model, num_train: int, stacked: bool, mesh=None):
    self.batch_sharding = (None if mesh is None else
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))
    self.loop = steps_lib.resolve_loop(cfg.train.loop, cfg.model)
    self.batch_size = cfg.train.batch_size
    self.unroll = cfg.train.unroll
    self.eval_model, self.eval_apply = eval_model, eval_model.apply
    self.num_train = num_train
    self.stacked = stacked
    # train.eval_statistics besides the running averages (always evaluated).
    self.eval_statistics = tuple(s for s in cfg.train.eval_statistics if s != "running")
    self.population_examples = cfg.train.population_examples
    self.population_model = self.population_apply = None
    if "population" in self.eval_statistics:
      self.population_model = models.build_model(
          evaluation.population_model_config(cfg.model),
          dtype=models.compute_dtype(cfg.train.half_precision))
      self.population_apply = self.population_model.apply

  def permutation(self, state, epoch: int):
    if self.stacked:
      return group_permutations(state.rng, epoch, num_examples=self.num_train)
    return run_permutation(state.rng, epoch, num_examples=self.num_train)

  def train(self, state, sums, images, labels, perm, length: int):
    """`length` train steps: (state, sums, steps timed, their seconds).

    The timed steps are those of calls that compiled nothing (a call that
    compiled is left out of the measure), each timed until its results are
    ready: the rate of training proper, without compiles, evaluations or
    checkpoints.
    """
    sharded = {} if self.batch_sharding is None else {"batch_sharding": self.batch_sharding}
    if self.loop == "scan":
      fn = run_steps_group if self.stacked else run_steps
      compiled, start = _cache_size(fn), time.perf_counter()
      state, sums = fn(state, sums, images, labels, perm, length=length,
                       batch_size=self.batch_size, unroll=self.unroll, **sharded)
      jax.block_until_ready((state, sums))
      if _cache_size(fn) != compiled:
        return state, sums, 0, 0.0
      return state, sums, length, time.perf_counter() - start
    fn = run_one_step_group if self.stacked else run_one_step
    timed, start = length, time.perf_counter()
    for i in range(length):
      compiled = _cache_size(fn)
      state, sums = fn(state, sums, images, labels, perm, batch_size=self.batch_size,
                       **sharded)
      if _cache_size(fn) != compiled:  # time the steps after the compile
        jax.block_until_ready((state, sums))
        timed, start = length - i - 1, time.perf_counter()
    jax.block_until_ready((state, sums))
    return state, sums, timed, time.perf_counter() - start

  def learning_rates(self, state):
    """The learning rate of the last step, per member (or of the one state), on the device."""
    hyper = getattr(state.opt_state, "hyperparams", None)
    if not hyper or "learning_rate" not in hyper:
      return None
    return hyper["learning_rate"]

  def eval_inputs(self, state):
    """(apply, population apply, params) for evaluating `state`.

    Members whose model values differ (`MemberStates`, e.g. BN's epsilon)
    carry them in their params to a `MemberApply`; else the models' own apply.
    """
    values = state_lib.model_values(getattr(state, "values", {}) or {})
    if not values:
      return self.eval_apply, self.population_apply, state.params
    return (state_lib.MemberApply(self.eval_model),
            self.population_model and state_lib.MemberApply(self.population_model),
            state_lib.with_member_values(state.params, values))

  def evaluate(self, state, images, labels, batch_size: int):
    fn = evaluation.evaluate_members if self.stacked else evaluation.evaluate
    apply, _, params = self.eval_inputs(state)
    return fn(apply, params, state.batch_stats, images, labels, batch_size=batch_size)

  def evaluate_others(self, state, images, labels, train_images, batch_size: int) -> dict:
    """{kind: evaluation} with each of `train.eval_statistics` but the running averages."""
    apply, population_apply, params = self.eval_inputs(state)
    return {kind: evaluation.evaluate_statistics(
        kind, apply, population_apply, params, state.batch_stats,
        images, labels, train_images, batch_size=batch_size,
        train_batch_size=self.batch_size, population_examples=self.population_examples,
        stacked=self.stacked) for kind in self.eval_statistics}

  def member(self, tree, i: int):
    """Member `i`'s part of a (host or device) tree."""
    return take(tree, i) if self.stacked else tree


# The train loss of always predicting the uniform distribution over 10 classes.
CHANCE_LOSS = math.log(10)


@dataclasses.dataclass
class CollapseWatch:
  """Detects a collapse in a run's metrics records, one record at a time (pure, host-side).

  A collapse is a run that blows up without its loss turning NaN/inf:
  - loss: a log interval's mean train loss above `loss_factor` x the smallest
    interval loss before it, and above chance (ln 10 = 2.30: worse than
    predicting the uniform distribution), so that noise after a very small
    minimum is not a collapse; `loss_factor=0` turns this rule off;
  - accuracy: a test accuracy <= `chance_accuracy` after an earlier one was
    >= `trained_accuracy` (the run had trained, then fell back near chance).
  `update` returns the reason of a collapse at that record, else None. The
  evaluation before training (step 0) is not part of the run's history: a run
  and the same run resumed see the same records.
  """

  loss_factor: float = 10.0
  chance_accuracy: float = 0.2
  trained_accuracy: float = 0.5
  min_loss: float = math.inf
  best_accuracy: float = -math.inf

  @classmethod
  def of(cls, train_cfg) -> CollapseWatch:
    return cls(train_cfg.collapse_loss_factor, train_cfg.collapse_accuracy,
               train_cfg.collapse_trained_accuracy)

  def update(self, record: dict) -> str | None:
    if record.get("step") == 0:
      return None
    reason = None
    loss = record.get("train_loss")
    if isinstance(loss, (int, float)) and math.isfinite(loss):
      if (self.loss_factor > 0 and loss > self.loss_factor * self.min_loss
          and loss > CHANCE_LOSS):
        reason = (f"train loss {loss:.4g} > {self.loss_factor:g} x its minimum "
                  f"{self.min_loss:.4g} and > chance ({CHANCE_LOSS:.2f})")
      self.min_loss = min(self.min_loss, loss)
    acc = record.get("test_accuracy")
    if isinstance(acc, (int, float)) and math.isfinite(acc):
      if (reason is None and self.best_accuracy >= self.trained_accuracy
          and acc <= self.chance_accuracy):
        reason = (f"test accuracy {acc:.4f} <= {self.chance_accuracy:g} after "
                  f"{self.best_accuracy:.4f} >= {self.trained_accuracy:g}")
      self.best_accuracy = max(self.best_accuracy, acc)
    return reason


def first_collapse(records, **thresholds) -> tuple[int, str] | None:
  """(step, reason) of the first collapse in a sequence of metrics records, or None."""
  watch = CollapseWatch(**thresholds)
  for r in records:
    reason = watch.update(r)
    if reason is not None:
      return r["step"], reason
  return None


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
  watch: CollapseWatch | None = None

  def __post_init__(self):
    if self.watch is None:
      self.watch = CollapseWatch.of(self.cfg.train)

  def observe(self, record: dict) -> bool:
    """Feeds `record` to the collapse watch; True at the run's first collapse."""
    reason = self.watch.update(record)
    if reason is None or self.collapsed_at is not None:
      return False
    self.collapsed_at, self.collapse_reason = record["step"], reason
    return True


class _Clock:
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
               split: timesplit.TimeSplit | None = None):
    self.members, self.ckpt_wd, self.plan, self.calls = members, ckpt_wd, plan, calls
    self.data, self.zero_sums, self.on_stop = data, zero_sums, on_stop
    self.split = split or timesplit.TimeSplit()
    self.cfg = members[0].cfg
    self.eval_batch_size = min(self.cfg.train.eval_batch_size, len(data.test_labels))

  def run(self, state) -> None:
    """Trains `state` (resumed from the latest checkpoint, if any) to the end.

    Ctrl-C (KeyboardInterrupt) comes out as `Interrupted`, naming the step.
    """
    self.step = None
    try:
      self._run(state)
    except Interrupted:
      raise
    except KeyboardInterrupt:
      raise Interrupted(self.step) from None

  def _run(self, state) -> None:
    split = self.split
    state, sums, step = self._resume(state)
    self.step = step
    split.mark_startup()
    clock = _Clock(step, split.start)
    if step == 0 and self.cfg.train.eval_at_start:
      self._record_start(state, clock)
    perm_epoch, perm = None, None
    while step < self.plan.total_steps:
      end = self.plan.next_boundary(step)
      with split.phase("train"):
        epoch = step // self.plan.steps_per_epoch
        if epoch != perm_epoch:
          perm, perm_epoch = self.calls.permutation(state, epoch), epoch
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
          self.ckpt_wd.save(step, {"state": state, "sums": sums},
                            force=step == self.plan.total_steps)
    with split.phase("checkpoint"):
      self.ckpt_wd.wait()
    self._finish(step, state, sums, clock)
    logging.info("Wall time %s", timesplit.describe(split.as_dict()))

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
    if step > 0:
      self._check_records_reach(step)
    if restored is not None:
      logging.info("Resumed from step %d in %s", step, self.ckpt_wd.path)
    for m in self.members:
      if m.recording:  # a fresh start (step 0) keeps no records at all
        m.wd.truncate_metrics_after(step if step > 0 else -1)
        records = m.wd.read_metrics() if step > 0 else []
        for r in records:  # the collapse watch's history
          m.watch.update(r)
          if r.get("collapsed") and m.collapsed_at is None:
            m.collapsed_at, m.collapse_reason = r["collapsed_at_step"], r.get("collapse_reason")
        if records:
          self._stop_if_stopped(m, records[-1])
    return state, sums, step

  def _stopped_by(self, record: dict) -> bool:
    """Whether `record` stopped its member: diverged, or collapsed with `train.stop_on_collapse`."""
    return "diverged_at_step" in record or bool(
        record.get("collapsed") and self.cfg.train.stop_on_collapse)

  def _stop_if_stopped(self, m: Member, last: dict) -> None:
    """A member whose last record stopped it (`_stopped_by`) but has no summary (the
    attempt ended before it was written, or it was removed) stops there again, its
    summary written from its records."""
    if not self._stopped_by(last):
      return
    if "diverged_at_step" in last:
      m.diverged_at = last["diverged_at_step"]
    else:
      m.stopped_on_collapse = True
    m.recording = False
    self.on_stop(m, last["step"], None, self.split)

  def _check_records_reach(self, step: int) -> None:
    """WorkDirError when a recording member's records stop before the checkpoint at `step`.

    Its metrics.jsonl was deleted, cut short, or its directory made anew (e.g. a
    finished member's removed to redo it): resuming would leave those steps out of
    its records for good. A member that stopped (`_stopped_by`) has its last
    record where it stopped.
    """
    want = self.plan.last_log_at_or_before(step)
    for m in self.members:
      if not m.recording:
        continue
      records = m.wd.read_metrics()
      last = records[-1] if records else {}
      if self._stopped_by(last):
        continue
      have = last.get("step", -1)
      if have < want:
        where = f"records up to step {have}" if records else "no records"
        raise workdir_lib.WorkDirError(
            f"{m.wd.metrics_path} holds {where}, but the run resumes from its "
            f"checkpoint at step {step} in {self.ckpt_wd.path}: the records between are "
            "gone (the file removed or cut short, or the directory made anew) and resuming "
            "would leave them out. Put the records back, or move "
            f"{os.path.join(self.ckpt_wd.path, 'checkpoints')} aside to retrain from step "
            "0" + (" (members already finished keep their results)" if self.calls.stacked
                   else ""))

  def _evaluate(self, state) -> dict:
    """The evaluations of every member, on the device: {"running": .., kind: .., "analysis": ..}."""
    out = {"running": self.calls.evaluate(state, self.data.test_images, self.data.test_labels,
                                          self.eval_batch_size)}
    out.update(self.calls.evaluate_others(state, self.data.test_images, self.data.test_labels,
                                          self.data.train_images, self.eval_batch_size))
    apply, _, params = self.calls.eval_inputs(state)
    out["analysis"] = evaluation.analysis_outputs(
        self.cfg.analysis, apply, params, state.batch_stats, self.data.test_images,
        self.calls.stacked)
    return out

  def _eval_records(self, host: dict) -> list[dict]:
    """Each member's test loss, accuracy and analysis recordings from `_evaluate`'s host copy."""
    analysis = evaluation.analysis_records(host.pop("analysis"), len(self.members),
                                           self.calls.stacked)
    results = []
    for i in range(len(self.members)):
      result = {}
      for kind, e in host.items():
        e = self.calls.member(e, i)
        suffix = "" if kind == "running" else f"_{kind}"
        result.update({f"test_loss{suffix}": float(e["loss"]),
                       f"test_accuracy{suffix}": float(e["accuracy"])})
      results.append({**result, **analysis[i]})
    return results

  def _record_start(self, state, clock: _Clock) -> None:
    """The evaluation before training (`train.eval_at_start`), recorded as step 0 by each
    recording member (a finished member carried along in a group keeps its records)."""
    if not any(m.recording for m in self.members):
      return
    with self.split.phase("evaluate"):
      evals = self._eval_records(jax.device_get(self._evaluate(state)))
    with self.split.phase("log"):
      for m, e in zip(self.members, evals):
        if m.recording:
          m.wd.write_metrics({"step": 0, "epoch": 0.0, **e, "wall_time": clock.elapsed()})

  def _log(self, step: int, state, sums, clock: _Clock) -> None:
    """The log action: records the interval's training metrics (and an evaluation when due).

    The interval's metric sums, learning rates and evaluations come to the
    host in one transfer. A group's evaluation runs even if some members
    diverged (their results are not recorded).
    """
    device = {"sums": sums, "lrs": self.calls.learning_rates(state)}
    with self.split.phase("evaluate"):
      if self.plan.is_eval(step) and any(m.recording for m in self.members):
        device["evals"] = self._evaluate(state)
      host = jax.device_get(device)
      evals = self._eval_records(host["evals"]) if "evals" in host else None
    with self.split.phase("log"):
      lrs = None if host["lrs"] is None else np.asarray(host["lrs"], np.float32)
      records = self._write_records(step, host["sums"], lrs, evals, clock)
      self._report_progress(records, step, clock)
    clock.next_interval()

  def _write_records(self, step: int, host, lrs, evals, clock: _Clock) -> list[dict]:
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

  def _report_progress(self, records: list[dict], step: int, clock: _Clock) -> None:
    """The progress action: one log line with the position, latest metrics and ETA."""
    seconds, steps_done = time.perf_counter() - clock.loop_start, step - clock.first_step
    if self.calls.stacked:
      _log_group_progress(records, self.members, self.plan, seconds, steps_done, step)
    elif records:
      _log_progress(records[0], self.plan, seconds, steps_done, step)

  def _finish(self, step: int, state, sums, clock: _Clock) -> None:
    """The members still recording at the end: full-train evaluation, final state, stop."""
    live = [i for i, m in enumerate(self.members) if m.recording]
    if not live:
      return
    full = None
    if self.cfg.train.final_train_eval:
      with self.split.phase("evaluate"):
        full = jax.device_get(self.calls.evaluate(
            state, self.data.train_images, self.data.train_labels,
            min(self.cfg.train.eval_batch_size, self.calls.num_train)))
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


# -- progress lines ----------------------------------------------------------

def _position(label: str, plan: Schedule, step: int) -> str:
  return f"{label} {step}/{plan.total_steps} ({100 * step / plan.total_steps:.0f}%)"


def _eta(plan: Schedule, seconds: float, steps_done: int, step: int) -> str:
  """Time left at the rate so far, as H:MM:SS."""
  left = int(max(seconds / max(steps_done, 1) * (plan.total_steps - step), 0))
  return f"ETA {left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"


def _log_group_progress(records, members, plan: Schedule, seconds: float, steps_done: int,
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


def _log_progress(record, plan: Schedule, seconds: float, steps_done: int,
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
