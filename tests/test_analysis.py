"""Tests of bnlab.analysis against hand-derived quantities."""

import jax
from jax import flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from bnlab import analysis
from bnlab import config as config_lib
from bnlab.models import networks as models


def _linear_problem(seed=0, n=8, d=5, h=4, k=3):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)).astype(np.float32)
  y = rng.normal(size=(n, k)).astype(np.float32)
  params = {"w1": rng.normal(size=(d, h)).astype(np.float32) * 0.5,
            "w2": rng.normal(size=(h, k)).astype(np.float32) * 0.5}

  def loss_fn(p):
    return 0.5 * jnp.mean(jnp.sum((x @ p["w1"] @ p["w2"] - y) ** 2, axis=1))

  return x, y, params, loss_fn


def test_layer_weights_orders_classifier_kernels():
  cfg = config_lib.base_config().model  # the seed CNN
  model = models.build_model(cfg)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 28, 28), jnp.uint8)))
  assert analysis.layer_weights(v["params"]) == [
      ("conv_block_0", "Conv_0", "kernel"), ("conv_block_1", "Conv_0", "kernel"),
      ("dense_block_0", "Dense_0", "kernel"), ("logits", "kernel")]
  assert analysis.layer_weights({"w2": 0, "w1": 0}) == [("w1",), ("w2",)]


@pytest.mark.usefixtures("float32_matmuls")
def test_ics_two_layer_linear_matches_hand_computation():
  x, y, p, loss_fn = _linear_problem()
  lr = 0.1
  out = jax.jit(lambda q: analysis.internal_covariate_shift(loss_fn, q, lr))(p)
  n = x.shape[0]
  w1, w2 = p["w1"].astype(np.float64), p["w2"].astype(np.float64)
  x64, y64 = x.astype(np.float64), y.astype(np.float64)
  r = (x64 @ w1 @ w2 - y64) / n
  g1 = x64.T @ r @ w2.T
  g2 = (x64 @ w1).T @ r
  w1_new = w1 - lr * g1
  g2_new = (x64 @ w1_new).T @ ((x64 @ w1_new @ w2 - y64) / n)
  np.testing.assert_allclose(out["l2"][0], 0.0, atol=0)
  np.testing.assert_allclose(out["cosine"][0], 1.0, rtol=1e-6)
  np.testing.assert_allclose(out["l2"][1], np.linalg.norm(g2 - g2_new), rtol=1e-4)
  cos = np.sum(g2 * g2_new) / np.linalg.norm(g2) / np.linalg.norm(g2_new)
  np.testing.assert_allclose(out["cosine"][1], cos, rtol=1e-5)
  np.testing.assert_allclose(out["grad_norm"], [np.linalg.norm(g1), np.linalg.norm(g2)],
                             rtol=1e-5)


def test_quadratic_beta_is_curvature_along_gradient_and_loss_closed_form():
  rng = np.random.default_rng(1)
  m = rng.normal(size=(6, 6))
  a = (m @ m.T + np.eye(6)).astype(np.float32)
  w = rng.normal(size=6).astype(np.float32)
  etas = analysis.eta_grid(0.05)
  out = jax.jit(lambda q: analysis.gradient_smoothness(
      lambda v: 0.5 * v @ a @ v, q, etas))(w)
  a64, w64, e64 = a.astype(np.float64), w.astype(np.float64), np.asarray(etas, np.float64)
  g = a64 @ w64
  expected_beta = np.linalg.norm(a64 @ g) / np.linalg.norm(g)
  np.testing.assert_allclose(out["beta"], expected_beta, rtol=1e-4)
  np.testing.assert_allclose(out["beta_max"], expected_beta, rtol=1e-4)
  np.testing.assert_allclose(out["grad_change"], e64 * np.linalg.norm(a64 @ g), rtol=1e-4)
  loss = 0.5 * (w64 @ a64 @ w64) - e64 * (g @ g) + 0.5 * e64 ** 2 * (g @ a64 @ g)
  np.testing.assert_allclose(out["loss"], loss, rtol=1e-4)
  np.testing.assert_allclose(out["loss_range"], loss.max() - loss.min(), rtol=1e-3)
  assert out["beta_max"] <= np.linalg.eigvalsh(a64).max() * (1 + 1e-5)


