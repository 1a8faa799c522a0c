"""Optimizers: the `optimizer` config section as an optax transformation and its schedule.

`optimizer.name` is one of bnlab's `sgd`, `momentum` (SGD with `optimizer.momentum`) and
`adam`; any optax optimizer by its function's name (`adamw`, `lamb`, `lion`, `rmsprop`,
`nadam`, ...), with its own keyword arguments from `optimizer.kwargs`; or
"package.module:function", your own transformation. Around it: `optimizer.clip_global_norm`
(the gradient clipped first) and `optimizer.weight_decay` (decoupled: -lr * wd * param added
after the optimizer, on the parameters `optimizer.weight_decay_mask` selects). The learning
rate and its schedule are bnlab's (`learning_rate_schedule`) for every optimizer, injected
into the optimizer state so that grouped runs can each have their own. With none of the
extras the transformation is the one bnlab always built, so older checkpoints restore and
resume bit-identically.
"""

from __future__ import annotations

import functools
import inspect
import json

import jax
import jax.numpy as jnp
import ml_collections
import optax

from bnlab.errors import ConfigError
from bnlab.models import user as user_models

# bnlab's own names; "momentum" is optax.sgd with optimizer.momentum and optimizer.nesterov.
BUILTIN = ("sgd", "momentum", "adam")
# optimizer.weight_decay_mask: "kernels" decays the parameters of 2 or more dimensions (dense
# and convolution kernels) and leaves the 1-D ones (BN's scale and bias, biases) alone, as
# is common practice (decaying BN's scale only shrinks it against the next layer's weights,
# Goyal et al. 2017, and biases have too few entries to overfit); "all" decays every one.
WEIGHT_DECAY_MASKS = ("kernels", "all")
# Arguments of an optax optimizer that have their own config key.
_OWN_KEYS = {"learning_rate": "optimizer.learning_rate"}


def learning_rate_schedule(opt, total_steps: int):
  """The learning rate of the `optimizer` config section: a float or a schedule."""
  lr = float(opt.learning_rate)
  if opt.schedule == "constant":
    main = lr
  elif opt.schedule == "step":
    main = optax.exponential_decay(lr, opt.decay_every_steps, opt.decay_factor,
                                   staircase=True)
  elif opt.schedule == "piecewise":  # x decay_factor at each boundary (He et al.'s drops)
    main = optax.piecewise_constant_schedule(
        lr, {int(b): float(opt.decay_factor) for b in opt.decay_boundaries})
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


def is_user_transformation(name: str) -> bool:
  """Whether `optimizer.name` is a "package.module:function" path (your own transformation)."""
  return ":" in name


def kernels_mask(params):
  """The parameters weight_decay_mask="kernels" decays: those of 2 or more dimensions."""
  return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def _parameters(fn) -> dict | None:
  try:
    return dict(inspect.signature(fn).parameters)
  except (TypeError, ValueError):
    return None


def _decay_arguments(fn) -> tuple[str, str] | None:
  """(its decay argument, its mask argument) when optax optimizer `fn` decays weights itself
  with a mask (adamw, lamb, lion, lars, adafactor, ...), else None."""
  params = _parameters(fn) or {}
  for decay in ("weight_decay", "weight_decay_rate"):
    for mask in ("mask", "weight_decay_mask"):
      if decay in params and mask in params:
        return decay, mask
  return None


def _optax_optimizers() -> list[str]:
  """The names of optax's functions that take a learning rate (its optimizers)."""
  return sorted(n for n in dir(optax) if not n.startswith("_") and _is_optax_optimizer(n))


def _is_optax_optimizer(name: str) -> bool:
  fn = getattr(optax, name, None)
  if name.startswith("_") or not callable(fn) or isinstance(fn, type):
    return False
  return "learning_rate" in (_parameters(fn) or {})


def _kwargs(opt) -> dict:
  """`optimizer.kwargs` as keyword arguments (lists, as JSON gives them back, as tuples)."""
  kwargs = opt.get("kwargs", None) or {}
  if isinstance(kwargs, ml_collections.ConfigDict):
    kwargs = kwargs.to_dict()
  return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def _optimizer_function(opt):
  """The optax function `opt.name` names, with the keyword arguments bnlab passes it."""
  kwargs = _kwargs(opt)
  if opt.name == "momentum":
    return optax.sgd, {**kwargs, "nesterov": opt.nesterov}
  fn = getattr(optax, opt.name)
  decay = _decay_arguments(fn)
  if decay:  # its own decay, where its algorithm puts it (inside LAMB's trust ratio, ...)
    kwargs[decay[0]] = float(opt.get("weight_decay", 0.0))
    if opt.get("weight_decay_mask", "kernels") == "kernels":
      kwargs[decay[1]] = kernels_mask
  return fn, kwargs


class NotATransformation(TypeError):
  """A user's optimizer function returned something else than an optax transformation."""


