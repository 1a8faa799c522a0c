"""Study 4: BN before vs after the activation, for the paper MLP and the seed CNN.

  python experiments/placement.py --workdir=runs/placement --out=results/placement

Runs (or completes) the sweep of configs/sweeps/placement.py through
`bnlab.sweep.run_sweep`: both models x BN before/after the activation x two
learning rates x 3 seeds, with the step budgets of the learning-rate sweep.
Writes report.md, test_accuracy.png, cells.json and a copy of the sweep's
results.csv into --out. "Diverged", "stalled" and the accuracy statistics are
defined as in experiments/lr_sweep.py.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from bnlab import workdir as workdir_lib  # noqa: E402
from experiments import lr_sweep  # noqa: E402
from experiments import study  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/placement", "The sweep's work directory.")
_OUT = flags.DEFINE_string("out", "results/placement", "Where report, figure and tables go.")
_SWEEP = flags.DEFINE_string("sweep", "configs/sweeps/placement.py", "The sweep file.")
_TRAIN = flags.DEFINE_bool("train", True, "Run missing members; false: only report.")

POSITIONS = ("before", "after")
STYLE = {"before": ("tab:purple", "-"), "after": ("tab:green", "--")}


def curves(workdir: str, rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
  """Each run's (step, test accuracy) evaluations, step 0 excluded."""
  out = {}
  for r in rows:
    run_dir = os.path.join(workdir, r["name"])
    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
      continue
    out[r["name"]] = [(m["step"], m["test_accuracy"]) for m in study.read_metrics(run_dir)
                      if m.get("test_accuracy") is not None and m["step"] > 0]
  return out


def mean_curve(runs: list[list[tuple[int, float]]]):
  """Steps every run evaluated at, with the mean, min and max over runs."""
  if not runs:
    return [], [], [], []
  common = sorted(set.intersection(*(set(s for s, _ in c) for c in runs)))
  vals = np.array([[dict(c)[s] for s in common] for c in runs])
  return common, vals.mean(0), vals.min(0), vals.max(0)


