"""Claim rules: a verdict (supported / refuted / inconclusive) and its numbers, from the cells.

A claim names its rule in the study config before the runs, so each verdict follows
from the numbers by a rule fixed in advance.
"""

from __future__ import annotations

import math

from bnlab.rundir import per_image
from bnlab.study import cells as cells_lib
from bnlab.study import choice
from bnlab.study import intervals
from bnlab.study import registry

VERDICTS = ("supported", "refuted", "inconclusive")
# The rules whose numbers carry the p-value of their verdict: a primary claim uses one.
registry.TESTS.update({"paired_interval", "equivalent", "reaches_sooner"})


def _mean(cell: dict | None, metric: str):
  return None if cell is None else cell["stats"][metric].get("mean")


def _mean_series(cell: dict, metric: str) -> list[float]:
  runs = [s for s in cell["values"][metric] if s]
  if not runs:
    return []
  length = min(len(s) for s in runs)
  return [sum(s[i][1] for s in runs) / len(runs) for i in range(length)]


@registry.register(registry.RULES, "below_everywhere")
def below_everywhere(cells, metric: str, a: str, b: str):
  """Supported when a's seed-mean series is below b's at every point; else refuted."""
  ca, cb = cells_lib.one(cells, a), cells_lib.one(cells, b)
  if ca is None or cb is None or not _mean_series(ca, metric) or not _mean_series(cb, metric):
    return "inconclusive", {"missing": [w for w, c in ((a, ca), (b, cb)) if c is None]}
  sa, sb = _mean_series(ca, metric), _mean_series(cb, metric)
  not_below = [i + 1 for i, (x, y) in enumerate(zip(sa, sb)) if not x < y]
  return ("refuted" if not_below else "supported",
          {"a": [round(x, 4) for x in sa], "b": [round(y, 4) for y in sb],
           "points_not_below": not_below})


@registry.register(registry.RULES, "difference_at_least")
def difference_at_least(cells, metric: str, a: str, b: str, threshold: float):
  """Supported when mean(a) - mean(b) >= threshold (means over the cells' seeds); else refuted.

  A comparison of two means without their noise: for seeded results, `paired_interval` with
  `margin` makes the same claim with error bars."""
  ma, mb = _mean(cells_lib.one(cells, a), metric), _mean(cells_lib.one(cells, b), metric)
  if ma is None or mb is None:
    return "inconclusive", {"mean_a": ma, "mean_b": mb}
  return ("supported" if ma - mb >= threshold else "refuted",
          {"mean_a": ma, "mean_b": mb, "difference": ma - mb, "threshold": threshold})


def _all(cell: dict | None, metric: str) -> bool:
  return cell is not None and bool(cell["values"][metric]) and all(cell["values"][metric])


@registry.register(registry.RULES, "wins_above_best")
def wins_above_best(cells, metric: str, along: str, treat: str, base: str, fails: str,
                    trains: str):
  """Supported when, at some value of `along` above base's best (highest mean `metric`),
  every base seed `fails` and every treat seed `trains`; refuted when there is none."""
  xs = sorted({c["key"][along] for c in cells})
  at = lambda where, x: cells_lib.one(cells, f"{where},{along}={cells_lib.show(x)}")  # noqa: E731
  scored = [(_mean(at(base, x), metric), x) for x in xs if _mean(at(base, x), metric) is not None]
  if not scored:
    return "inconclusive", {"reason": f"no {base} run has a {metric}"}
  best = max(scored)[1]
  high_fail = [x for x in xs if x > best and _all(at(base, x), fails)]
  wins = [x for x in high_fail if _all(at(treat, x), trains)]
  return ("supported" if wins else "refuted",
          {"base_best": best, "above_best": [x for x in xs if x > best],
           "base_fails_above_best": high_fail, "treat_trains_there": wins,
           "base_fails_below_best": [x for x in xs if x < best and _all(at(base, x), fails)]})


