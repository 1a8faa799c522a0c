"""Keras 3 peer of the benchmark: the seed CNN or paper MLP trained with `model.fit`.

  KERAS_BACKEND=jax python experiments/keras_peer.py --data=mnist.npz \
      --model=seed_cnn --norm=batch --batch=32 --steps=150 --reps=3

Run by experiments/benchmark.py in a subprocess per Keras backend (a backend is
fixed when keras is imported). Needs only numpy and keras (plus the backend's
framework), so it can run from another environment, e.g. one with TensorFlow.
Prints one JSON line: examples/s (median of --reps timed `fit` calls of
--steps steps after a warm-up), the backend, the keras and framework versions and the device.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_rate  # noqa: E402

_DATA = flags.DEFINE_string("data", None, ".npz with uint8 'images' and 'labels'")
_MODEL = flags.DEFINE_string("model", "seed_cnn", "seed_cnn or paper_mlp")
_NORM = flags.DEFINE_enum("norm", "batch", ["batch", "none"], "normalization")
_BATCH = flags.DEFINE_integer("batch", 32, "examples per step")
_STEPS = flags.DEFINE_integer("steps", 150, "steps per timed `fit` call")
_REPS = flags.DEFINE_integer("reps", 3, "timed `fit` calls (median)")


def build(keras, model_name: str, norm: str):
  """The benchmark's models in Keras layers, matching the Flax and PyTorch peers."""
  layers = keras.layers
  if model_name == "seed_cnn":
    stack = [keras.Input((28, 28, 1)), layers.Conv2D(32, 3, activation="relu"),
             layers.MaxPooling2D(2), layers.Conv2D(64, 3, activation="relu"),
             layers.Flatten()]
    if norm == "batch":
      stack.append(layers.BatchNormalization(momentum=0.99, epsilon=1e-3))
    stack += [layers.Dense(64, activation="relu"), layers.Dense(10)]
  elif model_name == "paper_mlp":
    stack = [keras.Input((28, 28)), layers.Flatten()]
    for _ in range(3):
      stack += [layers.Dense(100, use_bias=False), layers.BatchNormalization(),
                layers.Activation("sigmoid")]
    stack.append(layers.Dense(10))
  else:
    raise SystemExit(f"--model must be seed_cnn or paper_mlp, got {model_name!r}")
  return keras.Sequential(stack)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # only warnings and errors, as Python logs by default
    logging.set_verbosity(logging.WARNING)
  import keras  # pylint: disable=g-import-not-at-top  (after KERAS_BACKEND is read)
  keras.utils.set_random_seed(0)
  with np.load(_DATA.value) as d:
    images, labels = d["images"], d["labels"].astype(np.int32)
  x_all = images.astype(np.float32) / 255.0
  if _MODEL.value == "seed_cnn":
    x_all = x_all[..., None]
  perm = np.random.default_rng(0).permutation(len(labels))
  model = build(keras, _MODEL.value, _NORM.value)
  model.compile(optimizer=keras.optimizers.SGD(0.01),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))

  def run(n):
    idx = perm[np.arange(n * _BATCH.value) % len(perm)]  # n full batches, wrapping
    model.fit(x_all[idx], labels[idx], batch_size=_BATCH.value, epochs=1, shuffle=False,
              verbose=0)

  run(_STEPS.value)  # compiles the step; later calls reuse it
  rate = median_rate(run, _STEPS.value, _BATCH.value, _REPS.value, warm_up=False)
  backend = keras.backend.backend()
  if backend == "jax":
    import jax  # pylint: disable=g-import-not-at-top
    device, framework = jax.devices()[0].device_kind, f"jax {jax.__version__}"
  elif backend == "tensorflow":
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    framework = f"tensorflow {tf.__version__}"
  else:
    device, framework = "?", backend
  print(json.dumps({"rate": rate, "backend": backend, "keras": keras.__version__,
                    "framework": framework, "device": device}))


if __name__ == "__main__":
  flags.mark_flag_as_required("data")
  app.run(main)
