"""What `train.half_precision` (bfloat16 computation) does to training speed.

  python experiments/half_precision_speed.py [--reps=3] [--steps=1000] [--data=embedded]

Times bnlab's engine (the benchmark's runner) on the seed CNN with BN at batch 32
and 128 and the paper MLP at batch 60, float32 and bfloat16 computation timed
round-robin in one process. Prints one Markdown table. On CPU bfloat16 has no
fast kernels, so expect it to be slower there; the number that matters is a GPU's.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import benchmark, timing  # noqa: E402  (defines --reps and --data)

_STEPS = flags.DEFINE_integer("steps", 1000, "Steps per timed repetition (capped at an epoch).")

# (label, model, norm, batch)
CASES = (("seed CNN + BN, b32", "seed_cnn", "batch", 32),
         ("seed CNN + BN, b128", "seed_cnn", "batch", 128),
         ("paper MLP + BN, b60", "paper_mlp", "batch", 60))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from bnlab.engine import backend  # pylint: disable=g-import-not-at-top
  from bnlab.engine import provenance  # pylint: disable=g-import-not-at-top
  backend.configure(True)  # before JAX starts, as every bnlab run
  images, labels = benchmark.load_images(flags.FLAGS.data)
  print(f"Machine: {provenance.describe(provenance.environment(backend.deterministic()))}\n")
  print("| case | float32 (ex/s) | bfloat16 (ex/s) | bfloat16 speed-up |")
  print("|---|---|---|---|")
  for label, model, norm, batch in CASES:
    runs = {}
    for name, dtype in (("float32", None), ("bfloat16", jnp.bfloat16)):
      run, steps, _ = benchmark.bnlab_runner(model, norm, batch, _STEPS.value, images, labels,
                                             dtype=dtype)
      runs[name] = run
    rates = timing.interleaved_rates(runs, steps, batch, flags.FLAGS.reps)
    print(f"| {label} | {rates['float32']:,.0f} | {rates['bfloat16']:,.0f} | "
          f"{rates['bfloat16'] / rates['float32']:.2f}x |", flush=True)


if __name__ == "__main__":
  app.run(main)
