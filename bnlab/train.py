"""Training engine: device-resident MNIST, jitted steps, evaluation, checkpoints.

`train_and_evaluate(config, workdir)` runs one experiment. The whole training
set lives on the device and is shuffled there each epoch; batches are gathered
inside the compiled step. Steps run either as a `lax.scan` over many steps in
one compiled call or as a Python loop of jitted single steps (`resolve_loop`
picks per model and platform). Training metrics accumulate on the device and
reach the host only at log/eval boundaries.

Chunk boundaries are a fixed function of the absolute step (epoch ends,
log/eval/checkpoint steps, `steps_per_call` multiples), so a resumed run
executes exactly the same compiled programs on the same data as an
uninterrupted one and ends bit-identical on the same platform.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct

from bnlab import config as config_lib
from bnlab import conv as conv_lib
from bnlab import data as data_lib
from bnlab import distributed
from bnlab import models
from bnlab import workdir as workdir_lib


class TrainState(struct.PyTreeNode):
  """Everything that changes during training (and is checkpointed)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data; shuffling key = fold_in(rng, epoch)
  apply_fn: Callable = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)


def metric_sums_zero() -> dict[str, jax.Array]:
  """Device-side accumulators of training metrics over a log interval."""
  return {
      "loss": jnp.zeros((), jnp.float32),
      "correct": jnp.zeros((), jnp.float32),
      "count": jnp.zeros((), jnp.float32),
      # First step whose loss was not finite; -1 while none was.
      "first_nonfinite_step": jnp.full((), -1, jnp.int32),
  }


def learning_rate_schedule(opt, total_steps: int):
  """The learning rate of the `optimizer` config section: a float or a schedule."""
  lr = float(opt.learning_rate)
  if opt.schedule == "constant":
    main = lr
  elif opt.schedule == "step":
    main = optax.exponential_decay(lr, opt.decay_every_steps, opt.decay_factor,
                                   staircase=True)
  else:  # cosine, warmup_cosine: decay to 0 over the run
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, opt.warmup_steps, max(total_steps, opt.warmup_steps + 1),
        end_value=0.0) if opt.warmup_steps else optax.cosine_decay_schedule(
            lr, max(total_steps, 1))
  if not opt.warmup_steps:
    return main
  main = optax.constant_schedule(main) if isinstance(main, float) else main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, opt.warmup_steps), main], [opt.warmup_steps])


def make_optimizer(opt, total_steps: int) -> optax.GradientTransformation:
  """An optax optimizer whose learning rate lives in its state (vmappable)."""

  def build(learning_rate):
    if opt.name == "sgd":
      return optax.sgd(learning_rate)
    if opt.name == "momentum":
      return optax.sgd(learning_rate, momentum=opt.momentum, nesterov=opt.nesterov)
    return optax.adam(learning_rate)

  return optax.inject_hyperparams(build)(
      learning_rate=learning_rate_schedule(opt, total_steps))


def resolve_loop(loop: str, model_cfg, backend: str | None = None) -> str:
  """The loop form for a model on a backend ("scan" or "loop").

  Measured on a 2-core CPU (see results/README): a scanned epoch beats a loop
  of jitted steps for the MLPs (no convolutions) and for the CNNs with
  im2col convolutions; XLA's own convolutions run ~5x slower inside a scan on
  CPU (their backward passes fall to a generic emitter in loop bodies), so a
  CPU model with `conv_implementation=xla` uses the loop.
  """
  if loop != "auto":
    return loop
  backend = backend or jax.default_backend()
  has_conv = model_cfg.name in ("seed_cnn", "seed1_cnn")
  impl = conv_lib.resolve_conv_implementation(model_cfg.conv_implementation)
  if backend == "cpu" and has_conv and impl == "xla":
    return "loop"
  return "scan"


def eval_model_config(model_cfg):
  """The model config for forward-only evaluation: same parameters and outputs.

  With `conv_implementation=auto`, evaluation uses XLA's convolution: forward
  convolutions compile well inside loops on every backend, and on a 2-core CPU
  a 60,000-image evaluation of the seed CNN ran ~3x faster than with im2col
  (13,200 vs 4,600 examples/s at batch 2,000).
  """
  if model_cfg.conv_implementation != "auto":
    return model_cfg
  cfg = model_cfg.copy_and_resolve_references()
  cfg.conv_implementation = "xla"
  return cfg


