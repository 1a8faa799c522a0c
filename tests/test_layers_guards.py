"""The layers' guards: Flax's error on train mode with an immutable `batch_stats`,
the `update_stats` opt-out, NNX construction checks, and BN variables loaded into
the variants."""

from __future__ import annotations

import inspect

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnlab
from bnlab import config as config_lib
from bnlab.models import networks as models
from bnlab.layers.linen import load_batch_norm_checkpoint

NOISE = {"noise": jax.random.key(7)}

LINEN_LAYERS = {
    "BatchNorm": lambda **kw: bnlab.BatchNorm(**kw),
    "BatchRenorm": lambda **kw: bnlab.BatchRenorm(warmup_steps=0, r_max_steps=2,
                                                  d_max_steps=2, **kw),
    "GhostBatchNorm": lambda **kw: bnlab.GhostBatchNorm(ghost_size=4, **kw),
    "NoisyBatchNorm": lambda **kw: bnlab.NoisyBatchNorm(**kw),
    "ema": lambda **kw: bnlab.BatchNormVariant(**kw),
    "population": lambda **kw: bnlab.BatchNormVariant(running_average="population", **kw),
}


def batch(shape=(16, 3), seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(2.0, 3.0, shape), jnp.float32)


class Net(nn.Module):
  """Dense, a norm layer from `make`, Dense: the layer under a parent, auto-named."""

  make: object

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(4)(x)
    x = self.make()(x, use_running_average=not train)
    return nn.Dense(2)(x)


# ----------------------------------------------------------------------------
# linen: train mode needs a mutable batch_stats, as Flax


@pytest.mark.parametrize("name", LINEN_LAYERS)
def test_train_mode_with_immutable_stats_raises_flax_error(name):
  layer, x = LINEN_LAYERS[name](), batch()
  v = layer.init(jax.random.key(0), x, use_running_average=False)  # init: no error
  for mutable in (False, ["intermediates"]):
    with pytest.raises(flax.errors.ModifyScopeVariableError):
      layer.apply(v, x, use_running_average=False, mutable=mutable, rngs=NOISE)
  with pytest.raises(flax.errors.ModifyScopeVariableError):
    jax.jit(lambda v, x: layer.apply(v, x, use_running_average=False, rngs=NOISE))(v, x)
  # inference needs no mutable collection
  layer.apply(v, x, use_running_average=True)


def test_error_is_flax_batchnorm_error():
  x = batch()
  messages = []
  for make in (nn.BatchNorm, bnlab.BatchNorm):
    net = Net(make)
    v = net.init(jax.random.key(0), x, False)
    with pytest.raises(flax.errors.ModifyScopeVariableError) as e:
      net.apply(v, x, True)
    messages.append(str(e.value))
  assert messages[0] == messages[1]
  assert "BatchNorm_0" in messages[1] and "batch_stats" in messages[1]


@pytest.mark.parametrize("name", LINEN_LAYERS)
def test_update_stats_false_normalizes_with_batch_stats_and_keeps_running_ones(name):
  x = batch()
  layer, quiet = LINEN_LAYERS[name](), LINEN_LAYERS[name](update_stats=False)
  v = layer.init(jax.random.key(0), x, use_running_average=False)
  y_train, _ = layer.apply(v, x, use_running_average=False, mutable=["batch_stats"], rngs=NOISE)
  y = quiet.apply(v, x, use_running_average=False, rngs=NOISE)
  np.testing.assert_array_equal(y, y_train)
  # mutable or not, the running statistics (and counters) stay as they were
  _, state = quiet.apply(v, x, use_running_average=False, mutable=["batch_stats"], rngs=NOISE)
  jax.tree.map(np.testing.assert_array_equal, state["batch_stats"], v["batch_stats"])
  # and it is not inference: the running statistics would give another output
  assert not np.allclose(y, quiet.apply(v, x, use_running_average=True))


def test_update_stats_false_noisy_still_needs_its_rng():
  layer, x = bnlab.NoisyBatchNorm(update_stats=False), batch()
  v = layer.init(jax.random.key(0), x, use_running_average=True)
  with pytest.raises(ValueError, match="'noise' RNG"):
    layer.apply(v, x, use_running_average=False)


def test_frozen_trains_without_mutable():
  layer, x = bnlab.BatchNormVariant(frozen=True), batch()
  v = layer.init(jax.random.key(0), x, use_running_average=False)
  np.testing.assert_array_equal(layer.apply(v, x, use_running_average=False),
                                layer.apply(v, x, use_running_average=True))


def test_engine_train_and_eval_calls_pass_the_guard():
  """The engine's calls: train mode with mutable batch_stats, evaluation with running ones."""
  c = config_lib.base_config()
  c.model.name, c.model.widths, c.model.norm = "paper_mlp", (8,), "renorm"
  model = models.build_model(c.model)
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (8, 28, 28)), jnp.uint8)
  v = model.init(jax.random.key(0), images)
  _, upd = model.apply(v, images, train=True, mutable=["batch_stats"], rngs=NOISE)
  model.apply({**v, **upd}, images, train=False)
  with pytest.raises(flax.errors.ModifyScopeVariableError):
    model.apply(v, images, train=True)


