"""`bnlab.batch_norm` / `batch_moments` against float64 NumPy references.

The references below are written from the paper (Ioffe & Szegedy 2015,
Algorithm 1 for training, running statistics for inference) and from the
closed-form backward pass, independently of `bnlab.layers.functional`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlab
from bnlab.layers import functional
from bnlab.layers.functional import canonicalize_axes

VARIANCES = ("shifted", "two_pass", "fast", "flax_two_pass")
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)

# Jitted: one compilation per test is cheaper than op-by-op dispatch.
bn = jax.jit(bnlab.batch_norm, static_argnames=(
    "train", "axis", "momentum", "epsilon", "variance", "unbiased_running_var", "axis_name",
    "axis_index_groups", "dtype", "stats_dtype"))


# ----------------------------------------------------------------------------
# float64 references


def _axes(ndim, axis):
  feature = tuple(sorted(a % ndim for a in ((axis,) if isinstance(axis, int) else axis)))
  return feature, tuple(i for i in range(ndim) if i not in feature)


def ref_moments(x, axis=-1, mask=None):
  """Mean, biased variance and count per feature of the (masked) batch."""
  x = np.asarray(x, np.float64)
  _, red = _axes(x.ndim, axis)
  w = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool), x.shape)
  xs = np.where(w, x, 0.0)
  m = w.sum(red)
  mu = xs.sum(red) / np.maximum(m, 1)
  d = np.where(w, x - np.expand_dims(mu, red), 0.0)
  var = (d * d).sum(red) / np.maximum(m, 1)
  return mu, var, m


def ref_batch_norm(x, scale, bias, mean, var, *, train, axis=-1, momentum=0.99,
                   epsilon=1e-5, mask=None, unbiased=False):
  """Algorithm 1 (train) / inference transform; returns (y, new_mean, new_var)."""
  x = np.asarray(x, np.float64)
  _, red = _axes(x.ndim, axis)
  mean = np.asarray(mean, np.float64)
  var = np.asarray(var, np.float64)
  if train:
    mu, sigma2, m = ref_moments(x, axis, mask)
    update = sigma2 * m / np.maximum(m - 1, 1) if unbiased else sigma2
    new_mean = np.where(m > 0, momentum * mean + (1 - momentum) * mu, mean)
    new_var = np.where(m > 0, momentum * var + (1 - momentum) * update, var)
  else:
    mu, sigma2, new_mean, new_var = mean, var, mean, var
  xhat = (x - np.expand_dims(mu, red)) / np.sqrt(np.expand_dims(sigma2, red) + epsilon)
  y = xhat
  if scale is not None:
    y = y * np.expand_dims(np.asarray(scale, np.float64), red)
  if bias is not None:
    y = y + np.expand_dims(np.asarray(bias, np.float64), red)
  return y, new_mean, new_var


def ref_grads(x, scale, dy, *, axis=-1, epsilon=1e-5):
  """Closed-form BN backward pass in train mode: (dx, dscale, dbias)."""
  x = np.asarray(x, np.float64)
  dy = np.asarray(dy, np.float64)
  _, red = _axes(x.ndim, axis)
  mu, var, _ = ref_moments(x, axis)
  mu, var = np.expand_dims(mu, red), np.expand_dims(var, red)
  g = np.expand_dims(np.asarray(scale, np.float64), red)
  xhat = (x - mu) / np.sqrt(var + epsilon)
  mean = lambda v: v.mean(red, keepdims=True)
  dx = g / np.sqrt(var + epsilon) * (dy - mean(dy) - xhat * mean(dy * xhat))
  return dx, (dy * xhat).sum(red), dy.sum(red)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def feature_params(rng, fshape):
  return (
      rng.uniform(0.5, 2.0, fshape).astype(np.float32),   # scale
      rng.normal(0, 1, fshape).astype(np.float32),        # bias
      rng.normal(0, 1, fshape).astype(np.float32),        # running mean
      rng.uniform(0.5, 2.0, fshape).astype(np.float32),   # running var
  )


CASES = {  # name: (shape, feature axis)
    "dense": ((16, 5), -1),
    "conv_nhwc": ((4, 5, 3, 6), -1),
    "multi_axis": ((6, 3, 4, 2), (1, 2)),
}


# ----------------------------------------------------------------------------
# Algorithm 1 and inference


@pytest.mark.parametrize("case", list(CASES))
def test_algorithm1_train_and_inference(case):
  shape, axis = CASES[case]
  rng = np.random.default_rng(0)
  x = rng.normal(3.0, 2.0, shape).astype(np.float32)
  fshape = tuple(shape[a] for a in canonicalize_axes(len(shape), axis))
  scale, bias, mean, var = feature_params(rng, fshape)
  kw = dict(axis=axis, momentum=0.9, epsilon=1e-3)
  for s, b in ((scale, bias), (None, bias), (scale, None), (None, None)):
    for variance in VARIANCES:
      for train in (True, False):
        # eager: every configuration shares the per-shape compiled primitives
        out = bnlab.batch_norm(x, s, b, mean, var, train=train, variance=variance, **kw)
        y, m, v = ref_batch_norm(x, s, b, mean, var, train=train, **kw)
        np.testing.assert_allclose(out.y, y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out.mean, m, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out.var, v, rtol=1e-6, atol=1e-6)
        assert out.y.shape == x.shape and out.y.dtype == jnp.float32
        assert out.mean.shape == fshape and out.var.shape == fshape


def test_conv_statistics_are_per_channel_over_n_h_w():
  x = np.random.default_rng(1).normal(size=(3, 4, 5, 2)).astype(np.float32)
  m = bnlab.batch_moments(x, (0, 1, 2))
  flat = x.reshape(-1, 2).astype(np.float64)
  np.testing.assert_allclose(m.mean, flat.mean(0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(m.var, flat.var(0), rtol=1e-5)
  np.testing.assert_array_equal(m.count, [60, 60])


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    data=st.data(),
    variance=st.sampled_from(VARIANCES),
    momentum=st.floats(0.0, 1.0),
    epsilon=st.floats(1e-6, 1e-1),
    seed=st.integers(0, 2**16),
)
def test_batch_norm_matches_reference_property(shape, data, variance, momentum, epsilon, seed):
  ndim = len(shape)
  axis = data.draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim - 1, unique=True))
  rng = np.random.default_rng(seed)
  x = rng.normal(rng.uniform(-5, 5), rng.uniform(0.5, 3), shape).astype(np.float32)
  fshape = tuple(shape[a] for a in sorted(axis))
  scale, bias, mean, var = feature_params(rng, fshape)
  kw = dict(axis=tuple(axis), momentum=momentum, epsilon=epsilon)
  out = bn(x, scale, bias, mean, var, train=True, variance=variance, **kw)
  y, m, v = ref_batch_norm(x, scale, bias, mean, var, train=True, **kw)
  # Errors in y scale with |x - mu| / sqrt(var + eps) <= ~(6 * 3) / sqrt(eps).
  np.testing.assert_allclose(out.y, y, rtol=2e-4, atol=5e-4)
  np.testing.assert_allclose(out.mean, m, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.var, v, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("case", list(CASES))
def test_gradients_match_closed_form_backward(case, variance):
  shape, axis = CASES[case]
  rng = np.random.default_rng(2)
  x = rng.normal(1.0, 2.0, shape).astype(np.float32)
  fshape = tuple(shape[a] for a in canonicalize_axes(len(shape), axis))
  scale, bias, mean, var = feature_params(rng, fshape)
  dy = rng.normal(size=shape).astype(np.float32)

  def loss(x, scale, bias):
    out = bn(x, scale, bias, mean, var, train=True, axis=axis, variance=variance)
    return jnp.sum(out.y * dy)

  dx, dscale, dbias = jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias)
  rdx, rdscale, rdbias = ref_grads(x, scale, dy, axis=axis)
  np.testing.assert_allclose(dx, rdx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dscale, rdscale, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(dbias, rdbias, rtol=1e-5, atol=1e-5)


def test_inference_gradients_are_affine():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(6, 4)).astype(np.float32)
  scale, bias, mean, var = feature_params(rng, (4,))
  dy = rng.normal(size=x.shape).astype(np.float32)
  loss = lambda x, s: jnp.sum(bn(x, s, bias, mean, var, train=False).y * dy)
  dx, ds = jax.grad(loss, (0, 1))(x, scale)
  inv = 1 / np.sqrt(var.astype(np.float64) + 1e-5)
  np.testing.assert_allclose(dx, dy * scale * inv, rtol=1e-5)
  np.testing.assert_allclose(ds, (dy * (x - mean) * inv).sum(0), rtol=1e-4, atol=1e-5)


def test_running_statistics_get_no_gradient():
  x = np.random.default_rng(4).normal(size=(8, 3)).astype(np.float32)
  f = lambda x: jnp.sum(bn(x, None, None, jnp.zeros(3), jnp.ones(3), train=True).mean)
  np.testing.assert_array_equal(jax.grad(f)(x), 0.0)


# ----------------------------------------------------------------------------
# Numerical robustness


def _offset_input(shape, mean, std, seed=0):
  return (np.random.default_rng(seed).normal(size=shape) * std + mean).astype(np.float32)


def test_large_mean_default_is_exact_where_flax_fast_variance_fails():
  import flax.linen as nn

  x = _offset_input((256, 64), 1e4, 1.0)
  y_ref, _, _ = ref_batch_norm(x, None, None, np.zeros(64), np.ones(64), train=True)
  y = bn(x, None, None, jnp.zeros(64), jnp.ones(64), train=True).y
  assert rel_err(y, y_ref) <= 1e-3
  flax_bn = nn.BatchNorm(use_running_average=False)  # flax default: fast variance
  variables = flax_bn.init(jax.random.key(0), x)
  y_flax, _ = flax_bn.apply(variables, x, mutable=["batch_stats"])
  assert rel_err(y_flax, y_ref) > 1  # E[x^2] - E[x]^2 cancels catastrophically
  assert rel_err(bnlab.BatchNorm(use_running_average=False).apply(
      variables, x, mutable=["batch_stats"])[0], y_ref) <= 1e-3


@pytest.mark.parametrize("variance", ["shifted", "two_pass"])
@pytest.mark.parametrize("shape", [(512, 8), (8, 6, 6, 4)])
def test_offset_and_scale_robustness(shape, variance):
  # Reference: float64 statistics of the *same* float32 input, so input
  # rounding cancels out. In float32 the centred values x - k are exact
  # (Sterbenz) and the float32 sums have relative error ~ log2(n) * 6e-8; the
  # shifted variance loses a further factor 1 + (mu - k)^2 / var <= ~20 (k is a
  # sample of the batch). Hence 1e-5 on the variance and output is a margin of
  # about 5x; epsilon=1e-8 keeps sigma^2 in charge of the output even at std 1e-3.
  f = shape[-1]
  moments = jax.jit(lambda x: bnlab.batch_moments(x, tuple(range(x.ndim - 1)), variance=variance))
  for mean in (0.0, 1e2, -1e4):
    for std in (1.0, 1e-1, 1e-3):
      x = _offset_input(shape, mean, std, seed=5)
      mu, var, _ = ref_moments(x)
      m = moments(x)
      np.testing.assert_allclose(m.var, var, rtol=1e-5)
      np.testing.assert_allclose(m.mean, mu, rtol=1e-7, atol=std * 1e-5)
      y_ref, _, _ = ref_batch_norm(x, None, None, np.zeros(f), np.ones(f), train=True, epsilon=1e-8)
      y = bn(x, None, None, jnp.zeros(f), jnp.ones(f), train=True, epsilon=1e-8, variance=variance).y
      assert rel_err(y, y_ref) <= 1e-5, (mean, std)


@pytest.mark.parametrize("variance", VARIANCES)
def test_constant_features_give_bias(variance):
  # (the fast formula cannot resolve var 0 at |x| = 1e4: 1e8 - 1e8 in float32)
  big = -4.0 if variance == "fast" else -1e4
  x = np.broadcast_to(np.float32([3.0, big, 0.0, 7.5]), (10, 4)).copy()
  bias = np.float32([0.5, -2.0, 1.0, 0.0])
  out = bn(x, np.full(4, 3.0, np.float32), bias, jnp.zeros(4), jnp.ones(4),
                         train=True, variance=variance)
  assert np.isfinite(out.y).all() and np.isfinite(out.var).all()
  np.testing.assert_allclose(out.y, np.broadcast_to(bias, x.shape), atol=1e-2)
  np.testing.assert_allclose(out.var, 0.99, atol=1e-2)
  if variance == "shifted":
    np.testing.assert_array_equal(out.y, np.broadcast_to(bias, x.shape))


@pytest.mark.parametrize("variance", VARIANCES)
def test_batch_of_one(variance):
  rng = np.random.default_rng(6)
  x = rng.normal(size=(1, 5)).astype(np.float32)
  scale, bias, mean, var = feature_params(rng, (5,))
  for unbiased in (False, True):
    out = bn(x, scale, bias, mean, var, train=True, variance=variance,
                           unbiased_running_var=unbiased)
    y, m, v = ref_batch_norm(x, scale, bias, mean, var, train=True)
    assert np.isfinite(out.y).all() and np.isfinite(out.var).all()
    np.testing.assert_allclose(out.y, bias[None], atol=1e-6)  # x - mean = 0 exactly
    np.testing.assert_allclose(out.mean, m, rtol=1e-6)
    np.testing.assert_allclose(out.var, v, rtol=1e-6)
  # inference on a single example uses the running statistics only
  y_inf = bn(x, scale, bias, mean, var, train=False).y
  np.testing.assert_allclose(y_inf, ref_batch_norm(x, scale, bias, mean, var, train=False)[0],
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(jnp.bfloat16, 1e-5), (jnp.float16, 1e-5)])
def test_half_precision_inputs(dtype, tol):
  import flax.linen as nn

  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(100.0, 2.0, (64, 8)), dtype)
  xf = np.asarray(x.astype(jnp.float32))  # the exact half-precision values
  y_ref, m_ref, v_ref = ref_batch_norm(xf, np.ones(8), np.zeros(8), np.zeros(8), np.ones(8), train=True)
  module = bnlab.BatchNorm(use_running_average=False)
  variables = module.init(jax.random.key(0), x)
  y, state = module.apply(variables, x, mutable=["batch_stats"])
  y_flax, state_flax = nn.BatchNorm(use_running_average=False, use_fast_variance=False).apply(
      variables, x, mutable=["batch_stats"])
  assert y.dtype == y_flax.dtype == jnp.float32  # promoted by the float32 params, as flax
  assert state["batch_stats"]["var"].dtype == jnp.float32
  # float32 statistics of exactly representable inputs: float32-level errors
  assert rel_err(y, y_ref) <= tol
  np.testing.assert_allclose(state["batch_stats"]["var"], v_ref, rtol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["mean"], m_ref, rtol=1e-6)
  # output in half precision on request: rounding of the output only
  y_half = bnlab.BatchNorm(use_running_average=False, dtype=dtype).apply(
      variables, x, mutable=["batch_stats"])[0]
  assert y_half.dtype == dtype
  assert rel_err(y_half, y_ref) <= 1e-2
  # the functional core keeps the input dtype without params
  assert bn(x, None, None, jnp.zeros(8), jnp.ones(8), train=True).y.dtype == dtype


def test_integer_input_gives_float_output():
  x = jnp.arange(12).reshape(4, 3)
  y = bn(x, None, None, jnp.zeros(3), jnp.ones(3), train=True).y
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, ref_batch_norm(np.asarray(x), None, None, np.zeros(3), np.ones(3),
                                               train=True)[0], rtol=1e-5)


# ----------------------------------------------------------------------------
# Masks


@pytest.mark.parametrize("variance", VARIANCES)
@pytest.mark.parametrize("kind", ["examples", "elements", "conv_pixels"])
def test_mask_statistics_equal_those_of_the_subset(kind, variance):
  rng = np.random.default_rng(8)
  shape = (12, 5) if kind != "conv_pixels" else (3, 4, 4, 5)
  x = rng.normal(10.0, 2.0, shape).astype(np.float32)
  mshape = {"examples": (12, 1), "elements": (12, 5), "conv_pixels": (3, 4, 4, 1)}[kind]
  mask = rng.uniform(size=mshape) < 0.6
  mask.flat[0] = True
  scale, bias, mean, var = feature_params(rng, (5,))
  out = bn(x, scale, bias, mean, var, train=True, mask=mask, variance=variance)
  y, m, v = ref_batch_norm(x, scale, bias, mean, var, train=True, mask=mask)
  np.testing.assert_allclose(out.mean, m, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out.var, v, rtol=1e-5)
  np.testing.assert_allclose(out.y, y, rtol=1e-4, atol=1e-4)  # all entries normalized
  if kind == "examples":  # same as dropping the masked rows
    sub = bn(x[mask[:, 0]], scale, bias, mean, var, train=True, variance=variance)
    np.testing.assert_allclose(out.y[mask[:, 0]], sub.y, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.var, sub.var, rtol=1e-5)


@pytest.mark.parametrize("variance", VARIANCES)
def test_all_false_mask_leaves_running_statistics(variance):
  """No counted entry: NaN outputs; the running statistics kept, or Flax's NaN (0/0) with
  Flax's formulas ("fast", "flax_two_pass")."""
  flax_rule = variance in functional.FLAX_VARIANCES
  rng = np.random.default_rng(9)
  x = rng.normal(size=(6, 3)).astype(np.float32)
  _, _, mean, var = feature_params(rng, (3,))
  out = bn(x, None, None, mean, var, train=True, variance=variance,
                         mask=np.zeros((6, 1), bool), unbiased_running_var=True)
  if flax_rule:
    assert np.isnan(out.mean).all() and np.isnan(out.var).all()
  else:
    np.testing.assert_array_equal(out.mean, mean)
    np.testing.assert_array_equal(out.var, var)
  assert np.isnan(out.y).all()  # no batch statistics: NaN, as in Flax
  # a feature with no valid entry keeps its statistics (or gets NaN); the others update
  mask = np.ones((6, 3), bool)
  mask[:, 1] = False
  out = bn(x, None, None, mean, var, train=True, variance=variance, mask=mask)
  if flax_rule:
    assert np.isnan(out.mean[1]) and np.isnan(out.var[1])
  else:
    assert out.mean[1] == mean[1] and out.var[1] == var[1]
  assert out.mean[0] != mean[0] and np.isfinite(np.asarray(out.var)[[0, 2]]).all()