def create_train_state(model, tx, rng: jax.Array, batch_size: int) -> TrainState:
  """Initial state: parameters from `rng`, empty optimizer state, step 0."""
  init_rng, data_rng = jax.random.split(rng)
  dummy = jnp.zeros((batch_size, 28, 28), jnp.uint8)
  variables = model.init(init_rng, dummy, train=False)
  params = variables["params"]
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=variables.get("batch_stats", {}),
      opt_state=tx.init(params),
      rng=jax.random.key_data(data_rng),
      apply_fn=model.apply,
      tx=tx,
  )


def create_member_states(model, tx, cfgs, batch_size: int) -> TrainState:
  """The stacked initial states of a group's members, from one vmapped init.

  Member i equals `create_train_state(model, own_i, key(seed_i), batch_size)`
  up to float rounding, with `own_i` its own optimizer, so its optimizer state
  holds its own learning rate; `tx` is the update function they share. One
  compiled init for the whole group instead of one traced init per member
  (24 paper MLPs: 0.7 s instead of 2.5 s).
  """
  seeds = jnp.asarray([c.seed for c in cfgs], jnp.uint32)

  # Unoptimized code generation: compiles several times faster, and an
  # initialization runs once.
  @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
  def init(seeds):
    return jax.vmap(
        lambda s: create_train_state(model, tx, jax.random.key(s), batch_size))(seeds)

  state = init(seeds)
  opt = cfgs[0].optimizer
  if opt.schedule == "constant" and not opt.warmup_steps:  # the only case lrs may differ
    hp = state.opt_state.hyperparams
    lrs = jnp.asarray([c.optimizer.learning_rate for c in cfgs],
                      hp["learning_rate"].dtype)
    state = state.replace(opt_state=state.opt_state._replace(
        hyperparams={**hp, "learning_rate": lrs}))
  return state


def train_step(state: TrainState, sums, images, labels) -> tuple[TrainState, dict]:
  """One SGD step on a batch (uint8 images), with BN in train mode."""

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images,
        train=True, mutable=["batch_stats"], rngs=models.train_rngs(state.rng, state.step))
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, updates.get("batch_stats", {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss)
  first_bad = jnp.where(
      (sums["first_nonfinite_step"] < 0) & ~finite, state.step, sums["first_nonfinite_step"])
  sums = {
      "loss": sums["loss"] + loss,
      "correct": sums["correct"] + jnp.sum(jnp.argmax(logits, -1) == labels),
      "count": sums["count"] + 1.0,
      "first_nonfinite_step": first_bad,
  }
  state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
  return state, sums


def epoch_permutation(state: TrainState, epoch, num_examples: int) -> jax.Array:
  """The device-side shuffle of the training set for `epoch`."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), epoch)
  return jax.random.permutation(key, num_examples)


def _gather_batch(images, labels, perm, step, batch_size: int, batch_sharding):
  """Step `step`'s batch from device-resident data, split over devices if sharded."""
  steps_per_epoch = perm.shape[0] // batch_size
  start = (step % steps_per_epoch) * batch_size
  idx = jax.lax.dynamic_slice_in_dim(perm, start, batch_size)
  x, y = images[idx], labels[idx]
  if batch_sharding is not None:
    x = jax.lax.with_sharding_constraint(x, batch_sharding)
    y = jax.lax.with_sharding_constraint(y, batch_sharding)
  return x, y


@functools.partial(jax.jit, static_argnames=("length", "batch_size", "unroll",
                                             "batch_sharding"))
def run_steps(state, sums, images, labels, perm, *, length: int, batch_size: int,
              unroll: int = 1, batch_sharding=None):
  """`length` consecutive train steps of one epoch as one `lax.scan`.

  The batch of step s is `perm[(s mod steps_per_epoch) * batch_size:][:batch_size]`,
  gathered from the device-resident `images`/`labels`. With `batch_sharding`
  (a `NamedSharding` over the batch axis) each device computes on its part of
  the batch; reductions over the batch, BN's statistics included, stay global.
  """

  def body(carry, _):
    st, sm = carry
    x, y = _gather_batch(images, labels, perm, st.step, batch_size, batch_sharding)
    return train_step(st, sm, x, y), None

  (state, sums), _ = jax.lax.scan(body, (state, sums), None, length=length, unroll=unroll)
  return _replicated(state, batch_sharding), _replicated(sums, batch_sharding)


@functools.partial(jax.jit, static_argnames=("batch_size", "batch_sharding"))
def run_one_step(state, sums, images, labels, perm, *, batch_size: int, batch_sharding=None):
  """A single train step, gathering its batch on the device."""
  x, y = _gather_batch(images, labels, perm, state.step, batch_size, batch_sharding)
  state, sums = train_step(state, sums, x, y)
  return _replicated(state, batch_sharding), _replicated(sums, batch_sharding)


def _replicated(tree, batch_sharding):
  """With a mesh, `tree` leaves the step replicated: every process reads it whole."""
  if batch_sharding is None:
    return tree
  return jax.lax.with_sharding_constraint(
      tree, jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec()))


