"""Do population statistics beat BN's running averages for the paper MLP? On 10 new seeds.

The learning-rate sweep (lr_sweep) found, in claims added after its runs (seeds 0-9), that
for the sigmoid paper MLP with BN population statistics (Algorithm 2) score 0.23-0.39
points above the running averages at lr 0.03, 0.1, 0.3 and 3, with no difference
established at 0.001-0.01 and 1; test-batch statistics were above them at 0.001 and
0.03-0.3. Here those claims are registered before the runs and tested on 10 new seeds,
10-19 (seeds 0-9 would repeat the sweep's runs exactly): the paper MLP with BN
(configs/paper_mlp.py: sigmoid, BN before it, momentum 0.99, batch 60) at the sweep's 8
rates and its 10,000 steps, every evaluation scoring the same weights with the running
averages, population statistics over 10,000 training images and each test batch's own
statistics. The seed CNN's study: inference_statistics.py.

Run:    python -m bnlab.study --config=configs/studies/inference_statistics_mlp.py --workdir=runs/inference_statistics_mlp
Smoke:  ...inference_statistics_mlp.py:runlocal (lr 0.1 and 1, 2 seeds, 20 steps, 320 images)
Budget: 80 runs x 10,000 steps in one vmapped group, an evaluation every 2,500 steps:
        about 10-20 min on the 2-core CPU.
Primary: population_vs_running at each of the 8 rates (8 tests, Holm-corrected together).
        batch_vs_running is secondary.
Expected (written before any run): population_vs_running supported at lr 0.03, 0.1, 0.3 and
        3 (Holm over 8 may leave one of them inconclusive), inconclusive at 0.001-0.01 and
        at 1; batch_vs_running supported at 0.03-0.3, inconclusive elsewhere.
Measured (results/inference_statistics_mlp, 2026-12-07): 6.8 min on the 2-core CPU;
        population_vs_running supported after Holm at lr 0.1 and 0.3 (+0.26, +0.27 points),
        at 0.03, 1 and 3 before the correction only; batch_vs_running as expected.
"""

import os

from bnlab import study
from bnlab import sweep

RATES, SEEDS, STEPS, EVERY = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0), range(10, 20), \
    10_000, 2_500
# The seed CNN's study, whose claims, metrics and tables this one shares.
CNN = sweep.load_config_file(os.path.join(os.path.dirname(__file__), "inference_statistics.py"))


def get_config(arg=None):
  local = study.parse_arg(arg, runlocal=False).runlocal
  steps, every = (20, 10) if local else (STEPS, EVERY)
  return CNN.statistics_study(
      "BN's inference statistics, the paper MLP on 10 new seeds", "configs/paper_mlp.py",
      {"num_steps": steps, "eval_every_steps": every, "log_every_steps": every,
       **CNN.evaluations(local)}, rates(local))


def rates(local: bool) -> tuple[float, ...]:
  return (0.1, 1.0) if local else RATES


def get_sweep(arg=None):
  local = study.parse_arg(arg, runlocal=False).runlocal
  return sweep.product(sweep.axis("optimizer.learning_rate", rates(local)),
                       sweep.seeds(2) if local else sweep.axis("seed", SEEDS))
