"""Claim rules: a verdict (supported / refuted / inconclusive) and its numbers, from the cells.

A claim names its rule in the study config before the runs, so each verdict follows
from the numbers by a rule fixed in advance.
"""

from __future__ import annotations

import math

from bnlab.study import cells as cells_lib
from bnlab.study import registry

VERDICTS = ("supported", "refuted", "inconclusive")


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
  ca, cb = cells_lib.one(cells, a), cells_lib.one(cells, b)
  if ca is None or cb is None:
    return None
  by_seed = {r.get("seed"): r.get(other or metric) for r in cb["rows"]}
  return [(r.get("seed"), r.get(metric), by_seed[r.get("seed")])
          for r in ca["rows"] if r.get("seed") in by_seed]


Z95 = 1.959963984540054  # the two-sided 95% point of the standard normal


def binomial95(p_a: float, p_b: float, n_test: int | None) -> float:
  """The test set's noise on a difference of accuracies p_a - p_b: 1.96 x sqrt(se_a^2 + se_b^2).

  0 without n_test (a metric that is no test accuracy, or sides measured on different sets).
  """
  if not n_test:
    return 0.0
  return Z95 * math.sqrt(cells_lib.binomial_se(p_a, n_test) ** 2
                         + cells_lib.binomial_se(p_b, n_test) ** 2)


def call_difference(diffs: list[float], p_a: float, p_b: float, n_test: int | None,
                    higher: bool = True, margin: float = 0.0) -> tuple[str, dict]:
  """(verdict, numbers) of paired differences a - b: see `paired_interval`."""
  mean, half = cells_lib.t_interval(diffs)
  binom = binomial95(p_a, p_b, n_test)
  numbers = {"difference": mean, "t95": half, "binomial95": binom if n_test else None}
  if half is None:
    return "inconclusive", {**numbers, "reason": "fewer than 2 seeds"}
  bar, sign = max(half, binom), 1 if higher else -1
  if sign * mean - bar > margin:
    return "supported", numbers
  return ("refuted" if sign * mean + bar < margin else "inconclusive"), numbers


def _n_test_of(cells, where: str, metric: str):
  c = cells_lib.one(cells, where)
  return None if c is None else c["stats"][metric].get("n_test")


def _shared_n_test(cells, metric: str, a: str, b: str, other: str = ""):
  """The test-set size of both sides' accuracies; None when either has none or they differ."""
  n_a, n_b = _n_test_of(cells, a, metric), _n_test_of(cells, b, other or metric)
  return n_a if n_a and n_a == n_b else None


@registry.register(registry.RULES, "paired_interval")
def paired_interval(cells, metric: str, a: str, b: str, other: str = "", higher: bool = True,
                    from_step: int = 0, margin: float = 0.0):
  """Runs of a and b paired by seed, d = a's `metric` - b's `other` (default: `metric`).
  A difference is called only outside both noises: the 95% t interval on the seed mean of d
  (t_0.975,n-1 x sd(d) / sqrt(n)) and, for test accuracies, the test set's binomial noise
  1.96 x sqrt(se_a^2 + se_b^2), se = sqrt(p(1-p)/N) at each side's seed mean p. Supported
  when mean d is beyond both in the claimed direction (above; below if not `higher`),
  refuted when beyond both the other way, else inconclusive (also with < 2 seed pairs or a
  missing value). With `margin` m the claim is a difference of at least m: supported when
  the difference less both noises exceeds m, refuted when it plus them stays below m. A
  series is judged at every point from `from_step` that every pair has:
  supported when every point is, refuted when any point is."""
  pairs = paired_runs(cells, metric, a, b, other)
  if not pairs or any(x is None or y is None for _, x, y in pairs):
    return "inconclusive", {"missing": f"a pair of {metric} values of {a!r} and {b!r}"}
  n_test = _shared_n_test(cells, metric, a, b, other)
  seeds = [s for s, _, _ in pairs]

  def call(xs, ys):
    verdict, numbers = call_difference([x - y for x, y in zip(xs, ys)], sum(xs) / len(xs),
                                       sum(ys) / len(ys), n_test, higher, margin)
    return verdict, {"mean_a": sum(xs) / len(xs), "mean_b": sum(ys) / len(ys), **numbers}

  if not isinstance(pairs[0][1], list):
    verdict, numbers = call([x for _, x, _ in pairs], [y for _, _, y in pairs])
    return verdict, {"seeds": seeds, **numbers}
  by_point: dict = {}
  for _, x, y in pairs:
    ys = dict((p, v) for p, v in y)
    for p, v in x:
      if p in ys:
        by_point.setdefault(p, []).append((v, ys[p]))
  points = {p: call(*zip(*v)) for p, v in sorted(by_point.items())
            if len(v) == len(pairs) and p >= from_step}
  if not points:
    return "inconclusive", {"missing": "no point that every pair has"}
  count = {v: [p for p, (w, _) in points.items() if w == v] for v in VERDICTS}
  numbers = {"seeds": seeds, "points": len(points), **{v: len(count[v]) for v in VERDICTS},
             **{f"{v}_at": count[v][:5] for v in VERDICTS[1:] if count[v]}}
  if count["refuted"]:
    return "refuted", numbers
  return ("supported" if len(count["supported"]) == len(points) else "inconclusive"), numbers