@registry.register(registry.RULES, "separated")
def separated(cells, metric: str, a: str, b: str, higher: bool = True, require: str = ""):
  """Supported when every a seed beats every b seed on `metric` (higher, or lower if not
  `higher`); refuted when every b seed beats every a seed; inconclusive when the seed
  ranges overlap, a value is missing, or a seed fails `require`."""
  ca, cb = cells_lib.one(cells, a), cells_lib.one(cells, b)
  if ca is None or cb is None:
    return "inconclusive", {"missing": [w for w, c in ((a, ca), (b, cb)) if c is None]}
  va, vb = ca["values"][metric], cb["values"][metric]
  numbers = {"a": va, "b": vb}
  if require and not (_all(ca, require) and _all(cb, require)):
    return "inconclusive", {**numbers, "reason": f"not every seed {require}"}
  if None in va or None in vb or not va or not vb:
    return "inconclusive", {**numbers, "reason": f"not every seed has a {metric}"}
  sign = 1 if higher else -1
  numbers["difference"] = sum(va) / len(va) - sum(vb) / len(vb)
  if min(sign * x for x in va) > max(sign * y for y in vb):
    return "supported", numbers
  if min(sign * y for y in vb) > max(sign * x for x in va):
    return "refuted", numbers
  return "inconclusive", {**numbers, "reason": "the seed ranges overlap"}


def paired_runs(cells, metric: str, a: str, b: str, other: str = ""):
  """[(seed, a's `metric`, b's `other` or `metric`)] of the runs of cells a and b with the
  same seed, or None when a or b is not one cell."""
  pairs = paired_rows(cells, a, b)
  return None if pairs is None else [(s, ra.get(metric), rb.get(other or metric))
                                     for s, ra, rb in pairs]


def paired_rows(cells, a: str, b: str):
  """[(seed, a's row, b's row)] of the runs of cells a and b with the same seed, or None."""
  ca, cb = cells_lib.one(cells, a), cells_lib.one(cells, b)
  if ca is None or cb is None:
    return None
  by_seed = {r.get("seed"): r for r in cb["rows"]}
  return [(r.get("seed"), r, by_seed[r.get("seed")]) for r in ca["rows"]
          if r.get("seed") in by_seed]


def _is_finite_number(v) -> bool:
  return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


def _n_test_of(cells, where: str, metric: str):
  c = cells_lib.one(cells, where)
  return None if c is None else c["stats"][metric].get("n_test")


def _shared_n_test(cells, metric: str, a: str, b: str, other: str = ""):
  """The test-set size of both sides' accuracies; None when either has none or they differ."""
  n_a, n_b = _n_test_of(cells, a, metric), _n_test_of(cells, b, other or metric)
  return n_a if n_a and n_a == n_b else None


def _reduce(row: dict, metric: str, window: tuple):
  """(the run's value of `metric`, its per-image results or None): a series is averaged
  over the window (from_step, to_step), its per-image results with it."""
  value, images = row.get(metric), (row.get("per_image") or {}).get(metric)
  if not isinstance(value, list):
    return value, None if images is None else per_image.decode(images)
  return (intervals.window_mean(value, *window),
          None if images is None else intervals.window_bits(images, *window))


def _window_steps(value, window: tuple):
  return [s for s, _ in value if s >= window[0] and (not window[1] or s <= window[1])]


def paired_values(cells, metric: str, a: str, b: str, other: str = "", fails: str = "",
                  window: tuple = (0, 0)) -> dict:
  """Runs of a and b paired by seed, reduced to one number each: {"seeds", "xs", "ys",
  "a_images", "b_images", "failed"} or {"missing": why}. A pair with a run that `fails`
  (a boolean metric: diverged, collapsed) is left out and counted in "failed"."""
  pairs = paired_rows(cells, a, b)
  what = f"a pair of {metric} values of {a!r} and {b!r}"
  if not pairs:
    return {"missing": what}
  out = {"seeds": [], "xs": [], "ys": [], "a_images": [], "b_images": [], "failed": None}
  if fails:
    out["failed"] = {"a": sum(bool(ra.get(fails)) for _, ra, _ in pairs),
                     "b": sum(bool(rb.get(fails)) for _, _, rb in pairs), "pairs_left_out": []}
  bad = []
  for seed, ra, rb in pairs:
    if fails and (ra.get(fails) or rb.get(fails)):
      out["failed"]["pairs_left_out"].append(seed)
      continue
    va, vb = ra.get(metric), rb.get(other or metric)
    if isinstance(va, list) != isinstance(vb, list) or (
        isinstance(va, list) and _window_steps(va, window) != _window_steps(vb, window)):
      bad.append(f"seed {seed}'s two series have different steps in the window")
      continue
    (x, xi), (y, yi) = _reduce(ra, metric, window), _reduce(rb, other or metric, window)
    bad += [f"{m} of {w!r} at seed {seed} is {v}" for w, m, v in
            ((a, metric, x), (b, other or metric, y)) if not _is_finite_number(v)]
    out["seeds"].append(seed)
    out["xs"].append(x)
    out["ys"].append(y)
    out["a_images"].append(xi)
    out["b_images"].append(yi)
  if bad:  # e.g. a diverged run's accuracy, without `fails` to count it
    return {"missing": what, "reason": "; ".join(bad)}
  return out


