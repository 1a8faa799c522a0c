"""The redundant bias: does a bias just before BN change anything? (Ioffe & Szegedy 2015, 3.2)

BN subtracts the batch mean, so a constant b added before it is subtracted again: in
train mode the layer's output and every other gradient are the same with and without b,
and b's own gradient is 0 (tests/test_models.py shows it in float64). What the float32
engine makes of it over 10,000 steps is measured here: the paper MLP (sigmoid, BN before
the activation, batch 60, lr 0.1) with and without the bias before each BN layer
(model.bn.bias_before), under plain SGD, SGD with momentum 0.9, and SGD with decoupled
weight decay 1e-3 on every parameter (optimizer.weight_decay_mask="all", so the bias
decays even though its gradient is 0), 10 seeds each, paired by seed.

Run:    python -m bnlab.study --config=configs/studies/bias_before_bn.py --workdir=runs/bias_before_bn
Smoke:  ...bias_before_bn.py:runlocal (2 seeds, 30 steps)
Budget: 3 optimizers x 2 x 10 seeds x 10,000 steps (one vmapped group per optimizer and
        bias setting).
Primary: same_final_sgd, same_final_momentum, same_final_decay (3 equivalence tests,
        Holm-corrected together): the final test accuracies agree within 0.2 points.
Expected (written before any run): all three supported. With SGD and momentum the bias
        never moves (its gradient is 0 up to rounding); with weight decay it shrinks toward
        0, which train mode cannot see and the running mean follows with a lag.
Amended (after the runs, no claim changed): the pre_norm_bias measurement, the largest
        |bias before BN| at the end and the largest difference of any weight or running
        statistic from the twin run without the bias (same seed), as a table.
"""

from bnlab import study
from bnlab.study import measurements as study_measurements  # noqa: F401  (registers pre_norm_bias)
from bnlab import sweep

MARGIN = 0.002  # 0.2 points of test accuracy: "the same" for these claims
HIDDEN, LAYERS, INPUTS, CLASSES = 100, 3, 784, 10
# Parameters of the paper MLP with BN before each hidden activation: kernels, BN's scale and
# bias per hidden layer, the logits' kernel and bias; the bias before BN adds HIDDEN per layer.
PARAMS = (INPUTS * HIDDEN + (LAYERS - 1) * HIDDEN * HIDDEN + LAYERS * 2 * HIDDEN
          + HIDDEN * CLASSES + CLASSES)
OPTIMIZERS = {"sgd": {},
              "momentum": {"optimizer.name": "momentum", "optimizer.momentum": 0.9},
              "decay": {"optimizer.weight_decay": 1e-3, "optimizer.weight_decay_mask": "all"}}
NOTES = f"""
Parameters: {PARAMS:,} without the bias before BN, {PARAMS + LAYERS * HIDDEN:,} with it
({LAYERS} layers x {HIDDEN}). *The same*: mean(with - without) over seed pairs, its 90%
interval inside +-{MARGIN * 100:.1f} points (`equivalent`, two one-sided tests); the curves'
claim reads each run's test accuracy averaged over its evaluations from step 500.
"""


def get_config(arg=None):
  local = study.parse_arg(arg, runlocal=False).runlocal
  s = study.base_config()
  s.title = "The redundant bias before BN: paper MLP, SGD, momentum and weight decay"
  s.run.config = "configs/paper_mlp.py"
  s.run.overrides.optimizer = {"learning_rate": 0.1}
  s.run.overrides.train = {"num_steps": 30 if local else 10_000,
                           "eval_every_steps": 10 if local else 500}
  s.cells = ("optimizer", "model.bn.bias_before")
  s.metrics = {"final_acc": ("summary", "test_accuracy"),
               "diverged": ("diverged",),
               "test_acc_curve": ("series", "test_accuracy")}
  s.measurements = {"bias": {"kind": "pre_norm_bias",
                             "partner": ("bias_before=true", "bias_before=false")}}
  s.metrics.update({k: ("measured", "bias", k)
                    for k in ("max_abs_bias", "max_abs_param_diff", "max_abs_stats_diff")})
  s.tables = {"final": {"metrics": ("final_acc", "diverged"), "by": ("optimizer",),
                        "across": "model.bn.bias_before"},
              "weights": {"metrics": ("max_abs_bias", "max_abs_param_diff",
                                      "max_abs_stats_diff"), "by": ("optimizer",),
                          "across": "model.bn.bias_before"}}
  s.figures = {"curves": {"kind": "curves", "metric": "test_acc_curve",
                          "hue": ("model.bn.bias_before",), "panels": ("optimizer",)}}
  same = {"rule": "equivalent", "margin": MARGIN, "fails": "diverged"}
  def pair(opt):
    return {"a": f"optimizer={opt},model.bn.bias_before=true",
            "b": f"optimizer={opt},model.bn.bias_before=false"}
  s.claims = {
      **{f"same_final_{opt}": {
          **same, **pair(opt), "metric": "final_acc", "primary": True,
          "statement": f"With {what}, the final test accuracy with the bias before BN is the "
                       f"same as without it (within {MARGIN * 100:.1f} points)."}
         for opt, what in (("sgd", "plain SGD"), ("momentum", "momentum 0.9"),
                           ("decay", "weight decay on every parameter"))},
      "same_curves_sgd": {
          **same, **pair("sgd"), "metric": "test_acc_curve", "from_step": 10 if local else 500,
          "statement": "With plain SGD, the test accuracy averaged over the evaluations from "
                       "step 500 is the same with and without the bias."},
  }
  s.labels = {"final_acc": "final test accuracy", "test_acc_curve": "test accuracy"}
  s.notes = NOTES
  return s


def get_sweep(arg=None):
  local = study.parse_arg(arg, runlocal=False).runlocal
  return sweep.product(sweep.variants("optimizer", OPTIMIZERS),
                       sweep.axis("model.bn.bias_before", [False, True]),
                       sweep.seeds(2 if local else 10))
