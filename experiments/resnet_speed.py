"""ResNet-20's train step with and without BN, on MNIST-shaped input.

  python experiments/resnet_speed.py [--batch=128] [--steps=10] [--reps=3] [--data=embedded]

Times bnlab's engine (the benchmark's runner: device-resident data, the loop form and
convolution `auto` resolves to on this platform) on `model.name=resnet20` with
`configs/resnet20.py`'s network and optimizer (SGD momentum 0.9, decoupled weight decay),
with BN and with `model.norm=none`, timed round-robin in one process so a slow spell of a
shared machine falls on both. Prints one Markdown table: ms per step, examples/s, and BN's
cost. A number, not a test: results/README.md keeps the measured ones.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from experiments import benchmark, timing  # noqa: E402  (defines --reps and --data)

_BATCH = flags.DEFINE_integer("batch", 128, "Examples per step (the paper's 128).")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed repetition (one compiled call).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from bnlab.engine import backend  # pylint: disable=g-import-not-at-top
  from bnlab.engine import provenance  # pylint: disable=g-import-not-at-top
  backend.configure(True)  # before JAX starts, as every bnlab run
  images, labels = benchmark.load_images(flags.FLAGS.data)
  print(f"Machine: {provenance.describe(provenance.environment(backend.deterministic()))}\n")
  batch, runs = _BATCH.value, {}
  for norm in ("batch", "none"):
    run, steps, form = benchmark.bnlab_runner("resnet20", norm, batch, _STEPS.value, images,
                                              labels)
    runs[norm] = run
  rates = timing.interleaved_rates(runs, steps, batch, flags.FLAGS.reps)
  print(f"ResNet-20, batch {batch}, {images.shape[1]}x{images.shape[2]} grey input, "
        f"loop form {form}, median of {flags.FLAGS.reps} rounds of {steps} steps\n")
  print("| model | ms / step | examples/s |")
  print("|---|---|---|")
  for norm, label in (("batch", "ResNet-20 + BN"), ("none", "ResNet-20, no BN")):
    print(f"| {label} | {1000 * batch / rates[norm]:,.0f} | {rates[norm]:,.0f} |")
  print(f"\nBN's cost: a step with BN takes {rates['none'] / rates['batch']:.2f}x the time "
        "of one without.")


if __name__ == "__main__":
  app.run(main)