def test_set_noise(pv: dict, n_test) -> tuple[float, str]:
  """(the test set's standard error on mean(a - b), how it was found)."""
  if not pv["xs"]:
    return 0.0, "none (no pair to compare)"
  if all(i is not None for i in pv["a_images"] + pv["b_images"]):
    return intervals.image_se(pv["a_images"], pv["b_images"]), "per-image, paired"
  if n_test:
    mean_a, mean_b = (sum(v) / len(v) for v in (pv["xs"], pv["ys"]))
    return intervals.binomial_se(mean_a, mean_b, n_test), "binomial, unpaired"
  return 0.0, "none (not a test accuracy)"


def _paired_numbers(cells, metric, a, b, other, fails, window):
  """(numbers, combined statistics or None) shared by `paired_interval` and `equivalent`."""
  pv = paired_values(cells, metric, a, b, other, fails, window)
  if "missing" in pv:
    return pv, None
  se_image, noise = test_set_noise(pv, _shared_n_test(cells, metric, a, b, other))
  diffs = [x - y for x, y in zip(pv["xs"], pv["ys"])]
  c = intervals.combine(diffs, se_image)
  numbers = {"seeds": pv["seeds"], "n": len(diffs),
             "mean_a": sum(pv["xs"]) / len(diffs) if diffs else None,
             "mean_b": sum(pv["ys"]) / len(diffs) if diffs else None,
             "difference": c["mean"] if c else (diffs[0] if diffs else None),
             "se_seed": c and c["se_seed"], "se_image": se_image, "noise": noise,
             "df": c and c["df"]}
  if pv["failed"] is not None:
    numbers["failed"] = pv["failed"]
  if c is None:
    numbers["reason"] = f"fewer than 2 seed pairs{' that trained' if fails else ''}"
  return numbers, c


@registry.register(registry.RULES, "paired_interval")
def paired_interval(cells, metric: str, a: str, b: str, other: str = "", higher: bool = True,
                    from_step: int = 0, to_step: int = 0, margin: float = 0.0, fails: str = ""):
  """Runs of a and b paired by seed, d = a's `metric` - b's `other` (default: `metric`); a
  series is first averaged over its evaluations from `from_step` to `to_step` (0: the last).
  Seed and test-set noise add as variances (see the report's method line): 95% interval
  mean d +- t_0.975,df x sqrt(se_seed^2 + se_image^2). Supported when the interval lies
  wholly beyond `margin` in the claimed direction (above; below if not `higher`), refuted
  when wholly short of it, else inconclusive; p is the two-sided p-value of d = margin.
  With `fails` (a boolean metric such as diverged or collapsed), a pair with a failed run is
  left out and counted, and the verdict is on the pairs that trained; without it, a missing
  or non-finite value makes the claim inconclusive."""
  numbers, c = _paired_numbers(cells, metric, a, b, other, fails, (from_step, to_step))
  if c is None:
    return "inconclusive", numbers
  sign = 1 if higher else -1
  half = intervals.quantile(1 - intervals.ALPHA / 2, c["df"]) * c["se"]
  numbers.update(interval=[c["mean"] - half, c["mean"] + half], margin=margin,
                 p=intervals.two_sided_p(sign * c["mean"], c["se"], c["df"], margin),
                 detectable=intervals.detectable(c["se"], c["df"]))
  if sign * c["mean"] - half > margin:
    return "supported", numbers
  return ("refuted" if sign * c["mean"] + half < margin else "inconclusive"), numbers


@registry.register(registry.RULE_CHECKS, "equivalent")
def margin_problem(params: dict) -> str:
  """Why a claim's `equivalent` parameters cannot be judged, or "": the margin must be > 0."""
  m = params.get("margin")
  if _is_finite_number(m) and m > 0:
    return ""
  return ("rule 'equivalent' needs margin > 0, the largest difference a - b in the metric's "
          "units that counts as no difference (e.g. margin=0.005: half a point of accuracy); "
          f"got {'none' if 'margin' not in params else repr(m)}")


