"""The seed and paper networks: structure, BN placement, parameter counts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnlab import config as config_lib
from bnlab.models import networks as models


def model_cfg(**kw):
  c = config_lib.base_config().model
  for k, v in kw.items():
    c[k] = v
  return c


def param_shapes(cfg):
  model = models.build_model(cfg)
  v = model.init(jax.random.key(0), jnp.zeros((2, 28, 28), jnp.uint8))
  return model, v, jax.tree.map(jnp.shape, v)


def test_paper_mlp_structure_bn_before_without_bias():
  _, _, shapes = param_shapes(model_cfg(name="paper_mlp", norm="batch", bn_position="before",
                                        activation="sigmoid"))
  p = shapes["params"]
  assert p["dense_block_0"]["Dense_0"] == {"kernel": (784, 100)}  # no bias before BN
  assert p["dense_block_1"]["Dense_0"] == {"kernel": (100, 100)}
  assert p["dense_block_2"]["BatchNorm_0"] == {"scale": (100,), "bias": (100,)}
  assert p["logits"] == {"kernel": (100, 10), "bias": (10,)}
  assert set(shapes["batch_stats"]) == {"dense_block_0", "dense_block_1", "dense_block_2"}


def test_paper_mlp_without_bn_has_biases_and_no_batch_stats():
  _, v, shapes = param_shapes(model_cfg(name="paper_mlp", norm="none", activation="sigmoid"))
  assert shapes["params"]["dense_block_0"]["Dense_0"] == {"kernel": (784, 100), "bias": (100,)}
  assert "batch_stats" not in v
  n = sum(p.size for p in jax.tree.leaves(v["params"]))
  assert n == 784 * 100 + 100 + 2 * (100 * 100 + 100) + 100 * 10 + 10


def test_seed_cnn_matches_the_keras_model():
  # Conv32(3x3) relu, MaxPool2, Conv64(3x3) relu, Flatten, BN, Dense64 relu, Dense10
  _, _, shapes = param_shapes(model_cfg(name="seed_cnn", norm="batch", bn_position="after"))
  p = shapes["params"]
  assert p["conv_block_0"]["Conv_0"] == {"kernel": (3, 3, 1, 32), "bias": (32,)}
  assert p["conv_block_1"]["Conv_0"] == {"kernel": (3, 3, 32, 64), "bias": (64,)}
  # 28 -> 26 -> pool 13 -> 11: BN over the 11*11*64 flattened units, as Keras does.
  assert p["conv_block_1"]["BatchNorm_0"] == {"scale": (7744,), "bias": (7744,)}
  assert "BatchNorm_0" not in p["conv_block_0"]
  assert p["dense_block_0"]["Dense_0"] == {"kernel": (7744, 64), "bias": (64,)}
  assert "BatchNorm_0" not in p["dense_block_0"]
  assert p["logits"]["kernel"] == (64, 10)


def test_seed1_models():
  _, _, shapes = param_shapes(model_cfg(name="seed1_mlp", bn_position="before"))
  p = shapes["params"]
  assert p["dense_block_0"]["Dense_0"] == {"kernel": (784, 16)}
  assert p["dense_block_1"]["BatchNorm_0"]["scale"] == (32,)
  _, _, shapes = param_shapes(model_cfg(name="seed1_cnn", bn_position="before"))
  p = shapes["params"]
  assert p["conv_block_0"]["Conv_0"] == {"kernel": (3, 3, 1, 32)}
  assert p["conv_block_1"]["BatchNorm_0"]["scale"] == (32,)  # per feature map
  assert p["logits"]["kernel"] == (24 * 24 * 32, 10)


@pytest.mark.parametrize("position", ["before", "after"])
def test_bn_placement_order(position):
  """'before': the sown activation input is normalized; 'after': it is not."""
  model = models.build_model(model_cfg(name="paper_mlp", norm="batch", bn_position=position,
                                       activation="sigmoid"))
  x = jax.random.randint(jax.random.key(1), (256, 28, 28), 0, 256).astype(jnp.uint8)
  v = model.init(jax.random.key(0), x)
  _, state = model.apply(v, x, train=True, mutable=["batch_stats", "intermediates"])
  pre = state["intermediates"]["dense_block_1"]["preact_1"][0]
  mean, std = jnp.mean(pre, 0), jnp.std(pre, 0)
  normalized = bool(jnp.allclose(mean, 0, atol=1e-4) and jnp.allclose(std, 1, atol=1e-2))
  assert normalized == (position == "before")


def test_flax_batchnorm_variant_has_identical_variables():
  a = param_shapes(model_cfg(name="seed1_mlp", norm="batch"))[2]
  b = param_shapes(model_cfg(name="seed1_mlp", norm="flax_batch"))[2]
  assert a == b


def test_pre_activations_returns_every_layer():
  model = models.build_model(model_cfg(name="paper_mlp", activation="sigmoid"))
  x = jnp.zeros((4, 28, 28), jnp.uint8)
  v = model.init(jax.random.key(0), x)
  pre = models.pre_activations(model, v, x)
  assert sorted(pre) == ["preact_0", "preact_1", "preact_2"]
  assert pre["preact_2"].shape == (4, 100)


def test_unknown_model_is_rejected():
  with pytest.raises(ValueError, match="model.name"):
    models.build_model(model_cfg(name="resnet"))


# resnet20's every norm: tests/test_resnet.py (traced; run here it would take minutes).
@pytest.mark.parametrize("name", [m for m in models.MODELS if m != "resnet20"])
def test_every_model_builds_and_trains_with_every_norm(name):
  x = jax.random.randint(jax.random.key(1), (16, 28, 28), 0, 256).astype(jnp.uint8)
  for norm in models.NORMS:
    model = models.build_model(model_cfg(name=name, norm=norm))
    v = model.init(jax.random.key(0), x)
    logits, state = model.apply(v, x, train=True, mutable=["batch_stats"],
                                rngs={"noise": jax.random.key(2)})
    assert logits.shape == (16, 10) and bool(jnp.all(jnp.isfinite(logits))), norm
    assert ("batch_stats" in v) == (norm in models.BATCH_STAT_NORMS), norm
    assert model.apply(v, x).shape == (16, 10)


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh", "gelu"])
def test_conv_block_pooling_equals_activation_then_flax_max_pool(activation):
  # A conv block without norm may pool before a monotone activation; the
  # output and the parameter gradients must equal conv -> act -> nn.max_pool.
  block = models.Block(
      lambda b: models.Conv(8, (3, 3), use_bias=b, implementation="xla"),
      activation, None, "before", 0, pool=2)
  x = jax.random.normal(jax.random.key(1), (4, 11, 11, 3))
  v = block.init(jax.random.key(2), x, False)
  conv = models.Conv(8, (3, 3), implementation="xla")

  def reference(params):
    h = models.ACTIVATIONS[activation](conv.apply({"params": params["Conv_0"]}, x))
    return nn.max_pool(h, (2, 2), (2, 2))

  def ours(params):
    return block.apply({"params": params}, x, False)

  np.testing.assert_allclose(ours(v["params"]), reference(v["params"]), rtol=1e-6, atol=1e-6)
  cot = jax.random.normal(jax.random.key(3), reference(v["params"]).shape)
  grads = [jax.grad(lambda p, f=f: jnp.sum(f(p) * cot))(v["params"]) for f in (ours, reference)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), *grads)


@pytest.mark.parametrize("norm", ["batch", "flax_batch", "renorm", "none"])
def test_xhat_is_the_input_normalised_with_the_running_statistics(norm, float32_matmuls):
  """x-hat against a float64 reference: (preact - bias) / scale = (h - mean) / sqrt(var + eps),
  with random scale, bias and running statistics; its percentiles as the engine records them."""
  from bnlab.engine import evaluation
  cfg = model_cfg(name="paper_mlp", activation="sigmoid", norm=norm, bn_position="before")
  model = models.build_model(cfg)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 256, (64, 28, 28)), jnp.uint8)
  v = model.init(jax.random.key(0), x, train=False)
  if norm == "none":
    assert "xhat_2" not in models.sown_names(model)
    return
  assert "xhat_2" in models.pre_activation_names("paper_mlp")
  scale = rng.uniform(0.5, 3.0, 100)
  bias = rng.normal(0, 1, 100)
  mean, var = rng.normal(0, 0.3, 100), rng.uniform(0.05, 2.0, 100)
  params = jax.tree.map(lambda a: a, v["params"])
  params["dense_block_2"]["BatchNorm_0"] = {"scale": jnp.asarray(scale, jnp.float32),
                                           "bias": jnp.asarray(bias, jnp.float32)}
  stats = jax.tree.map(lambda a: a, v["batch_stats"])
  stats["dense_block_2"]["BatchNorm_0"] = {
      **stats["dense_block_2"]["BatchNorm_0"], "mean": jnp.asarray(mean, jnp.float32),
      "var": jnp.asarray(var, jnp.float32)}
  variables = {"params": params, "batch_stats": stats}
  sown = models.pre_activations(model, variables, x)
  preact = np.asarray(sown["preact_2"], np.float64)
  xhat = np.asarray(sown["xhat_2"], np.float64)
  want = (preact - bias) / scale  # independent of mean, var and epsilon
  np.testing.assert_allclose(xhat, want, rtol=1e-4, atol=1e-4)
  # Layer 1's raw input h = x W (no bias before BN), in float64.
  h = (np.asarray(x, np.float64).reshape(64, -1) / 255.0) @ np.asarray(
      params["dense_block_0"]["Dense_0"]["kernel"], np.float64)
  bn0 = stats["dense_block_0"]["BatchNorm_0"]
  want0 = (h - np.asarray(bn0["mean"], np.float64)) / np.sqrt(
      np.asarray(bn0["var"], np.float64) + cfg.bn.epsilon)
  np.testing.assert_allclose(np.asarray(sown["xhat_0"], np.float64), want0, rtol=1e-5, atol=1e-5)
  q = (15.0, 50.0, 85.0)
  got = evaluation.activation_percentiles(model.apply, params, stats, x, layers=("xhat_2",),
                                          units=(0, 7, 99), percentiles=q)["xhat_2"]
  np.testing.assert_allclose(np.asarray(got), np.percentile(want[:, [0, 7, 99]], q, axis=0).T,
                             rtol=1e-4, atol=1e-4)
  # Train mode sows nothing new and the outputs and variables are unchanged by x-hat.
  _, state = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"])
  assert not any(k.startswith("xhat") for b in state["intermediates"].values() for k in b)


def test_a_bias_before_bn_is_redundant_in_train_mode():
  """Ioffe & Szegedy 2015, section 3.2: a bias b added before BN is subtracted again with the
  batch mean, so in train mode the outputs and every other gradient are those without it,
  and its own gradient is 0 (float64, dense and convolutional)."""
  try:  # jax >= 0.9 moved it to the top level
    from jax import enable_x64
  except ImportError:
    from jax.experimental import enable_x64
  from bnlab import batch_norm

  def layer(params, x, with_bias, conv):
    h = (jax.lax.conv_general_dilated(x, params["w"], (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
         if conv else x @ params["w"])
    if with_bias:
      h = h + params["b"]
    out = batch_norm(h, params["scale"], params["beta"], jnp.zeros(h.shape[-1:]),
                     jnp.ones(h.shape[-1:]), train=True, stats_dtype=jnp.float64)
    return jnp.tanh(out.y)

  with enable_x64():
    for conv, x_shape, w_shape in ((False, (16, 7), (7, 5)), (True, (4, 6, 6, 3), (3, 3, 3, 5))):
      keys = jax.random.split(jax.random.key(0), 6)
      x = jax.random.normal(keys[0], x_shape, jnp.float64)
      params = {"w": jax.random.normal(keys[1], w_shape, jnp.float64),
                "b": 3 * jax.random.normal(keys[2], (5,), jnp.float64),
                "scale": 1 + jax.random.normal(keys[3], (5,), jnp.float64),
                "beta": jax.random.normal(keys[4], (5,), jnp.float64)}
      cot = jax.random.normal(keys[5], layer(params, x, False, conv).shape, jnp.float64)
      loss = lambda p, b: jnp.sum(cot * layer(p, x, b, conv))  # noqa: E731
      y0, y1 = layer(params, x, False, conv), layer(params, x, True, conv)
      assert y1.dtype == jnp.float64
      np.testing.assert_allclose(y1, y0, rtol=0, atol=1e-12)
      g0, g1 = jax.grad(loss)(params, False), jax.grad(loss)(params, True)
      for k in ("w", "scale", "beta"):
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-10, atol=1e-12)
      assert np.abs(g1["b"]).max() < 1e-12 * np.abs(g1["w"]).max()
      assert np.abs(g0["b"]).max() == 0  # unused without the bias


def test_bn_bias_before_keeps_the_bias_and_changes_no_train_mode_loss():
  """`model.bn.bias_before`: the biases come back (100 per BN layer of the paper MLP), and with
  nonzero biases the train-mode logits and the kernels' gradients are unchanged."""
  cfg = model_cfg(name="paper_mlp", norm="batch", bn_position="before", activation="sigmoid")
  with_bias = model_cfg(name="paper_mlp", norm="batch", bn_position="before",
                        activation="sigmoid")
  with_bias.bn.bias_before = True
  m0, v0, _ = param_shapes(cfg)
  m1, v1, s1 = param_shapes(with_bias)
  assert s1["params"]["dense_block_0"]["Dense_0"] == {"kernel": (784, 100), "bias": (100,)}
  count = lambda v: sum(p.size for p in jax.tree.leaves(v["params"]))  # noqa: E731
  assert count(v1) - count(v0) == 3 * 100
  params = jax.tree.map(lambda a: a, v1["params"])
  for i in range(3):
    params[f"dense_block_{i}"]["Dense_0"]["bias"] = jnp.full((100,), 0.5 * (i + 1))
    assert (v0["params"][f"dense_block_{i}"]["Dense_0"]["kernel"]
            == params[f"dense_block_{i}"]["Dense_0"]["kernel"]).all()
  images = jax.random.randint(jax.random.key(1), (8, 28, 28), 0, 256).astype(jnp.uint8)

  def loss(p, model, stats):
    logits, _ = model.apply({"params": p, "batch_stats": stats}, images, train=True,
                            mutable=["batch_stats"])
    return jnp.sum(jnp.sin(logits))
  l0, g0 = jax.value_and_grad(loss)(v0["params"], m0, v0["batch_stats"])
  l1, g1 = jax.value_and_grad(loss)(params, m1, v1["batch_stats"])
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  for i in range(3):
    a, b = (g[f"dense_block_{i}"]["Dense_0"]["kernel"] for g in (g0, g1))
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-6)
    assert np.abs(g1[f"dense_block_{i}"]["Dense_0"]["bias"]).max() < 1e-4 * np.abs(a).max()