@pytest.mark.parametrize("variance", VARIANCES)
def test_masked_padding_does_not_leak(variance):
  rng = np.random.default_rng(10)
  valid = rng.normal(5.0, 1.0, (10, 4)).astype(np.float32)
  mask = np.arange(16)[:, None] < 10
  scale, bias, mean, var = feature_params(rng, (4,))
  y, m, v = ref_batch_norm(valid, scale, bias, mean, var, train=True)
  dy = rng.normal(size=(10, 4)).astype(np.float32)
  rdx, rds, rdb = ref_grads(valid, scale, dy)

  @jax.jit
  def run(x, scale, bias):
    def loss(x, scale, bias):  # a loss over the valid entries only
      o = bnlab.batch_norm(x, scale, bias, mean, var, train=True, mask=mask, variance=variance)
      return jnp.sum(o.y[:10] * dy), o
    (_, out), grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(x, scale, bias)
    moments_grad = jax.grad(lambda x: jnp.sum(bnlab.batch_moments(
        x, 0, mask=mask, variance=variance).var * dy[0]))(x)
    return out, grads, moments_grad

  for garbage in (1e30, -3e38, np.inf, np.nan):
    x = np.concatenate([valid, np.full((6, 4), garbage, np.float32)])
    out, grads, moments_grad = run(x, scale, bias)
    np.testing.assert_allclose(out.mean, m, rtol=1e-6)
    np.testing.assert_allclose(out.var, v, rtol=1e-5)
    np.testing.assert_allclose(out.y[:10], y, rtol=1e-4, atol=1e-4)
    # the statistics' own gradients stay clean whatever the padding
    assert np.isfinite(moments_grad).all()
    np.testing.assert_array_equal(moments_grad[10:], 0.0)
    # NaN/inf padding gives NaN/inf *outputs* there, hence 0 * inf in the scale
    # gradient: full gradients are checked for finite padding
    if garbage == 1e30:
      np.testing.assert_allclose(grads[0][:10], rdx, rtol=1e-4, atol=1e-5)
      np.testing.assert_array_equal(grads[0][10:], 0.0)
      np.testing.assert_allclose(grads[1], rds, rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(grads[2], rdb, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------
# unbiased running variance, validation


@pytest.mark.parametrize("variance", VARIANCES)
def test_unbiased_running_var(variance):
  rng = np.random.default_rng(11)
  x = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  _, _, mean, var = feature_params(rng, (4,))
  out = bn(x, None, None, mean, var, train=True, momentum=0.8,
                         unbiased_running_var=True, variance=variance)
  y, m, v = ref_batch_norm(x, None, None, mean, var, train=True, momentum=0.8, unbiased=True)
  sigma2 = ref_moments(x)[1]
  np.testing.assert_allclose(v, 0.8 * var.astype(np.float64) + 0.2 * sigma2 * 18 / 17, rtol=1e-12)
  np.testing.assert_allclose(out.var, v, rtol=1e-5)
  np.testing.assert_allclose(out.mean, m, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out.y, y, rtol=1e-4, atol=1e-5)  # normalized with biased var
  # with a mask the correction uses the count of valid entries
  mask = np.zeros((2, 3, 3, 1), bool)
  mask[0, :2] = True  # 6 valid per channel
  out = bn(x, None, None, mean, var, train=True, mask=mask, momentum=0.8,
                         unbiased_running_var=True, variance=variance)
  _, _, v = ref_batch_norm(x, None, None, mean, var, train=True, mask=mask, momentum=0.8, unbiased=True)
  np.testing.assert_allclose(out.var, v, rtol=1e-5)


def test_argument_validation():
  x = jnp.ones((4, 3))
  with pytest.raises(ValueError, match="variance"):
    bn(x, None, None, jnp.zeros(3), jnp.ones(3), train=True, variance="welford")
  with pytest.raises(ValueError, match="shape"):
    bn(x, jnp.ones(4), None, jnp.zeros(3), jnp.ones(3), train=True)
  with pytest.raises(ValueError, match="out of range"):
    bn(x, None, None, jnp.zeros(3), jnp.ones(3), train=True, axis=2)
  with pytest.raises(ValueError, match="repeat"):
    bn(x, None, None, jnp.zeros(3), jnp.ones(3), train=True, axis=(1, -1))


# ----------------------------------------------------------------------------
# Transformations


@pytest.mark.parametrize("variance", ["shifted", "two_pass"])
def test_jit_vmap_grad_compositions(variance):
  rng = np.random.default_rng(12)
  models, shape = 3, (8, 2, 2, 3)
  xs = rng.normal(2.0, 1.5, (models, *shape)).astype(np.float32)
  params = [np.stack(p) for p in zip(*(feature_params(rng, (3,)) for _ in range(models)))]
  dy = rng.normal(size=shape).astype(np.float32)

  def f(x, scale, bias, mean, var):
    out = bn(x, scale, bias, mean, var, train=True, momentum=0.7, variance=variance)
    return jnp.sum(out.y * dy), out

  value_and_grad = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)
  (loss, out), grads = jax.jit(jax.vmap(value_and_grad))(xs, *params)
  for i in range(models):
    pi = [p[i] for p in params]
    y, m, v = ref_batch_norm(xs[i], *pi, train=True, momentum=0.7)
    np.testing.assert_allclose(out.y[i], y, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.mean[i], m, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.var[i], v, rtol=1e-5)
    np.testing.assert_allclose(loss[i], np.sum(y * dy), rtol=1e-4, atol=1e-4)
    rdx, rds, rdb = ref_grads(xs[i], pi[0], dy)
    np.testing.assert_allclose(grads[0][i], rdx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads[1][i], rds, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads[2][i], rdb, rtol=1e-5, atol=1e-5)
  if variance != "shifted":
    return
  # second order (grad of a gradient norm) agrees with the corrected two-pass form
  def gnorm(x, variance):
    g = jax.grad(lambda x: bnlab.batch_norm(x, None, None, params[2][0], params[3][0],
                                            train=True, variance=variance).y[0, 0, 0, 0])(x)
    return jnp.sum(g ** 2)

  second = jax.jit(lambda x: [jax.grad(gnorm)(x, v) for v in ("shifted", "two_pass")])(xs[0])
  assert np.isfinite(second[0]).all()
  np.testing.assert_allclose(second[0], second[1], rtol=1e-3, atol=1e-4)


@pytest.mark.usefixtures("float32_matmuls")
def test_grad_through_module_inside_a_model():
  import flax.linen as nn

  class MLP(nn.Module):
    norm: type

    @nn.compact
    def __call__(self, x, train):
      x = nn.Dense(16)(x)
      x = self.norm(use_running_average=not train, momentum=0.9, use_fast_variance=False)(x)
      return nn.Dense(1)(nn.relu(x))

  rng = np.random.default_rng(13)
  x = rng.normal(size=(32, 6)).astype(np.float32)
  t = rng.normal(size=(32, 1)).astype(np.float32)
  variables = MLP(nn.BatchNorm).init(jax.random.key(0), x, False)
  results = []
  for norm in (bnlab.BatchNorm, nn.BatchNorm):
    model = MLP(norm)

    @jax.jit
    def step(params, batch_stats):
      def loss(params):
        pred, state = model.apply({"params": params, "batch_stats": batch_stats}, x, True,
                                  mutable=["batch_stats"])
        return jnp.mean((pred - t) ** 2), state["batch_stats"]
      return jax.value_and_grad(loss, has_aux=True)(params)

    results.append(step(variables["params"], variables["batch_stats"]))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), *results)
  assert results[0][0][1]["BatchNorm_0"]["mean"].shape == (16,)


def test_shifted_variance_stays_exact_when_the_first_example_is_far_out():
  # A sparse feature firing only in example 0 (100 against ~0.01): a one-example shift
  # cost 1.5% of the variance in float32; the shift over 16 rows keeps it near 1e-5.
  rng = np.random.default_rng(1)
  x = np.abs(rng.normal(0, 1e-2, (100_000, 1)))
  x[0] = 100.0
  xf = jnp.asarray(x, jnp.float32)
  ref = np.asarray(xf, np.float64).var(0)
  assert rel_err(bnlab.batch_moments(xf, 0).var, ref) < 1e-4