def data_parallel_mesh(num_devices: int) -> jax.sharding.Mesh | None:
  """A 1-D mesh ("batch") over `num_devices` devices (0: all), or None for one.

  The devices of every process of a multi-process run (`bnlab.distributed`),
  the same number from each.
  """
  devices = distributed.mesh_devices(num_devices)
  if len(devices) == 1:
    return None
  return jax.sharding.Mesh(np.array(devices), ("batch",))


@functools.partial(jax.jit, static_argnames=("apply_fn", "batch_size"))
def evaluate(apply_fn, params, batch_stats, images, labels, *, batch_size: int):
  """Mean loss and accuracy over every example, BN with running averages.

  Runs in batches of `batch_size`; the last batch is padded and its padding
  masked out, so no example is dropped.
  """
  n = images.shape[0]
  num_batches = -(-n // batch_size)
  pad = num_batches * batch_size - n
  images = jnp.pad(images, ((0, pad), (0, 0), (0, 0)))
  labels = jnp.pad(labels, (0, pad))
  valid = jnp.arange(num_batches * batch_size) < n

  def body(carry, i):
    x = jax.lax.dynamic_slice_in_dim(images, i * batch_size, batch_size)
    y = jax.lax.dynamic_slice_in_dim(labels, i * batch_size, batch_size)
    w = jax.lax.dynamic_slice_in_dim(valid, i * batch_size, batch_size)
    logits = apply_fn({"params": params, "batch_stats": batch_stats}, x, train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = jnp.argmax(logits, -1) == y
    return (carry[0] + jnp.sum(jnp.where(w, loss, 0.0)),
            carry[1] + jnp.sum(w & correct)), None

  (loss, correct), _ = jax.lax.scan(
      body, (jnp.zeros(()), jnp.zeros((), jnp.int32)), jnp.arange(num_batches))
  return {"loss": loss / n, "accuracy": correct / n}


@functools.partial(jax.jit, static_argnames=("apply_fn", "layers", "units", "percentiles"))
def activation_percentiles(apply_fn, params, batch_stats, images, *, layers, units,
                           percentiles):
  """Per-unit percentiles of activation inputs, inference mode: {layer: (units, q)}."""
  _, state = apply_fn({"params": params, "batch_stats": batch_stats}, images, train=False,
                      mutable=["intermediates"])
  found = {}
  for block in state["intermediates"].values():
    for name, values in block.items():
      found[name] = values[0].reshape(images.shape[0], -1)
  return {layer: jnp.percentile(found[layer][:, jnp.array(units)], jnp.array(percentiles),
                                axis=0).T
          for layer in layers}


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Where a run's steps are grouped into compiled calls and what happens after."""

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

  def is_eval(self, step: int) -> bool:
    return step % self.eval_every == 0 or step == self.total_steps

  def is_log(self, step: int) -> bool:
    return step % self.log_every == 0 or self.is_eval(step)

  def is_checkpoint(self, step: int) -> bool:
    return step % self.checkpoint_every == 0 or step == self.total_steps


def make_schedule_plan(cfg, num_train: int) -> Schedule:
  """The step schedule for the `train` config section over `num_train` examples."""
  t = cfg.train
  spe = num_train // t.batch_size
  total = t.num_steps or t.num_epochs * spe
  eval_every = t.eval_every_steps or t.eval_every_epochs * spe
  log_every = t.log_every_steps or eval_every
  ckpt_every = t.checkpoint_every_steps or eval_every
  per_call = t.steps_per_call or spe
  return Schedule(total, spe, per_call, eval_every, log_every, ckpt_every)


def load_data(cfg) -> data_lib.Dataset:
  """MNIST from `cfg.data`, cut to `num_train`/`num_test` when set."""
  d = cfg.data
  ds = data_lib.load_mnist(
      d.source, data_dir=d.dir or None, cache_dir=d.cache_dir or None)
  if d.num_train or d.num_test:
    n_train = d.num_train or len(ds.train_labels)
    n_test = d.num_test or len(ds.test_labels)
    for key, n, have in (("data.num_train", n_train, len(ds.train_labels)),
                         ("data.num_test", n_test, len(ds.test_labels))):
      if n > have:
        raise config_lib.ConfigError(
            f"config.{key}={n} but the {ds.source} data has only {have} examples; "
            "lower it (0 = all)")
    ds = dataclasses.replace(
        ds, verified=False,
        train_images=ds.train_images[:n_train], train_labels=ds.train_labels[:n_train],
        test_images=ds.test_images[:n_test], test_labels=ds.test_labels[:n_test])
  if cfg.train.batch_size > len(ds.train_labels):
    raise config_lib.ConfigError(
        f"config.train.batch_size={cfg.train.batch_size} is larger than the "
        f"{len(ds.train_labels)} training examples; lower it or raise data.num_train")
  return ds


def versions() -> dict[str, str]:
  """Versions of the libraries that determine a run's numbers."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "flax": flax.__version__, "optax": optax.__version__,
          "backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind)}


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def train_and_evaluate(cfg, workdir: str, data: data_lib.Dataset | None = None
                       ) -> dict[str, Any]:
  """Runs (or resumes) the experiment `cfg` in `workdir`; returns its summary.

  Leaves in `workdir`: config.json, metrics.jsonl, TensorBoard events under
  tensorboard/, orbax checkpoints under checkpoints/, and summary.json. A run
  whose summary.json exists is complete: its summary is returned as is.
  `data`: the already loaded dataset of `cfg.data` (else it is loaded).
  """
  config_lib.validate(cfg)
  distributed.initialize(cfg.distributed)
  wd = workdir_lib.WorkDir(workdir, cfg)
  try:
    done = wd.read_summary()
    if done is not None:
      logging.info("Run in %s is complete; nothing to do.", workdir)
      return done
    return _run(cfg, wd, data)
  finally:
    wd.close()


# -- grouped runs: many members in one compiled program ----------------------

# Keys that may differ between members of a group (see `group_key`).
GROUPABLE_KEYS = ("seed", "optimizer.learning_rate")


def group_key(cfg) -> str:
  """Runs with equal keys can train as one group (`train_group`).

  Members may differ in `seed` and, with a constant schedule and no warmup,
  `optimizer.learning_rate` (it lives in the optimizer state); everything else
  shapes the compiled program and must match.
  """
  d = json.loads(cfg.to_json_best_effort())
  d.pop("seed")
  opt = cfg.optimizer
  if opt.schedule == "constant" and not opt.warmup_steps:
    d["optimizer"].pop("learning_rate")
  return json.dumps(d, sort_keys=True)


def grouping_helps(cfg, backend: str | None = None) -> bool:
  """Whether vmapping members of `cfg`'s model beats running them one by one.

  Measured on a 2-core CPU: a vmapped group of 24 paper MLPs trains at the
  per-member cost of a solo run and saves each run's compiles, evaluations
  and start-up, while vmapped convolutions of the seed CNN ran slower per
  member-step than a solo run (batch 32: 38.6 vs 15.9 ms with `xla_canonical`
  convolutions; 7.5 vs 6.4 ms for 4 members with `gemm`, whose batched
  matrix products run at about half the rate of unbatched ones), so on CPU
  models with convolutions run solo.
  """
  backend = backend or jax.default_backend()
  return not (backend == "cpu" and cfg.model.name in ("seed_cnn", "seed1_cnn"))


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _take(tree, i: int):
  return jax.tree.map(lambda x: x[i], tree)


@functools.partial(jax.jit, static_argnames=("num_examples",))
def group_permutations(rngs, epoch, *, num_examples: int) -> jax.Array:
  """Each member's `epoch_permutation` from its own rng: (members, num_examples)."""

  def one(rng):
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), epoch)
    return jax.random.permutation(key, num_examples)

  return jax.vmap(one)(rngs)


