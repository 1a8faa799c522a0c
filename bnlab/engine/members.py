"""Sweep members trained as one group: which runs may group, how many fit, the vmapped steps."""

from __future__ import annotations

import functools
import json
import math
import os

import jax
import jax.numpy as jnp

from bnlab import config as config_lib
from bnlab import data as data_lib
from bnlab.models import networks as models
from bnlab.engine import optim
from bnlab.engine import state as state_lib
from bnlab.engine import steps
from bnlab.data.dataset import InputSpec
from bnlab.engine.state import MEMBER_VALUE_KEYS, MemberStates

# Keys that only choose the initial parameters: members that differ in them share
# a train step (each part of a group is initialized with its own model).
INIT_KEYS = ("model.kernel_init", "model.init_std")
# Keys that may differ between members of a group (see `group_key`).
GROUPABLE_KEYS = ("seed", "optimizer.learning_rate") + MEMBER_VALUE_KEYS + INIT_KEYS
# The share of a device's memory a group's train step may fill (`group_capacity`).
MEMORY_FRACTION = 0.8
# A sweep's group directories (their stacked checkpoints), beside its members' directories.
GROUPS_DIR = "_groups"
# MNIST's training set: the size assumed when `data.num_train` is 0.
MNIST_TRAIN = 60_000


def group_key(cfg) -> str:
  """Runs with equal keys can train as one group (`train_group`).

  Members may differ in `seed`, `optimizer.momentum`, `model.bn.momentum`,
  `model.bn.epsilon`, `model.kernel_init` and `model.init_std` (of the
  built-in models) and, with a constant schedule and no warmup,
  `optimizer.learning_rate` (it lives in the optimizer state); the momenta
  and epsilon are per-member inputs of the step and the evaluations
  (`state.MemberStates`, `state.MemberApply`), the initializers only choose
  initial parameters (`init_models`). Everything else shapes the compiled
  program and must match.
  """
  d = json.loads(cfg.to_json_best_effort())
  d.pop("seed")
  if optim.constant_learning_rate(cfg.optimizer):
    d["optimizer"].pop("learning_rate")
  d["optimizer"].pop("momentum")
  if not models.is_user_model(cfg.model.name):  # a user's model may read it anywhere
    d["model"]["bn"].pop("momentum")
    d["model"]["bn"].pop("epsilon")
    for key in INIT_KEYS:
      d["model"].pop(key.split(".")[1])
  return json.dumps(d, sort_keys=True)


def init_models(cfgs, dtype=None, num_classes: int = 10):
  """Each member's model for its initialization where the members' `INIT_KEYS` differ
  (one model per distinct initializer), else None: all start from the group's model."""
  init_of = [tuple(c.model[k.split(".")[1]] for k in INIT_KEYS) for c in cfgs]
  if len(set(init_of)) == 1:
    return None
  built = {}
  for key, c in zip(init_of, cfgs):
    if key not in built:
      built[key] = models.build_model(c.model, dtype=dtype, num_classes=num_classes)
  return [built[key] for key in init_of]


@functools.lru_cache(maxsize=64)
def _has_convolutions(model_json: str, inputs: InputSpec) -> bool:
  model_cfg = config_lib.base_config().model
  model_cfg.update(json.loads(model_json))
  try:
    model = models.build_model(model_cfg)
    shapes = jax.eval_shape(lambda: model.init(
        models.init_rngs(jax.random.key(0)), jnp.zeros(*inputs.batch(1)), train=False))
  except Exception:  # pylint: disable=broad-except
    return False  # training it reports the problem
  return any(len(x.shape) >= 3 for x in jax.tree.leaves(shapes.get("params", {})))


