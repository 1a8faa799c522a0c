"""Study 3: the learning-rate sweep, {paper MLP, seed CNN} x {BN, no BN} x learning rate x seed.

  python experiments/lr_sweep.py --workdir=runs/lr_sweep --out=results/lr_sweep

Runs (or completes: finished members are skipped) the sweep of
configs/sweeps/lr_sweep.py through `bnlab.sweep.run_sweep`, then writes
report.md, final_accuracy.png, steps_to_97.png, cells.json and a copy of the
sweep's results.csv into --out.

Definitions used throughout: a run *diverged* when its training loss became
NaN/inf (the engine stops it); it *stalled* when it did not diverge and its
final test accuracy is below STALLED_BELOW (chance is ~0.10); it *trained*
when it neither diverged nor stalled and its final test accuracy is at least
TRAINED_AT_LEAST.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from bnlab import sweep  # noqa: E402
from bnlab import workdir as workdir_lib  # noqa: E402
from experiments import study  # noqa: E402

STALLED_BELOW = 0.2
TRAINED_AT_LEAST = 0.9
LARGE_ADVANTAGE = 0.05  # "large" BN advantage: at least 5 points of test accuracy

MODEL_LABELS = {"paper_mlp": "paper MLP (sigmoid, batch 60)",
                "seed_cnn": "seed CNN (ReLU, batch 32)"}
NORM_LABELS = {"batch": "BN", "none": "no BN"}
# Images per class (digits 0-9) in MNIST's 10,000-image test set.
MNIST_TEST_COUNTS = (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)

# A public reproduction of Ioffe & Szegedy's MLP (SGD, batch 60, 50,000 steps):
# (activation, learning rate) -> (test accuracy without BN, with BN).
PUBLIC = {("sigmoid", 0.01): (0.809, 0.973), ("sigmoid", 1.0): (0.977, 0.980),
          ("relu", 1.0): (0.098, 0.985)}


def define_flags():
  """This script's flags (defined only when it runs as a script)."""
  return (flags.DEFINE_string("workdir", "runs/lr_sweep", "The sweep's work directory."),
          flags.DEFINE_string("out", "results/lr_sweep", "Where report, figures and tables go."),
          flags.DEFINE_string("sweep", "configs/sweeps/lr_sweep.py", "The sweep file."),
          flags.DEFINE_bool("train", True, "Run missing members; false: only report."))


# -- shared with experiments/placement.py ---------------------------------------------

def run_or_load(sweep_path: str, workdir: str, train: bool):
  """(result rows, resolved members, minutes this invocation spent) of a sweep file."""
  timer = study.Timer()
  module = sweep.load_config_file(sweep_path)
  base, members_spec = module.get_config(), module.get_sweep()
  members = sweep.resolve_members(base, members_spec)
  if train:
    rows = sweep.run_sweep(base, members_spec, workdir)
  else:  # read what the member directories hold now
    rows = [sweep._result_row(m, os.path.join(workdir, m.name), None)  # pylint: disable=protected-access
            for m in members]
  return rows, members, timer.minutes()


def cell_stats(rows: list[dict]) -> dict:
  """Seed statistics of one cell (rows that differ only in seed)."""
  acc = [r["test_accuracy"] for r in rows
         if r["status"] == "done" and r["test_accuracy"] is not None]
  diverged = sum(r["status"] == "diverged" for r in rows)
  missing = sum(r["status"] in ("failed", "unfinished") for r in rows)
  stalled = sum(a < STALLED_BELOW for a in acc)
  trained = sum(a >= TRAINED_AT_LEAST for a in acc)
  reached = [r["steps_to_97"] for r in rows if r.get("steps_to_97") is not None]
  return {"seeds": len(rows), "finished": len(acc), "diverged": diverged, "stalled": stalled,
          "trained": trained, "missing": missing,
          "acc_mean": float(np.mean(acc)) if acc else None,
          "acc_min": min(acc) if acc else None, "acc_max": max(acc) if acc else None,
          "acc_each": acc,
          "diverged_at": [r["diverged_at_step"] for r in rows if r["status"] == "diverged"],
          "reached_97": len(reached),
          "steps_to_97_mean": float(np.mean(reached)) if reached else None,
          "steps_to_97_each": reached}