@functools.partial(jax.jit, static_argnames=("length", "batch_size", "unroll"))
def run_steps_group(states, sums, images, labels, perms, *, length: int, batch_size: int,
                    unroll: int = 1):
  """`run_steps` vmapped over stacked members; images/labels are shared."""
  return jax.vmap(lambda st, sm, p: run_steps(
      st, sm, images, labels, p, length=length, batch_size=batch_size, unroll=unroll))(
          states, sums, perms)


@functools.partial(jax.jit, static_argnames=("batch_size",))
def run_one_step_group(states, sums, images, labels, perms, *, batch_size: int):
  """`run_one_step` vmapped over stacked members."""
  return jax.vmap(lambda st, sm, p: run_one_step(
      st, sm, images, labels, p, batch_size=batch_size))(states, sums, perms)


@functools.partial(jax.jit, static_argnames=("apply_fn", "batch_size"))
def evaluate_members(apply_fn, params, batch_stats, images, labels, *, batch_size: int):
  """`evaluate` of each stacked member, one after another in one program.

  Sequential (`lax.map`) rather than vmapped: evaluation is compute-bound, and
  each member then sees exactly the batches (and memory) of a solo run.
  """
  return jax.lax.map(lambda pb: evaluate(apply_fn, pb[0], pb[1], images, labels,
                                         batch_size=batch_size), (params, batch_stats))


