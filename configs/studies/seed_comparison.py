"""Study 1: does BN lower the seed CNN's training loss at every epoch?

The Keras tutorial CNN (Conv32-MaxPool-Conv64-Flatten-[BN]-Dense64-Dense10),
SGD, batch 32, full MNIST, Keras' initialisers and BN defaults
(configs/seed_cnn.py). The seed's pair: BN at lr 0.01 against no BN at lr
0.001; `fair` (on by default) adds both models at both learning rates.

Run:    python -m bnlab.study --config=configs/studies/seed_comparison.py --workdir=runs/seed_comparison
Quick:  python -m bnlab.study --config=configs/studies/seed_comparison.py:epochs=2,fair=false --workdir=runs/seed_quick
Smoke:  ...seed_comparison.py:runlocal (the pair, 40 steps each)
Args:   epochs=20, fair=true, runlocal.
Budget: 4 runs x 20 epochs (37,500 steps each); 41.6 min on a 2-core CPU.
Expected: seed_claim supported; matched_rates supported at lr 0.001 and 0.01.
"""

from bnlab import study
from bnlab import sweep


def _arg(arg):
  return study.parse_arg(arg, epochs=20, fair=True, runlocal=False)


def get_config(arg=None):
  a = _arg(arg)
  s = study.base_config()
  s.title = "Seed comparison: the seed CNN with and without BN"
  s.run.config = "configs/seed_cnn.py"
  s.run.overrides.train = {"num_epochs": a.epochs}
  if a.runlocal:
    s.run.overrides.train = {"num_steps": 40, "log_every_steps": 10, "eval_every_steps": 20}
  s.cells = ("model.norm", "optimizer.learning_rate")
  s.metrics = {
      "train_loss_epochs": ("epoch_means", "train_loss"),
      "final_train_loss": ("mean_over_last_epoch", "train_loss"),
      "final_train_acc": ("mean_over_last_epoch", "train_accuracy"),
      "full_train_acc": ("summary", "full_train_accuracy"),
      "test_acc": ("summary", "test_accuracy"),
  }
  s.tables = {"final": {"metrics": ("final_train_loss", "final_train_acc", "full_train_acc",
                                    "test_acc")}}
  s.figures = {"train_loss": {"kind": "curves", "metric": "train_loss_epochs", "logy": True,
                              "xlabel": "epoch"}}
  s.claims = {
      "seed_claim": {
          "statement": "At the seed's learning rates (BN 0.01, no BN 0.001), BN's training "
                       "loss (epoch mean) is below no BN's at every epoch.",
          "rule": "below_everywhere", "metric": "train_loss_epochs",
          "a": "model.norm=batch,optimizer.learning_rate=0.01",
          "b": "model.norm=none,optimizer.learning_rate=0.001"},
      "matched_rates": {
          "statement": "At the same learning rate, BN's training loss (epoch mean) is below "
                       "no BN's at every epoch.",
          "rule": "below_everywhere", "metric": "train_loss_epochs",
          "a": "model.norm=batch", "b": "model.norm=none",
          "each": ("optimizer.learning_rate",)},
  }
  s.labels = {"batch": "BN", "none": "no BN", "learning_rate": "lr",
              "train_loss_epochs": "training loss (epoch mean)",
              "final_train_loss": "final train loss (last epoch mean)",
              "final_train_acc": "train accuracy (last epoch mean)",
              "full_train_acc": "train accuracy (full set, eval mode)",
              "test_acc": "test accuracy"}
  return s


def get_sweep(arg=None):
  pairs = [("batch", 0.01), ("none", 0.001)]
  if _arg(arg).fair and not _arg(arg).runlocal:
    pairs += [("batch", 0.001), ("none", 0.01)]
  return [{"model.norm": n, "optimizer.learning_rate": lr} for n, lr in pairs]
