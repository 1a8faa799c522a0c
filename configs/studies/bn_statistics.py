"""Statistics per feature map or per activation: BN in the seed CNN, at batch 32 and 8.

The paper normalizes a convolutional layer per feature map: "each feature map will have a
single mean and standard deviation, used on all the features it contains" (64 means for
the seed CNN's second conv layer). The seed's Keras model puts its BN after Flatten, which
keeps one mean and variance per activation instead (11 x 11 x 64 = 7,744 of each).
model.bn.statistics chooses: "channel" or "activation". The seed CNN (Conv32 relu, pool,
Conv64 relu, BN, Flatten, Dense64 relu, Dense10; SGD lr 0.01) at batch 32 (the seed's) and
8 (where each of the 7,744 statistics is estimated from 8 values per step), 3 epochs, 5
seeds each, paired by seed. The train/eval gap is bnlab/study/train_gap.py's: the final
weights on the same 10,000 training images with batch statistics minus running averages.

Run:    python -m bnlab.study --config=configs/studies/bn_statistics.py --workdir=runs/bn_statistics
Smoke:  ...bn_statistics.py:runlocal (2 seeds, 20 steps, 320 evaluation images)
Budget: 2 x 2 batch sizes x 5 seeds x 3 epochs of the seed CNN (one run at a time on CPU).
Primary: channel_above_at_8 and channel_above_at_32 (2 tests, Holm-corrected together).
Expected (written before any run): channel_above_at_8 supported (per activation, each
        statistic comes from 8 values: noisy), channel_above_at_32 inconclusive;
        the gap larger (more negative) per activation at batch 8.
"""

from bnlab import study
from bnlab import sweep

SEEDS, EPOCHS, BATCHES = 5, 3, (8, 32)
FEATURES = {"channel": 64, "activation": 11 * 11 * 64}
NOTES = f"""
Statistics kept by the BN layer: {FEATURES['channel']} means and {FEATURES['channel']}
variances per channel, {FEATURES['activation']:,} of each per activation; scale and bias
have the same shapes, so the parameter count differs too ({2 * FEATURES['channel']} against
{2 * FEATURES['activation']:,} BN parameters).
"""


def get_config(arg=None):
  local = study.parse_arg(arg, runlocal=False).runlocal
  s = study.base_config()
  s.title = "BN statistics per feature map or per activation, seed CNN"
  s.run.config = "configs/seed_cnn.py"
  s.run.overrides.train = ({"num_steps": 20, "eval_every_steps": 10} if local
                           else {"num_epochs": EPOCHS, "eval_every_epochs": 1})
  s.cells = ("model.bn.statistics", "train.batch_size")
  examples = 320 if local else 10_000
  s.measurements = {"train_gap": {"kind": "train_gap", "examples": examples, "seed": 0}}
  s.metrics = {"final_acc": ("summary", "test_accuracy"),
               "diverged": ("diverged",),
               "train_acc_batch": ("measured", "train_gap", "accuracy_batch"),
               "train_acc_running": ("measured", "train_gap", "accuracy_running"),
               "gap_running": ("measured", "train_gap", "gap_running")}
  s.tables = {"final": {"metrics": ("final_acc", "train_acc_batch", "train_acc_running",
                                    "gap_running", "diverged"),
                        "by": ("train.batch_size",), "across": "model.bn.statistics"}}
  s.figures = {"final_acc": {"kind": "final_vs", "metric": "final_acc", "x": "train.batch_size",
                             "hue": ("model.bn.statistics",), "logx": True}}
  def at(per, batch):
    return f"model.bn.statistics={per},train.batch_size={batch}"
  s.claims = {
      **{f"channel_above_at_{b}": {
          "statement": f"At batch {b}, BN with statistics per feature map ends with a higher "
                       "test accuracy than with statistics per activation.",
          "rule": "paired_interval", "metric": "final_acc", "fails": "diverged",
          "primary": True, "a": at("channel", b), "b": at("activation", b)} for b in BATCHES},
      "gap_larger_per_activation_at_8": {
          "statement": "At batch 8, the train/eval gap (batch statistics minus running "
                       "averages, same weights, same training images) is lower per "
                       "activation than per feature map.",
          "rule": "paired_interval", "metric": "gap_running", "higher": False,
          "fails": "diverged", "a": at("activation", 8), "b": at("channel", 8)},
  }
  s.labels = {"final_acc": "final test accuracy", "gap_running": "train/eval gap"}
  s.notes = NOTES
  return s


def get_sweep(arg=None):
  local = study.parse_arg(arg, runlocal=False).runlocal
  return sweep.product(sweep.axis("model.bn.statistics", ["channel", "activation"]),
                       sweep.axis("train.batch_size", BATCHES),
                       sweep.seeds(2 if local else SEEDS))
