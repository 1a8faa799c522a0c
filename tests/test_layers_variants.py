"""Normalization variants against float64 NumPy references written from the papers.

Batch Renormalization (Ioffe 2017, Algorithm 1), ghost batches (Hoffer et al.
2017), noisy BN (Santurkar et al. 2018), frozen statistics, the population
average (Ioffe & Szegedy 2015, Algorithm 2), and LayerNorm / GroupNorm
through the model configs.
"""

from __future__ import annotations

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnlab
from bnlab import config as config_lib
from bnlab.models import networks as models
from bnlab.layers import variants
from bnlab.layers.linen import (BatchNorm, BatchNormVariant, BatchRenorm, GhostBatchNorm,
                                NoisyBatchNorm)

EPS = 1e-3
MOMENTUM = 0.9


def reduction_axes(ndim):
  return tuple(range(ndim - 1))  # feature axis -1


def ref_moments(x):
  x = np.asarray(x, np.float64)
  red = reduction_axes(x.ndim)
  return x.mean(red), x.var(red), x.size // x.shape[-1]


def ref_bn_train(x, scale, bias, eps=EPS):
  mu, var, _ = ref_moments(x)
  return (np.asarray(x, np.float64) - mu) / np.sqrt(var + eps) * scale + bias


def ref_renorm(x, scale, bias, mean, var, r_max, d_max, eps=EPS, momentum=MOMENTUM):
  """Algorithm 1 of Ioffe 2017, with the running variance averaged like BN's."""
  x = np.asarray(x, np.float64)
  mu_b, var_b, _ = ref_moments(x)
  sigma_b, sigma = np.sqrt(var_b + eps), np.sqrt(np.asarray(var, np.float64) + eps)
  r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
  d = np.clip((mu_b - mean) / sigma, -d_max, d_max)
  y = ((x - mu_b) / sigma_b * r + d) * scale + bias
  return (y, momentum * mean + (1 - momentum) * mu_b,
          momentum * var + (1 - momentum) * var_b, r, d)


def ref_ghost(x, scale, bias, mean, var, ghost_size, eps=EPS, momentum=MOMENTUM):
  """Each ghost batch normalized alone; running stats fold in the mean ghost statistics."""
  x = np.asarray(x, np.float64)
  ghosts = [x[i:i + ghost_size] for i in range(0, len(x), ghost_size)]
  y = np.concatenate([ref_bn_train(g, scale, bias, eps) for g in ghosts])
  mus, vars_ = zip(*[ref_moments(g)[:2] for g in ghosts])
  return (y, momentum * mean + (1 - momentum) * np.mean(mus, 0),
          momentum * var + (1 - momentum) * np.mean(vars_, 0))


def ref_bn_grad_x(x, scale, dy, eps=EPS):
  """Closed-form train-mode BN backward pass for x."""
  x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  red = reduction_axes(x.ndim)
  mu, var, _ = ref_moments(x)
  xhat = (x - mu) / np.sqrt(var + eps)
  m = lambda v: v.mean(red, keepdims=True)
  return scale / np.sqrt(var + eps) * (dy - m(dy) - xhat * m(dy * xhat))


def features(rng, f):
  return (rng.uniform(0.5, 2.0, f).astype(np.float32), rng.normal(0, 1, f).astype(np.float32),
          rng.normal(0, 1, f).astype(np.float32), rng.uniform(0.5, 2.0, f).astype(np.float32))


SHAPES = {"dense": (16, 6), "conv": (8, 3, 2, 5)}


# ----------------------------------------------------------------------------
# Batch Renormalization


@pytest.mark.parametrize("step, expected", [
    (0, (1.0, 0.0)), (5000, (1.0, 0.0)), (25000, (1.0 + 2.0 * 20 / 35, 5.0)),
    (40000, (3.0, 5.0)), (90000, (3.0, 5.0))])
def test_renorm_limits_follow_the_paper_schedule(step, expected):
  limits = variants.renorm_limits(step, r_max=3.0, d_max=5.0)
  np.testing.assert_allclose([limits.r_max, limits.d_max], expected, rtol=1e-6)


