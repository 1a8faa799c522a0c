"""The tests among the claim rules (`paired_interval`, `equivalent`) and their family
correction, against numbers worked out by hand.

Each expected value is computed in the comments from quantiles given there, not by the
code under test: d = a - b per seed pair; se_seed = sd(d) / sqrt(n); the test set's se from
per-image results (per image, the seed-mean difference of right answers; its sd / sqrt(N))
or from two unpaired binomials; se = sqrt(se_seed^2 + se_image^2) read against Student t
with Welch-Satterthwaite df = se^4 (n - 1) / se_seed^4.
"""

import math

import numpy as np
import pytest

from bnlab import config as config_lib
from bnlab import study
from bnlab.rundir import per_image
from bnlab.study import intervals
from bnlab.study import report as report_lib
from bnlab.study import rules as rules_lib
from test_study import seeded_cells

B = (0.5, 0.5, 0.5)  # cell b: a constant, so d_i = a_i - 0.5


def judge(acc_a, acc_b, margin, n_test=None, a="norm=a", b="norm=b"):
  return study.equivalent(seeded_cells(acc_a, acc_b, n_test), "acc", a, b, margin=margin)


def image_cells(acc_a, acc_b, bits_a, bits_b, **extra):
  """Cells a and b whose runs carry per-image results of `acc` (lists of 0/1 per seed)."""
  rows = [{"norm": n, "lr": 1, "seed": i, "acc": v, "n_test": len(bits[i]),
           "per_image": {"acc": per_image.encode(np.asarray(bits[i], bool))},
           **{k: vals[i] for k, (vn, vals) in extra.items() if vn == n}}
          for n, accs, bits in (("a", acc_a, bits_a), ("b", acc_b, bits_b))
          for i, v in enumerate(accs)]
  return study.make_cells(rows, ("norm", "lr"), ["acc", *extra])


# Two seeds on N = 4 images. Per seed, a - b per image: seed 0 (0, 1, 0, 0), seed 1
# (0, 0, 0, 1); per image the seed mean D = (0, .5, 0, .5): mean .25, sd (n-1) =
# sqrt(4 x .25^2 / 3) = .2886751, se_image = .2886751 / sqrt(4) = .1443376.
BITS_A = [[1, 1, 1, 0], [1, 1, 0, 1]]
BITS_B = [[1, 0, 1, 0], [1, 1, 0, 0]]


def test_the_per_image_noise_is_the_paired_differences_sd_over_images():
  assert intervals.image_se(BITS_A, BITS_B) == pytest.approx(0.1443376, rel=1e-6)
  # Against a direct computation on random results: 5 seeds, 1,000 images.
  rng = np.random.default_rng(0)
  a, b = rng.random((5, 1000)) < 0.9, rng.random((5, 1000)) < 0.8
  direct = []
  for j in range(1000):
    direct.append(sum(int(a[i, j]) - int(b[i, j]) for i in range(5)) / 5)
  mean = sum(direct) / 1000
  sd = math.sqrt(sum((x - mean) ** 2 for x in direct) / 999)
  assert intervals.image_se(list(a), list(b)) == pytest.approx(sd / math.sqrt(1000), rel=1e-12)


def test_test_set_noise_alone_is_read_against_the_normal():
  # d = (.25, .25) from the bits: se_seed 0, so df = inf and the half-width is
  # 1.959964 x .1443376 = .2828965; the interval [-.0329, .5329] holds 0; p = 2 x
  # P(Z > .25 / .1443376 = 1.7320508) = 2 x .0416323 = .0832645.
  verdict, numbers = study.paired_interval(
      image_cells((0.75, 0.75), (0.5, 0.5), BITS_A, BITS_B), "acc", "norm=a", "norm=b")
  assert verdict == "inconclusive"
  assert numbers["noise"] == "per-image, paired" and numbers["df"] == math.inf
  assert (numbers["se_seed"], numbers["se_image"]) == (0.0, pytest.approx(0.1443376, rel=1e-6))
  assert numbers["interval"] == pytest.approx([0.25 - 0.2828965, 0.25 + 0.2828965], rel=1e-5)
  assert numbers["p"] == pytest.approx(0.0832645, rel=1e-5)


