"""bnlab.study.measurements: measurements, rules and figures against hand-computed values;
the paper_figure1 and why_bn studies end to end at :runlocal on the tiny MNIST fixture."""

import glob
import math
import json
import os
import shutil

import numpy as np
import pytest

from bnlab import study
from bnlab.study import figure_kinds
from bnlab.study import measurements as sm
from bnlab import sweep
import test_study

# Two units, percentiles (lo, median, hi) at steps 0, 5, 10.
PCT = [[[-1, 0, 1], [0, 1, 2]], [[-2, 0, 2], [0, 2, 3]], [[-2, 1, 4], [0, 1, 2]]]


def test_drift_of():
  d = sm.drift_of([0, 5, 10], PCT, from_step=4)  # from step 5 to step 10
  # unit 0: median 0 -> 1, spread 4 -> 6; unit 1: median 2 -> 1, spread 3 -> 2
  assert (d["from_step"], d["to_step"]) == (5, 10)
  assert d["median_abs_dmedian"] == 1.0 and d["median_abs_dspread"] == 1.5
  assert d["median_rel_dspread"] == pytest.approx((2 / 4 + 1 / 3) / 2)
  assert (d["median_spread_early"], d["median_spread_late"]) == (3.5, 4.0)
  assert (d["median_abs_median_early"], d["median_abs_median_late"]) == (1.0, 1.0)
  assert d["typical_unit"] == 1  # scores 3 (unit 0) and 2 (unit 1): the lower middle one


def test_relative_drift_leaves_out_units_saturated_to_one_value():
  """A diverged run's unit can hold one value at every image (spread 0): its relative
  change is undefined, so it is left out, and the key with it where every unit is one."""
  sat = [[[-1, 0, 1], [5, 5, 5]], [[-2, 0, 2], [5, 5, 5]], [[-2, 1, 4], [6, 6, 7]]]
  d = sm.drift_of([0, 5, 10], sat, from_step=4)
  assert d["median_rel_dspread"] == pytest.approx(2 / 4)   # unit 0 only
  assert d["median_abs_dspread"] == 1.5                     # both units: |2| and |1|
  flat = [[[u[0]] * 3 for u in p] for p in sat]
  assert "median_rel_dspread" not in sm.drift_of([0, 5, 10], flat, from_step=4)


def test_drift_windows_on_synthetic_activations():
  """Units whose inputs drift in a known way, percentiles taken by numpy, the drift measures
  recomputed independently with numpy from the same percentiles."""
  import numpy as np
  rng = np.random.default_rng(0)
  steps = list(range(0, 5001, 500))
  z = rng.standard_normal((2000, 6))
  loc = lambda s: np.linspace(-1, 1, 6) * s / 5000  # noqa: E731  medians move linearly
  scale = lambda s: 0.03 + 2 * min(s, 500) / 500 + np.sin(s / 800) ** 2  # noqa: E731
  pct = [np.percentile(loc(s) + scale(s) * z, [15, 50, 85], axis=0).T.tolist() for s in steps]
  d = sm.drift_of(steps, pct, from_step=500, window=1000)
  p = np.asarray(pct)  # (evaluation, unit, percentile)
  spread = p[:, :, 2] - p[:, :, 0]
  edges = [1, 2, 4, 6, 8, 10]  # step 500, then the multiples of 1,000 (the last is one)
  win = [(np.median(np.abs(p[j, :, 1] - p[i, :, 1])),
          np.median(np.abs(spread[j] - spread[i]))) for i, j in zip(edges, edges[1:])]
  assert [w[:2] for w in d["windows"]] == [[steps[i], steps[j]]
                                           for i, j in zip(edges, edges[1:])]
  assert np.allclose([w[2:] for w in d["windows"]], win, rtol=1e-12)
  assert d["window_abs_dmedian"] == pytest.approx(np.mean([w[0] for w in win]))
  assert d["window_abs_dspread"] == pytest.approx(np.mean([w[1] for w in win]))
  norm = np.abs(spread[-1] - spread[1]) / spread[1:].mean(axis=0)
  assert d["median_norm_dspread"] == pytest.approx(np.median(norm))
  # From step 0 the ratio to the near-zero start is huge; the normalised change is not.
  d0 = sm.drift_of(steps, pct, from_step=0)
  assert d0["median_rel_dspread"] > 30 and d0["median_norm_dspread"] < 2
  assert "windows" not in d0


