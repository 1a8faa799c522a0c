"""BN's train/eval gap, defined and registered: the same weights, the same images, three ways.

small_batches measured BN's train/eval gap in claims added after its runs (seeds 0-9): the
final weights of the ReLU paper MLP scored on one fixed sample of 10,000 training images
with batch statistics (batches of the training size), with the running averages and with
population statistics (`bnlab.study.train_gap`). Batch statistics scored *lower* than the
running averages at batch 2-128 (-6.3 points at batch 2, -12.9 at 4, -0.07 at 128). Here
that is registered before the runs and tested on 10 new seeds, 10-19 (seeds 0-9 would
repeat small_batches' runs exactly): the ReLU paper MLP (norm before every activation,
LeCun normal init, SGD at lr 0.1, 10,000 steps) with BN at batch 2, 4, 8, 32 and 128, and
LayerNorm and GroupNorm (4 groups) at batch 2 as zero-gap controls (no batch statistics:
the three ways are one computation).

Run:    python -m bnlab.study --config=configs/studies/train_gap.py --workdir=runs/train_gap
Smoke:  ...train_gap.py:runlocal (batch 2 and 32, 2 seeds, 30 steps)
Budget: 7 cells x 10 seeds = 70 runs of 10,000 steps in 7 vmapped groups, then the
        measurement (each run's final weights on 10,000 training images, three ways):
        about 10-15 min on the 2-core CPU.
Primary: bn_batch_vs_running at each BN batch size (5 tests, Holm-corrected together).
        bn_batch_vs_population and bn_gap_above_layer_at_2 are secondary.
Expected (written before any run): bn_batch_vs_running refuted (batch statistics lower) at
        every size, as in small_batches; bn_batch_vs_population refuted at 4-128 and
        inconclusive at 2; bn_gap_above_layer_at_2 refuted.
Measured (results/train_gap, 2026-12-07): 2.7 min on the 2-core CPU; every verdict as
        expected (batch - running: -10.1 points at batch 2, -12.9 at 4, -0.07 at 128).
"""

import os

from bnlab import study
from bnlab import sweep

SIZES, CONTROLS, SEEDS = (2, 4, 8, 32, 128), ("layer", "group"), range(10, 20)
# small_batches, whose measurement, sample and metrics this study shares.
SMALL = sweep.load_config_file(os.path.join(os.path.dirname(__file__), "small_batches.py"))
SAMPLE, WAYS = SMALL.SAMPLE, SMALL.WAYS


def get_config(arg=None):
  local = study.parse_arg(arg, runlocal=False).runlocal
  s = study.base_config()
  s.title = "BN's train/eval gap: the same weights on the same training images, three ways"
  s.run.config = "configs/paper_mlp.py"
  s.run.overrides.model = {"activation": "relu"}
  s.run.overrides.optimizer = {"learning_rate": 0.1}
  s.run.overrides.train = {"num_steps": 30 if local else 10_000,
                           "eval_every_steps": 15 if local else 2_500,
                           "log_every_steps": 15 if local else 2_500}
  s.cells = ("model.norm", "train.batch_size")
  s.metrics = {"final_acc": ("summary", "test_accuracy"),
               "diverged": ("diverged",), "collapsed": ("collapsed",),
               "failed": ("any", "diverged", "collapsed"), **SMALL.gap_metrics()}
  s.measurements = {"train_gap": {"kind": "train_gap", "examples": 320 if local else 10_000,
                                  "seed": 0}}
  s.tables = {"train_gap": {"metrics": ("gap_running", "gap_population", "final_acc"),
                            "by": ("train.batch_size",), "across": "model.norm"},
              "train_scores": {"metrics": tuple(f"train_acc_{k}" for k in ("batch", *WAYS)),
                               "by": ("train.batch_size",), "across": "model.norm"}}
  s.figures = {"gap_running": {"kind": "final_vs", "metric": "gap_running",
                               "x": "train.batch_size", "hue": ("model.norm",), "logx": True}}
  s.claims = {
      **{f"bn_batch_vs_{k}": {
          "statement": f"BN's final weights classify {SAMPLE} more accurately with batch "
                       "statistics (train mode, batches of the training size, in a fixed "
                       f"order) than with {said} (supported when above, refuted when below).",
          "rule": "paired_interval", "metric": "train_acc_batch", "other": f"train_acc_{k}",
          "a": "model.norm=batch", "b": "model.norm=batch", "fails": "failed",
          "primary": k == "running", "each": ("train.batch_size",)}
         for k, said in WAYS.items()},
      "bn_gap_above_layer_at_2": {
          "statement": f"At batch 2, BN's train/eval gap on {SAMPLE} (final weights, accuracy "
                       "with batch statistics minus with running averages) is above "
                       "LayerNorm's (0 by construction).",
          "rule": "paired_interval", "metric": "gap_running", "fails": "failed",
          "a": "model.norm=batch,train.batch_size=2",
          "b": "model.norm=layer,train.batch_size=2"}}
  s.labels = {"batch": "BN", "layer": "LayerNorm", "group": "GroupNorm",
              "final_acc": "final test accuracy", "batch_size": "batch size",
              "gap_running": "train/eval gap (batch - running)",
              "gap_population": "train/eval gap (batch - population)",
              **{f"train_acc_{k}": f"train-sample accuracy ({k})" for k in ("batch", *WAYS)}}
  s.notes = (f"*train_acc_batch/running/population*: the final weights' accuracy on {SAMPLE} "
             "with batch statistics at the training batch size (train mode, running "
             f"statistics not updated), with {WAYS['running']}, with {WAYS['population']}; "
             "*gap_running/population*: batch minus the other (`bnlab.study.train_gap`). "
             "Without batch statistics (LayerNorm, GroupNorm) the three are one computation: "
             "gap 0, the control. The step budget is the same at every size, so small "
             "batches see fewer examples.")
  return s


def get_sweep(arg=None):
  local = study.parse_arg(arg, runlocal=False).runlocal
  seeds = sweep.seeds(2) if local else sweep.axis("seed", SEEDS)
  sizes = (2, 32) if local else SIZES
  return (sweep.product(sweep.axis("model.norm", ["batch"]),
                        sweep.axis("train.batch_size", sizes), seeds)
          + sweep.product(sweep.axis("model.norm", CONTROLS),
                          sweep.axis("train.batch_size", [2]), seeds))