def has_convolutions(model_cfg, data_cfg) -> bool:
  """Whether the model of `model_cfg` has a parameter of rank 3 or more (a conv kernel).

  Built-in networks by name; a user's model (`module:factory`) from the
  shapes of its parameters, traced (nothing computed) on one example of the
  input of `data_cfg`'s data: a model written for other images may not trace on MNIST's.
  """
  if model_cfg.name in models.MODELS:
    return model_cfg.name in models.CNN_MODELS
  return _has_convolutions(model_cfg.to_json_best_effort(), data_lib.input_spec(data_cfg))


def grouping_helps(cfg, backend: str | None = None) -> bool:
  """Whether vmapping members of `cfg`'s model beats running them one by one.

  Measured on a 2-core CPU: a vmapped group of 24 paper MLPs trains at the
  per-member cost of a solo run and saves each run's compiles, evaluations
  and start-up, while vmapped convolutions of the seed CNN ran slower per
  member-step than a solo run (batch 32: 38.6 vs 15.9 ms with `xla_canonical`
  convolutions; 7.5 vs 6.4 ms for 4 members with `gemm`, whose batched
  matrix products run at about half the rate of unbatched ones), so on CPU
  models with convolutions (`has_convolutions`) run solo; on accelerators
  every model groups.
  """
  backend = backend or jax.default_backend()
  return not (backend == "cpu" and has_convolutions(cfg.model, cfg.data))


def streams(cfg) -> bool:
  """Whether `cfg`'s training split streams through grain on this device
  (`bnlab.data.streams`): such a run feeds one model on one device, so it trains alone."""
  return data_lib.streams(cfg.data, memory_budget())


# -- how many members fit -----------------------------------------------------

def memory_budget(device=None) -> int:
  """The bytes a group may use: `MEMORY_FRACTION` of the device's memory.

  From `device.memory_stats()["bytes_limit"]` where the backend reports it
  (GPUs, TPUs); else (CPU) of the machine's physical memory.
  """
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  total = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return int(MEMORY_FRACTION * total)


def _abstract_step_inputs(cfg, num_members: int, num_train: int):
  """Shapes of a group's step arguments (states, sums, images, labels, perms): nothing allocated."""
  spec = data_lib.spec_of(cfg.data)
  inputs = spec.input_spec(data_lib.normalized(cfg.data))
  model = models.build_model(cfg.model, dtype=models.compute_dtype(cfg.train.half_precision),
                             num_classes=spec.num_classes)
  tx = optim.make_optimizer(cfg.optimizer, max(cfg.train.num_steps, 1))
  bs = cfg.train.batch_size
  states = jax.eval_shape(
      jax.vmap(lambda s: state_lib.create_train_state(model, tx, jax.random.key(s), bs,
                                                      inputs)),
      jax.ShapeDtypeStruct((num_members,), jnp.uint32))
  sums = jax.eval_shape(lambda: steps.metric_sums_zero(num_members))
  return (states, sums, jax.ShapeDtypeStruct(inputs.batch(num_train)[0], inputs.dtype),
          jax.ShapeDtypeStruct((num_train,), jnp.int32),
          jax.ShapeDtypeStruct((num_members, num_train), jnp.int32))