@registry.register(registry.RULES, "equivalent")
def equivalent(cells, metric: str, a: str, b: str, other: str = "", from_step: int = 0,
               to_step: int = 0, fails: str = "", *, margin: float):
  """Supported when mean(a - b)'s 90% interval is inside ±margin, refuted when wholly outside it.

  Two one-sided tests at level 0.05 on runs of a and b paired by seed, d = a's `metric` -
  b's `other` (default: `metric`), `margin` in the metric's units; the noise, series windows
  and `fails` as in `paired_interval`, the interval mean d +- t_0.95,df x se. Supported
  (equivalent) when it lies in (-margin, margin); refuted (a difference of at least the
  margin) when it lies at or beyond +margin, or at or beyond -margin; else inconclusive, also
  with < 2 seed pairs or a missing or non-finite value (named). p: the larger one-sided
  p-value (the equivalence test's); detectable: the smallest margin the design establishes
  with 80% power when the true difference is 0."""
  problem = margin_problem({"margin": margin})
  if problem:
    raise ValueError(problem)
  numbers, c = _paired_numbers(cells, metric, a, b, other, fails, (from_step, to_step))
  numbers["margin"] = margin
  if c is None:
    return "inconclusive", {**numbers, "interval": None}
  mean, se, df = c["mean"], c["se"], c["df"]
  half = intervals.quantile(1 - intervals.ALPHA, df) * se
  lo, hi = mean - half, mean + half
  p_equal = max(intervals.p_above(intervals.statistic(mean, se, -margin), df),
                intervals.p_above(-intervals.statistic(mean, se, margin), df))
  p_differ = min(intervals.p_above(intervals.statistic(mean, se, margin), df),
                 intervals.p_above(-intervals.statistic(mean, se, -margin), df))
  numbers.update(interval=[lo, hi], detectable=intervals.equivalence_detectable(se, df))
  if -margin < lo and hi < margin:
    return "supported", {**numbers, "p": p_equal}
  if lo >= margin or hi <= -margin:
    return "refuted", {**numbers, "p": p_differ}
  crossed = [f"{sign}{margin}" for sign, out in (("-", lo <= -margin), ("+", hi >= margin)) if out]
  return "inconclusive", {**numbers, "p": p_equal,
                          "reason": f"the interval crosses {' and '.join(crossed)}"}


