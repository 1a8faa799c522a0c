"""The train/eval gap: a run's final weights scored on the same training images three ways.

Registered as MEASUREMENTS "train_gap" when imported (`bnlab.study` imports it).

Why: a gap read as "train-mode accuracy logged during training minus the final inference
accuracy" mixes BN's statistics with other differences (weights that moved during the log
interval, the images seen then against all of them), so models without batch statistics
show "gaps" too. Here one set of weights (the last checkpoint) scores one fixed sample of
training images, the same for every run (`spec["examples"]` drawn with `spec["seed"]`,
in that drawn order), and only the statistics that normalise change:

- "batch" (a): train-mode normalisation, each batch of the run's `train.batch_size` (in
  the sample's order) with its own statistics: the network as it trained. The running
  statistics are neither used nor updated (`evaluation.evaluate_batch_statistics`; the
  last batch overlaps the one before when the size does not divide `examples`).
- "running" (b): inference mode with the running averages, as test accuracy is read
  (`evaluation.evaluate`).
- "population" (c): statistics recomputed over the run's training batches (Algorithm 2),
  exactly as `train.eval_statistics="population"` recomputes them
  (`evaluation.evaluate_statistics`): None where that is not defined (norms other than
  "batch", or a user model; see `bnlab.config.validate`).

Values: "accuracy_{k}", "loss_{k}" and "correct_{k}" (`bnlab.rundir.per_image` bits, one
per sampled image in the sample's order, so rules pair runs per image: the metric
("measured", NAME, "accuracy_{k}") carries them) for k in batch, running, population;
"gap_running" = (a) - (b) and "gap_population" = (a) - (c); "examples", "seed",
"batch_size". A model without batch statistics (LayerNorm, GroupNorm, none) normalises the
same way in both modes, so its three scores are one computation, made once: its gaps are 0
by definition, the control against which BN's are read.
"""

from __future__ import annotations

from bnlab.rundir import per_image
from bnlab.study import measurements
from bnlab.study import registry

KINDS = ("batch", "running", "population")


def sample_indices(num_train: int, examples: int, seed: int):
  """The fixed sample: the first `examples` of a `seed`-seeded permutation of the training
  set (all of it when smaller), the same for every run on the same data."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  return np.random.default_rng(seed).permutation(num_train)[:min(examples, num_train)]


def score(cfg, params, batch_stats, images, labels, train_images, num_classes: int = 10
          ) -> dict:
  """The three scores of one state (params, batch_stats) on `images`: {kind: {"accuracy",
  "loss", "correct"} or None}. `cfg` is the run's config; `train_images` the run's
  training set (what Algorithm 2 averages over, as the engine's evaluation does);
  `num_classes` its data's."""
  import jax  # pylint: disable=g-import-not-at-top
  from bnlab.engine import evaluation  # pylint: disable=g-import-not-at-top
  from bnlab.models import networks as models  # pylint: disable=g-import-not-at-top
  dtype = models.compute_dtype(cfg.train.half_precision)
  model = models.build_model(evaluation.eval_model_config(cfg.model), dtype=dtype,
                             num_classes=num_classes)
  running = evaluation.evaluate(model.apply, params, batch_stats, images, labels,
                                batch_size=cfg.train.eval_batch_size)
  if not jax.tree.leaves(batch_stats):  # no statistics to choose between: one computation
    return dict.fromkeys(KINDS, running)
  out = {"running": running, "population": None,
         "batch": evaluation.evaluate_batch_statistics(
             model.apply, params, batch_stats, images, labels,
             batch_size=cfg.train.batch_size)}
  if cfg.model.norm == "batch" and not models.is_user_model(cfg.model.name):
    population = models.build_model(evaluation.population_model_config(cfg.model), dtype=dtype,
                                    num_classes=num_classes)
    out["population"] = evaluation.evaluate_statistics(
        "population", model.apply, population.apply, params, batch_stats, images, labels,
        train_images, batch_size=cfg.train.eval_batch_size,
        train_batch_size=cfg.train.batch_size,
        population_examples=cfg.train.population_examples, stacked=False)
  return out


def values_of(scores: dict) -> dict:
  """`score`'s results as the measurement's JSON values (accuracies, losses, bits, gaps)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = {}
  for k in KINDS:
    s = jax.device_get(scores[k])
    if s is None:
      out.update({f"accuracy_{k}": None, f"loss_{k}": None, f"correct_{k}": None})
      continue
    correct = np.asarray(s["correct"], bool)
    # The fraction of the bits (float64), not the float32 count / n: the accuracy its
    # per-image results add up to exactly.
    out[f"accuracy_{k}"] = float(np.mean(correct))
    out[f"loss_{k}"] = float(s["loss"])
    out[f"correct_{k}"] = per_image.encode(correct)
  for k in KINDS[1:]:
    other = out[f"accuracy_{k}"]
    out[f"gap_{k}"] = None if other is None else out["accuracy_batch"] - other
  return out


@registry.register(registry.MEASUREMENTS, "train_gap")
def train_gap(run_dir: str, run_cfg: dict, spec: dict) -> dict:
  """The three scores and two gaps of the run's last checkpoint on `spec["examples"]`
  training images drawn with `spec["seed"]` ({} without a checkpoint)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bnlab.engine import train  # pylint: disable=g-import-not-at-top
  steps = measurements._steps_saved(run_dir)  # pylint: disable=protected-access
  if not steps:
    return {}
  step = steps[-1]
  cfg = ml_collections.ConfigDict(run_cfg)
  ds = train.load_data(cfg)
  idx = sample_indices(len(ds.train_labels), spec["examples"], spec["seed"])
  state = measurements._restore(run_dir, step)  # pylint: disable=protected-access
  scores = score(cfg, state["params"], state.get("batch_stats") or {},
                 jnp.asarray(ds.train_images[idx]),
                 jnp.asarray(ds.train_labels[idx].astype(np.int32)),
                 jnp.asarray(ds.train_images), ds.num_classes)
  return {"step": step, "examples": len(idx), "seed": spec["seed"],
          "batch_size": cfg.train.batch_size, **values_of(scores)}
