"""The `equivalent` claim rule (two one-sided tests) against numbers worked out by hand.

Each expected interval is computed in the comments from the t quantiles below, not by the
formula under test: d = a - b per seed, half-width t_0.95,n-1 x sd(d) / sqrt(n), and for test
accuracies at least paired_interval's 1.96 x sqrt(se_a^2 + se_b^2).
"""

import math

import pytest

from bnlab import config as config_lib
from bnlab import study
from bnlab.study import report as report_lib
from test_study import seeded_cells

T95_2 = 2.919986  # t_0.95 with 2 degrees of freedom (3 seeds)
T95_4 = 2.131847  # t_0.95 with 4 degrees of freedom (5 seeds)
B = (0.5, 0.5, 0.5)  # cell b: a constant, so d_i = a_i - 0.5


def judge(acc_a, acc_b, margin, n_test=None, a="norm=a", b="norm=b"):
  return study.equivalent(seeded_cells(acc_a, acc_b, n_test), "acc", a, b, margin=margin)


def test_equivalent_inside_the_margin_is_supported():
  # d = (0.001, 0.002, 0.003): mean 0.002, sd 0.001; half = 2.919986 x 0.001 / sqrt(3)
  # = 2.919986 x 0.00057735 = 0.00168585: interval [0.00031415, 0.00368585], inside +-0.004.
  verdict, numbers = judge((0.501, 0.502, 0.503), B, 0.004)
  assert verdict == "supported"
  assert numbers["difference"] == pytest.approx(0.002)
  assert numbers["t90"] == pytest.approx(0.00168585, rel=1e-5)
  assert numbers["interval"] == pytest.approx([0.00031415, 0.00368585], rel=1e-4)
  assert (numbers["margin"], numbers["n"], numbers["seeds"]) == (0.004, 3, [0, 1, 2])
  assert numbers["binomial95"] is None and "reason" not in numbers
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


def test_the_test_sets_noise_widens_the_interval_as_in_paired_interval():
  # d = (-0.001, 0, 0.001): mean 0, half from the seeds 0.00168585. Both means 0.98 on
  # 10,000 images: se = sqrt(0.98 x 0.02 / 10,000) = 0.0014, and paired_interval's noise
  # 1.959964 x sqrt(2) x 0.0014 = 0.00388053 is the larger: interval +-0.00388053.
  a, b = (0.979, 0.980, 0.981), (0.980, 0.980, 0.980)
  verdict, numbers = judge(a, b, 0.005, n_test=10_000)
  assert verdict == "supported"
  assert numbers["binomial95"] == pytest.approx(0.00388053, rel=1e-5)
  assert numbers["interval"] == pytest.approx([-0.00388053, 0.00388053], rel=1e-5)
  # At 0.0035 the seeds alone (+-0.00169) would say equivalent, and so would TOST's 90% of the
  # noise (1.644854 x 0.0019799 = 0.0032566); the 95% noise (0.00388) does not.
  assert judge(a, b, 0.0035)[0] == "supported"
  assert judge(a, b, 0.0035, n_test=10_000)[0] == "inconclusive"


def test_one_seed_or_a_diverged_seed_is_inconclusive():
  verdict, numbers = judge((0.99,), (0.5,), 0.01)
  assert verdict == "inconclusive"
  assert numbers == {"seeds": [0], "mean_a": 0.99, "mean_b": 0.5, "difference": 0.49,
                     "t90": None, "binomial95": None, "interval": None, "margin": 0.01, "n": 1,
                     "reason": "fewer than 2 seeds"}
  verdict, numbers = judge((0.9, math.nan, 0.91), (0.9, 0.9, 0.9), 0.01)
  assert verdict == "inconclusive"
  assert numbers == {"missing": "a pair of acc values of 'norm=a' and 'norm=b'",
                     "reason": "acc of 'norm=a' at seed 1 is nan"}
  assert judge((0.9, 0.91), (0.9, None), 0.01)[1]["reason"] == "acc of 'norm=b' at seed 1 is None"
  assert judge((0.9, 0.91), (0.9, 0.9), 0.01, b="norm=c") == (
      "inconclusive", {"missing": "a pair of acc values of 'norm=a' and 'norm=c'"})
  verdict, numbers = study.equivalent(seeded_cells(B, B), "curve", "norm=a", "norm=b",
                                      margin=0.01)
  assert verdict == "inconclusive" and "series" in numbers["reason"]


def test_the_report_states_the_rule_and_its_numbers():
  claims = {"level": {"statement": "s", "rule": "equivalent", "metric": "acc", "a": "norm=a",
                      "b": "norm=b", "margin": 0.004}}
  [verdict] = study.judge(claims, seeded_cells((0.501, 0.502, 0.503), B))
  assert (verdict["rule"], verdict["verdict"]) == ("equivalent", "supported")
  assert report_lib._numbers(verdict["numbers"]).endswith(
      "interval: [0.0003141, 0.003686]; margin: 0.004; n: 3")
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