def test_seed_and_test_set_noise_add_as_variances():
  # d = (.1, .2): mean .15, sd .0707107, se_seed .05; se_image .1443376 (the bits above);
  # se = sqrt(.0025 + .0208333) = .1527526; df = .0233333^2 x 1 / .05^4 = 87.11118;
  # t_0.975,87.11 = 1.987573: half .3036068 (the larger noise alone would give .2829 and
  # max(.) of the two halves .2829: the sum of variances is wider). p = 2 P(T > .98198) =
  # .3288290.
  verdict, numbers = study.paired_interval(
      image_cells((0.8, 0.9), (0.7, 0.7), BITS_A, BITS_B), "acc", "norm=a", "norm=b")
  assert verdict == "inconclusive"
  assert numbers["df"] == pytest.approx(87.11118, rel=1e-6)
  assert numbers["interval"] == pytest.approx([0.15 - 0.3036068, 0.15 + 0.3036068], rel=1e-6)
  assert numbers["p"] == pytest.approx(0.3288290, rel=1e-5)
  # detectable at 80% power: (t_0.975,df + t_0.8,df) x se.
  from scipy import stats
  assert numbers["detectable"] == pytest.approx(
      (stats.t.ppf(0.975, 87.11118) + stats.t.ppf(0.8, 87.11118)) * 0.1527526, rel=1e-6)


def test_without_per_image_results_two_unpaired_binomials_are_the_test_sets_noise():
  # d = (-.001, 0, .001): mean 0, se_seed .001 / sqrt(3) = .000577350; unpaired binomial at
  # .98 and .98 on 10,000 images: sqrt(2 x .98 x .02 / 10,000) = .0019799; se = .0020624;
  # df = se^4 x 2 / se_seed^4 = 325.6352; t_0.95,325.6 = 1.649546: 90% half .0034020.
  a, b = (0.979, 0.980, 0.981), (0.980, 0.980, 0.980)
  verdict, numbers = judge(a, b, 0.005, n_test=10_000)
  assert verdict == "supported" and numbers["noise"] == "binomial, unpaired"
  assert numbers["se_image"] == pytest.approx(0.0019799, rel=1e-4)
  assert numbers["df"] == pytest.approx(325.6352, rel=1e-5)
  assert numbers["interval"] == pytest.approx([-0.0034020, 0.0034020], rel=1e-4)
  assert judge(a, b, 0.0034)[0] == "supported"  # the seeds alone: +-.00168585
  assert judge(a, b, 0.0034, n_test=10_000)[0] == "inconclusive"


def test_paired_interval_calls_a_difference_only_outside_the_combined_noise():
  # Without test-set noise (no n_test: not a test accuracy): d = (.0030, .0031, .0029):
  # mean .003, sd .0001, se .0000577; t_0.975,2 = 4.302653: half .000248: supported.
  a, b = (0.9830, 0.9836, 0.9840), (0.9800, 0.9805, 0.9811)
  assert study.paired_interval(seeded_cells(a, b), "acc", "norm=a", "norm=b")[0] == "supported"
  assert study.paired_interval(seeded_cells(a, b), "acc", "norm=b", "norm=a")[0] == "refuted"
  assert study.paired_interval(seeded_cells(a, b), "acc", "norm=b", "norm=a",
                               higher=False)[0] == "supported"
  # On 10,000 test images the unpaired binomials (se ~ .0019) swamp .003: inconclusive.
  verdict, numbers = study.paired_interval(seeded_cells(a, b, 10_000), "acc", "norm=a",
                                           "norm=b")
  assert verdict == "inconclusive" and numbers["p"] > 0.05
  # A margin: a difference of at least m. d = (.03, .029, .031): se_seed .000577,
  # binomial at .991/.961 on 10,000: sqrt((.008919 + .037479) / 10,000) = .0021540.
  a3, b3 = (0.99, 0.991, 0.992), (0.96, 0.962, 0.961)
  verdict, numbers = study.paired_interval(seeded_cells(a3, b3, 10_000), "acc", "norm=a",
                                           "norm=b")
  assert verdict == "supported" and numbers["se_image"] == pytest.approx(0.0021540, rel=1e-4)
  lo, hi = numbers["interval"]
  for margin, want in ((lo - 1e-4, "supported"), (lo + 1e-4, "inconclusive"),
                       (hi + 1e-4, "refuted")):
    assert study.paired_interval(seeded_cells(a3, b3, 10_000), "acc", "norm=a", "norm=b",
                                 margin=margin)[0] == want
  one = study.paired_interval(seeded_cells((0.99,), (0.5,)), "acc", "norm=a", "norm=b")
  assert one[0] == "inconclusive" and one[1]["reason"] == "fewer than 2 seed pairs"
  missing = study.paired_interval(seeded_cells((0.9, None), (0.5, 0.6)), "acc", "norm=a",
                                  "norm=b")
  assert missing[0] == "inconclusive" and "acc of 'norm=a' at seed 1 is None" in \
      missing[1]["reason"]


