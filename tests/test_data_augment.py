"""`data.augment`: random crop with padding and horizontal flip inside the train step,
against numpy references; reproducible per seed, bit-identical on resume, never in
evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnlab import config as config_lib
from bnlab import data
from bnlab import load_run
from bnlab.data import augment
from bnlab.engine import calls as calls_lib
from bnlab.engine import train

tiny_tfds = pytest.importorskip("tiny_tfds")


def batch(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


@pytest.mark.parametrize("shape", [(64, 10, 12), (64, 10, 12, 3)])
@pytest.mark.parametrize("kind", augment.AUGMENTS)
def test_shapes_and_dtype_kept(shape, kind):
  x = jnp.asarray(batch(shape))
  y = augment.apply(kind, x, jax.random.key(1))
  assert y.shape == x.shape and y.dtype == x.dtype


def test_none_is_the_identity():
  x = jnp.asarray(batch((4, 8, 8, 3)))
  assert augment.apply("none", x, jax.random.key(0)) is x


def test_flip_mirrors_about_half():
  x = batch((256, 6, 7, 2))
  y = np.asarray(augment.apply("flip", jnp.asarray(x), jax.random.key(3)))
  same = [np.array_equal(a, b) for a, b in zip(y, x)]
  mirrored = [np.array_equal(a, b[:, ::-1]) for a, b in zip(y, x)]
  assert all(s != m for s, m in zip(same, mirrored))  # each is one or the other
  assert 90 < sum(mirrored) < 166


def test_crop_is_a_window_of_the_zero_padded_image():
  """Each output equals the window of the padded image at some offset in [0, 2 * 4]
  (found by brute force); every offset row and column occurs."""
  x = batch((200, 9, 11, 3), seed=4) | 1  # no zero pixel: padding is recognizable
  y = np.asarray(augment.apply("crop", jnp.asarray(x), jax.random.key(5)))
  p = augment.PADDING
  padded = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  offsets = []
  for i in range(len(x)):
    found = [(r, c) for r in range(2 * p + 1) for c in range(2 * p + 1)
             if np.array_equal(padded[i, r:r + 9, c:c + 11], y[i])]
    assert len(found) == 1, i
    offsets.append(found[0])
  rows, cols = zip(*offsets)
  assert set(rows) == set(range(2 * p + 1)) and set(cols) == set(range(2 * p + 1))


def test_step_keys_differ_by_step_and_run():
  rng = jax.random.key_data(jax.random.key(0))
  other = jax.random.key_data(jax.random.key(1))
  x = jnp.asarray(batch((32, 12, 12, 3)))
  a = augment.apply("crop_flip", x, augment.step_key(rng, jnp.int32(0)))
  b = augment.apply("crop_flip", x, augment.step_key(rng, jnp.int32(0)))
  c = augment.apply("crop_flip", x, augment.step_key(rng, jnp.int32(1)))
  d = augment.apply("crop_flip", x, augment.step_key(other, jnp.int32(0)))
  assert np.array_equal(a, b) and not np.array_equal(a, c) and not np.array_equal(a, d)


# -- through the engine ----------------------------------------------------------------

@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  tiny_tfds.prepare("tiny_colour10", d)
  return str(d)


def config(tfds_dir, steps=8, augment_kind="crop_flip", seed=0):
  cfg = config_lib.base_config()
  cfg.seed = seed
  cfg.data.name, cfg.data.dir, cfg.data.augment = "tiny_colour10", tfds_dir, augment_kind
  cfg.model.name = "seed1_cnn"
  cfg.train.batch_size = 16
  cfg.train.num_steps = steps
  cfg.train.eval_every_steps = 4
  cfg.train.checkpoint_min_interval_secs = 0.0
  cfg.train.compilation_cache = False
  return cfg


def params_of(workdir):
  return jax.tree.leaves(load_run(workdir).variables)


def assert_same(a, b):
  assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_reproducible_per_seed_and_resumed_bit_identical(tmp_path, tfds_dir):
  full = tmp_path / "full"
  s_full = train.train_and_evaluate(config(tfds_dir), str(full))
  s_again = train.train_and_evaluate(config(tfds_dir), str(tmp_path / "again"))
  assert s_full["train_loss"] == s_again["train_loss"]
  assert_same(params_of(full), params_of(tmp_path / "again"))
  # Stopped at step 4 and continued to 8: the same parameters, bit for bit.
  half = tmp_path / "half"
  train.train_and_evaluate(config(tfds_dir, steps=4), str(half))
  s_resumed = train.train_and_evaluate(config(tfds_dir), str(half))
  assert s_resumed["train_loss"] == s_full["train_loss"]
  assert_same(params_of(full), params_of(half))
  # Another seed, or no augmentation, trains otherwise.
  other = train.train_and_evaluate(config(tfds_dir, seed=1), str(tmp_path / "seed1"))
  plain = train.train_and_evaluate(config(tfds_dir, augment_kind="none"), str(tmp_path / "none"))
  assert other["train_loss"] != s_full["train_loss"]
  assert plain["train_loss"] != s_full["train_loss"]
  assert s_full["data_augment"] == "crop_flip"


def test_evaluation_is_not_augmented(tmp_path, tfds_dir):
  """The recorded test loss is the model's on the unaugmented (standardized) test images."""
  cfg = config(tfds_dir, steps=4)
  cfg.train.final_train_eval = False
  summary = train.train_and_evaluate(cfg, str(tmp_path / "run"))
  run = load_run(str(tmp_path / "run"))
  test = calls_lib.DeviceData.place(data.load(cfg.data))
  logits = run.model.apply(run.variables, test.test_images, train=False)
  labels = np.asarray(test.test_labels)
  log_p = jax.nn.log_softmax(np.asarray(logits, np.float64))
  loss = -np.mean(np.asarray(log_p)[np.arange(len(labels)), labels])
  np.testing.assert_allclose(summary["test_loss"], loss, rtol=1e-5)
  accuracy = np.mean(np.argmax(np.asarray(logits), -1) == labels)
  assert summary["test_accuracy"] == pytest.approx(accuracy)