def _base(opt):
  """(`factory(learning_rate, **overrides)`: the optimizer without clipping and bnlab's
  decay, whether it decays weights itself)."""
  name = opt.name
  if is_user_transformation(name):
    target = user_models.load_target(name)
    takes_lr = user_models.accepts(target, "learning_rate")

    def user(learning_rate, **_):
      tx = target(opt, learning_rate=learning_rate) if takes_lr else target(opt)
      if not isinstance(tx, optax.GradientTransformation):
        raise NotATransformation(type(tx).__name__)
      # Without a learning_rate argument it is a direction (like optax.scale_by_adam()):
      # bnlab scales it by -learning_rate, the schedule's value at each step.
      return tx if takes_lr else optax.chain(tx, optax.scale_by_learning_rate(learning_rate))
    return user, False
  fn, kwargs = _optimizer_function(opt)
  if name == "momentum":  # a group member's own momentum may come in `overrides`
    return (lambda learning_rate, **o: fn(
        learning_rate, momentum=o.get("momentum", opt.momentum), **kwargs)), False
  return (lambda learning_rate, **_: fn(learning_rate, **kwargs)), bool(_decay_arguments(fn))


def make_optimizer(opt, total_steps: int) -> optax.GradientTransformation:
  """An optax optimizer whose learning rate lives in its state (vmappable).

  A `momentum` entry beside the learning rate in the state's hyperparameters
  replaces `opt.momentum` (a group member's own, `state.MemberStates`); solo
  states hold none, so their structure does not depend on it. The chain is
  clip -> optimizer -> decay: clipping bounds the raw gradient, and the decay,
  added after the optimizer's preconditioning and momentum, is decoupled
  (Loshchilov & Hutter 2019), scaled by the learning rate as in optax.adamw and
  PyTorch's AdamW. An optimizer that decays weights itself (`_decay_arguments`)
  gets `optimizer.weight_decay` and the mask as its own arguments instead.
  """
  base, decays_itself = _base(opt)
  clip = float(opt.get("clip_global_norm", 0.0))
  weight_decay = 0.0 if decays_itself else float(opt.get("weight_decay", 0.0))
  mask = kernels_mask if opt.get("weight_decay_mask", "kernels") == "kernels" else None

  def build(learning_rate, **overrides):
    tx = base(learning_rate, **overrides)
    if not clip and not weight_decay:
      return tx  # no chain around it: the state and numbers of bnlab before the extras
    parts = [optax.clip_by_global_norm(clip)] if clip else []
    parts.append(tx)
    if weight_decay:
      parts.append(optax.add_decayed_weights(-learning_rate * weight_decay, mask))
    return optax.chain(*parts)

  return optax.inject_hyperparams(build)(
      learning_rate=learning_rate_schedule(opt, total_steps))


# -- validation ----------------------------------------------------------------------------