def test_a_tie_is_no_difference_and_equivalent():
  # Identical runs: d = 0 on every seed, both noises 0.
  verdict, numbers = study.paired_interval(seeded_cells(B, B), "acc", "norm=a", "norm=b")
  assert verdict == "inconclusive" and numbers["p"] == 1.0
  assert numbers["interval"] == [0.0, 0.0]
  verdict, numbers = study.equivalent(seeded_cells(B, B), "acc", "norm=a", "norm=b",
                                      margin=1e-9)
  assert verdict == "supported" and numbers["p"] == 0.0


def test_a_collapsed_seed_is_a_failure_the_rule_counts_not_a_number():
  # Seed 2 of b collapsed to chance (0.1): as a number it makes d bimodal (.01, .012, .88)
  # and the interval uninformative; with fails="collapsed" the pair is left out and counted.
  a, b = (0.98, 0.982, 0.98), (0.97, 0.97, 0.10)
  rows = [{"norm": n, "lr": 1, "seed": i, "acc": v, "collapsed": v < 0.5}
          for n, accs in (("a", a), ("b", b)) for i, v in enumerate(accs)]
  cells = study.make_cells(rows, ("norm", "lr"), ["acc", "collapsed"])
  assert study.paired_interval(cells, "acc", "norm=a", "norm=b")[0] == "inconclusive"
  verdict, numbers = study.paired_interval(cells, "acc", "norm=a", "norm=b", fails="collapsed")
  # d = (.01, .012): mean .011, sd .0014142, se .001, t_0.975,1 = 12.7062: half .0127062.
  assert numbers["failed"] == {"a": 0, "b": 1, "pairs_left_out": [2]}
  assert numbers["seeds"] == [0, 1] and numbers["difference"] == pytest.approx(0.011)
  assert numbers["interval"] == pytest.approx([0.011 - 0.0127062, 0.011 + 0.0127062], rel=1e-5)
  assert verdict == "inconclusive"
  rows[5]["collapsed"] = rows[4]["collapsed"] = True  # two pairs out: fewer than 2 left
  cells = study.make_cells(rows, ("norm", "lr"), ["acc", "collapsed"])
  verdict, numbers = study.paired_interval(cells, "acc", "norm=a", "norm=b", fails="collapsed")
  assert verdict == "inconclusive"
  assert numbers["reason"] == "fewer than 2 seed pairs that trained"


