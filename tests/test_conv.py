"""Tests for bnlab.models.conv: im2col/taps convolutions and reshape max pooling."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax import lax
try:  # jax >= 0.9 moved it to the top level
  from jax import enable_x64
except ImportError:
  from jax.experimental import enable_x64

from bnlab.models import conv as bconv

# Unoptimized backend codegen: compiles ~4x faster, same numerics here.
_jit = partial(jax.jit,
               compiler_options={"xla_backend_optimization_level": 0})

CONV_CASES = [
    # (x shape NHWC, kernel shape HWIO, padding)
    ((2, 8, 8, 1), (3, 3, 1, 4), "VALID"),
    ((3, 7, 9, 3), (2, 2, 3, 5), "SAME"),
    ((1, 6, 5, 2), (1, 1, 2, 3), "VALID"),
    ((2, 9, 6, 4), (5, 3, 4, 2), "SAME"),
    ((2, 6, 6, 2), (3, 3, 2, 3), ((1, 2), (0, 1))),
]


def _normal(seed, shape, dtype=np.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _reference_conv(x, kernel, padding):
  pads = bconv._explicit_padding(padding, x.shape[1:3], kernel.shape[:2])
  return lax.conv_general_dilated(
      x, kernel, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize("x_shape,k_shape,padding", CONV_CASES)
def test_conv2d_matches_lax_forward_and_gradients(x_shape, k_shape, padding):
  impls = ("gemm", "im2col", "taps", "xla", "xla_canonical")

  def outputs_and_grads(x, kernel, cot):
    def fwd_and_grads(conv):
      loss = lambda a, b: jnp.sum(conv(a, b) * cot)
      return conv(x, kernel), jax.grad(loss, (0, 1))(x, kernel)
    ref = fwd_and_grads(lambda a, b: _reference_conv(a, b, padding))
    got = [fwd_and_grads(lambda a, b, i=i: bconv.conv2d(
        a, b, padding=padding, implementation=i)) for i in impls]
    return ref, got

  with enable_x64():
    x = _normal(0, x_shape, jnp.float64)
    kernel = _normal(1, k_shape, jnp.float64)
    out_shape = jax.eval_shape(
        partial(_reference_conv, padding=padding), x, kernel).shape
    cot = _normal(2, out_shape, jnp.float64)
    ref, got = _jit(outputs_and_grads)(x, kernel, cot)
    for impl, result in zip(impls, got):
      assert result[0].dtype == jnp.float64, impl
      jax.tree.map(
          lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12,
                                                  atol=1e-12, err_msg=impl),
          result, ref)


STRIDED_CASES = [
    # (x shape NHWC, kernel shape HWIO, strides, padding): even and odd sizes, the
    # ResNet's 3x3 stride-2 pad-1 and 1x1 stride-2 projection, uneven strides, SAME.
    ((2, 8, 8, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1))),
    ((2, 7, 7, 2), (3, 3, 2, 3), (2, 2), ((1, 1), (1, 1))),
    ((2, 7, 6, 2), (1, 1, 2, 4), (2, 2), "VALID"),
    ((1, 9, 8, 2), (3, 2, 2, 3), (3, 2), "SAME"),
    ((2, 10, 7, 1), (4, 3, 1, 2), (2, 3), "VALID"),
]


@pytest.mark.parametrize("x_shape,k_shape,strides,padding", STRIDED_CASES)
def test_strided_conv2d_matches_lax_forward_and_gradients(x_shape, k_shape, strides, padding):
  """Every implementation at stride > 1 against lax's own strided convolution (string
  paddings resolved by lax, not by bnlab), float64, forward and both gradients."""
  impls = ("gemm", "im2col", "taps", "xla", "xla_canonical")

  def reference(a, b):
    return lax.conv_general_dilated(a, b, strides, padding,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    precision=lax.Precision.HIGHEST)

  def outputs_and_grads(x, kernel, cot):
    def fwd_and_grads(conv):
      loss = lambda a, b: jnp.sum(conv(a, b) * cot)
      return conv(x, kernel), jax.grad(loss, (0, 1))(x, kernel)
    return fwd_and_grads(reference), [fwd_and_grads(lambda a, b, i=i: bconv.conv2d(
        a, b, strides=strides, padding=padding, implementation=i)) for i in impls]

  with enable_x64():
    x = _normal(20, x_shape, jnp.float64)
    kernel = _normal(21, k_shape, jnp.float64)
    out_shape = jax.eval_shape(reference, x, kernel).shape
    cot = _normal(22, out_shape, jnp.float64)
    ref, got = _jit(outputs_and_grads)(x, kernel, cot)
    for impl, result in zip(impls, got):
      assert result[0].shape == out_shape, impl
      jax.tree.map(lambda a, b: np.testing.assert_allclose(
          a, b, rtol=1e-12, atol=1e-12, err_msg=impl), result, ref)


def test_conv_module_strides_match_flax():
  x = _normal(23, (2, 9, 9, 3))
  ours = bconv.Conv(4, (3, 3), strides=2, padding=((1, 1), (1, 1)))
  v = ours.init(jax.random.key(0), x)
  theirs = nn.Conv(4, (3, 3), strides=2, padding=((1, 1), (1, 1)),
                   precision=lax.Precision.HIGHEST)
  with jax.default_matmul_precision("highest"):
    np.testing.assert_allclose(ours.apply(v, x), theirs.apply(v, x), rtol=1e-5, atol=1e-5)
  assert ours.apply(v, x).shape == (2, 5, 5, 4)
  with pytest.raises(ValueError, match="strides"):
    bconv.conv2d(x, v["params"]["kernel"], strides=0)


@pytest.mark.parametrize("impl", ["gemm", "im2col", "taps"])
def test_conv2d_float32_tolerance(impl):
  x, kernel = _normal(3, (4, 28, 28, 1)), _normal(4, (3, 3, 1, 32))
  ref = _jit(partial(_reference_conv, padding="VALID"))(x, kernel)
  got = _jit(partial(bconv.conv2d, implementation=impl,
                     precision=lax.Precision.HIGHEST))(x, kernel)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_conv2d_rejects_bad_input():
  with pytest.raises(ValueError):
    bconv.conv2d(jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 1, 2)))
  with pytest.raises(ValueError):
    bconv.conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 2)),
                 implementation="fft")
  with pytest.raises(ValueError):
    bconv.conv2d(jnp.zeros((1, 4, 4, 1)), jnp.zeros((3, 3, 1, 2)),
                 padding="CIRCULAR")


def test_resolve_conv_implementation():
  expected = "gemm" if jax.default_backend() == "cpu" else "xla"
  assert bconv.resolve_conv_implementation("auto") == expected
  for name in bconv.IMPLEMENTATIONS:
    assert bconv.resolve_conv_implementation(name) == name
  with pytest.raises(ValueError):
    bconv.resolve_conv_implementation("cudnn")


@pytest.mark.parametrize("impl,padding,kernel_size,use_bias", [
    ("auto", "VALID", (3, 3), True), ("auto", "SAME", (2, 4), False),
    ("im2col", "SAME", (3, 3), True), ("taps", "VALID", (2, 4), True),
    ("xla_canonical", "SAME", (3, 2), True), ("xla", "VALID", (3, 3), True),
    ("gemm", ((2, 0), (1, 1)), (3, 3), True)])
def test_conv_module_matches_flax(impl, padding, kernel_size, use_bias):
  x = _normal(5, (2, 10, 9, 3))
  ours = bconv.Conv(6, kernel_size, padding=padding, use_bias=use_bias,
                    implementation=impl, precision=lax.Precision.HIGHEST)
  ref = nn.Conv(6, kernel_size, padding=padding, use_bias=use_bias,
                precision=lax.Precision.HIGHEST)
  key = jax.random.PRNGKey(3)
  v_ours, v_ref = _jit(ours.init)(key, x), _jit(ref.init)(key, x)
  # Same tree, shapes, and (same initializers, same rng) values.
  assert jax.tree.structure(v_ours) == jax.tree.structure(v_ref)
  jax.tree.map(np.testing.assert_array_equal, v_ours, v_ref)
  if use_bias:  # make the bias non-trivial
    v_ref = jax.tree.map(lambda a: a + 0.1, v_ref)
  np.testing.assert_allclose(_jit(ours.apply)(v_ref, x),
                             _jit(ref.apply)(v_ref, x), rtol=1e-5, atol=1e-5)


def test_conv_module_batch_dims_and_dtype():
  x = _normal(6, (8, 8, 2))  # unbatched
  m = bconv.Conv(3, 3)
  v = _jit(m.init)(jax.random.PRNGKey(0), x)
  apply = _jit(m.apply)
  assert apply(v, x).shape == (6, 6, 3)
  xb = jnp.stack([x, 2 * x]).reshape(1, 2, 8, 8, 2)
  np.testing.assert_allclose(apply(v, xb)[0, 1], apply(v, 2 * x),
                             rtol=1e-5, atol=1e-5)
  m16 = bconv.Conv(3, 3, dtype=jnp.bfloat16)
  assert jax.eval_shape(m16.apply, v, x).dtype == jnp.bfloat16


def _tie_free(seed, shape):
  n = int(np.prod(shape))
  perm = np.random.default_rng(seed).permutation(n).reshape(shape)
  return jnp.asarray(perm / n, jnp.float32)


@pytest.mark.parametrize("shape,window", [
    ((2, 7, 9, 3), 2), ((1, 9, 9, 2), 3), ((3, 24, 24, 4), 2)])
def test_max_pool_matches_flax_on_tie_free_input(shape, window):
  x = _tie_free(7, shape)
  ref_fn = lambda a: nn.max_pool(a, (window, window), (window, window))
  ours_fn = lambda a: bconv.max_pool(a, window)
  np.testing.assert_array_equal(_jit(ours_fn)(x), _jit(ref_fn)(x))
  cot = _normal(8, jax.eval_shape(ref_fn, x).shape)
  g = _jit(jax.grad(lambda a: jnp.sum(ours_fn(a) * cot)))(x)
  g_ref = _jit(jax.grad(lambda a: jnp.sum(ref_fn(a) * cot)))(x)
  np.testing.assert_array_equal(g, g_ref)


def test_max_pool_ties_split_gradient_evenly():
  # One all-zero window (4-way tie), one 2-way tie, one unique max.
  x = jnp.array([[0., 0., 1., 3., 5., 2.],
                 [0., 0., 3., 0., 4., 1.]]).reshape(1, 2, 6, 1)
  g = jax.grad(lambda a: jnp.sum(bconv.max_pool(a)))(x)[0, :, :, 0]
  g_ref = jax.grad(lambda a: jnp.sum(nn.max_pool(a, (2, 2), (2, 2))))(x)
  g_ref = g_ref[0, :, :, 0]
  np.testing.assert_array_equal(
      g, [[.25, .25, 0., .5, 1., 0.], [.25, .25, .5, 0., 0., 0.]])
  # flax gives everything to the first maximal element of each window.
  np.testing.assert_array_equal(
      g_ref, [[1., 0., 0., 1., 1., 0.], [0., 0., 0., 0., 0., 0.]])
  # Both are subgradients: same total per window, supported on the maxima.
  win = lambda a: a.reshape(2, 3, 2).sum(axis=(0, 2))
  np.testing.assert_array_equal(win(g), win(g_ref))


def flax_pool(x):
  return nn.max_pool(x, (2, 2), (2, 2))


def test_conv_relu_pool_param_grads_unaffected_by_ties():
  # Post-ReLU zeros create ties; their ReLU derivative is 0, so the choice of
  # subgradient in the pool does not reach the parameters.
  x, kernel = _normal(9, (4, 12, 12, 1)), _normal(10, (3, 3, 1, 8))

  def loss(k, pool):
    y = jax.nn.relu(bconv.conv2d(x, k, implementation="im2col") - 0.5)
    return jnp.sum(pool(y) ** 2)

  g = _jit(jax.grad(loss), static_argnums=1)(kernel, bconv.max_pool)
  g_ref = _jit(jax.grad(loss), static_argnums=1)(kernel, flax_pool)
  np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("float32_matmuls")
def test_composes_with_jit_vmap_grad_scan():
  xs = _normal(11, (3, 2, 8, 8, 2))  # 3 steps of batch 2
  kernel = _normal(12, (3, 3, 2, 4))

  def loss(k, x, impl):
    y = bconv.max_pool(jax.nn.relu(bconv.conv2d(x, k, implementation=impl)))
    return jnp.mean(y ** 2)

  def epoch(k, impl):
    def body(k, x):
      l, g = jax.value_and_grad(loss)(k, x, impl)
      return k - 0.1 * g, l
    return lax.scan(body, k, xs)

  run_epoch = _jit(epoch, static_argnums=1)
  k_ref, l_ref = run_epoch(kernel, "xla")
  for impl in ("gemm", "im2col", "taps", "xla_canonical"):
    k_new, l = run_epoch(kernel, impl)
    np.testing.assert_allclose(l, l_ref, rtol=1e-4)
    np.testing.assert_allclose(k_new, k_ref, rtol=1e-4, atol=1e-5)
    # vmap over the batch of single examples equals the batched call.
    conv = partial(bconv.conv2d, implementation=impl)
    per_ex = _jit(jax.vmap(lambda x: conv(x[None], kernel)[0]))(xs[0])
    np.testing.assert_allclose(per_ex, _jit(conv)(xs[0], kernel),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.usefixtures("float32_matmuls")
@pytest.mark.parametrize("impl", ["gemm", "xla_canonical"])
def test_custom_backward_is_reverse_mode_only(impl):
  x, kernel = _normal(13, (1, 5, 5, 2)), _normal(14, (3, 3, 2, 2))
  f = lambda k: jnp.sum(jnp.sin(bconv.conv2d(x, k, implementation=impl)))
  f_ref = lambda k: jnp.sum(jnp.sin(bconv.conv2d(x, k, implementation="xla")))
  # Second-order reverse mode works (the backward pass is made of lax convs).
  gg = lambda fn: _jit(jax.grad(lambda k: jnp.sum(jax.grad(fn)(k) ** 2)))(kernel)
  np.testing.assert_allclose(gg(f), gg(f_ref), rtol=1e-4, atol=1e-4)
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(f, (kernel,), (kernel,))