def check_optimizer(opt) -> None:
  """ConfigError, one line naming the key and the fix, when the `optimizer` section `opt`
  builds no usable optimizer: an unknown name, keyword arguments its optax function does
  not take (listing those it does), a user's function that does not import or returns no
  optax.GradientTransformation, or one that fails on parameters (traced, nothing computed:
  a dense layer's kernel and a BN's scale and bias, through init and one update)."""
  name = opt.name
  if not isinstance(name, str):
    raise ConfigError(f"config.optimizer.name={name!r} is invalid: expected a string")
  if is_user_transformation(name):
    _check_user_transformation(opt)
  elif name in BUILTIN or _is_optax_optimizer(name):
    _check_kwargs(opt)
  else:
    import difflib  # pylint: disable=g-import-not-at-top
    close = difflib.get_close_matches(name, [*BUILTIN, *_optax_optimizers()], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(
        f"config.optimizer.name={name!r} is invalid{hint}: expected one of {BUILTIN}, an "
        "optax optimizer's name (a function of optax taking learning_rate, e.g. 'adamw', "
        "'lamb', 'lion', 'rmsprop', 'nadam') or 'package.module:function' for your own "
        "optax transformation. Set it with --config.optimizer.name=...")
  problem = "uncached" if is_user_transformation(name) else _cached_problem(opt)
  problem = _traced_problem(opt) if problem == "uncached" else problem
  if problem:
    raise ConfigError(f"config.optimizer.name={name!r} {problem}")


def _cached_problem(opt) -> str | None:
  """`_traced_problem` of an optax optimizer, once per distinct section (a sweep validates
  each member's config); "uncached" for one JSON cannot hold (a user's transformation,
  whose module may change, is never cached)."""
  try:
    text = json.dumps(opt.to_dict(), sort_keys=True)
  except (TypeError, ValueError):
    return "uncached"
  return _problem_of_json(text)


@functools.lru_cache(maxsize=256)
def _problem_of_json(opt_json: str) -> str | None:
  return _traced_problem(ml_collections.ConfigDict(json.loads(opt_json)))


def _check_kwargs(opt) -> None:
  fn, _ = _optimizer_function(opt)
  params = _parameters(fn) or {}
  where = ("optax.sgd (optimizer.name=momentum)" if opt.name == "momentum"
           else f"optax.{opt.name}")
  own = dict(_OWN_KEYS)
  if opt.name == "momentum":
    own.update(momentum="optimizer.momentum", nesterov="optimizer.nesterov")
  decay = _decay_arguments(fn)
  if decay:
    own.update({decay[0]: "optimizer.weight_decay", decay[1]: "optimizer.weight_decay_mask"})
  kwargs = _kwargs(opt)
  for key in kwargs:
    if key in own:
      raise ConfigError(
          f"config.optimizer.kwargs.{key} is set by config.{own[key]}, which bnlab passes to "
          f"{where}; set that key instead")
  accepted = sorted(k for k, p in params.items()
                    if k not in own and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
  unknown = sorted(k for k in kwargs if k not in accepted)
  if unknown:
    raise ConfigError(
        f"config.optimizer.kwargs has {unknown}, which {where} does not take; it takes "
        f"{accepted}")


def _check_user_transformation(opt) -> None:
  name = opt.name
  module, _, attr = name.partition(":")
  if not module or not attr or ":" in attr:
    raise ConfigError(f"config.optimizer.name={name!r} is invalid: expected "
                      "'package.module:function', e.g. 'my_optimizers:make'")
  try:
    target = user_models.load_target(name)
  except user_models.UserModelError as e:
    raise ConfigError(f"config.optimizer.name={name!r} is unusable: {e}") from None
  if not callable(target) or isinstance(target, type):
    raise ConfigError(
        f"config.optimizer.name={name!r} is a {type(target).__name__}, not a function; name "
        "a function taking the `optimizer` config section and returning an "
        "optax.GradientTransformation")


def _traced_problem(opt) -> str | None:
  """What fails when the optimizer of `opt` is built and applied, in words, or None."""
  user = is_user_transformation(opt.name)
  call = f"{opt.name}(config.optimizer)" if user else "building it"
  try:
    base, _ = _base(opt)
    tx = base(float(opt.learning_rate))  # a float: no array, so JAX's backend stays unstarted
  except NotATransformation as e:
    return f"is unusable: {opt.name} returned {e}, not an optax.GradientTransformation"
  except Exception as e:  # pylint: disable=broad-except
    fix = ("fix the function or the config.optimizer keys it reads" if user else
           "fix config.optimizer.kwargs")
    return f"is unusable: {call} raised {user_models.reason(e)}; {fix}"
  if not isinstance(tx, optax.GradientTransformation):  # an optax function's own bug
    return f"is unusable: it is a {type(tx).__name__}, not an optax.GradientTransformation"
  return _apply_problem(opt)


def _apply_problem(opt) -> str | None:
  params = {"dense": {"kernel": jax.ShapeDtypeStruct((4, 3), jnp.float32)},
            "bn": {"scale": jax.ShapeDtypeStruct((3,), jnp.float32),
                   "bias": jax.ShapeDtypeStruct((3,), jnp.float32)}}
  tx = make_optimizer(opt, 10)

  def step(p):
    state = tx.init(p)
    return tx.update(jax.tree.map(jnp.ones_like, p), state, p)

  try:
    updates, _ = jax.eval_shape(step, params)
  except Exception as e:  # pylint: disable=broad-except
    extra = (" (an optimizer that needs the loss, such as lbfgs, is not supported)"
             if "value_fn" in str(e) else "")
    return (f"is unusable: its init or update fails on a dense kernel and a BN scale and bias "
            f"({user_models.reason(e)}); bnlab calls only update(grads, state, params)"
            f"{extra}")
  if jax.tree.structure(updates) != jax.tree.structure(params):
    return "is unusable: its updates do not have the parameters' structure"
  return None


def constant_learning_rate(opt) -> bool:
  """Whether `opt`'s learning rate is one value for the whole run (no schedule, no warmup)."""
  return opt.schedule == "constant" and not opt.warmup_steps


def shared_optimizer(opt, total_steps: int) -> optax.GradientTransformation:
  """`make_optimizer`, one object for all `opt` that differ only in a constant learning rate.

  Its initial state holds learning rate 0: give each run its own with
  `state.set_learning_rates`. Runs one after another in a process then share
  the optimizer, and with it their compiled steps (jit caches key on it).
  """
  d = opt.to_dict()
  if constant_learning_rate(opt):
    d["learning_rate"] = 0.0
  return _cached_optimizer(json.dumps(d, sort_keys=True), total_steps)


@functools.lru_cache(maxsize=32)
def _cached_optimizer(opt_json: str, total_steps: int) -> optax.GradientTransformation:
  return make_optimizer(ml_collections.ConfigDict(json.loads(opt_json)), total_steps)
