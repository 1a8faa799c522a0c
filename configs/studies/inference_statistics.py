"""Which statistics should BN use at test time? The seed CNN at its full 20 epochs.

The learning-rate sweep (lr_sweep) tested BN's inference statistics directly, within the
same BN runs: population statistics (Algorithm 2) scored 0.10-0.16 points above the
running averages for the seed CNN at lr 0.003 and 0.01, and at lr 0.3 one seed's running
averages failed (+13.0 [-2.8, 28.7]). But its CNN ran 600 steps, a third of an epoch,
while the running averages (momentum 0.99) and the weights were still moving. Here the
seed CNN trains as the seed does, 20 epochs at batch 32 (37,500 steps), with BN at lr
0.01 (the seed's), 0.1 and 0.3, 5 seeds each, and every evaluation scores the same
weights three ways: running averages, population statistics over 10,000 training images,
and each test batch's own statistics. The comparisons are within runs, paired by run and
per test image.

Run:    python -m bnlab.study --config=configs/studies/inference_statistics.py --workdir=runs/inference_statistics
Smoke:  ...inference_statistics.py:runlocal (lr 0.01 and 0.3, 2 seeds, 20 steps, 320 images)
Budget: 15 runs x 37,500 steps of the seed CNN (one at a time on CPU: ~16 ms a step, about
        10 min a run, ~2.5-3 h with the evaluations on the 2-core CPU; minutes on a GPU),
        an evaluation with the three statistics every 5 epochs.
Primary: population_vs_running at each rate (3 tests, Holm-corrected together).
        batch_vs_running is secondary.
Expected (written before any run): after 20 epochs the running averages have followed the
        weights, so population_vs_running inconclusive at lr 0.01 and 0.1 (any difference
        under 0.1 points); at lr 0.3 inconclusive too, unless a seed diverges or its running
        averages fail as in the 600-step run; batch_vs_running inconclusive at lr 0.01
        and 0.1 (test batches of the evaluation batch size give statistics close to the
        population's).
Measured (results/inference_statistics, 2026-12-07): 94.7 min on the 2-core CPU; all six
        inconclusive as expected (population - running +0.04, +0.02, +0.09 points at lr 0.01,
        0.1, 0.3, each interval spanning 0); no run diverged.
"""

from bnlab import study
from bnlab import sweep

RATES, SEEDS, EVERY_EPOCHS, EXAMPLES = (0.01, 0.1, 0.3), 5, 5, 10_000
STATISTICS = ("running", "population", "batch")
FINAL = ("final_acc", "final_acc_population", "final_acc_batch")
SAID = {"population": "population statistics", "batch": "test-batch statistics"}
NOTES = f"""
Inference statistics: *running* = BN's running averages (momentum 0.99; the engine's
default); *population* = means and m/(m-1)-corrected variances averaged over the batches
of the first {EXAMPLES:,} training images with the final weights (Algorithm 2); *test
batch* = each test batch's own statistics. Each verdict compares two of them on the same
runs' final weights (paired by run; the test-set noise is paired per image). A diverged
run has no accuracy with any of them and is left out of its pair.
"""


def get_config(arg=None):
  local = study.parse_arg(arg, runlocal=False).runlocal
  evaluate = evaluations(local)
  return statistics_study(
      "BN's inference statistics, seed CNN at its full 20 epochs",
      "configs/seed_cnn.py",  # BN, momentum 0.99, batch 32, 20 epochs
      ({"num_steps": 20, "eval_every_steps": 10, **evaluate} if local
       else {"eval_every_epochs": EVERY_EPOCHS, **evaluate}), rates(local))


def evaluations(local: bool) -> dict:
  """Every evaluation scores the weights with the three statistics."""
  return {"eval_statistics": STATISTICS, "population_examples": 320 if local else EXAMPLES,
          "final_train_eval": False}


def statistics_study(title: str, run_config: str, train: dict, lrs):
  """The study of BN's inference statistics for one model, its runs at `lrs`: shared with
  `inference_statistics_mlp.py`."""
  s = study.base_config()
  s.title = title
  s.run.config = run_config
  s.run.overrides.train = train
  s.cells = ("optimizer.learning_rate",)
  s.metrics = {"final_acc": ("summary", "test_accuracy"),
               "final_acc_population": ("summary", "test_accuracy_population"),
               "final_acc_batch": ("summary", "test_accuracy_batch"),
               "diverged": ("diverged",)}
  s.labels = {"final_acc": "final test acc (running)",
              "final_acc_population": "final test acc (population)",
              "final_acc_batch": "final test acc (test batch)",
              "learning_rate": "learning rate"}
  s.tables = {"final test accuracy by BN's inference statistics": {
      "metrics": FINAL + ("diverged",), "by": (), "across": "optimizer.learning_rate"}}
  s.figures = {"final_acc_population": {
      "kind": "final_vs", "metric": "final_acc_population", "x": "optimizer.learning_rate",
      "hue": (), "logx": True}}
  s.claims = {
      f"{kind}_vs_running_at_{str(lr).replace('.', '_')}": {
          "statement": f"At lr {lr}, within the same BN runs, {SAID[kind]} score a "
                       "different final test accuracy than the running averages "
                       "(supported when above, refuted when below, inconclusive when no "
                       "difference is established).",
          "rule": "paired_interval", "metric": metric, "other": "final_acc",
          "fails": "diverged", "primary": kind == "population",
          "a": f"optimizer.learning_rate={lr:g}", "b": f"optimizer.learning_rate={lr:g}"}
      for kind, metric in zip(STATISTICS[1:], FINAL[1:]) for lr in lrs}
  s.notes = NOTES
  return s


def rates(local: bool) -> tuple[float, ...]:
  return (0.01, 0.3) if local else RATES


def get_sweep(arg=None):
  local = study.parse_arg(arg, runlocal=False).runlocal
  return sweep.product(sweep.axis("optimizer.learning_rate", rates(local)),
                       sweep.seeds(2 if local else SEEDS))
