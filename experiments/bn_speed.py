"""BatchNorm speed: bnlab.BatchNorm against flax.linen.BatchNorm, same run.

  python experiments/bn_speed.py [--reps=7] [--calls=5] [--only=dense,conv]

Times a jit-compiled training step of one BatchNorm layer: value_and_grad of
a scalar loss wrt the input and the params, with `batch_stats` updated
(`mutable=['batch_stats']`), on a dense (4096, 1024) and a conv
(128, 32, 32, 64) float32 input. Each entry is the median over --reps
repetitions of the mean time of --calls calls, after a warm-up; the layers
take turns within each repetition. The ratio is against flax's default (fast
variance).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags, logging  # noqa: E402

import bnlab  # noqa: E402

SHAPES = {"dense": (4096, 1024), "conv": (128, 32, 32, 64), "seed_cnn": (32, 7744)}
LAYERS = {
    "flax (fast, default)": nn.BatchNorm(),
    "flax use_fast_variance=False": nn.BatchNorm(use_fast_variance=False),
    "bnlab shifted (default)": bnlab.BatchNorm(),
    "bnlab two_pass": bnlab.BatchNorm(variance="two_pass"),
    "bnlab fast": bnlab.BatchNorm(variance="fast"),
}
BASELINE = "flax (fast, default)"

_REPS = flags.DEFINE_integer("reps", 7, "timed repetitions (median)")
_CALLS = flags.DEFINE_integer("calls", 5, "calls per repetition")
_ONLY = flags.DEFINE_string("only", "dense,conv", "comma-separated inputs to run")


def make_step(module):
  @jax.jit
  def step(params, batch_stats, x):
    def loss(params, x):
      y, state = module.apply({"params": params, "batch_stats": batch_stats}, x,
                              use_running_average=False, mutable=["batch_stats"])
      return jnp.mean(y * y) + jnp.mean(y), state["batch_stats"]

    (value, new_stats), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
    return value, new_stats, grads

  return step


def time_steps(steps, args, reps, calls):
  """Median seconds per call of each step; the steps take turns in every
  repetition so that drifting machine load hits them alike."""
  for step in steps.values():
    jax.block_until_ready(step(*args[step]))  # compile
    jax.block_until_ready(step(*args[step]))  # warm-up
  times = {label: [] for label in steps}
  for _ in range(reps):
    for label, step in steps.items():
      start = time.perf_counter()
      for _ in range(calls):
        out = step(*args[step])
      jax.block_until_ready(out)
      times[label].append((time.perf_counter() - start) / calls)
  return {label: statistics.median(t) for label, t in times.items()}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # only warnings and errors, as Python logs by default
    logging.set_verbosity(logging.WARNING)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {jax.devices()[0]}")
  print(f"reps={_REPS.value} calls={_CALLS.value}; ms per training step (median)")
  rows = []
  for name in _ONLY.value.split(","):
    shape = SHAPES[name]
    x = jax.random.normal(jax.random.key(0), shape, jnp.float32) * 2 + 3
    steps, step_args = {}, {}
    for label, module in LAYERS.items():
      variables = module.init(jax.random.key(1), x, use_running_average=False)
      steps[label] = step = make_step(module)
      step_args[step] = (variables["params"], variables["batch_stats"], x)
    times = {label: 1e3 * t
             for label, t in time_steps(steps, step_args, _REPS.value, _CALLS.value).items()}
    for label, ms in times.items():
      rows.append((f"{name} {shape}", label, ms, ms / times[BASELINE]))
  width = max(len(r[1]) for r in rows)
  print(f"{'input':<26} {'layer':<{width}} {'ms':>9} {'vs flax default':>16}")
  for inp, label, ms, ratio in rows:
    print(f"{inp:<26} {label:<{width}} {ms:9.2f} {ratio:16.3f}")


if __name__ == "__main__":
  app.run(main)
