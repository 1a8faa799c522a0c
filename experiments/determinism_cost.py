"""What deterministic mode (`train.deterministic`) costs: training speed with it on and off.

  python experiments/determinism_cost.py [--rounds=2] [--reps=3] [--data=embedded]

XLA reads its determinism flag once per process, so each setting is timed in a
fresh process (`--mode=on|off`), the two alternating for `--rounds` rounds so
that a slow spell falls on both alike. Cases: the seed CNN with BN at batch 32
and the paper MLP at batch 60, trained by bnlab's engine (the benchmark's
runner). Prints one Markdown table; on CPU both settings run the same programs
(the flag is for GPUs only), so the ratio there is noise.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from experiments import benchmark, timing  # noqa: E402  (defines --reps and --data)

_MODE = flags.DEFINE_enum("mode", None, ["on", "off"],
                          "Internal: time one setting in this process and print JSON.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Alternating on/off rounds (one process each).")
_STEPS = flags.DEFINE_integer("steps", 1000, "Steps per timed repetition (capped at an epoch).")

# (label, model, norm, batch)
CASES = (("seed CNN + BN, b32", "seed_cnn", "batch", 32),
         ("paper MLP + BN, b60", "paper_mlp", "batch", 60))


def time_here(mode: str) -> dict:
  """Examples/s of each case in this process, deterministic mode `mode`."""
  from bnlab.engine import backend  # pylint: disable=g-import-not-at-top
  backend.configure(mode == "on")  # before JAX starts
  from bnlab.engine import provenance  # pylint: disable=g-import-not-at-top
  images, labels = benchmark.load_images(flags.FLAGS.data)
  rates = {}
  for label, model, norm, batch in CASES:
    run, steps, _ = benchmark.bnlab_runner(model, norm, batch, _STEPS.value, images, labels)
    rates[label] = timing.median_rate(run, steps, batch, flags.FLAGS.reps, warm_up=False)
  return {"rates": rates, "deterministic": backend.deterministic(),
          "environment": provenance.describe(provenance.environment(mode == "on"))}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _MODE.value:
    print(json.dumps(time_here(_MODE.value)))
    return
  runs = {"on": [], "off": []}
  for _ in range(_ROUNDS.value):
    for mode in ("on", "off"):
      out = subprocess.run(
          [sys.executable, os.path.abspath(__file__), f"--mode={mode}", f"--reps={flags.FLAGS.reps}",
           f"--steps={_STEPS.value}", f"--data={flags.FLAGS.data}"],
          capture_output=True, text=True, check=False)
      if out.returncode:
        sys.exit(f"error: the --mode={mode} process failed:\n{out.stderr[-3000:]}")
      runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
  print(f"Machine: {runs['on'][0]['environment']}")
  print(f"Deterministic ops in effect: on={runs['on'][0]['deterministic']}, "
        f"off={runs['off'][0]['deterministic']}\n")
  print("| case | deterministic on (ex/s) | off (ex/s) | slowdown (off rate / on rate) |")
  print("|---|---|---|---|")
  for label, *_ in CASES:
    on = statistics.median(r["rates"][label] for r in runs["on"])
    off = statistics.median(r["rates"][label] for r in runs["off"])
    print(f"| {label} | {on:,.0f} | {off:,.0f} | {off / on:.2f}x |")


if __name__ == "__main__":
  app.run(main)