class _Steps:
  """The compiled calls of a run: one state, or a stack of members (`stacked`)."""

  def __init__(self, cfg, eval_model, num_train: int, stacked: bool, mesh=None):
    self.batch_sharding = (None if mesh is None else
                           jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))
    self.loop = resolve_loop(cfg.train.loop, cfg.model)
    self.batch_size = cfg.train.batch_size
    self.unroll = cfg.train.unroll
    self.eval_apply = eval_model.apply
    self.num_train = num_train
    self.stacked = stacked

  def permutation(self, state, epoch: int):
    if self.stacked:
      return group_permutations(state.rng, epoch, num_examples=self.num_train)
    return epoch_permutation(state, epoch, self.num_train)

  def train(self, state, sums, images, labels, perm, length: int):
    sharded = {} if self.batch_sharding is None else {"batch_sharding": self.batch_sharding}
    if self.loop == "scan":
      fn = run_steps_group if self.stacked else run_steps
      return fn(state, sums, images, labels, perm, length=length,
                batch_size=self.batch_size, unroll=self.unroll, **sharded)
    fn = run_one_step_group if self.stacked else run_one_step
    for _ in range(length):
      state, sums = fn(state, sums, images, labels, perm, batch_size=self.batch_size,
                       **sharded)
    return state, sums

  def evaluate(self, state, images, labels, batch_size: int):
    fn = evaluate_members if self.stacked else evaluate
    return jax.device_get(fn(self.eval_apply, state.params, state.batch_stats, images,
                             labels, batch_size=batch_size))

  def member(self, tree, i: int):
    """Member `i`'s part of a (host or device) tree."""
    return _take(tree, i) if self.stacked else tree


@dataclasses.dataclass
class _Member:
  """One run's directory and host-side status inside the step loop."""

  cfg: Any
  wd: workdir_lib.WorkDir
  recording: bool = True  # False once stopped (diverged) or finished before
  diverged_at: int | None = None