def test_renorm_limits_jump_when_the_ramp_is_empty():
  kw = dict(r_max=3.0, d_max=5.0, warmup_steps=10, r_max_steps=10, d_max_steps=10)
  assert tuple(map(float, variants.renorm_limits(9, **kw))) == (1.0, 0.0)
  assert tuple(map(float, variants.renorm_limits(10, **kw))) == (3.0, 5.0)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_renorm_with_unit_limits_is_batch_norm(shape):
  rng = np.random.default_rng(0)
  x = rng.normal(2.0, 3.0, shape).astype(np.float32)
  scale, bias, mean, var = features(rng, shape[-1])
  kw = dict(train=True, momentum=MOMENTUM, epsilon=EPS)
  got = variants.batch_renorm(x, scale, bias, mean, var, r_max=1.0, d_max=0.0, **kw)
  want = bnlab.batch_norm(x, scale, bias, mean, var, **kw)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_renorm_matches_reference_with_active_corrections(shape):
  rng = np.random.default_rng(1)
  f = shape[-1]
  x = rng.normal(0.0, 1.0, shape).astype(np.float32) * rng.uniform(0.3, 3, f) + rng.normal(0, 1, f)
  x = x.astype(np.float32)
  scale, bias, mean, var = features(rng, f)
  r_max, d_max = 1.5, 0.5
  y, new_mean, new_var, r, d = ref_renorm(x, scale, bias, mean, var, r_max, d_max)
  # Some features are clipped and some are not: both branches are exercised.
  assert np.any(np.abs(r - 1) > 1e-3) and np.any(np.isclose(np.abs(d), d_max))
  assert np.any(np.abs(d) < d_max - 1e-3)
  out = variants.batch_renorm(x, scale, bias, mean, var, train=True, r_max=r_max, d_max=d_max,
                              momentum=MOMENTUM, epsilon=EPS)
  np.testing.assert_allclose(out.y, y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.mean, new_mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out.var, new_var, rtol=1e-6, atol=1e-6)
  # r and d are constants for autodiff: the gradient is BN's with scale * r.
  dy = rng.normal(size=shape).astype(np.float32)
  dx = jax.grad(lambda x: jnp.sum(variants.batch_renorm(
      x, scale, bias, mean, var, train=True, r_max=r_max, d_max=d_max, epsilon=EPS).y * dy))(x)
  np.testing.assert_allclose(dx, ref_bn_grad_x(x, scale * r, dy), rtol=1e-4, atol=1e-5)
  # Inference: the running statistics.
  inf = variants.batch_renorm(x, scale, bias, mean, var, train=False, r_max=r_max, d_max=d_max,
                              epsilon=EPS)
  want = (x.astype(np.float64) - mean) / np.sqrt(var.astype(np.float64) + EPS) * scale + bias
  np.testing.assert_allclose(inf.y, want, rtol=1e-5, atol=1e-5)


