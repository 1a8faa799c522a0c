"""bnlab.study.train_gap against numpy float64: a tiny BN MLP with hand-set weights and running
statistics scored with batch, running and population statistics; the zero-gap controls."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnlab import config as config_lib
from bnlab.engine import train
from bnlab.models import networks as models
from bnlab.rundir import per_image
from bnlab.study import metrics as metrics_lib
from bnlab.study import registry
from bnlab.study import train_gap
from run_files import final_state

EPS = 1e-5
WIDTHS = (8, 4)  # GroupNorm's 4 groups divide both


def mlp_config(norm="batch", batch_size=4):
  c = config_lib.base_config()
  c.model.name, c.model.norm, c.model.widths = "seed1_mlp", norm, WIDTHS
  c.model.bn_position = "before"  # dense (no bias) -> norm -> ReLU
  c.train.batch_size, c.train.eval_batch_size = batch_size, 3
  c.train.population_examples = 100
  return c


def hand_set(cfg, rng, inputs):
  """The model's variables with every value drawn by hand: weights, BN scale/bias, running
  mean and (positive) running variance."""
  model = models.build_model(cfg.model)
  shapes = model.init(jax.random.key(0), jnp.zeros((2, *inputs), jnp.uint8), train=False)
  def draw(path, x):
    name = path[-1].key
    if name == "var":
      return jnp.asarray(rng.uniform(0.5, 3.0, x.shape), jnp.float32)
    scale = {"kernel": 2.0, "scale": 1.0, "mean": 1.0}.get(name, 0.5)
    return jnp.asarray(rng.normal(0.0, scale, x.shape) + (name == "scale"), jnp.float32)
  v = jax.tree_util.tree_map_with_path(draw, shapes)
  return v["params"], v.get("batch_stats", {})


def numpy_logits(params, x, stats, norm="batch"):
  """Logits in float64: each BN normalises with `stats[i]` (mean, var), or with the batch's
  own statistics (None); "layer" normalises each example over its features."""
  h, seen = x.reshape(len(x), -1).astype(np.float64) / 255.0, []
  for i in range(sum(k.startswith("dense_block_") for k in params)):
    p = params[f"dense_block_{i}"]
    z = h @ np.asarray(p["Dense_0"]["kernel"], np.float64)
    if norm == "layer":
      mean, var, n = z.mean(1, keepdims=True), z.var(1, keepdims=True), p["LayerNorm_0"]
    else:
      mean, var = (z.mean(0), z.var(0)) if stats is None else stats[i]
      n = p["BatchNorm_0"]
    seen.append((z.mean(0), z.var(0)))
    h = np.maximum((z - mean) / np.sqrt(var + EPS) * np.asarray(n["scale"], np.float64)
                   + np.asarray(n["bias"], np.float64), 0.0)
  out = h @ np.asarray(params["logits"]["kernel"], np.float64) + np.asarray(
      params["logits"]["bias"], np.float64)
  return out, seen


def loss_and_correct(logits, y):
  z = logits - logits.max(1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(1, keepdims=True))
  return float(-logp[np.arange(len(y)), y].mean()), np.argmax(logits, 1) == y


def batch_logits(params, x, b, norm="batch"):
  """(a): batches of b in order, each with its own statistics; the last batch is the last b
  images, counting only those not counted before (`evaluate_batch_statistics`)."""
  n, rows = len(x), []
  for start in range(0, n, b):
    lo = min(start, n - b)
    rows.append(numpy_logits(params, x[lo:lo + b], None, norm)[0][start - lo:])
  return np.concatenate(rows)


def check(got, logits, y):
  loss, correct = loss_and_correct(logits, y)
  assert np.array_equal(np.asarray(got["correct"], bool), correct)
  assert float(got["loss"]) == pytest.approx(loss, rel=1e-5, abs=1e-6)
  return correct


@pytest.mark.parametrize("b", [4, 5])  # 5 does not divide 13: the last batch overlaps
def test_three_scores_match_numpy(b, float32_matmuls):
  rng = np.random.default_rng(7)
  cfg = mlp_config(batch_size=b)
  x = rng.integers(0, 256, (13, 4, 4), dtype=np.uint8)
  train_x = rng.integers(0, 256, (17, 4, 4), dtype=np.uint8)
  params, stats = hand_set(cfg, rng, (4, 4))
  running = [(np.asarray(stats[f"dense_block_{i}"]["BatchNorm_0"]["mean"], np.float64),
              np.asarray(stats[f"dense_block_{i}"]["BatchNorm_0"]["var"], np.float64))
             for i in range(len(WIDTHS))]
  # Algorithm 2 over the first 17 // b whole training batches of b: the mean of the batch
  # means, b/(b-1) times the mean of the (biased) batch variances.
  seen = [numpy_logits(params, train_x[i * b:(i + 1) * b], None)[1] for i in range(17 // b)]
  population = [(np.mean([s[i][0] for s in seen], 0), np.mean([s[i][1] for s in seen], 0)
                 * b / (b - 1)) for i in range(len(WIDTHS))]
  logits = {"batch": batch_logits(params, x, b), "running": numpy_logits(params, x, running)[0],
            "population": numpy_logits(params, x, population)[0]}
  # Labels that each way gets right on its own third of the images (and others by chance):
  # three accuracies that differ, none 0.
  y = np.stack([logits[k].argmax(1) for k in train_gap.KINDS])[np.arange(13) % 3,
                                                               np.arange(13)].astype(np.int32)
  got = train_gap.score(cfg, params, stats, jnp.asarray(x), jnp.asarray(y),
                        jnp.asarray(train_x))
  values = train_gap.values_of(got)
  bits = {k: check(got[k], logits[k], y) for k in train_gap.KINDS}
  for k, c in bits.items():
    assert values[f"accuracy_{k}"] == c.mean() >= 4 / 13
    assert np.array_equal(per_image.decode(values[f"correct_{k}"]), c)
  assert values["gap_running"] == bits["batch"].mean() - bits["running"].mean()
  assert values["gap_population"] == bits["batch"].mean() - bits["population"].mean()
  assert len({bits[k].tobytes() for k in bits}) == 3  # three different scorings


@pytest.mark.parametrize("norm", ["layer", "group", "none"])
def test_no_batch_statistics_no_gap(norm, float32_matmuls):
  rng = np.random.default_rng(3)
  cfg = mlp_config(norm, batch_size=2)
  x = rng.integers(0, 256, (9, 4, 4), dtype=np.uint8)
  params, stats = hand_set(cfg, rng, (4, 4))
  y = rng.integers(0, 10, 9).astype(np.int32)
  if norm == "layer":  # right on the first 5 images (by LayerNorm in numpy), the rest by chance
    y[:5] = numpy_logits(params, x, None, "layer")[0].argmax(1)[:5]
  assert not jax.tree.leaves(stats)
  values = train_gap.values_of(train_gap.score(cfg, params, stats, jnp.asarray(x),
                                               jnp.asarray(y), jnp.asarray(x)))
  assert values["gap_running"] == 0.0 and values["gap_population"] == 0.0
  assert values["correct_batch"] == values["correct_running"] == values["correct_population"]
  if norm == "layer":  # the one score is the model's: LayerNorm by hand in numpy
    correct = check({"correct": per_image.decode(values["correct_batch"]),
                     "loss": values["loss_batch"]}, numpy_logits(params, x, None, "layer")[0], y)
    assert values["accuracy_batch"] == correct.mean() >= 5 / 9


def test_sample_is_fixed_and_seeded():
  a, b = train_gap.sample_indices(100, 30, 0), train_gap.sample_indices(100, 30, 0)
  assert np.array_equal(a, b) and len(set(a.tolist())) == 30
  assert not np.array_equal(a, train_gap.sample_indices(100, 30, 1))
  assert len(train_gap.sample_indices(20, 30, 0)) == 20  # all of a smaller training set


def tiny_run(idx_dir, wd, norm):
  c = config_lib.base_config()
  c.data.source, c.data.dir = "idx", idx_dir
  c.model.name, c.model.norm, c.model.bn_position = "seed1_mlp", norm, "before"
  c.optimizer.learning_rate = 0.1
  c.train.batch_size, c.train.num_steps, c.train.eval_every_steps = 8, 20, 20
  train.train_and_evaluate(c, wd)
  return json.loads(open(os.path.join(wd, "config.json")).read()), c


def test_measurement_of_runs(idx_dir, tmp_path, float32_matmuls):
  """Through the registry on trained runs: BN's three scores as numpy computes them from the
  last checkpoint on the seeded sample; LayerNorm's gaps exactly 0; measured accuracies
  carry their per-image bits to the rules."""
  spec = {"kind": "train_gap", "examples": 200, "seed": 5}
  wd = str(tmp_path / "bn")
  run_cfg, cfg = tiny_run(idx_dir, wd, "batch")
  v = registry.MEASUREMENTS["train_gap"](wd, run_cfg, spec)
  assert (v["step"], v["examples"], v["batch_size"]) == (20, 200, 8)
  ds = train.load_data(cfg)
  idx = train_gap.sample_indices(len(ds.train_labels), 200, 5)
  x, y = ds.train_images[idx], ds.train_labels[idx]
  _, state = final_state(wd)
  params, bs = state["params"], state["batch_stats"]
  running = [(bs[f"dense_block_{i}"]["BatchNorm_0"]["mean"],
              bs[f"dense_block_{i}"]["BatchNorm_0"]["var"]) for i in range(2)]
  _, batch_correct = loss_and_correct(batch_logits(params, x, 8), y)
  _, run_correct = loss_and_correct(numpy_logits(params, x, running)[0], y)
  assert np.array_equal(per_image.decode(v["correct_batch"]), batch_correct)
  assert np.array_equal(per_image.decode(v["correct_running"]), run_correct)
  assert v["gap_running"] == batch_correct.mean() - run_correct.mean()
  assert v["correct_batch"] != v["correct_running"]  # 20 steps: the statistics differ
  assert v["accuracy_population"] is not None

  run = metrics_lib.Run("r", wd, {}, run_cfg, [], {"final_step": 20},
                        measured={"gap": v})
  assert metrics_lib.per_image_of(run, ("measured", "gap", "accuracy_batch")) == \
      v["correct_batch"]
  assert metrics_lib.per_image_of(run, ("measured", "gap", "gap_running")) is None

  wd = str(tmp_path / "layer")
  run_cfg, _ = tiny_run(idx_dir, wd, "layer")
  v = registry.MEASUREMENTS["train_gap"](wd, run_cfg, spec)
  assert v["gap_running"] == 0.0 and v["gap_population"] == 0.0
  assert v["correct_batch"] == v["correct_running"] == v["correct_population"]