def train_group(cfgs, workdirs, group_dir: str, data: data_lib.Dataset | None = None
                ) -> list[dict[str, Any]]:
  """Trains runs with one `group_key` together: their states stacked, steps vmapped.

  Each member starts from its own seed and shuffles with its own rng, and its
  workdir gets what `train_and_evaluate` leaves (metrics, summary, its final
  checkpoint). `group_dir` holds the group's checkpoints; rerunning resumes
  there. Members whose summary.json exists are carried along but not
  recorded. Returns the members' summaries.
  """
  cfgs = list(cfgs)
  for cfg in cfgs:
    config_lib.validate(cfg)
  keys = {group_key(c) for c in cfgs}
  if len(keys) != 1:
    raise config_lib.ConfigError(
        f"a group's members may differ only in {GROUPABLE_KEYS} (learning rate with a "
        "constant schedule)")
  wds = []
  try:
    for cfg, path in zip(cfgs, workdirs):
      wds.append(workdir_lib.WorkDir(path, cfg))
    summaries = [wd.read_summary() for wd in wds]
    if all(s is not None for s in summaries):
      return summaries
    group_cfg = ml_collections.ConfigDict({
        "members": [{"workdir": os.path.basename(os.path.abspath(p)), "seed": c.seed,
                     "learning_rate": c.optimizer.learning_rate}
                    for c, p in zip(cfgs, workdirs)],
        "shared": json.loads(cfgs[0].to_json_best_effort()),
        "train": {"keep_checkpoints": cfgs[0].train.keep_checkpoints}})
    gwd = workdir_lib.WorkDir(group_dir, group_cfg)
    try:
      members = [_Member(c, wd, recording=s is None)
                 for c, wd, s in zip(cfgs, wds, summaries)]
      _train_loop(members, gwd, data, stacked=True)
    finally:
      gwd.close()
    return [wd.read_summary() for wd in wds]
  finally:
    for wd in wds:
      wd.close()


def _run(cfg, wd: workdir_lib.WorkDir, data=None) -> dict[str, Any]:
  _train_loop([_Member(cfg, wd)], wd, data, stacked=False)
  return wd.read_summary()


