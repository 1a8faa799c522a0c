"""A run's compiled calls: the jitted step functions, the data and mesh they run on, `StepCalls`.

The one place where the step functions are jitted; the loop decides when to
call them, this module how (solo or stacked members, scan or one step a call,
timed without compiles).
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple

import jax
import numpy as np

from bnlab.data import normalize
from bnlab.engine import distributed
from bnlab.engine import evaluation
from bnlab.engine import members as members_lib
from bnlab.models import networks as models
from bnlab.engine import state as state_lib
from bnlab.engine import steps as steps_lib
from bnlab.engine.state import take

run_steps = jax.jit(steps_lib.scan_steps,
                    static_argnames=("length", "batch_size", "unroll", "batch_sharding",
                                     "augment"))
run_one_step = jax.jit(steps_lib.one_step,
                       static_argnames=("batch_size", "batch_sharding", "augment"))
run_permutation = jax.jit(steps_lib.permutation, static_argnames=("num_examples",))
run_streamed_steps = jax.jit(steps_lib.scan_batches, static_argnames=("unroll", "augment"))
run_streamed_step = jax.jit(steps_lib.train_step, static_argnames=("augment",))
group_permutations = jax.jit(members_lib.permutations, static_argnames=("num_examples",))
run_steps_group = jax.jit(members_lib.scan_steps,
                          static_argnames=("length", "batch_size", "unroll", "augment"))
run_one_step_group = jax.jit(members_lib.one_step, static_argnames=("batch_size", "augment"))


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
  """The dataset on the device(s) as the model takes it (`Dataset.normalization`
  applied on the host), labels as int32; the held-out validation examples where the
  dataset has them (`data.validation_size`), else None."""

  train_images: jax.Array
  train_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array
  val_images: jax.Array | None = None
  val_labels: jax.Array | None = None

  @classmethod
  def place(cls, ds, mesh=None) -> DeviceData:
    """`ds` on the device, or replicated over `mesh` (on every process's devices)."""
    place = functools.partial(distributed.replicate, mesh=mesh)
    stats = ds.normalization
    table = None if stats is None else normalize.lookup_table(stats)
    inputs = functools.partial(normalize.standardize, stats=stats, table=table)
    held = () if ds.val_labels is None else (place(inputs(ds.val_images)),
                                             place(ds.val_labels.astype(np.int32)))
    return cls(place(inputs(ds.train_images)), place(ds.train_labels.astype(np.int32)),
               place(inputs(ds.test_images)), place(ds.test_labels.astype(np.int32)), *held)


def _cache_size(fn) -> int:
  """How many programs the jitted `fn` has compiled (-1 where JAX does not say)."""
  size = getattr(fn, "_cache_size", None)
  return size() if callable(size) else -1


class StepCalls:
  """The compiled calls of a run: one state, or a stack of members (`stacked`)."""

  def __init__(self, cfg, eval_model, num_train: int, stacked: bool, mesh=None,
               num_classes: int = 10):
    self.batch_sharding = (None if mesh is None else
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))
    self.loop = steps_lib.resolve_loop(cfg.train.loop, cfg.model)
    self.batch_size = cfg.train.batch_size
    self.unroll = cfg.train.unroll
    self.augment = cfg.data.augment
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
          dtype=models.compute_dtype(cfg.train.half_precision), num_classes=num_classes)
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
    if self.augment != "none":  # else the call (and its compile cache key) is unchanged
      sharded["augment"] = self.augment
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

  def train_streamed(self, state, sums, stream, perm, step: int, length: int):
    """`train` for a training split streamed through grain (`grain_source.StreamedSplit`):
    the batches of steps `step`.. `step + length - 1`, read in `perm`'s order (the host
    copy of `permutation`), as the device-resident path gathers them.

    The scan form runs each call's steps as scans over stacked batches, at most
    `stream.chunk_steps` at a time so a call's batches need not fit the device at once;
    each chunk is dispatched before the next is read, so reading overlaps training.
    """
    spe = self.num_train // self.batch_size
    epoch, start = step // spe, step % spe
    batches = stream.batches(perm, epoch, start, length, self.batch_size)
    augment = {} if self.augment == "none" else {"augment": self.augment}
    timed, begin = 0, time.perf_counter()
    if self.loop == "scan":
      chunk, done = stream.chunk_steps(self.batch_size), 0
      fn = run_streamed_steps
      while done < length:
        n = min(chunk, length - done)
        xs, ys = zip(*(next(batches) for _ in range(n)))
        compiled = _cache_size(fn)
        state, sums = fn(state, sums, np.stack(xs), np.stack(ys), unroll=self.unroll, **augment)
        if _cache_size(fn) != compiled:  # time what follows the compile
          jax.block_until_ready((state, sums))
          timed, begin = -(done + n), time.perf_counter()
        done += n
      timed += length
    else:
      fn = run_streamed_step
      timed = length
      for i, (x, y) in enumerate(batches):
        compiled = _cache_size(fn)
        state, sums = fn(state, sums, x, y, **augment)
        if _cache_size(fn) != compiled:
          jax.block_until_ready((state, sums))
          timed, begin = length - i - 1, time.perf_counter()
    jax.block_until_ready((state, sums))
    return state, sums, timed, time.perf_counter() - begin

  def evaluate_streamed(self, state, stream, batch_size: int):
    """`evaluate` (no per-image results) of the streamed training split, read in stored
    order in chunks of `batch_size`; the chunks' sums are added in float64 on the host,
    so it can differ from the device-resident evaluation in the last float32 bits."""
    apply, _, params = self.eval_inputs(state)
    loss = correct = 0.0
    for images, labels in stream.in_order(batch_size):
      out = jax.device_get(evaluation.evaluate(
          apply, params, state.batch_stats, images, labels, batch_size=len(labels),
          per_image=False))
      loss += float(out["loss"]) * len(labels)
      correct += round(float(out["accuracy"]) * len(labels))
    n = len(stream)
    return {"loss": np.float32(loss / n), "accuracy": np.float32(correct / n)}

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

  def evaluate(self, state, images, labels, batch_size: int, per_image: bool = True):
    """`evaluation.evaluate` of the state or each member; "correct" only with `per_image`."""
    fn = evaluation.evaluate_members if self.stacked else evaluation.evaluate
    apply, _, params = self.eval_inputs(state)
    return fn(apply, params, state.batch_stats, images, labels, batch_size=batch_size,
              per_image=per_image)

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