def test_a_series_is_judged_on_its_window_mean():
  # Runs evaluated at steps 0, 10, 20; a is above b by .2 from step 10 (plus seed / 100 on
  # both). Window from step 5: per run the mean of steps 10 and 20.
  def curve(norm, seed, v):
    up = 0.2 if norm == "a" else 0.0
    return [[0, 0.1 + seed / 100], [10, v + up + seed / 100], [20, v + up + seed / 50]]
  cells = seeded_cells((0.5, 0.6, 0.7), (0.5, 0.6, 0.7), None, curve)
  verdict, numbers = study.paired_interval(cells, "curve", "norm=a", "norm=b", from_step=5)
  assert verdict == "supported" and numbers["difference"] == pytest.approx(0.2)
  # The whole series: d = (.2 + .2 + 0) / 3 per seed, still a constant: supported.
  assert study.paired_interval(cells, "curve", "norm=a", "norm=b")[1]["difference"] == \
      pytest.approx(0.4 / 3)
  # Only step 0: a tie.
  assert study.paired_interval(cells, "curve", "norm=a", "norm=b", to_step=5)[1]["p"] == 1.0
  # Different steps in the window: not comparable.
  def uneven(norm, seed, v):
    return [[0, 0.1], [10 if norm == "a" else 12, v]]
  cells = seeded_cells((0.5, 0.6), (0.5, 0.6), None, uneven)
  verdict, numbers = study.paired_interval(cells, "curve", "norm=a", "norm=b")
  assert verdict == "inconclusive" and "different steps" in numbers["reason"]


def test_a_series_window_takes_its_per_image_results_along():
  # Two evaluations in the window; per seed and image the fraction right over them.
  bits = {("a", 0): ([1, 1, 0, 0], [1, 1, 1, 0]), ("a", 1): ([1, 0, 1, 1], [1, 1, 1, 1]),
          ("b", 0): ([1, 0, 0, 0], [1, 0, 1, 0]), ("b", 1): ([1, 0, 1, 0], [1, 0, 1, 1])}
  rows = [{"norm": n, "lr": 1, "seed": i, "n_test": 4,
           "curve": [[10, sum(bits[n, i][0]) / 4], [20, sum(bits[n, i][1]) / 4]],
           "per_image": {"curve": [[10, per_image.encode(np.asarray(bits[n, i][0], bool))],
                                   [20, per_image.encode(np.asarray(bits[n, i][1], bool))]]}}
          for n in "ab" for i in range(2)]
  cells = study.make_cells(rows, ("norm", "lr"), ["curve"])
  # Window means a - b per image: seed 0 ((1,1,.5,0) - (1,0,.5,0)) = (0,1,0,0); seed 1
  # ((1,.5,1,1) - (1,0,1,.5)) = (0,.5,0,.5). D = (0,.75,0,.25): mean .25, sd
  # sqrt((.0625 + .25 + .0625 + 0) / 3) = .3535534, se_image .1767767.
  numbers = study.paired_interval(cells, "curve", "norm=a", "norm=b")[1]
  assert numbers["noise"] == "per-image, paired"
  assert numbers["se_image"] == pytest.approx(0.1767767, rel=1e-6)


def test_equivalent_inside_the_margin_is_supported():
  # d = (0.001, 0.002, 0.003): mean 0.002, sd 0.001; half = 2.919986 x 0.001 / sqrt(3)
  # = 2.919986 x 0.00057735 = 0.00168585: interval [0.00031415, 0.00368585], inside +-0.004.
  verdict, numbers = judge((0.501, 0.502, 0.503), B, 0.004)
  assert verdict == "supported"
  assert numbers["difference"] == pytest.approx(0.002)
  assert numbers["se_seed"] * 2.919986 == pytest.approx(0.00168585, rel=1e-5)  # t_0.95,2
  assert numbers["interval"] == pytest.approx([0.00031415, 0.00368585], rel=1e-4)
  assert (numbers["margin"], numbers["n"], numbers["seeds"]) == (0.004, 3, [0, 1, 2])
  assert numbers["se_image"] == 0.0 and "reason" not in numbers
  assert numbers["noise"] == "none (not a test accuracy)"
  # The 90% interval, not the 95% one: t_0.975,2 = 4.302653 would reach 0.002 + 0.00248414
  # = 0.00448 > 0.004. Five seeds, d = (0, 1, 2, 3, 4) x 0.001: mean 0.002, sd sqrt(2.5) x
  # 0.001 = 0.00158114; half = 2.131847 x 0.00158114 / sqrt(5) = 0.00150745.
  verdict, numbers = judge((0.5, 0.501, 0.502, 0.503, 0.504), B + (0.5, 0.5), 0.0036)
  assert verdict == "supported"
  assert numbers["interval"] == pytest.approx([0.00049255, 0.00350745], rel=1e-4)


