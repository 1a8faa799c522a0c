"""Training state: the checkpointed pytree, its initialization, and stacks of group members."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from bnlab.data.dataset import MNIST_INPUT, InputSpec
from bnlab.engine import optim
from bnlab.models import networks as models


class TrainState(struct.PyTreeNode):
  """Everything that changes during training (and is checkpointed)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data; shuffling key = fold_in(rng, epoch)
  apply_fn: Callable = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)


def create_train_state(model, tx, rng: jax.Array, batch_size: int,
                       inputs: InputSpec = MNIST_INPUT) -> TrainState:
  """Initial state: parameters from `rng`, empty optimizer state, step 0. `inputs`: one
  example of the model's input (`bnlab.data.input_spec`), what init traces it on."""
  init_rng, data_rng = jax.random.split(rng)
  dummy = jnp.zeros(*inputs.batch(batch_size))
  variables = model.init(models.init_rngs(init_rng), dummy, train=False)
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


# Keys whose value is a per-member input of a group's step (`MemberStates`);
# the learning rate is one through the optimizer state.
MEMBER_VALUE_KEYS = ("optimizer.momentum", "model.bn.momentum", "model.bn.epsilon")
# The field of the built-in models' `norm` (a `NormSpec`) of each model key of MEMBER_VALUE_KEYS.
MODEL_FIELDS = {"model.bn.momentum": "momentum", "model.bn.epsilon": "epsilon"}
# Where `MemberApply` finds a member's model values: a reserved key of its params.
MEMBER_VALUES_PARAM = "__member_values__"


class MemberApply(struct.PyTreeNode):
  """`model.apply` with a member's model values (MODEL_FIELDS) read from its params.

  For evaluations of stacked members, which map one `apply_fn` over each
  member's params: `with_member_values` puts a member's values under the
  reserved key MEMBER_VALUES_PARAM of its params; this apply takes them out
  and applies the model cloned with them. Hashable, so it can be a static
  argument of a jitted evaluation, like `model.apply`.
  """

  model: Any = struct.field(pytree_node=False)

  def __call__(self, variables, *args, **kwargs):
    params = dict(variables["params"])
    values = params.pop(MEMBER_VALUES_PARAM)
    return with_model_values(self.model, values).apply(
        {**variables, "params": params}, *args, **kwargs)


def model_values(values: dict) -> dict:
  """The model keys (MODEL_FIELDS) of a `MemberStates.values`."""
  return {k: v for k, v in values.items() if k in MODEL_FIELDS}


def with_model_values(model, values: dict):
  """A built-in `model` cloned with a member's model values (MODEL_FIELDS of its `norm`):
  every built-in network (the classifiers, ResNet-20) holds its norm settings in one
  `NormSpec`, so one clone serves them all."""
  fields = {MODEL_FIELDS[k]: v for k, v in model_values(values).items()}
  return model.clone(norm=dataclasses.replace(model.norm, **fields)) if fields else model


def with_member_values(params, values: dict):
  """`params` with the members' model values (stacked like them) for `MemberApply`."""
  return {**params, MEMBER_VALUES_PARAM: values}


class MemberStates(TrainState):
  """A group's stacked states with per-member values of `MEMBER_VALUE_KEYS`.

  `values` maps each key whose value differs between the members to their
  values; the vmapped step gives each member its own (`member_view`). What
  `take` returns, and a member's checkpoint holds, is a plain `TrainState`.
  """

  values: Any
  model: Any = struct.field(pytree_node=False)

  def train_state(self) -> TrainState:
    """The `TrainState` fields (apply_fn and tx of the shared model and optimizer)."""
    return TrainState(step=self.step, params=self.params, batch_stats=self.batch_stats,
                      opt_state=self.opt_state, rng=self.rng, apply_fn=self.apply_fn,
                      tx=self.tx)

  def member_view(self) -> TrainState:
    """One (unstacked) member as a solo run's state, its values in its model and optimizer."""
    view = self.train_state()
    if model_values(self.values):
      view = view.replace(apply_fn=with_model_values(self.model, self.values).apply)
    if "optimizer.momentum" in self.values:  # read by `optim.make_optimizer`'s build
      hp = view.opt_state.hyperparams
      view = view.replace(opt_state=view.opt_state._replace(
          hyperparams={**hp, "momentum": self.values["optimizer.momentum"]}))
    return view

  def absorb(self, view: TrainState) -> MemberStates:
    """`self` advanced to the trained `view` of `member_view`."""
    opt_state = view.opt_state
    if "optimizer.momentum" in self.values:
      hp = dict(opt_state.hyperparams)
      hp.pop("momentum")
      opt_state = opt_state._replace(hyperparams=hp)
    return self.replace(step=view.step, params=view.params, batch_stats=view.batch_stats,
                        opt_state=opt_state, rng=view.rng)