# ----------------------------------------------------------------------------
# BatchNorm variables into BatchRenorm


def test_batch_norm_variables_without_steps_load_into_batch_renorm():
  x = batch()
  bn = bnlab.BatchNorm()
  v = bn.init(jax.random.key(0), x, use_running_average=False)
  _, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  v = {**v, **upd}
  renorm = bnlab.BatchRenorm()
  # inference: the same output, no counter needed
  np.testing.assert_array_equal(renorm.apply(v, x, use_running_average=True),
                                bn.apply(v, x, use_running_average=True))
  # training: a missing counter is 0 updates (warm-up: plain BN), then it exists
  y, upd = renorm.apply(v, x * 2, use_running_average=False, mutable=["batch_stats"])
  y_bn, upd_bn = bn.apply(v, x * 2, use_running_average=False, mutable=["batch_stats"])
  np.testing.assert_allclose(y, y_bn, rtol=1e-6, atol=1e-6)
  assert int(upd["batch_stats"]["steps"]) == 1
  np.testing.assert_array_equal(upd["batch_stats"]["mean"], upd_bn["batch_stats"]["mean"])
  # opt-out: no counter created
  _, same = renorm.clone(update_stats=False).apply(
      v, x, use_running_average=False, mutable=["batch_stats"])
  assert "steps" not in same["batch_stats"]


def test_engine_checkpoint_of_batch_loads_into_renorm():
  """The engine names every variant BatchNorm_0: only the counter differs."""
  c = config_lib.base_config()
  c.model.name, c.model.widths = "paper_mlp", (8,)
  images = jnp.asarray(np.random.default_rng(2).integers(0, 256, (8, 28, 28)), jnp.uint8)
  v = models.build_model(c.model).init(jax.random.key(0), images)
  c.model.norm = "renorm"
  renorm = models.build_model(c.model)
  renorm.apply(v, images, train=False)
  _, upd = renorm.apply(v, images, train=True, mutable=["batch_stats"])
  assert jax.tree.structure(upd["batch_stats"]) == jax.tree.structure(
      renorm.init(jax.random.key(0), images)["batch_stats"])


@pytest.mark.parametrize("variant", [bnlab.BatchRenorm, bnlab.GhostBatchNorm,
                                     lambda **kw: bnlab.BatchNormVariant(
                                         running_average="population", **kw)])
def test_load_batch_norm_checkpoint_renames_and_adds_counters(variant):
  x = batch()
  bn_net = Net(bnlab.BatchNorm)
  ckpt = bn_net.init(jax.random.key(0), x, False)
  _, upd = bn_net.apply(ckpt, x, True, mutable=["batch_stats"])
  ckpt = {**ckpt, **upd}
  net = Net(lambda: variant(ghost_size=4) if variant is bnlab.GhostBatchNorm else variant())
  template = net.init(jax.random.key(1), x, False)
  loaded = load_batch_norm_checkpoint(ckpt, template)
  assert jax.tree.structure(loaded) == jax.tree.structure(template)
  (name,) = [k for k in template["params"] if not k.startswith("Dense")]
  for col in ("params", "batch_stats"):
    for k, value in ckpt[col]["BatchNorm_0"].items():
      np.testing.assert_array_equal(loaded[col][name][k], value)
  for counter in ("steps", "num_batches"):
    if counter in template["batch_stats"][name]:
      assert int(loaded["batch_stats"][name][counter]) == 0
  np.testing.assert_array_equal(loaded["params"]["Dense_1"]["kernel"],
                                ckpt["params"]["Dense_1"]["kernel"])
  np.testing.assert_allclose(net.apply(loaded, x, False), bn_net.apply(ckpt, x, False),
                             rtol=1e-6)
  net.apply(loaded, x, True, mutable=["batch_stats"], rngs=NOISE)


class TwoNorms(nn.Module):
  swap_second: bool

  @nn.compact
  def __call__(self, x, train: bool):
    x = bnlab.BatchNorm(use_running_average=not train)(x)
    second = bnlab.BatchRenorm if self.swap_second else bnlab.BatchNorm
    return second(use_running_average=not train)(x + 1)


def test_load_batch_norm_checkpoint_refuses_ambiguous_pairs_and_takes_renames():
  x = batch()
  ckpt = TwoNorms(False).init(jax.random.key(0), x, False)
  ckpt = jax.tree.map(lambda a: a + np.arange(a.size).reshape(a.shape), ckpt)
  template = TwoNorms(True).init(jax.random.key(1), x, False)
  with pytest.raises(ValueError, match="renames"):
    load_batch_norm_checkpoint(ckpt, template)
  loaded = load_batch_norm_checkpoint(ckpt, template, renames={"BatchRenorm_0": "BatchNorm_1"})
  np.testing.assert_array_equal(loaded["params"]["BatchRenorm_0"]["bias"],
                                ckpt["params"]["BatchNorm_1"]["bias"])
  np.testing.assert_array_equal(loaded["params"]["BatchNorm_0"]["bias"],
                                ckpt["params"]["BatchNorm_0"]["bias"])
  with pytest.raises(ValueError, match="shape"):
    load_batch_norm_checkpoint(ckpt, Net(bnlab.BatchRenorm).init(jax.random.key(0), x, False))


