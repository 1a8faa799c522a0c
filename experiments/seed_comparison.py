"""Study 1: the seed comparison, the Keras tutorial CNN with and without BN.

  python experiments/seed_comparison.py --workdir=runs/seed [--epochs=20] [--fair]

The seed's setup: BN at SGD lr 0.01 against no BN at lr 0.001, batch 32.
`--fair` adds the comparison the seed omits: both models at both learning
rates. Writes report.md, train_loss.png and results.json into --workdir; each
run lives in its own sub-directory, so an interrupted study resumes.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from bnlab import workdir as workdir_lib  # noqa: E402
from configs import seed_cnn  # noqa: E402
from experiments import study  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/seed_comparison", "Output directory.")
_EPOCHS = flags.DEFINE_integer("epochs", 20, "Training epochs per run (the seed: 20).")
_FAIR = flags.DEFINE_bool("fair", False, "Also run both models at both learning rates.")
_SOURCE = flags.DEFINE_string("data_source", "embedded", "bnlab.data source.")


def members(fair: bool):
  """(name, variant, learning rate) of every run of the study."""
  out = [("BN, lr 0.01", "bn", 0.01), ("no BN, lr 0.001", "nobn", 0.001)]
  if fair:
    out += [("BN, lr 0.001", "bn", 0.001), ("no BN, lr 0.01", "nobn", 0.01)]
  return out


def main(argv):
  del argv
  workdir_lib.quiet_library_logs()
  timer = study.Timer()
  os.makedirs(_WORKDIR.value, exist_ok=True)
  results = {}
  for name, variant, lr in members(_FAIR.value):
    cfg = seed_cnn.get_config(variant)
    cfg.optimizer.learning_rate = lr
    cfg.train.num_epochs = _EPOCHS.value
    cfg.data.source = _SOURCE.value
    wd = os.path.join(_WORKDIR.value, f"{variant}_lr{lr:g}")
    logging.info("Running %s in %s", name, wd)
    summary = study.run(cfg, wd)
    results[name] = {"summary": summary,
                     "train_loss": study.epoch_curve(study.read_metrics(wd)),
                     "train_accuracy": study.epoch_curve(study.read_metrics(wd), "train_accuracy")}
  write_report(results, _WORKDIR.value, _EPOCHS.value, timer.minutes())
  print(open(os.path.join(_WORKDIR.value, "report.md")).read())


def write_report(results: dict, out: str, epochs: int, minutes: float) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for name, r in results.items():
    curve = r["train_loss"]
    ax.plot(range(1, len(curve) + 1), curve, marker="o", ms=3, label=name,
            ls="-" if name.startswith("BN") else "--")
  ax.set_xlabel("epoch")
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.set_ylabel("training loss (epoch mean)")
  ax.set_yscale("log")
  ax.set_title("Seed CNN on MNIST, SGD, batch 32")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "train_loss.png"), dpi=120)
  plt.close(fig)

  seed_pair = [results.get("BN, lr 0.01"), results.get("no BN, lr 0.001")]
  lines = [f"# Seed comparison: seed CNN with and without BN ({epochs} epochs)", "",
           "Keras tutorial CNN (Conv32-MaxPool-Conv64-Flatten-[BN]-Dense64-Dense10), SGD, "
           "batch 32, full MNIST (60,000 train / 10,000 test), Keras' initialisers and BN "
           "defaults (momentum 0.99, epsilon 1e-3).", "",
           "![training loss](train_loss.png)", "",
           "| run | final train loss (last epoch mean) | train accuracy (last epoch mean) | "
           "train accuracy (full set, eval mode) | test accuracy |",
           "|---|---|---|---|---|"]
  for name, r in results.items():
    s = r["summary"]
    lines.append(f"| {name} | {r['train_loss'][-1]:.4f} | {r['train_accuracy'][-1]:.4f} | "
                 f"{s.get('full_train_accuracy', float('nan')):.4f} | "
                 f"{s.get('test_accuracy', float('nan')):.4f} |")
  if all(seed_pair):
    bn, nobn = seed_pair[0]["train_loss"], seed_pair[1]["train_loss"]
    below = [a < b for a, b in zip(bn, nobn)]
    verdict = ("reproduced" if all(below) else
               f"NOT reproduced at epochs {[i + 1 for i, b in enumerate(below) if not b]}")
    lines += ["", f"**Seed claim, BN's training loss below no-BN's at every epoch:** {verdict} "
              f"(BN {', '.join(f'{x:.3f}' for x in bn)}; no BN "
              f"{', '.join(f'{x:.3f}' for x in nobn)})."]
  run_minutes = sum(r["summary"].get("wall_time", 0.0) for r in results.values()) / 60
  backend = results[next(iter(results))]["summary"]["versions"]["backend"]
  lines += ["", f"Wall time of this study: {run_minutes:.1f} min, the sum of its runs' own wall "
            f"times ({backend}); this invocation took {minutes:.1f} min (finished runs are "
            "read, not repeated)."]
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
