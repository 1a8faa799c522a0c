"""Per-image results: the record text (`bnlab.rundir.per_image`) and what every evaluation
records with it (`test_correct*`), against the model applied directly to the test images."""

import base64
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnlab import config as config_lib
from bnlab.engine import evaluation
from bnlab.engine import train
from bnlab.models import networks as models
from bnlab.rundir import per_image
from run_files import final_state, read_jsonl

KINDS = {"running": "", "population": "_population", "batch": "_batch"}
EPS = 1e-5  # the seed1 MLP's BN epsilon (the config's default)
RNGS = {"noise": jax.random.key(0), "dropout": jax.random.key(0)}


# -- the text ------------------------------------------------------------------


def reference_text(bits) -> str:
  """`"{n}:{base64}"` with the bytes packed by hand: image i is bit i % 8 of byte i // 8."""
  raw = bytearray(-(-len(bits) // 8))
  for i, b in enumerate(bits):
    if b:
      raw[i // 8] |= 1 << (i % 8)
  return f"{len(bits)}:{base64.b64encode(bytes(raw)).decode()}"


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 13, 100, 10_000])
def test_encode_decode_round_trip(n):
  bits = np.random.default_rng(n).random(n) < 0.7
  text = per_image.encode(bits)
  assert text == reference_text(bits.tolist())
  assert text.isascii() and text.startswith(f"{n}:")
  back = per_image.decode(text)
  assert back.dtype == np.bool_ and back.shape == (n,)
  np.testing.assert_array_equal(back, bits)
  assert per_image.decode(json.loads(json.dumps(text))).tolist() == bits.tolist()


def test_encode_sizes_and_edge_cases():
  assert per_image.encode(np.zeros(0, bool)) == "0:"
  assert per_image.encode(np.ones(3, bool)) == "3:Bw=="
  assert len(per_image.encode(np.ones(10_000, bool))) == 6 + 1668  # ~1.7 KB
  assert per_image.encode(jnp.array([True, False, True])) == "3:BQ=="  # a device array
  with pytest.raises(ValueError, match="1-D"):
    per_image.encode(np.ones((2, 3), bool))
  with pytest.raises(ValueError, match="bools"):
    per_image.encode(np.ones(3, np.int32))


@pytest.mark.parametrize("text, words", [
    ("", "not \"N:BASE64\""),
    ("AA==", "not \"N:BASE64\""),  # no count
    ("8", "not \"N:BASE64\""),
    ("-1:AA==", "not \"N:BASE64\""),
    ("08:AA==", "not \"N:BASE64\""),  # a count encode never writes
    (" 8:AA==", "not \"N:BASE64\""),
    ("8:AA==\n", "not \"N:BASE64\""),
    ("8:A@==", "not \"N:BASE64\""),  # not a base64 character
    ("8:AAA", "not valid base64"),  # missing padding
    ("8:", "0 bytes of bits, but 8 images take 1"),
    ("8:AAA=", "2 bytes of bits, but 8 images take 1"),
    ("20:AAA=", "2 bytes of bits, but 20 images take 3"),
    ("3:/w==", "bits set past the 3 images"),
])
def test_decode_rejects_malformed_text(text, words):
  with pytest.raises(ValueError, match="per-image results") as e:
    per_image.decode(text)
  assert words in str(e.value)


@pytest.mark.parametrize("value", [None, 12, b"8:AA==", ["8:AA=="]])
def test_decode_rejects_what_is_not_text(value):
  with pytest.raises(ValueError, match="are text"):
    per_image.decode(value)


def test_decode_shortens_a_long_malformed_text_in_its_message():
  with pytest.raises(ValueError) as e:
    per_image.decode("10000:" + "A" * 2000 + "!")
  assert len(str(e.value)) < 200


def assert_accuracy_of(bits, accuracy):
  """`accuracy` (float32 count / n, as recorded) is the mean of `bits`: the count exactly,
  the value to 1 float32 ulp (XLA may divide by the constant n as a product with 1/n)."""
  assert round(float(accuracy) * len(bits)) == bits.sum()
  mean = np.float32(bits.sum()) / np.float32(len(bits))
  assert abs(np.float32(accuracy) - mean) <= np.spacing(mean)


# -- the evaluation functions ---------------------------------------------------


def small_model():
  c = config_lib.base_config()
  c.model.name, c.model.norm, c.model.bn_position = "seed1_mlp", "batch", "before"
  model = models.build_model(c.model)
  images = jax.random.randint(jax.random.key(0), (103, 28, 28), 0, 255).astype(jnp.uint8)
  v = model.init(jax.random.key(1), images)
  return model, v["params"], v["batch_stats"], images


def right_where(predicted, wanted):
  """Labels that make `predicted` right where `wanted`, wrong elsewhere."""
  predicted = np.asarray(predicted)
  return jnp.asarray(np.where(wanted, predicted, (predicted + 1) % 10), jnp.int32)


# Which of the 103 images the labels make right: random, with the last ones right.
WANTED = np.random.default_rng(0).random(103) < 0.5
WANTED[-3:] = True


def test_evaluate_returns_each_examples_result_without_the_padding():
  model, params, stats, images = small_model()
  logits = model.apply({"params": params, "batch_stats": stats}, images, train=False)
  labels = right_where(jnp.argmax(logits, -1), WANTED)
  for batch_size in (103, 10, 50):  # 103 = 10 x 10 + 3: 7 padded examples
    out = evaluation.evaluate(model.apply, params, stats, images, labels,
                              batch_size=batch_size)
    correct = np.asarray(out["correct"])
    assert correct.dtype == np.bool_ and correct.shape == (103,)
    np.testing.assert_array_equal(correct, WANTED)
    assert_accuracy_of(correct, out["accuracy"])
  out = evaluation.evaluate(model.apply, params, stats, images, labels, batch_size=10,
                            per_image=False)
  assert set(out) == {"loss", "accuracy"}


def test_evaluate_batch_statistics_counts_each_image_in_its_own_batch():
  model, params, stats, images = small_model()
  # Batches of 10 from 0, 10, ..., 90, and the last 10 images (93-102): of it only
  # 100-102 are new; 93-99 were counted in the batch from 90. Each image's prediction
  # in the batch that counts it (train-mode BN: the batch's own statistics).
  predicted = np.zeros(103, np.int32)
  last_batch = None
  for start in list(range(0, 100, 10)) + [93]:
    logits, _ = model.apply({"params": params, "batch_stats": stats},
                            images[start:start + 10], train=True, mutable=["batch_stats"],
                            rngs=RNGS)
    first_new = 100 if start == 93 else start
    predicted[first_new:start + 10] = np.asarray(jnp.argmax(logits, -1))[first_new - start:]
    last_batch = np.asarray(jnp.argmax(logits, -1))
  labels = right_where(predicted, WANTED)
  out = evaluation.evaluate_batch_statistics(model.apply, params, stats, images, labels,
                                             batch_size=10)
  np.testing.assert_array_equal(np.asarray(out["correct"]), WANTED)
  assert_accuracy_of(WANTED, out["accuracy"])
  # The overlap matters: some of images 93-99 are predicted otherwise in the last batch.
  assert np.any(last_batch[:7] != predicted[93:100])
  # One batch that is the whole set.
  whole = evaluation.evaluate_batch_statistics(model.apply, params, stats, images, labels,
                                               batch_size=103)
  logits, _ = model.apply({"params": params, "batch_stats": stats}, images, train=True,
                          mutable=["batch_stats"], rngs=RNGS)
  np.testing.assert_array_equal(np.asarray(whole["correct"]),
                                np.asarray(jnp.argmax(logits, -1) == labels))


# -- what runs record -----------------------------------------------------------


def tiny_config(idx_dir, seed=0):
  c = config_lib.base_config()
  c.seed = seed
  c.data.source, c.data.dir = "idx", idx_dir
  c.model.name, c.model.norm, c.model.bn_position = "seed1_mlp", "batch", "before"
  c.optimizer.learning_rate = 0.02  # part trained at step 20: some test images wrong
  c.train.batch_size, c.train.num_steps, c.train.eval_every_steps = 32, 20, 10
  c.train.eval_batch_size = 40  # 100 test images: batches 0-39, 40-79 and 60-99 (80-99 new)
  c.train.eval_statistics = ("running", "population", "batch")
  c.train.population_examples = 100  # 3 whole batches of 32: the first 96 images
  return c


def assert_same_bits(bits, logits, labels, margin=1e-4):
  """`bits` are argmax(logits) == labels, but for images whose top two logits are within
  `margin` (float32 sums in another order may flip those)."""
  logits = np.asarray(logits, np.float64)
  expected = np.argmax(logits, -1) == labels
  top2 = np.sort(logits, -1)[:, -2:]
  differ = bits != expected
  assert np.all(top2[differ, 1] - top2[differ, 0] < margin), np.flatnonzero(differ)
  assert differ.sum() <= 1


def direct_logits(cfg, ds, state):
  """{kind: logits of the 100 test images} of `state`, the model applied outside the engine.

  "population": the BN statistics of Algorithm 2 computed here in numpy from the
  pre-BN activations of the first 3 training batches of 32; "batch": each test batch of
  40 (0-39, 40-79, 60-99) normalised with its own statistics, each image's logits from
  the batch that counts it.
  """
  model = models.build_model(evaluation.eval_model_config(cfg.model))
  params, running = state["params"], state["batch_stats"]
  x = ds.test_images
  out = {"running": model.apply({"params": params, "batch_stats": running}, x, train=False)}

  def layer_inputs(images, stats):
    """The inputs of both BN layers, in numpy, BN with `stats` (None: the batch's own)."""
    h, zs = np.asarray(images, np.float64).reshape(len(images), -1) / 255.0, []
    for i in range(2):
      p = params[f"dense_block_{i}"]
      z = h @ np.asarray(p["Dense_0"]["kernel"], np.float64)
      zs.append(z)
      mean, var = (z.mean(0), z.var(0)) if stats is None else stats[i]
      bn = p["BatchNorm_0"]
      h = np.maximum((z - mean) / np.sqrt(var + EPS) * bn["scale"] + bn["bias"], 0)
    return zs

  m = 32
  per_batch = [layer_inputs(ds.train_images[b * m:(b + 1) * m], None) for b in range(3)]
  population = [(np.mean([pb[i].mean(0) for pb in per_batch], 0),
                 np.mean([pb[i].var(0) for pb in per_batch], 0) * m / (m - 1))
                for i in range(2)]
  stats = {f"dense_block_{i}": {"BatchNorm_0": {
      "mean": population[i][0].astype(np.float32), "var": population[i][1].astype(np.float32)}}
      for i in range(2)}
  out["population"] = model.apply({"params": params, "batch_stats": stats}, x, train=False)

  batch = np.zeros((len(x), 10), np.float32)
  for start, first_new in ((0, 0), (40, 40), (60, 80)):
    logits, _ = model.apply({"params": params, "batch_stats": running}, x[start:start + 40],
                            train=True, mutable=["batch_stats"], rngs=RNGS)
    batch[first_new:start + 40] = np.asarray(logits)[first_new - start:]
  out["batch"] = batch
  return out


def check_member(cfg, wd, ds):
  """Every evaluation record of the run in `wd`, and its summary, against the model."""
  records = read_jsonl(os.path.join(wd, "metrics.jsonl"))
  evals = [r for r in records if "test_accuracy" in r]
  assert [r["step"] for r in evals] == [0, 10, 20]
  for r in evals:
    for suffix in KINDS.values():
      bits = per_image.decode(r[f"test_correct{suffix}"])
      assert bits.shape == (100,)
      assert_accuracy_of(bits, r[f"test_accuracy{suffix}"])
  for r in records:
    if "test_accuracy" not in r:
      assert not any(k.startswith("test_correct") for k in r)
  step, state = final_state(wd)
  assert step == 20
  logits = direct_logits(cfg, ds, state)
  for kind, suffix in KINDS.items():
    bits = per_image.decode(evals[-1][f"test_correct{suffix}"])
    assert 0 < bits.sum() < 100  # some right, some wrong
    assert_same_bits(bits, logits[kind], ds.test_labels)
  summary = json.load(open(os.path.join(wd, "summary.json")))
  for suffix in KINDS.values():
    assert summary[f"test_correct{suffix}"] == evals[-1][f"test_correct{suffix}"]
  return evals


def test_a_run_records_which_test_images_it_got_right(idx_dir, tmp_path, float32_matmuls):
  cfg = tiny_config(idx_dir)
  wd = str(tmp_path / "run")
  train.train_and_evaluate(cfg, wd)
  evals = check_member(cfg, wd, train.load_data(cfg))
  # Trained: the final bits are not those before training.
  assert evals[0]["test_correct"] != evals[-1]["test_correct"]


def test_a_groups_members_record_their_own_test_images(idx_dir, tmp_path, float32_matmuls):
  cfgs = [tiny_config(idx_dir, seed) for seed in (0, 1)]
  cfgs[1].optimizer.learning_rate = 0.01
  wds = [str(tmp_path / name) for name in ("a", "b")]
  train.train_group(cfgs, wds, str(tmp_path / "group"))
  ds = train.load_data(cfgs[0])
  finals = [check_member(c, w, ds)[-1] for c, w in zip(cfgs, wds)]
  assert finals[0]["test_correct"] != finals[1]["test_correct"]  # each its own


def test_a_diverged_run_keeps_them_as_it_keeps_its_accuracy(idx_dir, tmp_path):
  cfg = tiny_config(idx_dir)
  cfg.model.norm, cfg.model.activation = "none", "relu"
  cfg.optimizer.learning_rate = 1e9
  cfg.train.eval_statistics = ("running",)
  cfg.train.log_every_steps = 5
  wd = str(tmp_path / "div")
  summary = train.train_and_evaluate(cfg, wd)
  assert summary["diverged"] is True
  assert "test_correct" not in summary
  assert ("test_correct_before_divergence" in summary) == (
      "test_accuracy_before_divergence" in summary)
  records = read_jsonl(os.path.join(wd, "metrics.jsonl"))
  last_eval = [r for r in records if "test_accuracy" in r][-1]
  assert summary["test_correct_before_divergence"] == last_eval["test_correct"]
  assert "test_correct" not in records[-1]  # the diverged record has no evaluation