def test_unit_drift_reads_the_records(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for s, p in zip((0, 5, 10), PCT):
      f.write(json.dumps({"step": s, "preact_2/percentiles": p}) + "\n")
  spec = {"kind": "unit_drift", "layer": "preact_2", "from_step": 4}
  assert sm.unit_drift(str(tmp_path), {}, spec) == sm.drift_of([0, 5, 10], PCT, 4)
  assert sm.unit_drift(str(tmp_path), {}, {**spec, "from_step": 11}) == {}
  assert sm.bn_affine(str(tmp_path), {"model": {"norm": "batch"}}, {"block": "b"}) == {}


def test_reaches_sooner_counts_censored_runs():
  """Steps to a target paired by seed; None: never reached (censored, kept, not dropped)."""
  from scipy import stats
  a = [500, 1000, 1500, None, 700, 800, 900, 600, 1000, 400]
  b = [900, None, 2000, None, 700, 1200, 1100, None, 800, 3000]
  c = cells([{"norm": n, "lr": 1, "seed": s, "t": v}
             for n, vs in (("bn", a), ("no", b)) for s, v in enumerate(vs)])
  verdict, n = study.reaches_sooner(c, "t", "norm=bn", "norm=no")
  # seed 3: neither reached (undecided); seed 4: a tie; seed 8: b sooner; 7 pairs a sooner.
  assert (n["a_sooner"], n["b_sooner"], n["ties"], n["undecided"]) == (7, 1, 1, 1)
  assert (n["reached_a"], n["reached_b"]) == (9, 7)
  assert n["p"] == pytest.approx(stats.binomtest(7, 8).pvalue)  # 0.0703
  assert verdict == "inconclusive"
  # Kaplan-Meier medians with every censored run at the end: a's sorted times
  # 400 500 600 700 800 | 900 ...: (800 + 900) / 2; b's: 700 800 900 1100 1200 | 2000.
  assert (n["median_a"], n["median_b"], n["difference"]) == (850, 1600, -750)
  b2 = [None if v is None else v + 1000 for v in b[:8]] + [2000, 3000]
  c2 = cells([{"norm": n, "lr": 1, "seed": s, "t": v}
              for n, vs in (("bn", a), ("no", b2)) for s, v in enumerate(vs)])
  verdict, n = study.reaches_sooner(c2, "t", "norm=bn", "norm=no")
  assert (n["a_sooner"], n["b_sooner"]) == (9, 0) and verdict == "supported"
  assert n["p"] == pytest.approx(stats.binomtest(9, 9).pvalue)
  assert study.reaches_sooner(c2, "t", "norm=no", "norm=bn")[0] == "refuted"
  assert study.reaches_sooner(c2, "t", "norm=bn", "norm=gn")[0] == "inconclusive"


def test_reaches_sooner_interval_on_censored_pairs():
  a = [500, 1000, 1500, None, 700, 800, 900, 600, 1000, 400]
  b = [900, None, 2000, None, 700, 1200, 1100, None, 800, 3000]
  c = cells([{"norm": n, "lr": 1, "seed": s, "t": v}
             for n, vs in (("bn", a), ("no", b)) for s, v in enumerate(vs)])
  # The 9 decided pairs' differences a - b, a run that never reached as +inf:
  # -inf -inf -2600 -500 -400 -400 -200 0 200. Median -400; n = 9 gives k = 2
  # (2 P(Bin(9, 1/2) <= 1) = 0.039 <= 0.05 < 2 P(<= 2) = 0.18): [d_(2), d_(8)] = [-inf, 0].
  verdict, n = study.reaches_sooner(c, "t", "norm=bn", "norm=no", interval=True)
  assert n["median_difference"] == -400 and n["interval"] == [None, 0]
  assert "interval" not in study.reaches_sooner(c, "t", "norm=bn", "norm=no")[1]


def test_median_interval_is_the_sign_tests():
  from scipy import stats
  from bnlab.study import intervals
  # n = 10: the textbook 95% interval is [x_(2), x_(9)] (coverage 1 - 2 P(Bin(10, 1/2) <= 1)
  # = 0.979); n = 5 cannot reach 95% (2 / 32 = 0.0625 > 0.05).
  assert intervals.median_interval(list(range(10, 0, -1))) == (2, 9)
  assert intervals.median_interval([1, 2, 3, 4, 5]) == (None, None)
  assert intervals.median_interval([1, 2, 3, 4, 5, 6]) == (1, 6)
  for n in range(6, 40):
    lo, _ = intervals.median_interval(list(range(1, n + 1)))
    k = lo  # the values are 1..n: the lower end is the k-th order statistic
    assert 2 * stats.binom.cdf(k - 1, n, 0.5) <= 0.05 < 2 * stats.binom.cdf(k, n, 0.5)
  # Coverage of a skewed distribution's median (exponential: ln 2), 2,000 samples of 12.
  rng = np.random.default_rng(0)
  hits = [lo <= math.log(2) <= hi for lo, hi in
          (intervals.median_interval(list(rng.exponential(size=12))) for _ in range(2000))]
  assert np.mean(hits) >= 0.95


def test_censored_median_and_sign_test():
  from bnlab.study import intervals
  assert intervals.censored_median([3, None, 1]) == 3
  assert intervals.censored_median([3, None, None, 1]) is None  # half never reached
  assert intervals.censored_median([4, 2, 1, 3]) == 2.5
  assert intervals.sign_test_p(0, 0) == 1.0 and intervals.sign_test_p(5, 5) == 1.0
  assert intervals.sign_test_p(6, 0) == pytest.approx(2 / 64)


def test_first_step_at_most():
  run = study.Run(name="r", path="", key={}, cfg={}, summary={},
                  records=[{"step": 0, "loss": 2.0}, {"step": 5}, {"step": 10, "loss": 0.1}])
  assert study.first_step_at_most(run, "loss", 0.1) == 10
  assert study.first_step_at_most(run, "loss", 0.05) is None


def test_value_when_at_most():
  """Test accuracy at the first evaluation whose training loss reached the threshold."""
  run = study.Run(name="r", path="", key={}, cfg={}, summary={},
                  records=[{"step": 0, "loss": 2.0, "acc": 0.1}, {"step": 5, "loss": 0.09},
                           {"step": 10, "loss": 0.08, "acc": 0.9},
                           {"step": 15, "loss": 0.01, "acc": 0.95}])
  # Step 5 reached it but has no accuracy: the first record with both counts.
  assert study.value_when_at_most(run, "acc", "loss", 0.1) == 0.9
  assert study.value_when_at_most(run, "acc", "loss", 0.05) == 0.95
  assert study.value_when_at_most(run, "acc", "loss", 0.001) is None


def test_summarize_checkpoints():
  rows = [{"step": s, "ics_l2": [0, a, 2 * a], "ics_cos": [1, 1 - a, 1], "ics_rel": [0, a, a],
           "grad_change": [9, g, 9], "grad_norm": 2.0, "beta_max": a, "loss_range": g}
          for s, a, g in ((0, 9, 9), (5, 1, 2), (10, 3, 4))]  # step 0 is left out
  out = sm.summarize_checkpoints(rows, mid=1)
  assert out["ics_l2@2"] == 2 and out["ics_l2@3"] == 4 and out["ics_cos@2"] == -1
  assert out["ics_l2/pairs"] == [1, 2, 3, 6] and out["ics_rel/pairs"] == [1, 1, 3, 3]
  assert out["grad_change"] == 3 and out["grad_change_rel"] == 1.5
  assert out["beta_max/pairs"] == [1, 3] and out["loss_range"] == 3


def test_at_matched_loss_interpolates_at_the_first_crossing():
  losses, values = [2.3, 1.4, 0.8, 0.6, 0.45], [10.0, 8.0, 4.0, 3.0, 2.0]
  got = sm.at_matched_loss(losses, values, (3.0, 1.0, 0.5, 0.3, 0.8))
  # 3.0: the first checkpoint already; 1.0: 2/3 of the way from 1.4 to 0.8; 0.5: 2/3 of the
  # way from 0.6 to 0.45; 0.3: never reached (censored); 0.8: exactly at a checkpoint.
  assert got[0] == 10.0 and got[3] is None and got[4] == 4.0
  assert got[1] == pytest.approx(8 - 8 / 3) and got[2] == pytest.approx(3 - 2 / 3)
  # Not monotone: the first crossing counts, and the rise before it is its left end.
  rising = [2.3, 0.9, 1.2, 0.4, 0.2]
  got = sm.at_matched_loss(rising, [0.0, 10.0, 20.0, 30.0, 40.0], (1.0, 0.5, 0.1))
  assert got[0] == pytest.approx(10 * 1.3 / 1.4) and got[1] == pytest.approx(28.75)
  assert got[2] is None
  # A non-finite loss never matches, nor interpolates; list values go element by element.
  assert sm.at_matched_loss([2.0, float("nan"), 0.4], [1, 2, 3], (0.5,)) == [3]
  assert sm.at_matched_loss([2.0, 1.0], [[0.0, 1.0], [2.0, 3.0]], (1.5,)) == [[1.0, 2.0]]
  assert sm.at_matched_loss([2.0, 1.0], [None, 3.0], (1.5, 1.0)) == [None, 3.0]


def test_matched_progress_keys_and_censoring():
  series = {"step": [0, 100, 200], "loss": [2.0, 1.0, 0.6], "beta_max": [1.0, 3.0, 5.0]}
  out = sm.matched_progress(series, (1.0, 0.8, 0.3))
  assert out == {"reached@loss=1": True, "reached@loss=0_8": True, "reached@loss=0_3": False,
                 "step@loss=1": 100, "step@loss=0_8": pytest.approx(150),
                 "step@loss=0_3": None, "beta_max@loss=1": 3.0,
                 "beta_max@loss=0_8": pytest.approx(4.0), "beta_max@loss=0_3": None}
  rows = [{"step": s, "grad_change": [0, g, 0], "grad_norm": 2.0, "beta_max": b,
           "loss_range": 1.0, "loss": x} for s, g, b, x in ((0, 4, 1, 2), (5, 2, 3, 1))]
  scalars = sm.checkpoint_scalars(rows, mid=1)
  assert scalars["grad_change_rel"] == [2.0, 1.0] and scalars["loss"] == [2, 1]
  assert "hessian_top" not in scalars  # measured only with hessian_iterations


def test_a_censored_run_makes_the_matched_claim_inconclusive_by_name():
  def row(norm, seed, loss):
    losses = [2.0, loss]
    return {"norm": norm, "lr": 1, "seed": seed, **sm.matched_progress(
        {"loss": losses, "beta_max": [1.0, 2.0 + seed + (norm == "bn")]}, (0.5,))}
  reached = cells([row(n, s, 0.4) for n in ("bn", "no") for s in range(3)])
  verdict, numbers = study.paired_interval(reached, "beta_max@loss=0_5", "norm=bn", "norm=no")
  assert verdict == "supported" and numbers["n"] == 3
  censored = cells([row(n, s, 0.6 if (n, s) == ("no", 2) else 0.4)
                    for n in ("bn", "no") for s in range(3)])
  verdict, numbers = study.paired_interval(censored, "beta_max@loss=0_5", "norm=bn", "norm=no")
  assert verdict == "inconclusive"
  assert "'norm=no' at seed 2 is None" in numbers["reason"]


def cells(rows):
  return study.make_cells(rows, ("norm", "lr"),
                          [k for k in rows[0] if k not in ("norm", "lr", "seed")])


CURVES = cells([  # BN above no BN from step 10 on seed 0; tied at step 10 on seed 1
    {"norm": "bn", "lr": 1, "seed": 0, "acc": [[0, 0.1], [10, 0.9], [20, 0.95]], "d": 0.1,
     "ok": True, "loss": 0.5},
    {"norm": "bn", "lr": 1, "seed": 1, "acc": [[0, 0.1], [10, 0.8], [20, 0.97]], "d": 0.3,
     "ok": False, "loss": 0.4},
    {"norm": "no", "lr": 1, "seed": 0, "acc": [[0, 0.2], [10, 0.7], [20, 0.94]], "d": 0.2,
     "ok": True, "loss": 0.2},
    {"norm": "no", "lr": 1, "seed": 1, "acc": [[0, 0.2], [10, 0.8], [20, 0.96]], "d": 0.4,
     "ok": True, "loss": 0.3},
    {"norm": "no", "lr": 0.1, "seed": 0, "acc": [[0, 0.2]], "d": 0.0, "ok": True, "loss": 0.1},
])


def test_every_seed_and_selected_value():
  assert sm.every_seed(CURVES, "ok", "norm=no,lr=1") == ("supported", {"values": [True, True]})
  assert sm.every_seed(CURVES, "ok", "norm=bn")[0] == "refuted"
  assert sm.every_seed(CURVES, "ok", "norm=gn")[0] == "inconclusive"
  verdict, numbers = sm.selected_value(CURVES, "loss", "lr", "norm=no", expected=0.1)
  assert verdict == "supported" and numbers["loss"] == {1: 0.2, 0.1: 0.1}
  assert sm.selected_value(CURVES, "loss", "lr", "norm=bn", expected=0.1)[0] == "refuted"


def test_paired_above():
  verdict, numbers = sm.paired_above(CURVES, ("acc",), "norm=bn,lr=1", "norm=no,lr=1",
                                     from_step=10)
  assert verdict == "refuted"  # seed 1 ties at step 10
  assert numbers["acc seed 0"] == {"above": 2, "of": 2, "min_margin": 0.01,
                                   "min_margin_step": 20, "mean_margin": 0.105}
  assert numbers["acc seed 1"]["above"] == 1 and numbers["acc seed 1"]["min_margin"] == 0.0
  assert sm.paired_above(CURVES, ("d",), "norm=no,lr=1", "norm=bn,lr=1")[0] == "supported"
  assert sm.paired_above(CURVES, ("d",), "norm=no,lr=1", "norm=gn")[0] == "inconclusive"


def test_mostly_lower():
  c = cells([{"norm": "bn", "lr": 1, "seed": 0, "p": [1, 2, 3, 4]},
             {"norm": "no", "lr": 1, "seed": 0, "p": [2, 4, 6, 1]},
             {"norm": "gn", "lr": 1, "seed": 0, "p": [2, 1, 6, 1]}])
  verdict, numbers = sm.mostly_lower(c, "p", "norm=bn", "norm=no", fraction=0.75)
  assert verdict == "supported"
  assert numbers == {"lower": 3, "higher": 1, "of": 4, "median_ratio": 0.5}
  assert sm.mostly_lower(c, "p", "norm=no", "norm=bn", fraction=0.75)[0] == "refuted"
  assert sm.mostly_lower(c, "p", "norm=bn", "norm=gn", fraction=0.75)[0] == "inconclusive"


def test_mostly_lower_per_seed():
  c = cells([{"norm": n, "lr": 1, "seed": s, "p": p}
             for n, s, p in (("bn", 0, [1, 1, 1, 1]), ("no", 0, [2, 2, 2, 2]),
                             ("bn", 1, [1, 1, 3, 3]), ("no", 1, [2, 2, 2, 2]))])
  # Pooled, 6 of 8 pairs lower (0.75); seed 1 alone, 2 of 4.
  assert sm.mostly_lower(c, "p", "norm=bn", "norm=no", fraction=0.75)[0] == "supported"
  verdict, numbers = sm.mostly_lower(c, "p", "norm=bn", "norm=no", fraction=0.75, per_seed=True)
  assert verdict == "inconclusive" and numbers["lower_per_seed"] == {0: 4, 1: 2}
  assert sm.mostly_lower(c, "p", "norm=bn", "norm=no", fraction=0.5, per_seed=True)[0] == \
      "supported"


def test_figures(tmp_path):
  pct = cells([{"norm": n, "lr": 1, "seed": s, "pct": [[0, PCT[0]], [5, PCT[1]], [10, PCT[2]]],
                "unit": s, "acc": [[0, 0.1], [10, 0.5 + s / 10]], "ics": [[0, [0, 1, 2]],
                                                                         [10, [0, 2, 3]]]}
               for n in ("no", "bn") for s in (0, 1)])
  figures = {"u": (figure_kinds.unit_percentiles, {"metric": "pct", "rows": ("norm=no", "norm=bn"),
                                                   "unit_metric": "unit", "from_step": 5}),
             "f": (figure_kinds.unit_percentiles, {"metric": "pct", "rows": ("norm=bn",),
                                                   "units": (0, 1)}),
             "d": (figure_kinds.paired_difference, {"metric": "acc", "a": "norm=bn",
                                                    "b": "norm=no"}),
             "c": (figure_kinds.per_checkpoint, {"metric": "ics", "hue": ("norm",), "first": 1})}
  for name, (fn, spec) in figures.items():
    assert fn(pct, str(tmp_path / name), study.FigureContext(), **spec)  # its caption
    assert os.path.getsize(tmp_path / f"{name}.png") > 0


@pytest.mark.parametrize("name", ["paper_figure1", "why_bn"])
def test_study_runs_end_to_end(name, idx_dir, tmp_path):
  wd = str(tmp_path / name)
  text = test_study.run_local(name, idx_dir, wd)
  rows = json.load(open(os.path.join(wd, "results.json")))["rows"]
  assert rows and all(r["status"] == "done" for r in rows)
  verdicts = {(c["claim"], c["where"]): c["verdict"]
              for c in json.load(open(os.path.join(wd, "claims.json")))}
  assert set(verdicts.values()) <= set(study.VERDICTS) and "## Verdicts" in text
  for fig in sweep.load_config_file(os.path.join(test_study.ROOT, "configs", "studies",
                                                f"{name}.py")).get_config("runlocal").figures:
    assert os.path.getsize(os.path.join(wd, "figures", f"{fig}.png")) > 0
  if name == "paper_figure1":
    assert verdicts[("selected_rate", "")] in ("supported", "refuted")
    assert ("bn_above", "init=lecun,optimizer.learning_rate=1") in verdicts
    assert all(r["typical_unit"] is not None for r in rows)
    # x-hat is recorded with BN only; drift from step 0 has a step-0 record.
    assert all((r["xhat_typical_unit"] is None) == (r["model.norm"] == "none") for r in rows)
    assert ("xhat_abs_spread", "init=lecun,optimizer.learning_rate=1") in verdicts
    # Drift from step 500 with its windows, and steps to 97% (censored here: never reached).
    assert all(r["late_window_abs_dspread"] is not None for r in rows)
    assert verdicts[("sooner_97", "init=lecun,optimizer.learning_rate=1")] == "inconclusive"
    first = [json.loads(line) for line in open(os.path.join(wd, "runs", rows[0]["name"],
                                                            "metrics.jsonl"))][0]
    assert first["step"] == 0 and "preact_2/percentiles" in first
  else:
    caches = [os.path.join(wd, "runs", r["name"], "measurements", "ics.json") for r in rows]
    # Series stay in the run's measurement cache: initialisation + 2 checkpoints.
    assert all(len(json.load(open(c))["values"]["ics_l2/series"]) == 3 for c in caches)
    for c in caches:  # the Hessian and the matched-loss values: None exactly when censored
      v = json.load(open(c))["values"]
      assert len(v["hessian_top/series"]) == 3 and v["hessian_change_rel_max"] >= 0
      for t in ("1", "0_5", "0_3"):
        assert (v[f"beta_max@loss={t}"] is None) == (not v[f"reached@loss={t}"])
  assert test_study.run_local(name, idx_dir, wd, stage="report") == text  # from the cache



def test_measurements_follow_a_study_made_longer(idx_dir, tmp_path):
  # The cached measurements of 30-step runs must not stand for the same runs at 40 steps.
  wd = str(tmp_path / "f1")
  test_study.run_local("paper_figure1", idx_dir, wd)
  longer = test_study.run_local("paper_figure1", idx_dir, wd, num_steps=40)
  for cache in glob.glob(os.path.join(wd, "runs", "*", "measurements")):
    shutil.rmtree(cache)
  # Measured afresh: the same report.
  assert test_study.run_local("paper_figure1", idx_dir, wd, "report", num_steps=40) == longer


def test_pre_norm_bias_against_hand_values(monkeypatch, tmp_path):
  """The biases before BN (in a block with a norm) and the largest difference to the twin
  run's weights and running statistics, on states written by hand."""
  import numpy as np
  with_b = {"params": {"block_0": {"Dense_0": {"bias": np.array([0.0, -3e-7]),
                                               "kernel": np.array([[1.0, 2.0]])},
                                   "BatchNorm_0": {"scale": np.ones(2), "bias": np.zeros(2)}},
                       "logits": {"bias": np.array([5.0]), "kernel": np.ones((2, 1))}},
            "batch_stats": {"block_0": {"BatchNorm_0": {"mean": np.array([0.5, 0.25])}}}}
  without = {"params": {"block_0": {"Dense_0": {"kernel": np.array([[1.0, 2.5]])},
                                    "BatchNorm_0": {"scale": np.ones(2), "bias": np.zeros(2)}},
                        "logits": {"bias": np.array([5.0]), "kernel": np.ones((2, 1))}},
             "batch_stats": {"block_0": {"BatchNorm_0": {"mean": np.array([0.5, 0.0])}}}}
  runs = {"opt,bias_before=true,seed=0": with_b, "opt,bias_before=false,seed=0": without}
  for name in runs:
    (tmp_path / name).mkdir()
  monkeypatch.setattr(sm, "_steps_saved", lambda d: [7] if os.path.basename(d) in runs else [])
  monkeypatch.setattr(sm, "_restore", lambda d, step: runs[os.path.basename(d)])
  cfg = {"model": {"norm": "batch", "bn": {"bias_before": True}}}
  spec = {"partner": ("bias_before=true", "bias_before=false")}
  got = sm.pre_norm_bias(str(tmp_path / "opt,bias_before=true,seed=0"), cfg, spec)
  # The logits' bias is not before a norm; the kernel differs by 0.5, the mean by 0.25.
  assert got == {"max_abs_bias": pytest.approx(3e-7), "max_abs_param_diff": 0.5,
                 "max_abs_stats_diff": 0.25}
  assert sm.pre_norm_bias(str(tmp_path / "opt,bias_before=false,seed=0"),
                          {"model": {"norm": "batch", "bn": {}}}, spec) == {}
  (tmp_path / "lone,bias_before=true").mkdir()
  runs["lone,bias_before=true"] = with_b
  assert sm.pre_norm_bias(str(tmp_path / "lone,bias_before=true"), cfg, spec) == {
      "max_abs_bias": pytest.approx(3e-7)}   # no twin: no differences