def test_renorm_module_counts_updates_and_ramps_its_limits():
  rng = np.random.default_rng(2)
  x = (rng.normal(size=(16, 4)) * 3 + 1).astype(np.float32)
  layer = BatchRenorm(r_max=3.0, d_max=5.0, warmup_steps=0, r_max_steps=2, d_max_steps=2,
                      momentum=MOMENTUM, epsilon=EPS)
  v = layer.init(jax.random.key(0), x, use_running_average=True)
  assert int(v["batch_stats"]["steps"]) == 0
  # Step 0: limits (1, 0), i.e. plain BN.
  y0, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  np.testing.assert_allclose(y0, ref_bn_train(x, 1.0, 0.0), rtol=1e-5, atol=1e-5)
  stats = upd["batch_stats"]
  assert int(stats["steps"]) == 1
  # Step 1: limits (2, 2.5) against the running statistics after step 0.
  y1, upd = layer.apply({**v, "batch_stats": stats}, x, use_running_average=False,
                        mutable=["batch_stats"])
  y, new_mean, new_var, _, _ = ref_renorm(
      x, 1.0, 0.0, np.asarray(stats["mean"], np.float64), np.asarray(stats["var"], np.float64),
      2.0, 2.5)
  np.testing.assert_allclose(y1, y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(upd["batch_stats"]["mean"], new_mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(upd["batch_stats"]["var"], new_var, rtol=1e-6, atol=1e-6)
  assert int(upd["batch_stats"]["steps"]) == 2
  # Immutable batch_stats: Flax's error; update_stats=False: no update, no count.
  with pytest.raises(flax.errors.ModifyScopeVariableError):
    layer.apply({**v, "batch_stats": stats}, x, use_running_average=False)
  _, same = layer.clone(update_stats=False).apply(
      {**v, "batch_stats": stats}, x, use_running_average=False, mutable=["batch_stats"])
  assert int(same["batch_stats"]["steps"]) == 1


# ----------------------------------------------------------------------------
# Ghost batch norm


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_ghost_statistics_per_ghost_batch(shape):
  rng = np.random.default_rng(3)
  x = rng.normal(1.0, 2.0, shape).astype(np.float32)
  x[: shape[0] // 2] += 3.0  # ghost batches with different statistics
  scale, bias, mean, var = features(rng, shape[-1])
  ghost = shape[0] // 4
  out = variants.ghost_batch_norm(x, scale, bias, mean, var, train=True, ghost_size=ghost,
                                  momentum=MOMENTUM, epsilon=EPS)
  y, new_mean, new_var = ref_ghost(x, scale, bias, mean, var, ghost)
  np.testing.assert_allclose(out.y, y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.mean, new_mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out.var, new_var, rtol=1e-6, atol=1e-6)
  inf = variants.ghost_batch_norm(x, scale, bias, mean, var, train=False, ghost_size=ghost,
                                  epsilon=EPS)
  want = bnlab.batch_norm(x, scale, bias, mean, var, train=False, epsilon=EPS)
  np.testing.assert_array_equal(inf.y, want.y)


def test_ghost_of_the_whole_batch_is_batch_norm():
  rng = np.random.default_rng(4)
  x = rng.normal(1.0, 2.0, (12, 5)).astype(np.float32)
  scale, bias, mean, var = features(rng, 5)
  kw = dict(train=True, momentum=MOMENTUM, epsilon=EPS)
  got = variants.ghost_batch_norm(x, scale, bias, mean, var, ghost_size=12, **kw)
  want = bnlab.batch_norm(x, scale, bias, mean, var, **kw)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_ghost_size_must_divide_the_batch():
  x = jnp.ones((10, 3))
  with pytest.raises(ValueError, match="ghost_size=4"):
    variants.ghost_batch_norm(x, None, None, jnp.zeros(3), jnp.ones(3), train=True, ghost_size=4)
  layer = GhostBatchNorm(ghost_size=4)
  v = layer.init(jax.random.key(0), x, use_running_average=True)  # inference: any batch
  with pytest.raises(ValueError, match="ghost_size=4"):
    layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])


# ----------------------------------------------------------------------------
# Noisy BN


def test_activation_noise_ranges_and_broadcast():
  noise = variants.activation_noise(jax.random.key(0), (1000,), shift_max=0.5, scale_max=1.5)
  assert 1.0 <= float(noise.scale.min()) and float(noise.scale.max()) <= 1.5
  assert -0.5 <= float(noise.shift.min()) and float(noise.shift.max()) <= 0.5
  assert float(jnp.std(noise.shift)) > 0.2 and float(jnp.std(noise.scale)) > 0.1
  y = np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)
  small = variants.activation_noise(jax.random.key(1), (4,), shift_max=0.5, scale_max=1.5)
  got = variants.apply_activation_noise(y, small)
  np.testing.assert_allclose(got, y * np.asarray(small.scale) + np.asarray(small.shift),
                             rtol=1e-6)


