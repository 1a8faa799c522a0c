"""Does BN let the ReLU paper MLP train at learning rates where it fails without BN?

The paper MLP (784-100-100-100-10, batch 60, LeCun normal init) with ReLU, BN before
every activation vs none, plain SGD at a constant rate, 50,000 steps, 10 seeds. A run
*fails* when it diverges (NaN/inf loss), collapses (a finite loss > 10x its minimum and
above chance, or test accuracy <= 0.2 after >= 0.5: bnlab.engine.collapse.CollapseWatch) or ends
below 0.2. BN is evaluated with its running averages and with population statistics
recomputed over 10,000 training images (Algorithm 2).

Run:    python -m bnlab.study --config=configs/studies/relu_lr.py --workdir=runs/relu_lr
Smoke:  ...relu_lr.py:runlocal (lr 0.1 and 3, 1 seed, 30 steps)
Budget: 140 runs x 50,000 steps, two vmapped groups of 70 (at 3 seeds: 42 runs, two
        groups of 21). No claim is primary: wins_above_best is not a test (no p-value). Timed on a busy 2-core CPU
        (600 steps, full MNIST): 130 group steps/s with BN, 134 without, so ~6.5 min
        of training per group; with 20 evaluations and population statistics (~0.6 s a
        round) and compiles, ~15 min on CPU. One GPU: estimated under 5 min (not timed).
Expected (written before any run): high_rates supported (without BN lr 3 blew up at step
        12 in an earlier run, with BN it reached 98.4%); high_rates_population supported.
Measured (NVIDIA H200, commit 1d4e03d, six other studies and the test suite sharing the
        machine): 1.7 min; both supported (with BN 98.3% at lr 1 and 3 on every seed;
        without BN at lr 1 one run collapsed, one never trained, one diverged).
"""

from bnlab import study
from bnlab import sweep

RATES = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
STALLED_BELOW, TRAINED_AT_LEAST = 0.2, 0.9
NOTES = f"""
Verdicts use divergence *and* collapse. *trained*: final test accuracy >= {TRAINED_AT_LEAST}
with the running averages (*trained_population*: with Algorithm 2's population
statistics, 10,000 training images in batches of 60, variance times 60/59); *stalled*:
not diverged and final test accuracy < {STALLED_BELOW} (chance ~0.10). A collapsed run keeps
training (it may recover), and counts as failed either way. Without BN the two
statistics are the same (there are none), so high_rates and high_rates_population
differ only where the choice of BN statistics changes the verdict.
"""


def get_config(arg=None):
  local = study.parse_arg(arg, runlocal=False).runlocal
  s = study.base_config()
  s.title = "ReLU MLP: learning rates with and without BN (divergence and collapse)"
  s.run.config = "configs/paper_mlp.py"
  every = 15 if local else 2_500
  s.run.overrides.model = {"activation": "relu"}
  s.run.overrides.train = {
      "num_steps": 30 if local else 50_000, "eval_every_steps": every,
      "log_every_steps": 5 if local else 500, "eval_statistics": ("running", "population"),
      "population_examples": 10_000}
  s.cells = ("model.norm", "optimizer.learning_rate")
  s.metrics = {
      "final_acc": ("summary", "test_accuracy"),
      "final_acc_population": ("summary", "test_accuracy_population"),
      "diverged": ("diverged",),
      "collapsed": ("collapsed",),
      "collapsed_at": ("collapsed_at",),
      "stalled": ("below", "final_acc", STALLED_BELOW),
      "trained": ("at_least", "final_acc", TRAINED_AT_LEAST),
      "trained_population": ("at_least", "final_acc_population", TRAINED_AT_LEAST),
      "failed": ("any", "diverged", "collapsed", "stalled"),
      "test_acc_curve": ("series", "test_accuracy")}
  s.tables = {"final": {
      "metrics": ("final_acc", "final_acc_population", "diverged", "collapsed", "stalled"),
      "by": ("optimizer.learning_rate",), "across": "model.norm"}}
  s.figures = {
      **{name: {"kind": "final_vs", "metric": name, "x": "optimizer.learning_rate",
                "hue": ("model.norm",), "logx": True}
         for name in ("final_acc", "final_acc_population")},
      "curves": {"kind": "curves", "metric": "test_acc_curve",
                 "panels": ("optimizer.learning_rate",)}}
  rule = {"rule": "wins_above_best", "metric": "final_acc", "along": "optimizer.learning_rate",
          "treat": "model.norm=batch", "base": "model.norm=none", "fails": "failed"}
  said = ("Above the rate at which no BN reaches its best seed-mean final test accuracy, "
          "there is a rate where every no-BN seed diverges, collapses or stalls and every "
          "BN seed ends at >= 90% test accuracy with ")
  s.claims = {
      "high_rates": {"statement": said + "its running averages.", "trains": "trained", **rule},
      "high_rates_population": {"statement": said + "population statistics (Algorithm 2).",
                                "trains": "trained_population", **rule}}
  s.labels = {"batch": "BN", "none": "no BN", "final_acc": "final test acc (running)",
              "final_acc_population": "final test acc (population)",
              "learning_rate": "learning rate"}
  s.notes = NOTES
  return s


def get_sweep(arg=None):
  local = study.parse_arg(arg, runlocal=False).runlocal
  return sweep.product(sweep.axis("model.norm", ["batch", "none"]),
                       sweep.axis("optimizer.learning_rate", (0.1, 3.0) if local else RATES),
                       sweep.seeds(1 if local else 10))
