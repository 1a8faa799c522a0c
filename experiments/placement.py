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
_COMPARE = flags.DEFINE_string(
    "compare_workdir", "runs/lr_sweep",
    "The learning-rate sweep's work directory: runs with identical configs are compared.")
_COMPARE_SWEEP = flags.DEFINE_string("compare_sweep", "configs/sweeps/lr_sweep.py",
                                     "The sweep file of --compare_workdir.")

POSITIONS = ("before", "after")
STYLE = {"before": ("tab:purple", "-"), "after": ("tab:green", "--")}


def curves(workdir: str, rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
  """Each run's (step, test accuracy) evaluations."""
  out = {}
  for r in rows:
    run_dir = os.path.join(workdir, r["name"])
    if not os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
      continue
    out[r["name"]] = [(m["step"], m["test_accuracy"]) for m in study.read_metrics(run_dir)
                      if m.get("test_accuracy") is not None]
  return out


def mean_curve(runs: list[list[tuple[int, float]]]):
  """Steps every run evaluated at, and the mean over runs there."""
  if not runs:
    return [], []
  common = sorted(set.intersection(*(set(s for s, _ in c) for c in runs)))
  return common, np.array([[dict(c)[s] for s in common] for c in runs]).mean(0)


def plot(rows, cells, runs, models, lrs, path: str) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(len(models), len(lrs), figsize=(5.5 * len(lrs), 3.8 * len(models)),
                           squeeze=False)
  for i, model in enumerate(models):
    for j, lr in enumerate(lrs):
      ax = axes[i, j]
      lows = []
      for pos in POSITIONS:
        color, ls = STYLE[pos]
        members = [r for r in rows if r["model"] == model and r["model.bn_position"] == pos
                   and r["optimizer.learning_rate"] == lr and r["name"] in runs]
        for r in members:
          c = runs[r["name"]]
          xs, ys = [s for s, _ in c], [a for _, a in c]
          ax.plot(xs, ys, ls, color=color, lw=0.7, alpha=0.45)
          if r["status"] == "diverged" and xs:
            ax.plot(xs[-1], ys[-1], "x", color=color, ms=7, mew=1.5)
          tail = ys[len(ys) // 4:]
          if tail:
            lows.append(min(tail))
        done = [runs[r["name"]] for r in members if r["status"] == "done"]
        steps, mean = mean_curve(done)
        c = cells[(model, pos, lr)]
        label = f"BN {pos} activation: {lr_sweep.short_acc(c)}"
        if len(steps):
          ax.plot(steps, mean, ls, color=color, label=label, lw=2)
        else:
          ax.plot([], [], ls, color=color, label=label, lw=2)
      bottom = min(lows) - 0.01 if lows else 0.0
      ax.set_ylim(bottom if bottom > 0.5 else 0.0, 1.0)
      ax.axhline(0.97, color="grey", lw=0.8, ls=":")
      ax.set_title(f"{lr_sweep.MODEL_LABELS.get(model, model)}, lr {lr:g}", fontsize=10)
      ax.set_xlabel("step")
      ax.set_ylabel("test accuracy")
      ax.legend(fontsize=8, loc="best", title="thick: mean of non-diverged seeds; thin: "
                "each seed;\nx: diverged. Legend: final accuracy", title_fontsize=7)
      ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def finding(model: str, lr: float, cells) -> str:
  """One sentence on after vs before for one (model, lr), from the numbers alone."""
  b, a = cells.get((model, "before", lr)), cells.get((model, "after", lr))
  head = f"- {lr_sweep.MODEL_LABELS.get(model, model)}, lr {lr:g}: "
  if b is None or a is None:
    return head + "incomplete (see the table)."
  each = lambda c: ", ".join(f"{x:.4f}" for x in c["acc_each"]) or "none"  # noqa: E731
  if a["trained"] < a["seeds"] or b["trained"] < b["seeds"]:
    parts = []
    for pos, c in (("before", b), ("after", a)):
      fail = lr_sweep.fmt_fail(c)
      parts.append(f"{pos}: {c['trained']}/{c['seeds']} seeds trained (final accuracies of "
                   f"the non-diverged seeds: {each(c)}" + ("" if fail == "0" else f"; {fail}")
                   + ")")
    return head + "not every seed trains, so no mean comparison; " + "; ".join(parts) + "."
  d = a["acc_mean"] - b["acc_mean"]
  if a["acc_min"] > b["acc_max"]:
    sep = "every 'after' seed above every 'before' seed"
  elif b["acc_min"] > a["acc_max"]:
    sep = "every 'before' seed above every 'after' seed"
  else:
    sep = "the seed ranges overlap"
  text = (head + f"after minus before = {d * 100:+.2f} points of final test accuracy "
          f"({a['acc_mean']:.4f} vs {b['acc_mean']:.4f}); {sep}; steps to 97%: after "
          f"{lr_sweep.fmt_steps(a)}, before {lr_sweep.fmt_steps(b)}")
  sa, sb = a["steps_to_97_each"], b["steps_to_97_each"]
  if len(sa) == a["seeds"] and len(sb) == b["seeds"]:
    if max(sa) < min(sb):
      text += " (every 'after' seed reached 97% before every 'before' seed)"
    elif max(sb) < min(sa):
      text += " (every 'before' seed reached 97% before every 'after' seed)"
    else:
      text += " (the seeds' steps to 97% overlap)"
  return text + "."


def same_config_check(members, rows) -> str | None:
  """Runs whose resolved config equals one of the learning-rate sweep's: equal results?"""
  if not os.path.isdir(_COMPARE.value) or not os.path.exists(_COMPARE_SWEEP.value):
    return None
  module = lr_sweep.sweep.load_config_file(_COMPARE_SWEEP.value)
  other = {m.cfg.to_json_best_effort(sort_keys=True): m.name
           for m in lr_sweep.sweep.resolve_members(module.get_config(), module.get_sweep())}
  mine = {r["name"]: (r["status"] == "diverged", r["diverged_at_step"],
                      None if r["status"] == "diverged" else r["test_accuracy"])
          for r in rows if r["status"] in ("done", "diverged")}
  pairs = []
  for m in members:
    name = other.get(m.cfg.to_json_best_effort(sort_keys=True))
    path = os.path.join(_COMPARE.value, str(name), "summary.json")
    if name and os.path.exists(path) and m.name in mine:
      s = json.load(open(path))
      theirs = (s["diverged"], s.get("diverged_at_step"),
                None if s["diverged"] else s.get("test_accuracy"))
      pairs.append((mine[m.name], theirs))
  if not pairs:
    return None
  equal = sum(a == b for a, b in pairs)
  return (f"Check: {len(pairs)} runs here have the same resolved config (model, placement, "
          f"learning rate, seed) as a run of `{_COMPARE.value}`; {equal} of them end the same "
          "way there (bit-identical final test accuracy, or divergence at the same step).")


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
            "Test accuracy over training (step 0: at initialisation): each seed (thin), the "
            "mean of the seeds that did not diverge (thick), diverged seeds' last evaluation "
            "(x); the legend gives the mean final accuracy. The dotted line marks 97%. A "
            "panel's y axis is zoomed to its curves' last three quarters.", "",
            "| model | lr | BN | final test acc, mean [min..max] | each non-diverged seed (seed order) | steps to 97% "
            "(k/n reached) | diverged / stalled |", "|---|---|---|---|---|---|---|"]
  for model in models:
    for lr in lrs:
      for pos in POSITIONS:
        c = cells.get((model, pos, lr))
        if c is None:
          continue
        lines.append(f"| {lr_sweep.MODEL_LABELS.get(model, model)} | {lr:g} | {pos} | "
                     f"{lr_sweep.fmt_acc(c)} | {', '.join(f'{x:.4f}' for x in c['acc_each'])}"
                     f" | {lr_sweep.fmt_steps(c)} | "
                     f"{lr_sweep.fmt_fail(c)} |")
  lines += ["", "## What the data shows", ""]
  lines += [finding(model, lr, cells) for model in models for lr in lrs]
  wall = lr_sweep.sweep_wall_time(os.path.normpath(_WORKDIR.value) + ".time", _WORKDIR.value,
                                  members)
  lines += ["", "With 3 seeds per cell, a difference whose seed ranges overlap is not "
            "distinguishable from seed noise here.", ""]
  check = same_config_check(members, rows)
  if check:
    lines += [check, ""]
  lines += [
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