def test_a_difference_beyond_the_margin_is_refuted():
  # d = (0.010, 0.011, 0.012): mean 0.011, sd 0.001, half 0.00168585 (as above):
  # interval [0.00931415, 0.01268585], wholly above +0.005.
  a = (0.510, 0.511, 0.512)
  verdict, numbers = judge(a, B, 0.005)
  assert verdict == "refuted"
  assert numbers["interval"] == pytest.approx([0.00931415, 0.01268585], rel=1e-5)
  assert judge(a, B, 0.0093)[0] == "refuted"  # lower end 0.009314 >= 0.0093
  assert judge(B, a, 0.005)[0] == "refuted"  # b - a: [-0.01268585, -0.00931415], below -0.005
  # margin 0.0094: the interval crosses +0.0094, so neither equivalence nor a difference >= m.
  verdict, numbers = judge(a, B, 0.0094)
  assert verdict == "inconclusive" and numbers["reason"] == "the interval crosses +0.0094"


def test_an_interval_straddling_the_margin_is_inconclusive():
  # [0.00031415, 0.00368585] from the first test crosses +0.003.
  verdict, numbers = judge((0.501, 0.502, 0.503), B, 0.003)
  assert verdict == "inconclusive" and numbers["reason"] == "the interval crosses +0.003"
  verdict, numbers = judge(B, (0.501, 0.502, 0.503), 0.003)
  assert verdict == "inconclusive" and numbers["reason"] == "the interval crosses -0.003"
  # Seeds that disagree: d = (-0.01, 0, 0.01), sd 0.01, half 2.919986 x 0.01 / sqrt(3) =
  # 0.0168585: [-0.0168585, 0.0168585] crosses both sides of +-0.005.
  verdict, numbers = judge((0.49, 0.5, 0.51), B, 0.005)
  assert verdict == "inconclusive"
  assert numbers["reason"] == "the interval crosses -0.005 and +0.005"
  assert numbers["interval"] == pytest.approx([-0.0168585, 0.0168585], rel=1e-5)


def test_one_seed_or_a_diverged_seed_is_inconclusive():
  verdict, numbers = judge((0.99,), (0.5,), 0.01)
  assert verdict == "inconclusive"
  assert numbers["interval"] is None and numbers["n"] == 1
  assert numbers["reason"] == "fewer than 2 seed pairs"
  verdict, numbers = judge((0.9, math.nan, 0.91), (0.9, 0.9, 0.9), 0.01)
  assert verdict == "inconclusive"
  assert numbers["reason"] == "acc of 'norm=a' at seed 1 is nan"
  assert judge((0.9, 0.91), (0.9, None), 0.01)[1]["reason"] == "acc of 'norm=b' at seed 1 is None"
  assert judge((0.9, 0.91), (0.9, 0.9), 0.01, b="norm=c")[1]["missing"] == \
      "a pair of acc values of 'norm=a' and 'norm=c'"


def test_holm_corrects_the_primaries_together():
  # p = (.01, .04, .03, .2) at family level .05: sorted .01 <= .05/4 = .0125 rejected; .03 >
  # .05/3 = .0167 stops: only the first stands.
  assert intervals.holm([0.01, 0.04, 0.03, 0.2]) == [True, False, False, False]
  assert intervals.holm([0.01, 0.012, 0.02]) == [True, True, True]  # .01<.0167, .012<.025
  verdicts = [{"primary": True, "verdict": "supported", "numbers": {"p": 0.01}},
              {"primary": True, "verdict": "supported", "numbers": {"p": 0.03}},
              {"primary": False, "verdict": "supported", "numbers": {"p": 0.03}},
              {"primary": True, "verdict": "inconclusive", "numbers": {"p": 0.3}}]
  out = rules_lib.correct_primaries(verdicts)
  assert [v.get("corrected") for v in out] == ["supported", "inconclusive", None,
                                               "inconclusive"]
  assert out[0]["family"] == 3