def test_noisy_bn_resamples_per_key_and_is_deterministic_per_key():
  rng = np.random.default_rng(5)
  x = rng.normal(2.0, 3.0, (32, 6)).astype(np.float32)
  layer = NoisyBatchNorm(noise_shift_max=0.5, noise_scale_max=1.5, epsilon=EPS,
                         momentum=MOMENTUM)
  v = layer.init(jax.random.key(0), x, use_running_average=True)

  def train(key):
    return layer.apply(v, x, use_running_average=False, mutable=["batch_stats"],
                       rngs={"noise": key})

  (ya, sa), (yb, _), (yc, _) = train(jax.random.key(1)), train(jax.random.key(1)), train(
      jax.random.key(2))
  np.testing.assert_array_equal(ya, yb)
  assert not np.allclose(ya, yc)
  # Per activation, the noisy output is y_bn * s + m with s in [1, 1.5], m in [-0.5, 0.5].
  y_bn = ref_bn_train(x, 1.0, 0.0)
  for j in range(6):
    s, m = np.polyfit(y_bn[:, j], np.asarray(ya[:, j], np.float64), 1)
    assert 1.0 - 1e-4 <= s <= 1.5 + 1e-4 and -0.5 - 1e-4 <= m <= 0.5 + 1e-4
    np.testing.assert_allclose(ya[:, j], y_bn[:, j] * s + m, atol=1e-4)
  # The running statistics are those of plain BN: the noise comes after.
  _, plain = BatchNorm(epsilon=EPS, momentum=MOMENTUM).apply(
      v, x, use_running_average=False, mutable=["batch_stats"])
  for k in ("mean", "var"):
    np.testing.assert_array_equal(sa["batch_stats"][k], plain["batch_stats"][k])


def test_noisy_bn_inference_is_noise_free_and_train_needs_the_rng():
  x = np.random.default_rng(6).normal(size=(8, 3)).astype(np.float32)
  layer = NoisyBatchNorm()
  v = layer.init(jax.random.key(0), x, use_running_average=False)  # init needs no noise rng
  got = layer.apply(v, x, use_running_average=True, rngs={"noise": jax.random.key(1)})
  np.testing.assert_array_equal(got, BatchNorm().apply(v, x, use_running_average=True))
  with pytest.raises(ValueError, match=r"rngs=\{'noise': key\}"):
    layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])


# ----------------------------------------------------------------------------
# Frozen statistics and the population average


def test_frozen_uses_and_keeps_the_running_statistics_in_train_mode():
  rng = np.random.default_rng(7)
  x = rng.normal(3.0, 2.0, (16, 4)).astype(np.float32)
  scale, bias, mean, var = features(rng, 4)
  layer = BatchNormVariant(frozen=True, epsilon=EPS)
  v = {"params": {"scale": scale, "bias": bias}, "batch_stats": {"mean": mean, "var": var}}
  y, upd = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  want = (x.astype(np.float64) - mean) / np.sqrt(var.astype(np.float64) + EPS) * scale + bias
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  for k, ref in (("mean", mean), ("var", var)):
    np.testing.assert_array_equal(upd["batch_stats"][k], ref)
  # Gradients reach the parameters but do not see batch statistics.
  g = jax.grad(lambda p: jnp.sum(layer.apply({**v, "params": p}, x,
                                             use_running_average=False)))(v["params"])
  np.testing.assert_allclose(g["bias"], np.full(4, 16.0), rtol=1e-6)


@pytest.mark.parametrize("layer", [BatchNormVariant(running_average="population", epsilon=EPS),
                                   GhostBatchNorm(ghost_size=3, running_average="population",
                                                  epsilon=EPS)],
                         ids=["batch", "ghost"])