def _config_value(cfg, key: str):
  node = cfg
  for part in key.split("."):
    node = node[part]
  return node


def member_values(cfgs) -> dict[str, list[float]]:
  """The `MEMBER_VALUE_KEYS` whose values differ between `cfgs`: {key: each member's value}.

  The optimizer's momentum only for `optimizer.name="momentum"` (else unused).
  """
  out = {}
  for key in MEMBER_VALUE_KEYS:
    if key == "optimizer.momentum" and cfgs[0].optimizer.name != "momentum":
      continue
    values = [float(_config_value(c, key)) for c in cfgs]
    if len(set(values)) > 1:
      out[key] = values
  return out


def create_member_states(model, tx, cfgs, batch_size: int, init_models=None,
                         inputs: InputSpec = MNIST_INPUT) -> TrainState:
  """The stacked initial states of a group's members, from one vmapped init.

  Member i equals `create_train_state(model, own_i, key(seed_i), batch_size)`
  up to float rounding, with `own_i` its own optimizer, so its optimizer state
  holds its own learning rate; `tx` is the update function they share. One
  compiled init for the whole group instead of one traced init per member
  (24 paper MLPs: 0.7 s instead of 2.5 s). Members that differ in a key of
  `MEMBER_VALUE_KEYS` get `MemberStates`. `init_models` (`members.init_models`):
  each member's model, where members differ in their initializers; one vmapped
  init per distinct model, every state then applied with `model`.
  """
  seeds = np.asarray([c.seed for c in cfgs], np.uint32)

  def init(init_model, seeds):
    # Unoptimized code generation: compiles several times faster, and an
    # initialization runs once.
    @functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
    def run(seeds):
      return jax.vmap(
          lambda s: create_train_state(init_model, tx, jax.random.key(s), batch_size,
                                       inputs))(seeds)
    return run(seeds).replace(apply_fn=model.apply)

  if init_models is None:
    state = init(model, seeds)
  else:  # one init per distinct model, the parts put back in member order on the host
    distinct = list({id(m): m for m in init_models}.values())
    which = [[i for i, m in enumerate(init_models) if m is d] for d in distinct]
    parts = [jax.device_get(init(d, seeds[idx])) for d, idx in zip(distinct, which)]
    order = np.argsort(np.concatenate(which))
    state = jax.tree.map(lambda *xs: jax.device_put(np.concatenate(xs)[order]), *parts)
  state = set_learning_rates(state, cfgs)
  values = member_values(cfgs)
  if values:
    values = {k: jax.device_put(np.asarray(v, np.float32)) for k, v in values.items()}
    state = MemberStates(**{f.name: getattr(state, f.name) for f in dataclasses.fields(state)},
                         values=values, model=model)
  return spread_members(state, len(cfgs))


def set_learning_rates(state: TrainState, cfgs) -> TrainState:
  """`state` (one run's, or stacked members') with each config's constant learning rate.

  Only a constant schedule without warmup keeps its rate as a plain value in
  the optimizer state (`optim.shared_optimizer`); other states are returned as
  they are.
  """
  opt = cfgs[0].optimizer
  if not optim.constant_learning_rate(opt):
    return state
  hp = state.opt_state.hyperparams
  lrs = np.asarray([c.optimizer.learning_rate for c in cfgs], hp["learning_rate"].dtype)
  lrs = lrs.reshape(hp["learning_rate"].shape)
  return state.replace(opt_state=state.opt_state._replace(
      hyperparams={**hp, "learning_rate": jax.device_put(lrs)}))


def spread_members(tree, num_members: int):
  """`tree`'s member axis split over this process's devices, when they divide it evenly.

  Each device then trains its share of the members (the step is vmapped over
  them; the shared data is copied to every device). One device: unchanged.
  """
  devices = jax.local_devices()
  if len(devices) == 1 or num_members % len(devices):
    return tree
  mesh = jax.sharding.Mesh(np.array(devices), ("members",))
  return jax.device_put(tree, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("members")))


def take(tree, i: int):
  """Member `i`'s part of a stacked (host or device) tree (of `MemberStates`: a `TrainState`)."""
  if isinstance(tree, MemberStates):
    tree = tree.train_state()
  return jax.tree.map(lambda x: x[i, ...], tree)  # a host array's 0-d part stays an array