def plot(rows, cells, runs, models, lrs, path: str) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(len(models), len(lrs), figsize=(5 * len(lrs), 3.6 * len(models)),
                           squeeze=False)
  for i, model in enumerate(models):
    for j, lr in enumerate(lrs):
      ax = axes[i, j]
      lows = []
      for pos in POSITIONS:
        color, ls = STYLE[pos]
        members = [r for r in rows if r["model"] == model and r["model.bn_position"] == pos
                   and r["optimizer.learning_rate"] == lr and r["name"] in runs
                   and r["status"] == "done"]
        steps, mean, lo, hi = mean_curve([runs[r["name"]] for r in members])
        if not steps:
          continue
        c = cells[(model, pos, lr)]
        label = f"BN {pos} activation: {lr_sweep.short_acc(c)}"
        ax.plot(steps, mean, ls, color=color, label=label, lw=1.5)
        ax.fill_between(steps, lo, hi, color=color, alpha=0.2, lw=0)
        lows.append(float(np.min(mean[len(mean) // 4:])))
      if lows:
        ax.set_ylim(max(0.0, min(lows) - 0.02), 1.0)
      ax.axhline(0.97, color="grey", lw=0.8, ls=":")
      ax.set_title(f"{lr_sweep.MODEL_LABELS.get(model, model)}, lr {lr:g}", fontsize=10)
      ax.set_xlabel("step")
      ax.set_ylabel("test accuracy")
      ax.legend(fontsize=8, loc="lower right", title="seed mean (band: min..max); final",
                title_fontsize=7)
      ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def finding(model: str, lr: float, cells) -> str:
  """One sentence on after vs before for one (model, lr), from the numbers alone."""
  b, a = cells.get((model, "before", lr)), cells.get((model, "after", lr))
  head = f"- {lr_sweep.MODEL_LABELS.get(model, model)}, lr {lr:g}: "
  if b is None or a is None or b["acc_mean"] is None or a["acc_mean"] is None:
    return head + "incomplete (see the table)."
  d = a["acc_mean"] - b["acc_mean"]
  if a["acc_min"] > b["acc_max"]:
    sep = "every 'after' seed above every 'before' seed"
  elif b["acc_min"] > a["acc_max"]:
    sep = "every 'before' seed above every 'after' seed"
  else:
    sep = "the seed ranges overlap"
  text = (f"after minus before = {d * 100:+.2f} points of final test accuracy "
          f"({a['acc_mean']:.4f} vs {b['acc_mean']:.4f}); {sep}")
  if a["steps_to_97_mean"] is not None or b["steps_to_97_mean"] is not None:
    text += (f"; steps to 97%: after {lr_sweep.fmt_steps(a)}, before {lr_sweep.fmt_steps(b)}")
  fails = [f"{p}: {lr_sweep.fmt_fail(c)}" for p, c in (("before", b), ("after", a))
           if lr_sweep.fmt_fail(c) != "0"]
  if fails:
    text += "; failures " + ", ".join(fails)
  return head + text + "."


def main(argv):
  del argv
  workdir_lib.quiet_library_logs()
  rows, members, minutes = lr_sweep.run_or_load(_SWEEP.value, _WORKDIR.value, _TRAIN.value)
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  rows = [{**r, "model": str(r["model"])} for r in rows]
  cells = lr_sweep.cells_by(rows, ("model", "model.bn_position", "optimizer.learning_rate"))
  models = list(dict.fromkeys(r["model"] for r in rows))
  lrs = sorted({r["optimizer.learning_rate"] for r in rows})
  runs = curves(_WORKDIR.value, rows)
  plot(rows, cells, runs, models, lrs, os.path.join(out, "test_accuracy.png"))
  if _TRAIN.value:
    shutil.copy(os.path.join(_WORKDIR.value, "results.csv"), os.path.join(out, "results.csv"))
  with open(os.path.join(out, "cells.json"), "w") as fh:
    json.dump([{"model": k[0], "bn_position": k[1], "learning_rate": k[2], **v}
               for k, v in sorted(cells.items())], fh, indent=1)
    fh.write("\n")

  n_seeds = max(c["seeds"] for c in cells.values())
  lines = ["# Study 4: BN before vs after the activation", "",
           f"{len(rows)} runs: {{{', '.join(models)}}} x BN {{before, after}} the activation x "
           f"learning rates {{{', '.join(f'{x:g}' for x in lrs)}}} x {n_seeds} seeds, plain "
           f"SGD at a constant rate, full MNIST; sweep file `{_SWEEP.value}`. Every run has "
           "BN; only its position changes.", "",
           "- **before**: layer (no bias: BN's shift replaces it) -> BN -> activation, the "
           "paper's placement.",
           "- **after**: layer (with bias) -> activation -> BN.",
           "- paper MLP: 784-100-100-100-10, sigmoid, LeCun normal init, BN in every hidden "
           "layer (configs/paper_mlp.py uses 'before').",
           "- seed CNN: Conv32-MaxPool-Conv64-Flatten-[BN]-Dense64-Dense10, ReLU, Glorot "
           "uniform init; its one BN acts per unit on the flattened output of the second "
           "convolution, before or after that convolution's ReLU (configs/seed_cnn.py, the "
           "Keras tutorial, uses 'after').", "",
           "## Step budgets", ""]
  lines += lr_sweep.budget_lines(members)
  lines += ["", "The CNN budget is a third of one epoch: its numbers describe early training.",
            "", "## Results", "",
            "![test accuracy over training](test_accuracy.png)", "",
            "Test accuracy over training, seed mean (line) and min..max band over the seeds; "
            "the legend gives the final accuracy (mean over seeds). The dotted line marks 97%. "
            "Each panel's y axis is zoomed to its curves.", "",
            "| model | lr | BN | final test acc, mean [min..max] | steps to 97% (k/n reached) "
            "| diverged / stalled |", "|---|---|---|---|---|---|"]
  for model in models:
    for lr in lrs:
      for pos in POSITIONS:
        c = cells.get((model, pos, lr))
        if c is None:
          continue
        lines.append(f"| {lr_sweep.MODEL_LABELS.get(model, model)} | {lr:g} | {pos} | "
                     f"{lr_sweep.fmt_acc(c)} | {lr_sweep.fmt_steps(c)} | "
                     f"{lr_sweep.fmt_fail(c)} |")
  lines += ["", "## What the data shows", ""]
  lines += [finding(model, lr, cells) for model in models for lr in lrs]
  wall = lr_sweep.sweep_wall_time(os.path.normpath(_WORKDIR.value) + ".time", _WORKDIR.value,
                                  members)
  lines += ["", "With 3 seeds per cell, a difference whose seed ranges overlap is not "
            "distinguishable from seed noise here.", "",
            "## Wall time", "",
            f"- The sweep: {wall}; cpu, 2 CPU cores shared with other work.",
            f"- This invocation: {minutes:.1f} min (finished members are read, not rerun).", "",
            f"Command: `python experiments/placement.py --workdir={_WORKDIR.value} "
            f"--out={out}`", "",
            "Files: `results.csv` (one row per run, from the sweep), `cells.json` (the "
            "per-cell statistics above)."]
  with open(os.path.join(out, "report.md"), "w") as fh:
    fh.write("\n".join(lines) + "\n")
  logging.info("Wrote %s", os.path.join(out, "report.md"))
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