@registry.register(registry.RULES, "reaches_sooner")
def reaches_sooner(cells, metric: str, a: str, b: str, interval: bool = False):
  """Whether a's runs reach a target in fewer steps than b's, paired by seed; `metric` is the
  step a run first reached it, None where it never did (censored at the run's end, kept).

  Per seed pair: a sooner, b sooner, a tie, or undecided (neither reached). The exact
  two-sided sign test on the decided pairs gives p (ties and undecided pairs left out, a
  pair where only one run reached counting for it); supported when p < 0.05 with a sooner
  more often, refuted when p < 0.05 the other way, else inconclusive. The medians are
  Kaplan-Meier's (`intervals.censored_median`): None when half or more never reached.
  With `interval`, also the median of the decided pairs' step differences a - b (a run
  that never reached counts as slower than any that did: +-inf) and its distribution-free
  95% interval (`intervals.median_interval`; an unbounded end is None).
  """
  pairs = paired_rows(cells, a, b)
  if not pairs:
    return "inconclusive", {"missing": f"a pair of {metric} values of {a!r} and {b!r}"}
  inf = math.inf
  xs = [ra.get(metric) for _, ra, _ in pairs]
  ys = [rb.get(metric) for _, _, rb in pairs]
  bad = [v for v in xs + ys if v is not None and not _is_finite_number(v)]
  if bad:
    return "inconclusive", {"missing": f"{metric} values", "reason": f"not steps: {bad[:3]}"}
  tx, ty = ([inf if v is None else v for v in vs] for vs in (xs, ys))
  a_sooner = sum(x < y for x, y in zip(tx, ty))
  b_sooner = sum(y < x for x, y in zip(tx, ty))
  undecided = sum(x == y == inf for x, y in zip(tx, ty))
  med_a, med_b = intervals.censored_median(xs), intervals.censored_median(ys)
  numbers = {"seeds": [s for s, _, _ in pairs], "n": len(pairs), "a_steps": xs, "b_steps": ys,
             "reached_a": sum(v is not None for v in xs),
             "reached_b": sum(v is not None for v in ys),
             "a_sooner": a_sooner, "b_sooner": b_sooner,
             "ties": len(pairs) - a_sooner - b_sooner - undecided, "undecided": undecided,
             "median_a": med_a, "median_b": med_b,
             "difference": None if med_a is None or med_b is None else med_a - med_b,
             "p": intervals.sign_test_p(a_sooner, b_sooner)}
  if interval:
    diffs = sorted(x - y for x, y in zip(tx, ty) if not x == y == inf)
    n = len(diffs)
    mid = (diffs[(n - 1) // 2] + diffs[n // 2]) / 2 if n else math.nan
    numbers["median_difference"] = mid if math.isfinite(mid) else None  # None: unbounded
    numbers["interval"] = list(intervals.median_interval(diffs))
  if numbers["p"] < intervals.ALPHA:
    return ("supported" if a_sooner > b_sooner else "refuted"), numbers
  return "inconclusive", {**numbers, "reason": f"{a_sooner} pair(s) a sooner, {b_sooner} b "
                                                f"sooner: the sign test's p is {numbers['p']:.3g}"}


@registry.register(registry.RULES, "same_verdict")
def same_verdict(cells, metrics, a: str, b: str, higher: bool = True):
  """`paired_interval` of a against b once with each of `metrics` (e.g. test accuracy with
  running averages, population and test-batch statistics): supported when all give the
  same verdict, refuted when the choice of metric changes it; inconclusive when a metric
  lacks a value."""
  calls = {m: paired_interval(cells, m, a, b, higher=higher) for m in metrics}
  numbers = {m: v for m, (v, _) in calls.items()}
  numbers.update({f"{m} difference": n["difference"] for m, (_, n) in calls.items()
                  if "difference" in n})
  if any("missing" in n for _, n in calls.values()):
    return "inconclusive", numbers
  return ("supported" if len(set(numbers[m] for m in metrics)) == 1 else "refuted"), numbers


def judge(claims: dict, cells: list[dict]) -> list[dict]:
  """Every claim's verdict(s), one per value combination of its `each` keys among the cells
  its `within` names (all by default), and for the primary claims' verdicts together the
  Holm-corrected verdict (`corrected`). A claim with `choose` compares a and b each at its
  own value of `choose.along`, chosen on `choose.by` first (`choice`; the numbers' `chosen`)."""
  out = []
  for name, spec in claims.items():
    spec = dict(spec)
    statement, rule, each = spec.pop("statement"), spec.pop("rule"), tuple(spec.pop("each", ()))
    primary = bool(spec.pop("primary", False))
    within = spec.pop("within", "")
    choose = spec.pop("choose", None)
    pool = [c for c in cells if any(c in cells_lib.select(cells, w) for w in
                                    ([within] if isinstance(within, str) else within))
            ] if within else cells
    groups = list(dict.fromkeys(",".join(f"{k}={cells_lib.show(c['key'][k])}" for k in each)
                                for c in pool)) if each else [""]
    for where in groups:
      params = {k: (f"{where},{v}" if k in ("a", "b", "treat", "base") and where else v)
                for k, v in spec.items()}
      group = cells_lib.select(pool, where) if where else pool
      chosen = None
      if choose:
        params, chosen = choice.at_chosen(group, params, dict(choose))
      if params is None:
        verdict, numbers = "inconclusive", {"chosen": chosen, "reason": chosen["reason"]}
      else:
        verdict, numbers = registry.RULES[rule](group, **params)
        if chosen is not None:
          numbers = {"chosen": chosen, **numbers}
      params_out = spec if not choose else {**spec, "choose": dict(choose)}
      out.append({"claim": name, "statement": statement, "where": where, "rule": rule,
                  "params": params_out, "primary": primary, "verdict": verdict,
                  "numbers": numbers})
  return correct_primaries(out)


def correct_primaries(verdicts: list[dict]) -> list[dict]:
  """The primary verdicts corrected together by Holm's step-down at family level 0.05: a
  verdict whose p-value the procedure does not reject becomes inconclusive."""
  family = [v for v in verdicts if v["primary"]]
  p = [v["numbers"].get("p", 1.0) if v["verdict"] != "inconclusive" else
       max(v["numbers"].get("p", 1.0), intervals.ALPHA) for v in family]
  for v, rejected in zip(family, intervals.holm(p)):
    v["corrected"] = v["verdict"] if rejected else "inconclusive"
    v["family"] = len(family)
  return verdicts
