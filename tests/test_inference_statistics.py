"""Evaluation with population (Algorithm 2) and test-batch BN statistics, against numpy."""

import os

import numpy as np
import pytest

from bnlab import config as config_lib
from bnlab.engine import train
from run_files import final_state, read_jsonl

EPS = 1e-5


def tiny_config(idx_dir, statistics=("running", "population", "batch")):
  c = config_lib.base_config()
  c.data.source, c.data.dir = "idx", idx_dir
  c.model.name, c.model.norm, c.model.bn_position = "seed1_mlp", "batch", "before"
  c.optimizer.learning_rate = 0.1
  c.train.batch_size, c.train.num_steps, c.train.eval_every_steps = 32, 20, 10
  c.train.eval_batch_size = 40  # 100 test images: batches 0-39, 40-79 and 60-99 (80-99 new)
  c.train.eval_statistics = statistics
  c.train.population_examples = 100  # 3 whole batches of 32: the first 96 images
  return c


def forward(params, x, stats):
  """Logits of the seed1 MLP (dense -> BN -> ReLU, twice; logits) in numpy.

  `stats`: a list of (mean, var) per BN layer, or None to normalise with the
  batch's own statistics; returns (logits, [(batch mean, batch var), ...]).
  """
  h, seen = x.reshape(len(x), -1).astype(np.float64) / 255.0, []
  for i in range(2):
    p = params[f"dense_block_{i}"]
    z = h @ p["Dense_0"]["kernel"]
    mean, var = (z.mean(0), z.var(0)) if stats is None else stats[i]
    seen.append((z.mean(0), z.var(0)))
    bn = p["BatchNorm_0"]
    h = np.maximum((z - mean) / np.sqrt(var + EPS) * bn["scale"] + bn["bias"], 0.0)
  return h @ params["logits"]["kernel"] + params["logits"]["bias"], seen


def accuracy(logits, labels):
  return float(np.mean(np.argmax(logits, -1) == labels))


def test_population_and_batch_statistics_match_numpy(idx_dir, tmp_path, float32_matmuls):
  cfg = tiny_config(idx_dir)
  wd = str(tmp_path / "run")
  summary = train.train_and_evaluate(cfg, wd)
  ds = train.load_data(cfg)
  _, state = final_state(wd)
  params, running = state["params"], state["batch_stats"]
  x, y = ds.test_images, ds.test_labels

  # Running averages: the numpy forward agrees with the engine's test_accuracy.
  stats = [(running[f"dense_block_{i}"]["BatchNorm_0"]["mean"],
            running[f"dense_block_{i}"]["BatchNorm_0"]["var"]) for i in range(2)]
  assert accuracy(forward(params, x, stats)[0], y) == pytest.approx(summary["test_accuracy"])

  # Algorithm 2: train-mode forward over 3 batches of m=32, means of the batch
  # means and m/(m-1) times the means of the batch variances.
  m, per_batch = 32, []
  for b in range(3):
    per_batch.append(forward(params, ds.train_images[b * m:(b + 1) * m], None)[1])
  population = [(np.mean([pb[i][0] for pb in per_batch], 0),
                 np.mean([pb[i][1] for pb in per_batch], 0) * m / (m - 1)) for i in range(2)]
  expected = accuracy(forward(params, x, population)[0], y)
  assert summary["test_accuracy_population"] == pytest.approx(expected)
  assert not np.allclose(population[0][1], stats[0][1], rtol=1e-3)  # another statistic

  # Test-batch statistics: each batch normalised with its own, last batch overlapping.
  correct = 0
  for start, new in ((0, 0), (40, 40), (60, 80)):
    logits = forward(params, x[start:start + 40], None)[0]
    correct += np.sum((np.argmax(logits, -1) == y[start:start + 40])[new - start:])
  assert summary["test_accuracy_batch"] == pytest.approx(correct / 100)

  records = read_jsonl(os.path.join(wd, "metrics.jsonl"))
  evals = [r for r in records if "test_accuracy" in r]
  assert [r["step"] for r in evals] == [0, 10, 20]
  for r in evals:
    assert {"test_loss_population", "test_accuracy_population", "test_loss_batch",
            "test_accuracy_batch"} <= set(r)


def test_default_records_running_only_and_no_bn_agrees(idx_dir, tmp_path):
  summary = train.train_and_evaluate(tiny_config(idx_dir, ("running",)), str(tmp_path / "a"))
  assert not any(k.startswith("test_accuracy_") for k in summary)
  cfg = tiny_config(idx_dir, ("running", "population"))
  cfg.model.norm = "none"  # no statistics: population = running
  summary = train.train_and_evaluate(cfg, str(tmp_path / "b"))
  assert summary["test_accuracy_population"] == summary["test_accuracy"]


def test_population_statistics_of_a_model_that_keeps_population_averages(idx_dir, tmp_path):
  # Its own BN layers keep num_batches: the recomputed statistics keep the run's structure.
  cfg = tiny_config(idx_dir, ("running", "population"))
  cfg.model.bn.running_average = "population"
  summary = train.train_and_evaluate(cfg, str(tmp_path / "a"))
  assert 0.0 <= summary["test_accuracy_population"] <= 1.0


def test_config_checks_eval_statistics():
  c = config_lib.base_config()
  c.train.eval_statistics = ("running", "median")
  with pytest.raises(config_lib.ConfigError, match="train.eval_statistics"):
    config_lib.validate(c)
  c.train.eval_statistics = ("population",)
  c.model.norm = "ghost"
  with pytest.raises(config_lib.ConfigError, match="no 'population' with model.norm='ghost'"):
    config_lib.validate(c)