def test_population_average_over_a_sequence_of_batches(layer):
  rng = np.random.default_rng(8)
  batches = [rng.normal(rng.uniform(-3, 3), rng.uniform(0.5, 3), (6, 4)).astype(np.float32)
             for _ in range(5)]
  v = layer.init(jax.random.key(0), batches[0], use_running_average=True)
  stats = v["batch_stats"]
  for b in batches:
    _, upd = layer.apply({**v, "batch_stats": stats}, b, use_running_average=False,
                         mutable=["batch_stats"])
    stats = upd["batch_stats"]
  # Algorithm 2: E[x] = mean of batch means, Var[x] = m/(m-1) * mean of batch variances,
  # over the batches the layer normalized with (ghost batches of 3 for the ghost layer).
  group = getattr(layer, "ghost_size", 6)
  parts = [b[i:i + group] for b in batches for i in range(0, 6, group)]
  mus = np.array([ref_moments(p)[0] for p in parts])
  vars_ = np.array([ref_moments(p)[1] for p in parts])
  per_batch = len(parts) // len(batches)
  mean = mus.reshape(len(batches), per_batch, 4).mean(1).mean(0)
  var = group / (group - 1) * vars_.reshape(len(batches), per_batch, 4).mean(1).mean(0)
  np.testing.assert_allclose(stats["mean"], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["var"], var, rtol=1e-5, atol=1e-6)
  assert int(stats["num_batches"]) == len(batches)
  # Inference normalizes with them.
  y = layer.apply({**v, "batch_stats": stats}, batches[0], use_running_average=True)
  np.testing.assert_allclose(y, (batches[0] - mean) / np.sqrt(var + EPS), rtol=1e-4, atol=1e-5)


def test_population_average_skips_a_batch_with_nothing_counted():
  # An all-False mask counts nothing: the population averages and their count stay.
  x = 5.0 + np.arange(4.0, dtype=np.float32)[:, None] * np.ones((4, 2), np.float32)
  layer = BatchNormVariant(running_average="population")
  v = layer.init(jax.random.key(0), x, use_running_average=False)
  _, upd = layer.apply(v, x, use_running_average=False, mask=np.zeros((4, 2), bool),
                       mutable=["batch_stats"])
  _, upd = layer.apply({**v, **upd}, x, use_running_average=False, mutable=["batch_stats"])
  stats = upd["batch_stats"]
  np.testing.assert_allclose(stats["mean"], [6.5, 6.5])
  np.testing.assert_allclose(stats["var"], [5.0 / 3.0] * 2, rtol=1e-6)  # m/(m-1) * 1.25
  assert int(stats["num_batches"]) == 1
  bn = bnlab.nnx.BatchNormVariant(2, running_average="population", rngs=nnx.Rngs(0))
  bn(x, mask=np.zeros((4, 2), bool))
  bn(x)
  np.testing.assert_allclose(bn.mean[...], [6.5, 6.5])
  assert int(bn.num_batches[...]) == 1


def test_population_average_function_is_the_running_mean():
  rng = np.random.default_rng(9)
  values = rng.normal(size=(50, 3)).astype(np.float32)
  mean, var, n = jnp.zeros(3), jnp.ones(3), jnp.zeros((), jnp.int32)
  for v in values:
    mean, var, n = variants.population_average(mean, var, n, v, 2 * v)
  np.testing.assert_allclose(mean, values.astype(np.float64).mean(0), atol=1e-6)
  np.testing.assert_allclose(var, 2 * values.astype(np.float64).mean(0), atol=1e-6)
  assert int(n) == 50


def test_variant_rejects_unknown_running_average():
  with pytest.raises(ValueError, match="running_average"):
    BatchNormVariant(running_average="median").init(jax.random.key(0), jnp.ones((2, 3)), True)


# ----------------------------------------------------------------------------
# Through the model configs


def run_config(**changes):
  c = config_lib.base_config()
  c.model.name = "paper_mlp"
  c.model.widths = (8, 8)
  c.model.activation = "sigmoid"
  c.train.batch_size = 12
  c.model.bn.ghost_size = 4
  for key, value in changes.items():
    section, name = key.split("__") if "__" in key else ("model", key)
    target = c.model.bn if section == "bn" else c[section]
    target[name] = value
  return c