def test_bn_statistics_per_channel_or_per_activation():
  """`model.bn.statistics`: the seed CNN's BN after Flatten is per activation (its own), or per
  feature map ("channel": one mean and variance per channel); seed1_cnn's per channel, or per
  (H, W, C) position ("activation"), which equals a dense BN on the flattened map."""
  def shapes(name, statistics):
    cfg = model_cfg(name=name, norm="batch", bn_position="before")
    cfg.bn.statistics = statistics
    return param_shapes(cfg)
  _, _, own = shapes("seed_cnn", "model")
  _, _, channel = shapes("seed_cnn", "channel")
  assert own["batch_stats"]["conv_block_1"]["BatchNorm_0"]["mean"] == (64 * 11 * 11,)
  assert channel["batch_stats"]["conv_block_1"]["BatchNorm_0"]["mean"] == (64,)
  _, _, own = shapes("seed1_cnn", "model")
  model, v, per = shapes("seed1_cnn", "activation")
  assert own["params"]["conv_block_0"]["BatchNorm_0"]["scale"] == (32,)
  assert per["params"]["conv_block_0"]["BatchNorm_0"]["scale"] == (26, 26, 32)
  assert per["batch_stats"]["conv_block_1"]["BatchNorm_0"]["var"] == (24, 24, 32)
  assert models.normalized_features(model_cfg(name="seed1_cnn")) == (32, 32)
  cfg = model_cfg(name="seed1_cnn")
  cfg.bn.statistics = "activation"
  assert models.normalized_features(cfg) == (26 * 26 * 32, 24 * 24 * 32)
  # Per activation is a dense BN over the flattened map (train mode, random statistics).
  from bnlab import BatchNorm
  h = jax.random.normal(jax.random.key(0), (6, 5, 4, 3)) * 3 + 1
  conv_bn = BatchNorm(axis=(1, 2, 3))
  dense_bn = BatchNorm()
  vc = conv_bn.init(jax.random.key(1), h, use_running_average=False)
  y, _ = conv_bn.apply(vc, h, use_running_average=False, mutable=["batch_stats"])
  flat = {"params": jax.tree.map(lambda a: a.reshape(-1), vc["params"]),
          "batch_stats": jax.tree.map(lambda a: a.reshape(-1), vc["batch_stats"])}
  yd, _ = dense_bn.apply(flat, h.reshape(6, -1), use_running_average=False,
                         mutable=["batch_stats"])
  np.testing.assert_allclose(y.reshape(6, -1), yd, rtol=1e-6, atol=1e-6)
  # Against float64: each (H, W, C) position normalized by its own batch mean and biased
  # variance, then scaled and shifted by its own scale and bias.
  rng = np.random.default_rng(0)
  x = rng.normal(1.0, 3.0, (8, 5, 4, 3))
  scale, bias = rng.normal(size=(5, 4, 3)), rng.normal(size=(5, 4, 3))
  variables = {"params": {"scale": jnp.asarray(scale, jnp.float32),
                          "bias": jnp.asarray(bias, jnp.float32)},
               "batch_stats": {"mean": jnp.zeros((5, 4, 3)), "var": jnp.ones((5, 4, 3))}}
  y, new = BatchNorm(axis=(1, 2, 3), epsilon=1e-3, momentum=0.9).apply(
      variables, jnp.asarray(x, jnp.float32), use_running_average=False,
      mutable=["batch_stats"])
  mean, var = x.mean(0), x.var(0)
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-3) * scale + bias,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(new["batch_stats"]["mean"], 0.1 * mean, rtol=1e-5, atol=1e-6)
  bad = config_lib.base_config()
  bad.model.bn.statistics = "feature"
  with pytest.raises(config_lib.ConfigError, match="model.bn.statistics"):
    config_lib.validate(bad)