# ----------------------------------------------------------------------------
# NNX


def test_nnx_promote_dtype_as_flax():
  x = batch((8, 6)).astype(jnp.bfloat16)
  calls = []

  def promote(args, *, dtype=None):
    calls.append(dtype)
    return nnx.nn.dtypes.promote_dtype(args, dtype=dtype)

  for kw in ({}, {"dtype": jnp.bfloat16}, {"promote_dtype": promote}):
    ours = bnlab.nnx.BatchNorm(6, rngs=nnx.Rngs(0), **kw)
    theirs = nnx.BatchNorm(6, rngs=nnx.Rngs(0), use_fast_variance=False, **kw)
    for ura in (False, True):
      y, y_ref = ours(x, ura), theirs(x, ura)
      assert y.dtype == y_ref.dtype, kw
      np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                                 rtol=2e-2, atol=2e-2)
    assert ours.mean[...].dtype == ours.var[...].dtype == jnp.float32
  assert calls == [None] * 4  # one call per forward, ours and Flax's

  def to_float16(args, *, dtype=None):
    del dtype
    return tuple(None if a is None else jnp.asarray(a, jnp.float16) for a in args)

  layer = bnlab.nnx.BatchNorm(6, promote_dtype=to_float16, rngs=nnx.Rngs(0))
  assert layer(batch((8, 6))).dtype == jnp.float16
  assert layer.mean[...].dtype == jnp.float32


@pytest.mark.parametrize("make", [bnlab.nnx.BatchNorm, bnlab.nnx.BatchRenorm,
                                  lambda n, **kw: bnlab.nnx.GhostBatchNorm(n, ghost_size=4, **kw)])
def test_nnx_axis_tuple_one_axis_or_refused_at_construction(make):
  x = batch((8, 3, 6))
  one = make(3, axis=(1,), rngs=nnx.Rngs(0))
  ref = make(3, axis=1, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(one(x), ref(x))
  with pytest.raises(ValueError, match="one feature axis"):
    make(3, axis=(1, 2), rngs=nnx.Rngs(0))


def test_nnx_noisy_needs_a_noise_or_default_stream():
  x = batch((8, 4))
  with pytest.raises(ValueError, match=r"nnx.Rngs\(params=0, noise=1\)"):
    bnlab.nnx.NoisyBatchNorm(4, rngs=nnx.Rngs(params=0))
  with_noise = bnlab.nnx.NoisyBatchNorm(4, rngs=nnx.Rngs(params=0, noise=1))
  with_default = bnlab.nnx.NoisyBatchNorm(4, rngs=nnx.Rngs(0))
  assert with_noise(x).shape == with_default(x).shape == x.shape
  with pytest.raises(ValueError, match="'noise' stream"):
    with_default(x, rngs=nnx.Rngs(params=0))
  assert with_default(x, rngs=nnx.Rngs(3)).shape == x.shape


def test_every_module_documents_its_attributes():
  """An `Attributes:` section naming each field the class adds."""
  linen = {bnlab.BatchNorm: None, bnlab.BatchNormVariant: bnlab.BatchNorm,
           bnlab.BatchRenorm: bnlab.BatchNormVariant,
           bnlab.GhostBatchNorm: bnlab.BatchNormVariant,
           bnlab.NoisyBatchNorm: bnlab.BatchNormVariant}
  for cls, base in linen.items():
    fields = set(cls.__dataclass_fields__) - {"parent", "name"}
    if base is not None:
      fields -= set(base.__dataclass_fields__)
    doc = cls.__doc__.split("Attributes:", 1)[1]
    for field in fields:
      assert f"    {field}:" in doc, (cls.__name__, field)
  nnx_classes = {bnlab.nnx.BatchNorm: None, bnlab.nnx.BatchNormVariant: bnlab.nnx.BatchNorm,
                 bnlab.nnx.BatchRenorm: bnlab.nnx.BatchNormVariant,
                 bnlab.nnx.GhostBatchNorm: bnlab.nnx.BatchNormVariant,
                 bnlab.nnx.NoisyBatchNorm: bnlab.nnx.BatchNormVariant}
  for cls, base in nnx_classes.items():
    args = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    if base is not None:
      args -= set(inspect.signature(base.__init__).parameters)
    doc = cls.__doc__.split("Attributes:", 1)[1]
    for arg in args:
      assert f"    {arg}" in doc, (cls.__name__, arg)


def test_nnx_batch_norm_state_loads_into_batch_renorm():
  x = batch((8, 4))
  bn = bnlab.nnx.BatchNorm(4, rngs=nnx.Rngs(0))
  bn(x)
  renorm = bnlab.nnx.BatchRenorm(4, rngs=nnx.Rngs(1))
  nnx.update(renorm, nnx.state(bn))  # no `steps` in the state: the counter stays 0
  assert int(renorm.steps[...]) == 0
  np.testing.assert_array_equal(renorm(x, True), bn(x, True))