@pytest.mark.parametrize("norm", ["layer", "group", "renorm", "ghost", "noisy", "frozen"])
def test_model_with_norm_trains_a_step(norm):
  c = run_config(norm=norm, bn__num_groups=2)
  config_lib.validate(c)
  model = models.build_model(c.model)
  rng = np.random.default_rng(10)
  images = jnp.asarray(rng.integers(0, 256, (12, 28, 28)), jnp.uint8)
  labels = jnp.asarray(rng.integers(0, 10, 12))
  v = model.init(jax.random.key(0), images)
  tx = optax.sgd(0.1)

  def loss_fn(params, key):
    logits, upd = model.apply({**v, "params": params}, images, train=True,
                              mutable=["batch_stats"], rngs={"noise": key})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd

  (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(v["params"], jax.random.key(1))
  updates, _ = tx.update(grads, tx.init(v["params"]), v["params"])
  params = optax.apply_updates(v["params"], updates)
  after, _ = loss_fn(params, jax.random.key(1))
  assert np.isfinite(loss) and after < loss
  if norm in ("layer", "group"):
    assert "batch_stats" not in v and not upd
    kind = "LayerNorm_0" if norm == "layer" else "GroupNorm_0"
    assert kind in v["params"]["dense_block_0"]
  else:
    assert "BatchNorm_0" in v["batch_stats"]["dense_block_0"]


def test_frozen_and_population_keep_the_batch_norm_variable_paths():
  shapes = lambda c: jax.tree.map(jnp.shape, models.build_model(c.model).init(
      jax.random.key(0), jnp.zeros((4, 28, 28), jnp.uint8)))
  batch = shapes(run_config(norm="batch"))
  assert shapes(run_config(norm="frozen")) == batch
  population = shapes(run_config(norm="batch", bn__running_average="population"))
  for block in ("dense_block_0", "dense_block_1"):
    stats = population["batch_stats"][block]["BatchNorm_0"]
    assert stats == {**batch["batch_stats"][block]["BatchNorm_0"], "num_batches": ()}
  assert population["params"] == batch["params"]


def test_group_norm_needs_num_groups_dividing_the_features():
  c = run_config(norm="group", bn__num_groups=3)
  model = models.build_model(c.model)
  with pytest.raises(ValueError, match="model.bn.num_groups=3"):
    model.init(jax.random.key(0), jnp.zeros((4, 28, 28), jnp.uint8))


@pytest.mark.parametrize("changes, key", [
    (dict(norm="batchnorm"), "model.norm"),
    (dict(bn__running_average="median"), "model.bn.running_average"),
    (dict(norm="flax_batch", bn__running_average="population"), "model.bn.running_average"),
    (dict(norm="ghost", bn__ghost_size=5), "model.bn.ghost_size"),
    (dict(bn__ghost_size=0), "model.bn.ghost_size"),
    (dict(bn__renorm_r_max=0.5), "model.bn.renorm_r_max"),
    (dict(bn__renorm_d_max=-1.0), "model.bn.renorm_d_max"),
    (dict(bn__renorm_warmup_steps=-1), "model.bn.renorm_warmup_steps"),
    (dict(bn__renorm_r_max_steps=100), "model.bn.renorm_r_max_steps"),
    (dict(bn__renorm_d_max_steps=100), "model.bn.renorm_d_max_steps"),
    (dict(bn__noise_shift_max=-0.1), "model.bn.noise_shift_max"),
    (dict(bn__noise_scale_max=0.5), "model.bn.noise_scale_max"),
    (dict(bn__num_groups=0), "model.bn.num_groups"),
    (dict(norm="group", bn__num_groups=3), "model.bn.num_groups"),
])
def test_config_rejects_bad_variant_values(changes, key):
  with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
    config_lib.validate(run_config(**changes))


def test_config_accepts_every_norm():
  for norm in models.NORMS:
    config_lib.validate(run_config(norm=norm, bn__num_groups=2))


def test_train_rngs_give_a_noise_key_per_step_apart_from_the_shuffling_keys():
  data = jax.random.key_data(jax.random.key(0))
  keys = [jax.random.key_data(models.train_rngs(data, s)["noise"]) for s in range(3)]
  assert len({tuple(np.asarray(k)) for k in keys}) == 3
  np.testing.assert_array_equal(jax.random.key_data(models.train_rngs(data, 1)["noise"]), keys[1])
  shuffle = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(data), 1))
  assert not np.array_equal(shuffle, keys[1])