def _is_finite_number(v) -> bool:
  return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


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
def equivalent(cells, metric: str, a: str, b: str, other: str = "", *, margin: float):
  """Supported when mean(a - b)'s 90% interval is inside ±margin, refuted when wholly outside it.

  Two one-sided tests at level 0.05 on runs of a and b paired by seed, d = a's `metric` - b's
  `other` (default: `metric`), `margin` in the metric's units. The interval is mean d ± the
  larger of the 90% t half-width t_0.95,n-1 x sd(d) / sqrt(n) and, for test accuracies, the
  test set's noise as `paired_interval` takes it, 1.96 x sqrt(se_a^2 + se_b^2): at its 95%
  width, not TOST's 90% (1.645), so never narrower than there. Supported (equivalent) when
  the interval lies in (-margin, margin); refuted (a difference of at least the margin) when
  it lies at or beyond +margin, or at or beyond -margin; else inconclusive, also with < 2
  seed pairs or a missing or non-finite value (named)."""
  problem = margin_problem({"margin": margin})
  if problem:
    raise ValueError(problem)
  pairs = paired_runs(cells, metric, a, b, other)
  missing = {"missing": f"a pair of {metric} values of {a!r} and {b!r}"}
  if not pairs:
    return "inconclusive", missing
  if any(isinstance(v, list) for _, x, y in pairs for v in (x, y)):
    return "inconclusive", {"reason": f"{metric} is a series; equivalent reads one value a run"}
  bad = [f"{m} of {w!r} at seed {s} is {v}" for s, x, y in pairs
         for w, m, v in ((a, metric, x), (b, other or metric, y)) if not _is_finite_number(v)]
  if bad:  # e.g. a diverged run's accuracy
    return "inconclusive", {**missing, "reason": "; ".join(bad)}
  xs, ys = [x for _, x, _ in pairs], [y for _, _, y in pairs]
  mean_a, mean_b = sum(xs) / len(xs), sum(ys) / len(ys)
  mean, half = cells_lib.t_interval([x - y for x, y in zip(xs, ys)], quantile=0.95)
  n_test = _shared_n_test(cells, metric, a, b, other)
  binom = binomial95(mean_a, mean_b, n_test)
  numbers = {"seeds": [s for s, _, _ in pairs], "mean_a": mean_a, "mean_b": mean_b,
             "difference": mean, "t90": half, "binomial95": binom if n_test else None}
  if half is None:
    return "inconclusive", {**numbers, "interval": None, "margin": margin, "n": len(pairs),
                            "reason": "fewer than 2 seeds"}
  lo, hi = mean - max(half, binom), mean + max(half, binom)
  numbers.update(interval=[lo, hi], margin=margin, n=len(pairs))
  if -margin < lo and hi < margin:
    return "supported", numbers
  if lo >= margin or hi <= -margin:
    return "refuted", numbers
  crossed = [f"{sign}{margin}" for sign, out in (("-", lo <= -margin), ("+", hi >= margin)) if out]
  return "inconclusive", {**numbers, "reason": f"the interval crosses {' and '.join(crossed)}"}


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
  """Every claim's verdict(s): one per value combination of its `each` keys."""
  out = []
  for name, spec in claims.items():
    spec = dict(spec)
    statement, rule, each = spec.pop("statement"), spec.pop("rule"), tuple(spec.pop("each", ()))
    groups = list(dict.fromkeys(",".join(f"{k}={cells_lib.show(c['key'][k])}" for k in each)
                                for c in cells)) if each else [""]
    for where in groups:
      params = {k: (f"{where},{v}" if k in ("a", "b", "treat", "base") and where else v)
                for k, v in spec.items()}
      verdict, numbers = registry.RULES[rule](
          cells_lib.select(cells, where) if where else cells, **params)
      out.append({"claim": name, "statement": statement, "where": where, "rule": rule,
                  "params": spec, "verdict": verdict, "numbers": numbers})
  return out