def _train_loop(members: list[_Member], ckpt_wd: workdir_lib.WorkDir, ds,
                stacked: bool) -> None:
  """The step loop of a solo run (`stacked=False`, one member) or of a group.

  Trains, logs and evaluates every recording member, checkpoints into
  `ckpt_wd`, and writes each member's summary when it stops. A member whose
  loss turns non-finite is recorded as diverged at that log step; the others
  go on (vmapped members are independent).
  """
  cfg = members[0].cfg
  if stacked and distributed.process_count() > 1:
    raise config_lib.ConfigError(
        "grouped runs (train_group, sweeps) run in one process; set "
        "config.distributed.* only for single runs, or turn grouping off")
  # Every process loads the same data (process 0 first: it fills the cache).
  ds = distributed.together(
      "loading the data", lambda: ds if ds is not None else load_data(cfg),
      fingerprint=distributed.data_fingerprint, primary_first=True,
      differs="loaded other data than process 0; every process must read the same data "
      "(same config.data.*, same files)")
  plan = make_schedule_plan(cfg, len(ds.train_labels))
  model = models.build_model(cfg.model)
  eval_model = models.build_model(eval_model_config(cfg.model))
  tx = make_optimizer(cfg.optimizer, plan.total_steps)
  num_train = len(ds.train_labels)
  bs = cfg.train.batch_size
  mesh = None if stacked else data_parallel_mesh(cfg.train.num_devices)
  if mesh is not None and bs % mesh.size:
    raise config_lib.ConfigError(
        f"config.train.batch_size={bs} does not split over {mesh.size} devices; make it a "
        f"multiple of {mesh.size} or set train.num_devices")
  steps = _Steps(cfg, eval_model, num_train, stacked, mesh)
  if stacked:
    # One update function for all; each member's hyperparameters (its learning
    # rate) live in its own optimizer state.
    state = create_member_states(model, tx, [m.cfg for m in members], bs)
    zero_sums = _stack([metric_sums_zero()] * len(members))
  else:
    state = create_train_state(model, tx, jax.random.key(cfg.seed), bs)
    zero_sums = metric_sums_zero()
  # Data, state and metric sums live on the device(s); with a mesh, replicated
  # (on every process's devices); a checkpoint is restored into that placement.
  place = functools.partial(distributed.replicate, mesh=mesh)
  state, zero_sums = place(state), place(zero_sums)
  sums = zero_sums

  restored = ckpt_wd.restore_latest({"state": state, "sums": sums})
  if restored is not None:
    state, sums = restored["state"], restored["sums"]
    logging.info("Resumed from step %d in %s", int(np.max(state.step)), ckpt_wd.path)
  step = first_step = int(np.max(state.step))
  for m in members:
    if m.recording:  # a fresh start (step 0) keeps no records at all
      m.wd.truncate_metrics_after(step if step > 0 else -1)

  train_images = place(ds.train_images)
  train_labels = place(ds.train_labels.astype(np.int32))
  test_images = place(ds.test_images)
  test_labels = place(ds.test_labels.astype(np.int32))
  eval_bs = min(cfg.train.eval_batch_size, len(ds.test_labels))
  info = {"loop": steps.loop, "backend": jax.default_backend(),
          "conv_implementation": conv_lib.resolve_conv_implementation(
              cfg.model.conv_implementation),
          "data_source": ds.source, "data_verified": ds.verified,
          "total_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch}
  if stacked:
    info["group_size"] = len(members)
  info["num_devices"] = 1 if mesh is None else mesh.size
  info["num_processes"] = distributed.process_count()
  logging.info("Run: %s", json.dumps(info))

  perm_epoch, perm = None, None
  run_start = interval_start = time.perf_counter()
  interval_steps = 0
  if step == 0 and cfg.train.eval_at_start:
    ev = steps.evaluate(state, test_images, test_labels, eval_bs)
    analysis = _analysis_records(cfg.analysis, steps, state, test_images, len(members))
    for i, m in enumerate(members):
      e = steps.member(ev, i)
      m.wd.write_metrics({"step": 0, "epoch": 0.0, "test_loss": float(e["loss"]),
                          "test_accuracy": float(e["accuracy"]), **analysis[i],
                          "wall_time": time.perf_counter() - run_start})
  while step < plan.total_steps:
    epoch = step // plan.steps_per_epoch
    if epoch != perm_epoch:
      perm, perm_epoch = steps.permutation(state, epoch), epoch
    end = plan.next_boundary(step)
    state, sums = steps.train(state, sums, train_images, train_labels, perm, end - step)
    interval_steps += end - step
    step = end
    if plan.is_log(step):
      host = jax.device_get(sums)
      seconds = time.perf_counter() - interval_start
      ev = analysis = None
      if plan.is_eval(step) and any(
          m.recording and steps.member(host, i)["first_nonfinite_step"] < 0
          for i, m in enumerate(members)):
        ev = steps.evaluate(state, test_images, test_labels, eval_bs)
        analysis = _analysis_records(cfg.analysis, steps, state, test_images, len(members))
      records = []
      for i, m in enumerate(members):
        if not m.recording:
          continue
        h = steps.member(host, i)
        count = max(float(h["count"]), 1.0)
        record = {"step": step, "epoch": step / plan.steps_per_epoch,
                  # Steps averaged in this record (its sums survive a resume).
                  "interval_steps": int(h["count"]),
                  "train_loss": float(h["loss"]) / count,
                  "train_accuracy": float(h["correct"]) / (count * bs),
                  "examples_per_sec": interval_steps * bs / max(seconds, 1e-9)}
        if h["first_nonfinite_step"] >= 0:
          m.diverged_at = int(h["first_nonfinite_step"])
          record["diverged_at_step"] = m.diverged_at
        elif ev is not None:
          e = steps.member(ev, i)
          record.update(test_loss=float(e["loss"]), test_accuracy=float(e["accuracy"]))
          record.update(analysis[i])
        record["wall_time"] = time.perf_counter() - run_start
        m.wd.write_metrics(record)
        records.append(record)
        if m.diverged_at is not None:
          logging.warning("Loss became non-finite at step %d: run %s stopped (diverged).",
                          m.diverged_at, m.wd.path)
          m.recording = False
          _finish(m, info, step, None, run_start)
      if stacked:
        _log_group_progress(records, members, plan, time.perf_counter() - run_start,
                            step - first_step, step)
      elif records:
        _log_progress(records[0], plan, time.perf_counter() - run_start, step - first_step,
                      step)
      sums = zero_sums
      interval_start, interval_steps = time.perf_counter(), 0
    if not any(m.recording for m in members):
      break
    if plan.is_checkpoint(step):
      ckpt_wd.save(step, {"state": state, "sums": sums})
  ckpt_wd.wait()

  live = [i for i, m in enumerate(members) if m.recording]
  if not live:
    return
  full = None
  if cfg.train.final_train_eval:
    full = steps.evaluate(state, train_images, train_labels,
                          min(cfg.train.eval_batch_size, num_train))
  for i in live:
    m = members[i]
    if stacked:  # the member's final state where a solo run keeps it
      m.wd.save(step, {"state": _take(state, i), "sums": _take(sums, i)})
    _finish(m, info, step, None if full is None else steps.member(full, i), run_start)


def _finish(m: _Member, info: dict, step: int, full_train, run_start: float) -> None:
  """Writes member `m`'s summary.json."""
  m.wd.wait()
  summary = {"diverged": m.diverged_at is not None, "diverged_at_step": m.diverged_at,
             "final_step": step, **info, "versions": versions()}
  last = m.wd.last_metrics() or {}
  for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
    if key in last:
      # A diverged run has no final accuracy: its last evaluation predates the blow-up.
      summary[key if m.diverged_at is None else f"{key}_before_divergence"] = last[key]
  if full_train is not None and m.diverged_at is None:
    summary.update(full_train_loss=float(full_train["loss"]),
                   full_train_accuracy=float(full_train["accuracy"]))
  summary["wall_time"] = time.perf_counter() - run_start
  m.wd.write_summary(summary)


def _analysis_records(acfg, steps: _Steps, state, test_images, n: int) -> list[dict]:
  """The `analysis` section's recordings at an evaluation, per member."""
  if not acfg.layers:
    return [{}] * n
  kwargs = dict(layers=tuple(acfg.layers), units=tuple(acfg.units),
                percentiles=tuple(float(q) for q in acfg.percentiles))
  images = test_images[:acfg.num_examples]
  if steps.stacked:
    out = jax.device_get(jax.lax.map(
        lambda pb: activation_percentiles(steps.eval_apply, pb[0], pb[1], images, **kwargs),
        (state.params, state.batch_stats)))
  else:
    out = jax.device_get(activation_percentiles(
        steps.eval_apply, state.params, state.batch_stats, images, **kwargs))
  return [{f"{layer}/percentiles": np.asarray(steps.member(v, i)).tolist()
           for layer, v in out.items()} for i in range(n)]


def _log_group_progress(records, members, plan: Schedule, seconds: float, steps_done: int,
                        step: int) -> None:
  eta = seconds / max(steps_done, 1) * (plan.total_steps - step)
  live = sum(m.recording for m in members)
  parts = [f"group step {step}/{plan.total_steps} ({100 * step / plan.total_steps:.0f}%)",
           f"{live}/{len(members)} members training"]
  accs = [r["test_accuracy"] for r in records if "test_accuracy" in r]
  if accs:
    parts.append(f"test acc {min(accs):.4f}..{max(accs):.4f}")
  if records:
    parts.append(f"{records[0]['examples_per_sec'] * len(members):,.0f} ex/s")
  parts.append(f"ETA {_format_eta(eta)}")
  logging.info(" | ".join(parts))


def _log_progress(record, plan: Schedule, seconds: float, steps_done: int,
                  step: int) -> None:
  eta = seconds / max(steps_done, 1) * (plan.total_steps - step)
  parts = [f"step {step}/{plan.total_steps} ({100 * step / plan.total_steps:.0f}%)",
           f"epoch {record['epoch']:.2f}"]
  if "train_loss" in record:
    parts.append(f"train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}")
  if "test_accuracy" in record:
    parts.append(f"test loss {record['test_loss']:.4f} acc {record['test_accuracy']:.4f}")
  if "examples_per_sec" in record:
    parts.append(f"{record['examples_per_sec']:,.0f} ex/s")
  parts.append(f"ETA {_format_eta(eta)}")
  logging.info(" | ".join(parts))