def test_detectable_effect_at_80_percent_power():
  # (z_0.975 + z_0.8) x se = (1.959964 + 0.841621) x .01 = .0280158; with 2 df
  # (t_0.975,2 + t_0.8,2) = 4.302653 + 1.060660 = 5.363313.
  assert intervals.detectable(0.01, math.inf) == pytest.approx(0.0280158, rel=1e-5)
  assert intervals.detectable(1.0, 2) == pytest.approx(5.363313, rel=1e-6)


def test_the_report_states_the_rule_and_its_numbers():
  claims = {"level": {"statement": "s", "rule": "equivalent", "metric": "acc", "a": "norm=a",
                      "b": "norm=b", "margin": 0.004}}
  [verdict] = study.judge(claims, seeded_cells((0.501, 0.502, 0.503), B))
  assert (verdict["rule"], verdict["verdict"]) == ("equivalent", "supported")
  assert "margin: 0.004; interval: [0.0003141, 0.003686]" in report_lib._numbers(
      verdict["numbers"])
  assert report_lib._rule_text(claims["level"]).startswith(
      "`equivalent(metric='acc', a='norm=a', b='norm=b', margin=0.004)`: Supported when "
      "mean(a - b)'s 90% interval is inside ±margin, refuted when wholly outside it. Two ")


def claim_config(**params):
  s = study.base_config()
  s.metrics = {"acc": ("summary", "test_accuracy")}
  s.claims = {"level": {"statement": "s", "rule": "equivalent", "metric": "acc",
                        "a": "norm=a", "b": "norm=b", **params}}
  return s


@pytest.mark.parametrize("params, got", [
    ({}, "got none"), ({"margin": 0.0}, "got 0.0"), ({"margin": -0.01}, "got -0.01"),
    ({"margin": "0.01"}, "got '0.01'"), ({"margin": math.inf}, "got inf")])
def test_validate_refuses_a_missing_or_non_positive_margin(params, got):
  with pytest.raises(config_lib.ConfigError,
                     match=rf"^study config claims\.level: rule 'equivalent' needs margin > 0, "
                           rf".*\(e\.g\. margin=0\.005.*{got}$"):
    study.validate(claim_config(**params))


def test_validate_accepts_a_margin_and_the_rule_refuses_none():
  study.validate(claim_config(margin=0.005))
  study.validate(claim_config(margin=1, other="acc"))
  with pytest.raises(config_lib.ConfigError, match="unexpected keyword argument 'higher'"):
    study.validate(claim_config(margin=0.005, higher=False))
  with pytest.raises(ValueError, match="needs margin > 0"):
    judge(B, B, 0.0)


def test_within_keeps_each_to_the_named_cells():
  """A claim `within` two of three rates is judged at those two only, and its family of
  primaries is only those verdicts."""
  cells = study.make_cells(
      [{"norm": n, "lr": lr, "seed": s, "acc": 0.9 + (0.01 * s if n == "bn" else 0) + lr / 100}
       for n in ("bn", "no") for lr in (1, 10, 100) for s in range(4)],
      ("norm", "lr"), ["acc"])
  claim = {"statement": "BN above.", "rule": "paired_interval", "metric": "acc",
           "a": "norm=bn", "b": "norm=no", "each": ("lr",), "primary": True}
  every = study.judge({"c": claim}, cells)
  some = study.judge({"c": {**claim, "within": ("lr=1", "lr=100")}}, cells)
  assert [v["where"] for v in every] == ["lr=1", "lr=10", "lr=100"]
  assert [v["where"] for v in some] == ["lr=1", "lr=100"] and some[0]["family"] == 2
  assert [v["numbers"] for v in some] == [every[0]["numbers"], every[2]["numbers"]]