def fmt_acc(c: dict) -> str:
  if c["acc_mean"] is None:
    return "-"
  if c["finished"] == 1:
    return f"{c['acc_mean']:.4f}"
  return f"{c['acc_mean']:.4f} [{c['acc_min']:.4f}..{c['acc_max']:.4f}]"


def short_acc(c: dict) -> str:
  """Seed-mean accuracy, with the diverged/stalled/missing count when there are any."""
  text = "-" if c["acc_mean"] is None else f"{c['acc_mean']:.3f}"
  fail = fmt_fail(c)
  return text if fail == "0" else f"{text} ({fail})"


def fmt_steps(c: dict) -> str:
  if not c["reached_97"]:
    return f"- (0/{c['seeds']})"
  return f"{c['steps_to_97_mean']:,.0f} ({c['reached_97']}/{c['seeds']})"


def fmt_fail(c: dict) -> str:
  parts = []
  if c["diverged"]:
    parts.append(f"{c['diverged']} diverged (step {', '.join(map(str, c['diverged_at']))})")
  if c["stalled"]:
    parts.append(f"{c['stalled']} stalled")
  if c["missing"]:
    parts.append(f"{c['missing']} missing")
  return ", ".join(parts) or "0"


def sweep_wall_time(time_file: str, workdir: str, members) -> str:
  """The sweep's wall time: a bash `time` output if present, else the runs' own clocks."""
  if os.path.exists(time_file):
    m = re.search(r"real\s+(\d+)m([\d.]+)s", open(time_file).read())
    if m:
      minutes = int(m.group(1)) + float(m.group(2)) / 60
      return (f"{minutes:.1f} min, the wall time of the sweep command (bash `time`, "
              f"`{os.path.normpath(time_file)}`)")
  from bnlab import train  # pylint: disable=g-import-not-at-top
  # Grouped members share one clock: count each group's longest wall time once.
  groups: dict[str, float] = {}
  for m in members:
    path = os.path.join(workdir, m.name, "summary.json")
    if not os.path.exists(path):
      continue
    s = json.load(open(path))
    key = train.group_key(m.cfg) if s.get("group_size") else m.name
    groups[key] = max(groups.get(key, 0.0), s.get("wall_time", 0.0))
  return (f"{sum(groups.values()) / 60:.1f} min, summed over the runs' own training loops "
          "(each grouped program counted once; start-up, data loading and compiling before "
          "the loop not included)")


def budget_lines(members) -> list[str]:
  """One line per model: steps, batch, examples, epochs and evaluation interval."""
  out, seen = [], set()
  for m in members:
    label = str(m.overrides.get("model"))
    if label in seen:
      continue
    seen.add(label)
    t = m.cfg.train
    examples = t.num_steps * t.batch_size
    out.append(f"- {MODEL_LABELS.get(label, label)}: {t.num_steps:,} SGD steps at batch "
               f"{t.batch_size} = {examples:,} examples = {examples / 60000:.2f} epochs; test "
               f"accuracy (full 10,000-image test set) every {t.eval_every_steps} steps, so "
               "'steps to 97%' is the first evaluation at or above 97%, resolved to that "
               "interval.")
  return out


# -- this study -----------------------------------------------------------------------

def cells_by(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, dict]:
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault(tuple(r[k] for k in keys), []).append(r)
  return {k: cell_stats(v) for k, v in groups.items()}


