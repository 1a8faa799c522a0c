"""A claim's `choose`: each method at its own rate, chosen on a validation metric alone, then
judged on the test metric against the other at its own rate, paired by seed, censored runs kept."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from bnlab import study
from bnlab import sweep
from bnlab.study import choice
from bnlab.study import published
from bnlab.study import rules as rules_lib
from test_study import ROOT, run_local
from test_study_checks import fails, make_study, check

RATES = (0.1, 1.0, 10.0)
SEEDS = range(4)
# Validation accuracy per (norm, rate), one value per seed. BN: 1 and 10 tie exactly (the same
# values), so the smaller, 1, is chosen. No BN: 10 is best on the seeds that trained but one
# run diverged there (None), so it is not eligible; 0.1 beats 1.
VAL = {("bn", 0.1): [0.90, 0.91, 0.92, 0.93], ("bn", 1.0): [0.97, 0.96, 0.98, 0.97],
       ("bn", 10.0): [0.97, 0.96, 0.98, 0.97],
       ("no", 0.1): [0.95, 0.94, 0.96, 0.95], ("no", 1.0): [0.93, 0.92, 0.94, 0.93],
       ("no", 10.0): [0.99, None, 0.99, 0.99]}
# Steps to a test-accuracy target (None: never reached, censored). At the chosen cells, BN at
# 1 and no BN at 0.1: seed 0 a sooner, seed 1 a sooner (b never reached), seed 2 neither
# (undecided), seed 3 a sooner.
CHOSEN_STEPS = {("bn", 1.0): [100, 200, None, 300], ("no", 0.1): [400, None, None, 500]}


def make(test_shift=0.0, other_steps=50):
  """Cells of norm x lr x 4 seeds: `val` (chooses), `test` and `steps` (judged); the test
  values, and the steps of the cells not chosen, move with the arguments."""
  rows = []
  for (norm, lr), vals in VAL.items():
    steps = CHOSEN_STEPS.get((norm, lr), [other_steps] * 4)
    for s in SEEDS:
      # Test accuracy best where validation is worst: a test-set choice would differ.
      rows.append({"norm": norm, "lr": lr, "seed": s, "val": vals[s], "steps": steps[s],
                   "test": None if vals[s] is None else 1.9 - vals[s] + test_shift + s / 100})
  return study.make_cells(rows, ("norm", "lr"), ["val", "test", "steps"])


CLAIMS = {
    "sooner": {"statement": "BN reaches the target sooner, each at its chosen rate.",
               "rule": "reaches_sooner", "metric": "steps", "a": "norm=bn", "b": "norm=no",
               "choose": {"along": "lr", "by": "val", "higher": True}},
    "above": {"statement": "BN's test accuracy is above, each at its chosen rate.",
              "rule": "paired_interval", "metric": "test", "a": "norm=bn", "b": "norm=no",
              "choose": {"along": "lr", "by": "val"}}}


def test_each_method_gets_its_best_validation_rate_ties_to_the_smaller():
  cells = make()
  assert choice.scores(cells, "norm=bn", "lr", "val") == [
      [0.1, pytest.approx(0.915)], [1.0, pytest.approx(0.97)], [10.0, pytest.approx(0.97)]]
  assert choice.chosen(choice.scores(cells, "norm=bn", "lr", "val")) == 1.0  # tie: smaller
  no = choice.scores(cells, "norm=no", "lr", "val")
  assert no[2] == [10.0, None]  # a diverged run: not eligible, though its others are best
  assert choice.chosen(no) == 0.1
  assert choice.chosen(no, higher=False) == 1.0  # lowest, e.g. for a validation loss
  assert choice.chosen([[1.0, None]]) is None


def test_the_claim_compares_each_at_its_chosen_rate_censored_runs_kept():
  verdicts = {v["claim"]: v for v in rules_lib.judge(CLAIMS, make())}
  v = verdicts["sooner"]
  assert (v["numbers"]["chosen"]["a"], v["numbers"]["chosen"]["b"]) == (1.0, 0.1)
  n = v["numbers"]
  assert n["a_steps"] == CHOSEN_STEPS[("bn", 1.0)] and n["b_steps"] == CHOSEN_STEPS[("no", 0.1)]
  assert n["n"] == 4 and (n["reached_a"], n["reached_b"]) == (3, 2)  # censored, not dropped
  assert (n["a_sooner"], n["b_sooner"], n["undecided"]) == (3, 0, 1)
  assert n["p"] == pytest.approx(0.25)  # 3 of 3 decided pairs: 2 / 2^3
  assert v["verdict"] == "inconclusive"
  # The interval reads the test metric of exactly those cells, paired by seed.
  above = verdicts["above"]["numbers"]
  bn = [1.9 - x + s / 100 for s, x in enumerate(VAL[("bn", 1.0)])]
  no = [1.9 - x + s / 100 for s, x in enumerate(VAL[("no", 0.1)])]
  assert above["mean_a"] == pytest.approx(sum(bn) / 4)
  assert above["mean_b"] == pytest.approx(sum(no) / 4)
  assert verdicts["above"]["params"]["choose"] == CLAIMS["above"]["choose"]


def test_the_test_set_never_chooses():
  """Changing every test value, and the steps wherever the rate was not chosen, changes no
  choice; changing the validation values does."""
  base = {v["claim"]: v["numbers"]["chosen"] for v in rules_lib.judge(CLAIMS, make())}
  for shift, steps in ((0.5, 10), (-0.8, 1), (0.0, None)):
    again = {v["claim"]: v["numbers"]["chosen"]
             for v in rules_lib.judge(CLAIMS, make(shift, steps))}
    assert again == base
  VAL[("bn", 10.0)][0] += 0.01  # now 10 is BN's best on validation
  try:
    moved = {v["claim"]: v["numbers"]["chosen"] for v in rules_lib.judge(CLAIMS, make())}
  finally:
    VAL[("bn", 10.0)][0] -= 0.01
  assert moved["sooner"]["a"] == 10.0 and moved["sooner"]["b"] == 0.1


def test_no_eligible_rate_is_inconclusive_with_its_reason():
  claims = {"x": {**CLAIMS["sooner"], "within": "lr=10"}}
  (v,) = rules_lib.judge(claims, make())
  assert v["verdict"] == "inconclusive"
  assert "no value of lr of 'norm=no' has val on every run" in v["numbers"]["reason"]


def test_the_choosing_metric_is_published_so_verify_recomputes_the_choice():
  cfg = {"cells": ["norm", "lr"], "claims": CLAIMS,
         "metrics": {"val": ["summary", "val_accuracy"], "test": ["summary", "test_accuracy"],
                     "steps": ["first_step_at_least", "test_accuracy", 0.97],
                     "unused": ["summary", "train_loss"]}}
  assert published.read_metrics(cfg) == ["val", "test", "steps"]
  rows = [{**r, "name": f"{r['norm']},{r['lr']},{r['seed']}", "status": "done"}
          for c in make() for r in c["rows"]]
  members = [{"name": r["name"], "key": {k: r[k] for k in ("norm", "lr", "seed")}} for r in rows]
  data = published.normal(published.data_of(rows, cfg, members))
  again = published.normal(published.verdicts(cfg, data))
  assert again == published.normal(rules_lib.judge(CLAIMS, make()))


CHOOSE = {"along": "optimizer.learning_rate", "by": "acc", "higher": True}


def test_choose_is_checked_with_the_study():
  ok = {"a": "model.norm=batch", "b": "model.norm=none", "choose": CHOOSE}
  check(make_study(**ok))
  check(make_study(**{**ok, "rule": "reaches_sooner"}))
  fails(make_study(**{**ok, "choose": {**CHOOSE, "hgher": False}}),
        r"claims.small_rates.choose has unknown keys \['hgher'\]")
  fails(make_study(**{**ok, "choose": {**CHOOSE, "by": "val_acc"}}),
        r"claims.small_rates.choose.by: unknown metric 'val_acc'")
  fails(make_study(**{**ok, "choose": {**CHOOSE, "higher": "yes"}}),
        r"choose.higher='yes': give True or False")
  fails(make_study(**{**ok, "choose": {"by": "acc"}}), r"choose.along=None")
  fails(make_study(**{**ok, "choose": {**CHOOSE, "along": "lr"}}),
        r"claims.small_rates.choose.along: no cell key 'lr'")
  fails(make_study(**{**ok, "each": ["optimizer.learning_rate"]}),
        r"choose.along: optimizer.learning_rate is also in each")
  fails(make_study(**{**ok, "a": "model.norm=batch,optimizer.learning_rate=0.01"}),
        r"claims.small_rates.a=.* fixes optimizer.learning_rate, which choose chooses")
  fails(make_study(**{**ok, "rule": "wins_above_best"}),
        r"rule 'wins_above_best' does not compare two cells a and b")


def test_the_speed_study_publishes_its_choice_and_verify_recomputes_it(idx_dir, tmp_path):
  """configs/studies/speed_to_target.py at :runlocal on the tiny fixture: every claim
  compares the rates that the runs' own summaries (val_accuracy) make best, and `verify`
  recomputes them from the published data, failing when a published validation value moves."""
  wd, out = str(tmp_path / "wd"), str(tmp_path / "out")
  run_local("speed_to_target", idx_dir, wd)
  path = os.path.join("configs", "studies", "speed_to_target.py")
  cfg = sweep.load_config_file(os.path.join(ROOT, path)).get_config("runlocal")
  cfg.data.source, cfg.data.dir = "idx", idx_dir
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    study.run_study(study.Study.from_file(path, "runlocal", cfg), wd, "report", out=out)
  finally:
    os.chdir(cwd)
  means = {}
  for name in os.listdir(os.path.join(wd, "runs")):
    if name.startswith("norm="):
      with open(os.path.join(wd, "runs", name, "summary.json")) as f:
        summary = json.load(f)
      key = dict(part.split("=") for part in name.split(","))
      means.setdefault((key["norm"], float(key["learning_rate"])), []).append(
          summary["val_accuracy"])
  best = {}
  for norm in ("batch", "none"):
    rates = sorted(lr for n, lr in means if n == norm)
    best[norm] = max(rates, key=lambda lr: (sum(means[(norm, lr)]) / 2, -lr))
  claims = json.load(open(os.path.join(out, "claims.json")))
  assert len(claims) == 4
  for c in claims:
    assert (c["numbers"]["chosen"]["a"], c["numbers"]["chosen"]["b"]) == (best["batch"],
                                                                           best["none"])
  assert published.verify(out) == (4, [])
  with gzip.open(os.path.join(out, published.DATA), "rt") as f:
    data = json.load(f)
  for row in data["rows"]:  # the other rate of BN becomes its best on validation
    if row["model.norm"] == "batch" and row["optimizer.learning_rate"] != best["batch"]:
      row["val_acc"] = 2.0
  published.write(os.path.join(out, published.DATA), data)
  count, problems = published.verify(out)
  assert count == 4 and any("numbers published" in p for p in problems)
