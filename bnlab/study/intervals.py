"""How sure a paired difference is: seed noise and test-set noise combined, p-values and power.

Two models compared on the same test images differ by two noises that add as variances:
the seeds' (training randomness: sd(d) / sqrt(n) over the n seed pairs' differences d) and
the test set's (which N images were drawn). The test set's is read from per-image results
paired across the two models, which is tighter than two independent binomials and exact:
per image j, D_j = the mean over seed pairs of (a got j right) - (b got j right), and
se = sd(D) / sqrt(N). Without per-image results it falls back to the unpaired binomial
sqrt(p_a(1-p_a)/N + p_b(1-p_b)/N), which over-covers. The combined standard error
sqrt(se_seed^2 + se_image^2) is read against Student t with Welch-Satterthwaite degrees of
freedom (n - 1 when the seeds dominate, the normal when the test set does).
"""

from __future__ import annotations

import math

import numpy as np

from bnlab.rundir import per_image
from bnlab.study import cells as cells_lib

ALPHA = 0.05  # every interval's and test's level
POWER = 0.8  # the power at which a design's detectable effect is stated


def image_se(a_bits: list, b_bits: list) -> float:
  """The test set's standard error on mean(a - b) from per-image results paired by seed.

  `a_bits[i]`, `b_bits[i]`: seed pair i's per-image results (arrays of 0/1, or of the
  fraction of evaluations right when a window of evaluations is averaged), one per test image.
  """
  d = np.mean([np.asarray(x, np.float64) - np.asarray(y, np.float64)
               for x, y in zip(a_bits, b_bits)], axis=0)
  return float(np.std(d, ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0


def binomial_se(p_a: float, p_b: float, n_test: int) -> float:
  """The unpaired fallback: sqrt(p_a(1-p_a)/N + p_b(1-p_b)/N), two accuracies' standard
  errors (`cells.binomial_se`) added as variances."""
  return math.hypot(cells_lib.binomial_se(p_a, n_test), cells_lib.binomial_se(p_b, n_test))


def combine(diffs: list[float], se_image: float = 0.0) -> dict | None:
  """{mean, se_seed, se_image, se, df} of paired differences `diffs`; None for < 2 pairs.

  se = sqrt(se_seed^2 + se_image^2), df by Welch-Satterthwaite: se^4 (n-1) / se_seed^4.
  """
  n = len(diffs)
  if n < 2:
    return None
  mean = sum(diffs) / n
  se_seed = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
  se = math.hypot(se_seed, se_image)
  df = math.inf if se_seed == 0 else se ** 4 * (n - 1) / se_seed ** 4
  return {"mean": mean, "se_seed": se_seed, "se_image": se_image, "se": se, "df": df}


def quantile(q: float, df: float) -> float:
  """Student t's q-quantile with `df` degrees of freedom (the normal's for df = inf)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return float(stats.norm.ppf(q) if math.isinf(df) else stats.t.ppf(q, df))


def p_above(t: float, df: float) -> float:
  """P(T >= t) for Student t with `df` degrees of freedom."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  return float(stats.norm.sf(t) if math.isinf(df) else stats.t.sf(t, df))


def statistic(mean: float, se: float, null: float) -> float:
  """(mean - null) / se, with se = 0 read as an exact difference (+-inf, or 0 on the null)."""
  if se > 0:
    return (mean - null) / se
  return 0.0 if mean == null else math.copysign(math.inf, mean - null)


def two_sided_p(mean: float, se: float, df: float, null: float = 0.0) -> float:
  """The two-sided p-value of mean != null."""
  return min(1.0, 2 * p_above(abs(statistic(mean, se, null)), df))


def detectable(se: float, df: float, alpha: float = ALPHA, power: float = POWER) -> float:
  """The smallest true difference a two-sided level-alpha test finds with probability `power`."""
  return (quantile(1 - alpha / 2, df) + quantile(power, df)) * se


def equivalence_detectable(se: float, df: float, alpha: float = ALPHA,
                           power: float = POWER) -> float:
  """The smallest margin two one-sided tests establish with probability `power` at a true 0."""
  return (quantile(1 - alpha, df) + quantile(1 - (1 - power) / 2, df)) * se


def window_mean(series: list, from_step: int = 0, to_step: int = 0) -> float | None:
  """The mean of a [[step, value], ...] series over from_step <= step <= to_step (0: the end)."""
  vals = [v for s, v in series if s >= from_step and (not to_step or s <= to_step)]
  return sum(vals) / len(vals) if vals else None


def window_bits(series: list, from_step: int = 0, to_step: int = 0):
  """Per image, the fraction of a [[step, per-image text], ...] window's evaluations right."""
  bits = [per_image.decode(t) for s, t in series
          if s >= from_step and (not to_step or s <= to_step)]
  return np.mean(bits, axis=0) if bits else None


def sign_test_p(wins: int, losses: int) -> float:
  """Two-sided exact sign test: the probability, with wins and losses equally likely, of a
  split at least as uneven as `wins` : `losses` (ties left out before the call)."""
  n, k = wins + losses, min(wins, losses)
  if n == 0:
    return 1.0
  return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def censored_median(values: list, cap: float = math.inf) -> float | None:
  """The median time of `values` where None is censored (not reached by the end, `cap`).

  All runs stop at the same step, after every time reached, so Kaplan-Meier's median is
  the plain median with the censored values ranked last: None when half or more are
  censored (the median is not reached).
  """
  times = sorted(math.inf if v is None else v for v in values)
  n = len(times)
  if not n:
    return None
  m = (times[(n - 1) // 2] + times[n // 2]) / 2
  return None if not math.isfinite(m) or m >= cap else m


def median_interval(values: list, alpha: float = ALPHA) -> tuple[float | None, float | None]:
  """The distribution-free interval for the median of `values` (paired differences, which
  may be +-inf: a run that never reached a target is slower than any that did), from their
  order statistics: [v_(k), v_(n+1-k)] for the largest k with 2 P(Binomial(n, 1/2) < k)
  <= alpha, covering the median with probability >= 1 - alpha whatever the distribution
  (the interval the sign test inverts). An end that is infinite, or too few values to
  reach the level (n < 6 at 0.05), is None: unbounded."""
  v, n = sorted(values), len(values)
  k = 0
  while k < n and sign_test_p(k, n - k) <= alpha:  # 2 P(Binomial(n, 1/2) <= k), k < n/2
    k += 1
  if k == 0:
    return None, None
  lo, hi = v[k - 1], v[n - k]
  return (lo if math.isfinite(lo) else None), (hi if math.isfinite(hi) else None)


def holm(p_values: list[float], alpha: float = ALPHA) -> list[bool]:
  """Which of the hypotheses Holm's step-down procedure rejects at family level `alpha`."""
  order = sorted(range(len(p_values)), key=lambda i: p_values[i])
  rejected = [False] * len(p_values)
  for rank, i in enumerate(order):
    if p_values[i] > alpha / (len(p_values) - rank):
      break
    rejected[i] = True
  return rejected