def plot_final_accuracy(cells, models, lrs, path: str) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, len(models), figsize=(5.2 * len(models), 7.2), sharex=True,
                           gridspec_kw={"height_ratios": [3, 2]})
  axes = np.array(axes).reshape(2, len(models))
  colors = {"batch": "tab:blue", "none": "tab:red"}
  for j, model in enumerate(models):
    top, bottom = axes[0, j], axes[1, j]
    for norm in ("batch", "none"):
      xs, mean, lo, hi = [], [], [], []
      for lr in lrs:
        c = cells.get((model, norm, lr))
        if c is None:
          continue
        for a in c["acc_each"]:
          top.plot(lr, a, ".", color=colors[norm], alpha=0.5, ms=5)
          bottom.plot(lr, max(1 - a, 1e-4), ".", color=colors[norm], alpha=0.5, ms=5)
        for _ in range(c["diverged"]):
          top.plot(lr, -0.04, "x", color=colors[norm], ms=7, mew=1.5)
        if c["acc_mean"] is not None:
          xs.append(lr)
          mean.append(c["acc_mean"])
          lo.append(c["acc_min"])
          hi.append(c["acc_max"])
      label = NORM_LABELS[norm]
      ls = "-" if norm == "batch" else "--"
      top.plot(xs, mean, ls, color=colors[norm], marker="o", ms=4, label=label)
      top.fill_between(xs, lo, hi, color=colors[norm], alpha=0.15, lw=0)
      err = [1 - m for m in mean]
      bottom.plot(xs, err, ls, color=colors[norm], marker="o", ms=4, label=label)
      bottom.fill_between(xs, [1 - h for h in hi], [1 - l for l in lo],
                          color=colors[norm], alpha=0.15, lw=0)
    top.axhline(STALLED_BELOW, color="grey", lw=0.8, ls=":")
    top.text(lrs[0], STALLED_BELOW + 0.01, "stalled below", fontsize=7, color="grey",
             va="bottom")
    top.axhline(0, color="black", lw=0.5)
    top.set_ylim(-0.08, 1.02)
    top.set_xscale("log")
    top.set_title(MODEL_LABELS.get(model, model))
    top.set_ylabel("final test accuracy")
    if j == 0:
      top.legend(loc="lower right", title="line: seed mean\nband: min..max\nx: diverged",
                 title_fontsize=7, fontsize=8)
    top.grid(alpha=0.3)
    bottom.set_yscale("log")
    bottom.set_ylim(5e-3, 1)
    bottom.set_ylabel("final test error (log)")
    bottom.set_xlabel("learning rate (SGD, constant)")
    bottom.grid(alpha=0.3, which="major")
    bottom.set_xticks(lrs)
    bottom.set_xticklabels([f"{lr:g}" for lr in lrs], fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_steps_to_97(cells, models, lrs, budgets, path: str) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.6))
  axes = np.atleast_1d(axes)
  colors = {"batch": "tab:blue", "none": "tab:red"}
  for ax, model in zip(axes, models):
    for k, norm in enumerate(("batch", "none")):
      xs, ys = [], []
      for lr in lrs:
        c = cells.get((model, norm, lr))
        if c is None:
          continue
        for s in c["steps_to_97_each"]:
          ax.plot(lr, s, ".", color=colors[norm], alpha=0.5, ms=5)
        if c["reached_97"]:
          xs.append(lr)
          ys.append(c["steps_to_97_mean"])
          ax.annotate(f"{c['reached_97']}/{c['seeds']}", (lr, c["steps_to_97_mean"]),
                      textcoords="offset points", xytext=(-9, 6) if k == 0 else (9, -12),
                      ha="center", fontsize=7, color=colors[norm])
      ax.plot(xs, ys, "-" if norm == "batch" else "--", color=colors[norm], marker="o", ms=4,
              label=NORM_LABELS[norm])
    ax.axhline(budgets[model], color="grey", lw=0.8, ls=":")
    ax.set_ylim(0, budgets[model] * 1.08)
    ax.set_xscale("log")
    ax.set_xticks(lrs)
    ax.set_xticklabels([f"{lr:g}" for lr in lrs], fontsize=8)
    ax.set_xlim(lrs[0] / 1.5, lrs[-1] * 1.5)
    ax.set_title(MODEL_LABELS.get(model, model), fontsize=10)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("steps to 97% test accuracy")
    ax.legend(fontsize=8, title="mean of seeds that reached it\n(k/n: how many)",
              title_fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def pattern_check(cells, models, lrs) -> list[str]:
  """Verdicts on (a): rates above no BN's best where no BN fails and BN trains.

  A rate is "high" when it is above the no-BN network's best rate (highest
  seed-mean final test accuracy); no BN "fails" at a rate when every seed
  diverged or stalled; BN "trains" when every seed trained.
  """
  def fails(c):
    return c is not None and c["diverged"] + c["stalled"] == c["seeds"]

  def trains(c):
    return c is not None and c["trained"] == c["seeds"]

  lines = []
  for model in models:
    scored = [(c["acc_mean"], lr) for lr in lrs
              if (c := cells.get((model, "none", lr))) and c["acc_mean"] is not None]
    if not scored:
      lines.append(f"- {MODEL_LABELS[model]}: no finished no-BN run.")
      continue
    best = max(scored)[1]
    high = [lr for lr in lrs if lr > best]
    high_fail = [lr for lr in high if fails(cells.get((model, "none", lr)))]
    wins = [lr for lr in high_fail if trains(cells.get((model, "batch", lr)))]
    low_fail = [lr for lr in lrs if lr < best and fails(cells.get((model, "none", lr)))]
    verdict = "**holds**" if wins else "**does NOT hold**"
    fmt = lambda xs: ", ".join(f"{x:g}" for x in xs) or "none"  # noqa: E731
    text = (f"- {MODEL_LABELS[model]}: {verdict}. No BN's best rate: {best:g}; rates above "
            f"it: {fmt(high)}; of these, where every no-BN seed diverged or stalled: "
            f"{fmt(high_fail)}; and where, in addition, every BN seed trained: {fmt(wins)}.")
    if low_fail:
      low_wins = [lr for lr in low_fail if trains(cells.get((model, "batch", lr)))]
      text += (f" (Below the best rate, every no-BN seed stalled or diverged at "
               f"{fmt(low_fail)}, and BN trained at {fmt(low_wins)}: a failure at *small* "
               "rates, not the high-rate pattern.)")
    both_fail = [lr for lr in lrs if fails(cells.get((model, "none", lr)))
                 and fails(cells.get((model, "batch", lr)))]
    if both_fail:
      bc = [cells[(model, "batch", lr)] for lr in both_fail]
      nc = [cells[(model, "none", lr)] for lr in both_fail]
      text += (f" Both fail at {fmt(both_fail)}: BN diverged in {sum(c['diverged'] for c in bc)}"
               f" and stalled in {sum(c['stalled'] for c in bc)} of {sum(c['seeds'] for c in bc)}"
               f" runs there, no BN diverged in {sum(c['diverged'] for c in nc)} and stalled in "
               f"{sum(c['stalled'] for c in nc)} of {sum(c['seeds'] for c in nc)}.")
    worse = [lr for lr in lrs
             if (b := cells.get((model, "batch", lr))) and (n := cells.get((model, "none", lr)))
             and b["acc_mean"] is not None and n["acc_mean"] is not None
             and n["trained"] == n["seeds"] and b["acc_mean"] <= n["acc_mean"] - LARGE_ADVANTAGE]
    if worse:
      text += (f" Rates where every no-BN seed trained and BN's mean final test accuracy is at "
               f"least {LARGE_ADVANTAGE * 100:.0f} points lower: {fmt(worse)}.")
    lines.append(text)
  return lines


def small_lr_advantage(cells, model: str, lrs) -> list[tuple[float, float | None]]:
  out = []
  for lr in lrs:
    b, n = cells.get((model, "batch", lr)), cells.get((model, "none", lr))
    if b and n and b["acc_mean"] is not None and n["acc_mean"] is not None:
      out.append((lr, b["acc_mean"] - n["acc_mean"]))
    else:
      out.append((lr, None))
  return out


def main(argv):
  del argv
  workdir_lib.quiet_library_logs()
  f = flags.FLAGS
  rows, members, minutes = run_or_load(f.sweep, f.workdir, f.train)
  os.makedirs(f.out, exist_ok=True)
  rows = [{**r, "model": str(r["model"])} for r in rows]
  cells = cells_by(rows, ("model", "model.norm", "optimizer.learning_rate"))
  models = list(dict.fromkeys(r["model"] for r in rows))
  lrs = sorted({r["optimizer.learning_rate"] for r in rows})
  budgets = {str(m.overrides["model"]): m.cfg.train.num_steps for m in members}
  activations = {str(m.overrides["model"]): m.cfg.model.activation for m in members}

  plot_final_accuracy(cells, models, lrs, os.path.join(f.out, "final_accuracy.png"))
  plot_steps_to_97(cells, models, lrs, budgets, os.path.join(f.out, "steps_to_97.png"))
  if f.train:
    shutil.copy(os.path.join(f.workdir, "results.csv"), os.path.join(f.out, "results.csv"))
  with open(os.path.join(f.out, "cells.json"), "w") as fh:
    json.dump([{"model": k[0], "norm": k[1], "learning_rate": k[2], **v}
               for k, v in sorted(cells.items())], fh, indent=1)
    fh.write("\n")

  n_seeds = max(c["seeds"] for c in cells.values())
  status = {}
  for r in rows:
    status[r["status"]] = status.get(r["status"], 0) + 1
  lines = ["# Study 3: learning-rate sweep with and without BN", "",
           f"{len(rows)} runs: {{{', '.join(models)}}} x {{BN, no BN}} x learning rates "
           f"{{{', '.join(f'{x:g}' for x in lrs)}}} x {n_seeds} seeds, plain SGD at a constant "
           "rate, full MNIST (60,000 train / 10,000 test); sweep file "
           f"`{f.sweep}`. Run status: "
           + ", ".join(f"{v} {k}" for k, v in sorted(status.items())) + ".", "",
           "- paper MLP: 784-100-100-100-10, sigmoid, LeCun normal init; with BN, BN before "
           "every sigmoid and no bias in the Dense before it (configs/paper_mlp.py); "
           "without BN the same network with biases.",
           "- seed CNN: the Keras tutorial CNN (Conv32-MaxPool-Conv64-Flatten-[BN]-Dense64-"
           "Dense10), ReLU, Glorot uniform init, BN after the activation on the flattened "
           "features, Keras' BN defaults (configs/seed_cnn.py).", "",
           "## Step budgets", ""]
  lines += budget_lines(members)
  cnn = [m for m in members if str(m.overrides["model"]) == "seed_cnn"]
  if cnn:
    t = cnn[0].cfg.train
    lines += ["", f"The CNN budget is small: {t.num_steps * t.batch_size:,} examples, "
              f"{t.num_steps * t.batch_size / 60000:.2f} of one epoch. Its numbers describe "
              "early training (how fast and whether a rate trains at all), not final "
              "accuracy; the seed comparison (study 1) trains the same CNN for 20 epochs."]
  lines += ["", "## Definitions", "",
            "- **diverged**: the training loss became NaN/inf; the run stopped there (the step "
            "is given). A diverged run has no final accuracy and is left out of the accuracy "
            "mean and range.",
            f"- **stalled**: did not diverge, final test accuracy < {STALLED_BELOW} (chance is "
            "about 0.10).",
            f"- **trained**: did not diverge, final test accuracy >= {TRAINED_AT_LEAST}.",
            "- **final test accuracy**: the last evaluation, at the end of the budget: mean "
            "over the seeds that did not diverge, [min..max] over the same seeds.",
            "- **steps to 97%**: first evaluated step with test accuracy >= 0.97, mean over "
            "the seeds that reached it within the budget; (k/n) = how many of the n seeds did.",
            "", "## Final test accuracy", "",
            "![final test accuracy against learning rate](final_accuracy.png)", "",
            "Top: final test accuracy per seed (dots), seed mean (line) and min..max band; "
            "diverged seeds as crosses below zero. Bottom: the same as test error on a log "
            "scale, to separate the runs near the top.", ""]
  for model in models:
    lines += [f"### {MODEL_LABELS.get(model, model)}", "",
              "| learning rate | BN: final test acc, mean [min..max] | no BN: final test acc, "
              "mean [min..max] | BN: steps to 97% | no BN: steps to 97% | BN: diverged / "
              "stalled | no BN: diverged / stalled |",
              "|---|---|---|---|---|---|---|"]
    for lr in lrs:
      b, n = cells.get((model, "batch", lr)), cells.get((model, "none", lr))
      if b is None or n is None:
        continue
      lines.append(f"| {lr:g} | {fmt_acc(b)} | {fmt_acc(n)} | {fmt_steps(b)} | "
                   f"{fmt_steps(n)} | {fmt_fail(b)} | {fmt_fail(n)} |")
    lines.append("")
  stalled = [r for r in rows if r["status"] == "done" and r["test_accuracy"] is not None
             and r["test_accuracy"] < STALLED_BELOW]
  if stalled:
    const = [r for r in stalled
             if round(r["test_accuracy"] * 10000) in MNIST_TEST_COUNTS]
    lines += [f"Stalled runs: {len(stalled)}; of these, {len(const)} end at a test accuracy "
              "equal to one digit's share of the test set (e.g. 0.1135 = the 1,135 images of "
              "digit 1), the accuracy of predicting that digit for every image.", ""]
  lines += ["![steps to 97% test accuracy](steps_to_97.png)", "",
            "Steps to 97% test accuracy; the dotted line is the step budget. A missing point: "
            "no seed reached 97% within the budget.", ""]

  # The public reproduction's pattern, measured.
  lines += ["## Does the pattern of a public reproduction hold?", "",
            "A public reproduction of this MLP (SGD, batch 60, **50,000 steps**) reports test "
            "accuracy without -> with BN: sigmoid lr 0.01: 0.809 -> 0.973; sigmoid lr 1: "
            "0.977 -> 0.980; ReLU lr 1: 0.098 -> 0.985 (no BN diverges). Our budget is "
            f"**{budgets.get('paper_mlp', 0):,} steps** (a fifth of theirs), and their "
            "initialisation is not known to us, so the levels are not expected to match; "
            "the pattern is what is checked. Our sweep has no ReLU MLP: the ReLU network "
            "here is the seed CNN, on its much smaller budget.", "",
            "| network | lr | public: no BN -> BN (50k steps) | measured: no BN -> BN "
            f"({budgets.get('paper_mlp', 0):,} steps, seed mean) |", "|---|---|---|---|"]
  for (act, lr), (pn, pb) in PUBLIC.items():
    model = next((m for m in models if activations.get(m) == act and m == "paper_mlp"), None)
    if model is None:
      lines.append(f"| {act} MLP | {lr:g} | {pn:.3f} -> {pb:.3f} | not in this sweep |")
      continue
    b, n = cells.get((model, "batch", lr)), cells.get((model, "none", lr))
    if b is None or n is None:
      lines.append(f"| {act} MLP | {lr:g} | {pn:.3f} -> {pb:.3f} | not in this sweep |")
      continue
    nb, bb = short_acc(n), short_acc(b)
    lines.append(f"| {act} MLP | {lr:g} | {pn:.3f} -> {pb:.3f} | {nb} -> {bb} |")
  lines += ["", "**(a) A range of high learning rates where no BN diverges or stalls (every "
            "seed) and BN trains (every seed).** 'High': above the rate at which no BN reaches "
            "its best seed-mean final test accuracy in this grid. In the public reproduction "
            "this failure is the ReLU network's; its sigmoid network without BN trains at lr 1 "
            "(0.977).", ""]
  lines += pattern_check(cells, models, lrs)
  if "paper_mlp" in models:
    small = [lr for lr in lrs if lr <= 0.01]
    adv = small_lr_advantage(cells, "paper_mlp", small)
    at = dict(adv).get(0.01)
    verdict = ("**holds**" if at is not None and at >= LARGE_ADVANTAGE else
               "**does NOT hold**")
    lines += ["", f"**(b) A large BN advantage for the sigmoid MLP at small learning rates** "
              f"(large: BN's mean final test accuracy at least {LARGE_ADVANTAGE * 100:.0f} "
              f"points above no BN's at lr 0.01, the public reproduction's rate): {verdict}. "
              "BN minus no BN, mean final test accuracy: "
              + "; ".join(f"lr {lr:g}: " + ("n/a" if d is None else f"{d * 100:+.1f} points")
                          for lr, d in adv) + "."]
    big = [lr for lr in lrs if lr >= 0.1]
    adv_big = small_lr_advantage(cells, "paper_mlp", big)
    lines += ["", "For contrast, at larger rates: "
              + "; ".join(f"lr {lr:g}: " + ("n/a" if d is None else f"{d * 100:+.1f} points")
                          for lr, d in adv_big) + "."]

  wall = sweep_wall_time(os.path.normpath(f.workdir) + ".time", f.workdir, members)
  lines += ["", "## Wall time", "",
            f"- The sweep: {wall}; "
            "cpu, 2 CPU cores shared with other work. The MLP members train as grouped "
            "(vmapped) programs of 24; the CNN members one by one.",
            f"- This invocation: {minutes:.1f} min (finished members are read, not rerun).", "",
            f"Command: `python experiments/lr_sweep.py --workdir={f.workdir} --out={f.out}`", "",
            "Files: `results.csv` (one row per run, from the sweep), `cells.json` (the "
            "per-cell statistics above)."]
  with open(os.path.join(f.out, "report.md"), "w") as fh:
    fh.write("\n".join(lines) + "\n")
  logging.info("Wrote %s", os.path.join(f.out, "report.md"))
  print("\n".join(lines))


if __name__ == "__main__":
  define_flags()
  app.run(main)