def _step_bytes(cfg, num_members: int, num_train: int) -> int:
  """Bytes of the group step compiled for `num_members` (arguments, outputs, temporaries)."""
  args = _abstract_step_inputs(cfg, num_members, num_train)
  m = jax.jit(one_step, static_argnames=("batch_size",)).lower(
      *args, batch_size=cfg.train.batch_size).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def member_bytes(cfg) -> int:
  """The device memory one member adds to a group's train step (compiled, not run).

  The growth of XLA's `memory_analysis()` of the step compiled for 1 and for
  8 members, so that fixed costs (the shared data, a GPU's matrix-product
  workspace) are left out.
  """
  num_train = cfg.data.num_train or data_lib.spec_of(cfg.data).num_train
  return max((_step_bytes(cfg, 8, num_train) - _step_bytes(cfg, 1, num_train)) // 7, 1)


def _value_bytes(var) -> int:
  aval = getattr(var, "aval", None)
  if not hasattr(aval, "shape") or not hasattr(aval, "dtype"):
    return 0
  return math.prod(aval.shape) * aval.dtype.itemsize


def _jaxpr_bytes(jaxpr) -> int:
  """Bytes of every value `jaxpr` computes, those of its inner jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    total += sum(_value_bytes(v) for v in eqn.outvars)
    for param in eqn.params.values():
      for inner in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr's
        if hasattr(inner, "eqns"):
          total += _jaxpr_bytes(inner)
  return total


def member_bytes_bound(cfg) -> int:
  """An upper bound of `member_bytes`, traced, not compiled (~10x cheaper).

  Twice the bytes of a member's step inputs and of every value its step
  computes, as if XLA fused nothing and freed nothing (measured 4-6x the
  compiled figure for the paper MLP and the seed CNN).
  """
  num_train = cfg.data.num_train or data_lib.spec_of(cfg.data).num_train
  args = _abstract_step_inputs(cfg, 1, num_train)
  closed = jax.make_jaxpr(functools.partial(one_step, batch_size=cfg.train.batch_size))(*args)
  shared = sum(math.prod(x.shape) * x.dtype.itemsize for x in args[2:4])  # images, labels
  inputs = sum(_value_bytes(v) for v in closed.jaxpr.invars) - shared
  return 2 * (inputs + _jaxpr_bytes(closed.jaxpr))


def group_capacity(cfg, budget: int | None = None, wanted: int | None = None) -> int:
  """How many members of `cfg`'s group fit `budget` bytes (default `memory_budget()`).

  With `wanted`: `wanted` when `member_bytes_bound` says they all fit (no
  compilation), else the compiled estimate (`member_bytes`). Of one device:
  where several share a group (`state.spread_members`), each holds fewer.
  """
  budget = memory_budget() if budget is None else budget
  spec = data_lib.spec_of(cfg.data)
  free = budget - data_lib.data_bytes(cfg.data, spec)
  if wanted and wanted * member_bytes_bound(cfg) <= free:
    return wanted
  return max(1, int(free // member_bytes(cfg)))


def chunks(items: list, capacity: int) -> list[list]:
  """`items` in order, cut into the fewest near-equal chunks of at most `capacity`."""
  n = math.ceil(len(items) / max(capacity, 1))
  return [items[i * len(items) // n:(i + 1) * len(items) // n] for i in range(n)]


# -- the vmapped steps --------------------------------------------------------

def permutations(rngs, epoch, *, num_examples: int) -> jax.Array:
  """Each member's `steps.permutation` from its own rng: (members, num_examples)."""
  return jax.vmap(lambda rng: steps.permutation(rng, epoch, num_examples))(rngs)


def _as_solo(step):
  """`step` of one member applied to a `MemberStates` member through its solo view."""

  def member_step(state, sums, perm):
    if not isinstance(state, MemberStates):
      return step(state, sums, perm)
    view, sums = step(state.member_view(), sums, perm)
    return state.absorb(view), sums

  return member_step


def scan_steps(states, sums, images, labels, perms, *, length: int, batch_size: int,
               unroll: int = 1, augment: str = "none"):
  """`steps.scan_steps` vmapped over stacked members; images/labels are shared, each
  member augments with its own key."""
  return jax.vmap(_as_solo(lambda st, sm, p: steps.scan_steps(
      st, sm, images, labels, p, length=length, batch_size=batch_size, unroll=unroll,
      augment=augment)))(states, sums, perms)


def one_step(states, sums, images, labels, perms, *, batch_size: int, augment: str = "none"):
  """`steps.one_step` vmapped over stacked members."""
  return jax.vmap(_as_solo(lambda st, sm, p: steps.one_step(
      st, sm, images, labels, p, batch_size=batch_size, augment=augment)))(
          states, sums, perms)
