"""Sweep members trained as one group: which runs may group, and the solo steps vmapped over them."""

from __future__ import annotations

import json

import jax

from bnlab import steps

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


def permutations(rngs, epoch, *, num_examples: int) -> jax.Array:
  """Each member's `steps.permutation` from its own rng: (members, num_examples)."""
  return jax.vmap(lambda rng: steps.permutation(rng, epoch, num_examples))(rngs)


def scan_steps(states, sums, images, labels, perms, *, length: int, batch_size: int,
               unroll: int = 1):
  """`steps.scan_steps` vmapped over stacked members; images/labels are shared."""
  return jax.vmap(lambda st, sm, p: steps.scan_steps(
      st, sm, images, labels, p, length=length, batch_size=batch_size, unroll=unroll))(
          states, sums, perms)


def one_step(states, sums, images, labels, perms, *, batch_size: int):
  """`steps.one_step` vmapped over stacked members."""
  return jax.vmap(lambda st, sm, p: steps.one_step(
      st, sm, images, labels, p, batch_size=batch_size))(states, sums, perms)
