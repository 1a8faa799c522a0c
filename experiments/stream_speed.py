"""Training speed of a streamed training split (data.pipeline=grain) against the same data
held on the device (data.pipeline=device), on a generated TFDS dataset that fits both ways.

  python experiments/stream_speed.py [--model=seed_cnn] [--batch_size=128] [--steps=144] \
      [--num_train=4096] [--size=32] [--augment=none]

Writes a colour SIZE x SIZE, 10-class array_record dataset (PNG images, as cifar10's) to
a temporary TFDS data dir, trains each pipeline through `train_and_evaluate` and prints
the training examples per second of the timed train calls (compiles excluded), each the
median over the run's log intervals after the first, and their ratio.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402

from bnlab import config as config_lib  # noqa: E402
from bnlab.engine import train  # noqa: E402
import tiny_tfds  # noqa: E402

_MODEL = flags.DEFINE_string("model", "seed_cnn", "model.name")
_BATCH = flags.DEFINE_integer("batch_size", 128, "train.batch_size")
_STEPS = flags.DEFINE_integer("steps", 144, "train.num_steps (logged every steps/3)")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 4096, "Training examples generated.")
_SIZE = flags.DEFINE_integer("size", 32, "Image height and width.")
_AUGMENT = flags.DEFINE_string("augment", "none", "data.augment")


def rate(workdir: str) -> float:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  rates = [r["examples_per_sec"] for r in records if r.get("examples_per_sec")][1:]
  return statistics.median(rates)


def main(argv):
  del argv
  root = tempfile.mkdtemp(prefix="bnlab_stream_speed_")
  builder_cls = type("StreamSpeed", (tiny_tfds._Tiny,), {  # pylint: disable=protected-access
      "SHAPE": (_SIZE.value, _SIZE.value, 3), "NUM_TRAIN": _NUM_TRAIN.value,
      "NUM_TEST": 512, "__module__": tiny_tfds.__name__})
  builder_cls(data_dir=root, file_format="array_record").download_and_prepare()
  rates = {}
  for pipeline in ("device", "grain"):
    cfg = config_lib.base_config()
    cfg.data.name, cfg.data.dir, cfg.data.pipeline = "stream_speed", root, pipeline
    cfg.data.augment = _AUGMENT.value
    cfg.model.name = _MODEL.value
    cfg.train.batch_size = _BATCH.value
    cfg.train.num_steps = _STEPS.value
    cfg.train.eval_every_steps = _STEPS.value // 3
    cfg.train.log_every_steps = _STEPS.value // 6
    cfg.train.eval_at_start = cfg.train.final_train_eval = False
    cfg.train.compilation_cache = False
    workdir = os.path.join(root, f"run_{pipeline}")
    train.train_and_evaluate(cfg, workdir)
    rates[pipeline] = rate(workdir)
  print(f"Platform: {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"{os.cpu_count()} CPU cores; {_MODEL.value}, batch {_BATCH.value}, "
        f"{_SIZE.value}x{_SIZE.value}x3 images, {_NUM_TRAIN.value} training examples, "
        f"augment={_AUGMENT.value}")
  for pipeline, r in rates.items():
    print(f"{pipeline}: {r:,.0f} training examples/s")
  print(f"device / grain: {rates['device'] / rates['grain']:.2f}x")


if __name__ == "__main__":
  app.run(main)
