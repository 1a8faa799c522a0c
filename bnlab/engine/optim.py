"""Optimizers: the `optimizer` config section as an optax chain and its learning-rate schedule."""

from __future__ import annotations

import functools
import json

import ml_collections
import optax


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
  """An optax optimizer whose learning rate lives in its state (vmappable).

  A `momentum` entry beside the learning rate in the state's hyperparameters
  replaces `opt.momentum` (a group member's own, `state.MemberStates`); solo
  states hold none, so their structure does not depend on it.
  """

  def build(learning_rate, **overrides):
    if opt.name == "sgd":
      return optax.sgd(learning_rate)
    if opt.name == "momentum":
      return optax.sgd(learning_rate, momentum=overrides.get("momentum", opt.momentum),
                       nesterov=opt.nesterov)
    return optax.adam(learning_rate)

  return optax.inject_hyperparams(build)(
      learning_rate=learning_rate_schedule(opt, total_steps))


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