@pytest.mark.parametrize("norm", ["batch", "none", "noisy"])
def test_classifier_with_and_without_bn(norm):
  cfg = config_lib.base_config().model
  cfg.name, cfg.norm, cfg.widths, cfg.activation = "paper_mlp", norm, (8, 8), "sigmoid"
  cfg.bn_position = "before"
  model = models.build_model(cfg)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (16, 28, 28)), jnp.uint8)
  labels = jnp.asarray(rng.integers(0, 10, 16), jnp.int32)
  variables = model.init(jax.random.key(0), images, train=False)
  rngs = models.train_rngs(jax.random.key_data(jax.random.key(3)), jnp.int32(5))
  loss_fn = analysis.classifier_loss(model.apply, variables, images, labels, rngs=rngs)
  params = variables["params"]
  weights = analysis.layer_weights(params)
  assert [w[0] for w in weights] == ["dense_block_0", "dense_block_1", "logits"]

  @jax.jit
  def measure(p):
    return (analysis.internal_covariate_shift(loss_fn, p, 0.5),
            analysis.gradient_smoothness(loss_fn, p, analysis.eta_grid(0.5, num=5)))

  ics, smooth = measure(params)
  assert ics["l2"].shape == ics["cosine"].shape == (3,)
  assert float(ics["l2"][0]) == 0.0
  assert np.all(np.abs(np.asarray(ics["cosine"])) <= 1 + 1e-6)
  assert np.all(np.asarray(ics["l2"][1:]) > 0)
  assert smooth["loss"].shape == smooth["beta"].shape == (5,)
  for v in jax.tree.leaves((ics, smooth)):
    assert np.all(np.isfinite(np.asarray(v)))
  # Train-mode BN with batch statistics: the loss differs from inference mode's.
  if norm != "none":
    eval_logits = model.apply(variables, images, train=False)
    import optax  # pylint: disable=g-import-not-at-top
    eval_loss = optax.softmax_cross_entropy_with_integer_labels(eval_logits, labels).mean()
    assert abs(float(loss_fn(params)) - float(eval_loss)) > 1e-6


def _spectrum_quadratic(eigenvalues, seed=0):
  """0.5 x^T A x with A = Q diag(eigenvalues) Q^T, Q a random rotation (float64 numpy)."""
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues),) * 2))
  return q @ np.diag(eigenvalues) @ q.T


@pytest.mark.usefixtures("float32_matmuls")
@pytest.mark.parametrize("eigenvalues", [(5.0, 3.0, 1.0, 0.5, -0.2, 0.1),
                                         (-6.0, 2.0, 1.5, 1.0, 0.3, -0.5)])
def test_top_hessian_eigenvalue_of_a_quadratic_with_a_known_spectrum(eigenvalues):
  a = _spectrum_quadratic(np.asarray(eigenvalues))
  a32 = jnp.asarray(a, jnp.float32)
  # The parameters as a tree of two leaves: the iteration must run over a whole pytree.
  loss_fn = lambda p: 0.5 * jnp.concatenate([p["u"], p["w"]]) @ a32 @ jnp.concatenate(  # noqa: E731
      [p["u"], p["w"]])
  params = {"u": jnp.ones(2), "w": jnp.zeros(4)}
  out = jax.jit(lambda p: analysis.top_hessian_eigenvalue(loss_fn, p, iterations=60))(params)
  top = max(eigenvalues, key=abs)  # the largest in magnitude, with its sign
  np.testing.assert_allclose(out["eigenvalue"], top, rtol=1e-5)
  assert 0 <= float(out["change"]) < 1e-5
  # Few iterations: not converged, and the change says so.
  short = analysis.top_hessian_eigenvalue(loss_fn, params, iterations=3)
  assert float(short["change"]) > 1e-3 and abs(float(short["eigenvalue"]) - top) > 1e-3
  assert np.isnan(analysis.top_hessian_eigenvalue(loss_fn, params, iterations=1)["change"])


@pytest.mark.usefixtures("float32_matmuls")
def test_top_hessian_eigenvalue_of_a_tiny_mlp_matches_the_full_hessian():
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(12, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 2, 12), jnp.int32)
  params = {"l1": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                   "bias": jnp.asarray(rng.normal(size=4) * 0.1, jnp.float32)},
            "l2": {"kernel": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}}

  def loss_fn(p):
    import optax  # pylint: disable=g-import-not-at-top
    logits = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"]) @ p["l2"]["kernel"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  flat, unravel = flatten_util.ravel_pytree(params)
  h = np.asarray(jax.hessian(lambda f: loss_fn(unravel(f)))(flat), np.float64)
  eig = np.linalg.eigvalsh(0.5 * (h + h.T))
  top = eig[np.argmax(np.abs(eig))]
  out = jax.jit(lambda p: analysis.top_hessian_eigenvalue(loss_fn, p, iterations=200))(params)
  np.testing.assert_allclose(out["eigenvalue"], top, rtol=1e-4)
  assert float(out["change"]) < 1e-4 * abs(top)
  # A fixed seed: the same start vector, the same estimate; another seed, another start.
  again = analysis.top_hessian_eigenvalue(loss_fn, params, iterations=5)
  assert float(again["eigenvalue"]) == float(
      analysis.top_hessian_eigenvalue(loss_fn, params, iterations=5)["eigenvalue"])
  assert float(again["eigenvalue"]) != float(
      analysis.top_hessian_eigenvalue(loss_fn, params, iterations=5, seed=1)["eigenvalue"])