# ----------------------------------------------------------------------------
# The NNX modules: the same numbers as the linen modules, step after step

NNX_CASES = {
    "population": (BatchNormVariant, dict(running_average="population")),
    "frozen": (BatchNormVariant, dict(frozen=True)),
    "renorm": (BatchRenorm, dict(r_max=3.0, d_max=5.0, warmup_steps=1, r_max_steps=3,
                                 d_max_steps=2)),
    "ghost": (GhostBatchNorm, dict(ghost_size=3)),
    "ghost_population": (GhostBatchNorm, dict(ghost_size=4, running_average="population")),
    "noisy": (NoisyBatchNorm, dict(noise_shift_max=0.5, noise_scale_max=1.5)),
}


@pytest.mark.parametrize("case", list(NNX_CASES), ids=list(NNX_CASES))
def test_nnx_variants_match_linen(case):
  from flax import nnx
  linen_cls, kw = NNX_CASES[case]
  nnx_cls = getattr(bnlab.nnx, linen_cls.__name__)
  rng = np.random.default_rng(11)
  shape = (12, 5, 4)
  layer = nnx_cls(4, momentum=0.8, epsilon=EPS, rngs=nnx.Rngs(0), **kw)
  if case == "noisy":
    # Linen derives its noise key from the module path; the reference is plain
    # BN followed by the noise drawn from the very key the NNX layer is given.
    linen, kw = BatchNorm(momentum=0.8, epsilon=EPS), {}

    def add_noise(y, key):
      return variants.apply_activation_noise(
          y, variants.activation_noise(key, (4,), shift_max=0.5, scale_max=1.5))
  else:
    linen = linen_cls(momentum=0.8, epsilon=EPS, **kw)

    def add_noise(y, key):
      del key
      return y
  v = linen.init(jax.random.key(0), jnp.zeros(shape), use_running_average=True)
  # Non-trivial parameters, the same in both.
  scale, bias = rng.uniform(0.5, 2, 4).astype(np.float32), rng.normal(size=4).astype(np.float32)
  v = {**v, "params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
  layer.scale[...], layer.bias[...] = scale, bias
  assert set(nnx.state(layer, nnx.BatchStat)) == set(v["batch_stats"])

  @nnx.jit
  def nnx_step(layer, x, key):
    return layer(x, rngs=key) if case == "noisy" else layer(x)

  for step in range(5):
    x = jnp.asarray(rng.normal(step, 1 + step, shape), jnp.float32)
    key = jax.random.key(100 + step)
    y_linen, upd = linen.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    v = {**v, **upd}
    y_linen = add_noise(y_linen, key)
    y_nnx = nnx_step(layer, x, key)
    np.testing.assert_allclose(y_nnx, y_linen, rtol=1e-5, atol=1e-5)
    for name, value in v["batch_stats"].items():
      np.testing.assert_allclose(getattr(layer, name)[...], value, rtol=1e-6, atol=1e-6,
                                 err_msg=f"{name} after step {step}")
  if case == "renorm":
    assert int(layer.steps[...]) == 5
  # Inference: the running statistics, no noise, nothing updated.
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  before = jax.tree.map(jnp.copy, nnx.state(layer, nnx.BatchStat))
  np.testing.assert_allclose(layer(x, use_running_average=True),
                             linen.apply(v, x, use_running_average=True), rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(nnx.state(layer, nnx.BatchStat)), jax.tree.leaves(before)):
    np.testing.assert_array_equal(a, b)
  # Gradients with respect to the parameters and the input, train mode.
  key = jax.random.key(7)
  gy = jnp.asarray(rng.normal(size=shape), jnp.float32)

  def linen_loss(params, x):
    y, _ = linen.apply({**v, "params": params}, x, use_running_average=False,
                       mutable=["batch_stats"])
    return jnp.sum(add_noise(y, key) * gy)

  def nnx_loss(layer, x):
    return jnp.sum((layer(x, rngs=key) if case == "noisy" else layer(x)) * gy)

  g_params, g_x = jax.grad(linen_loss, argnums=(0, 1))(v["params"], x)
  g_layer, g_x_nnx = nnx.grad(nnx_loss, argnums=(0, 1))(layer, x)
  np.testing.assert_allclose(g_x_nnx, g_x, rtol=1e-4, atol=1e-5)
  for name in ("scale", "bias"):
    np.testing.assert_allclose(getattr(g_layer, name)[...], g_params[name], rtol=1e-4,
                               atol=1e-5)


def test_nnx_noisy_bn_draws_from_its_stream_and_checks_fields():
  from flax import nnx
  x = jnp.asarray(np.random.default_rng(12).normal(size=(16, 3)), jnp.float32)
  layer = bnlab.nnx.NoisyBatchNorm(3, rngs=nnx.Rngs(0, noise=1))
  first, second = layer(x), layer(x)
  assert not np.allclose(first, second)  # a new draw every call
  again = bnlab.nnx.NoisyBatchNorm(3, rngs=nnx.Rngs(0, noise=1))
  np.testing.assert_array_equal(again(x), first)  # reproducible from the seed
  np.testing.assert_allclose(layer(x, use_running_average=True),  # no noise
                             (x - layer.mean[...]) / jnp.sqrt(layer.var[...] + 1e-5),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="running_average"):
    bnlab.nnx.BatchNormVariant(3, running_average="median", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="axis_name"):
    bnlab.nnx.GhostBatchNorm(3, axis_name="batch", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="axis_name"):
    variants.ghost_batch_norm(x, None, None, jnp.zeros(3), jnp.ones(3), train=True,
                              ghost_size=8, axis_name="batch")


@pytest.mark.parametrize("make", [
    lambda r: bnlab.nnx.BatchNorm(5, rngs=r),
    lambda r: bnlab.nnx.BatchNormVariant(5, rngs=r),
    lambda r: bnlab.nnx.BatchNormVariant(5, running_average="population", rngs=r),
    lambda r: bnlab.nnx.BatchRenorm(5, warmup_steps=0, r_max_steps=1, d_max_steps=1, rngs=r),
    lambda r: bnlab.nnx.GhostBatchNorm(5, ghost_size=4, rngs=r),
], ids=["batch", "variant", "population", "renorm", "ghost"])
def test_nnx_update_stats_false_normalizes_and_changes_no_statistic(make):
  """NNX `update_stats=False`, as linen's: a train-mode call gives the same output as with
  updates, and every batch statistic (running mean and variance, the population count, the
  renorm step count) stays as it was; with True they change."""
  x = jax.random.normal(jax.random.key(0), (8, 5)) * 2 + 1
  kept, updated = make(nnx.Rngs(0)), make(nnx.Rngs(0))
  for layer in (kept, updated):  # one update first, so the running statistics are not (0, 1)
    layer(x[::-1] * 0.5, use_running_average=False)
  kept.update_stats = False
  kept_before = jax.tree.map(np.asarray, nnx.state(kept, nnx.BatchStat))
  updated_before = jax.tree.map(np.asarray, nnx.state(updated, nnx.BatchStat))
  jax.tree.map(np.testing.assert_array_equal, kept_before, updated_before)
  y_kept = kept(x, use_running_average=False)
  y_updated = updated(x, use_running_average=False)
  np.testing.assert_array_equal(y_kept, y_updated)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(kept, nnx.BatchStat), kept_before)
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         nnx.state(updated, nnx.BatchStat), updated_before)
  assert any(jax.tree.leaves(changed))
