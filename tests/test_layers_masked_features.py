"""A feature whose every entry is masked out, in train mode, in every layer.

It has no batch statistics: its output is NaN (as Flax's 0/0) rather than
x / sqrt(epsilon), and the other features, their gradients and the
parameters' gradients are those of a run without it. Its running statistics:
bnlab's rule (its own variance methods, the default) keeps them, and a later
batch that counts the feature updates them; Flax's formulas (`use_fast_variance`
True or False: variance "fast", "flax_two_pass") make them NaN for good, as
Flax's layer does (compared with Flax's layer itself in
tests/test_layers_flax_bitwise.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnlab
from bnlab.layers import linen, variants

EPS = 1e-3
MOMENTUM = 0.9
F = 4
DEAD = 2  # the fully masked feature
KEEP = np.array([f for f in range(F) if f != DEAD])
SHAPE = (12, 3, F)


def batch(seed, dead=True):
  """Input, a random mask (every feature keeps entries, but DEAD when `dead`) and parameters."""
  rng = np.random.default_rng(seed)
  x = rng.normal(2.0, 3.0, SHAPE).astype(np.float32)
  mask = rng.uniform(size=SHAPE) < 0.7
  mask[0, 0] = True  # every ghost batch of 3 counts every feature
  mask[3, 0] = mask[6, 0] = mask[9, 0] = True
  if dead:
    mask[..., DEAD] = False
  scale = rng.uniform(0.5, 2.0, F).astype(np.float32)
  bias = rng.normal(size=F).astype(np.float32)
  mean = rng.normal(size=F).astype(np.float32)
  var = rng.uniform(0.5, 2.0, F).astype(np.float32)
  return x, mask, scale, bias, mean, var


def _noise(f):
  return variants.activation_noise(jax.random.key(3), (f,), shift_max=0.5, scale_max=1.5)


FUNCTIONS = {
    **{f"batch_norm_{v}": lambda *a, v=v, **k: bnlab.batch_norm(*a, variance=v, **k)
       for v in ("shifted", "two_pass", "fast", "flax_two_pass")},
    "batch_norm_unbiased": lambda *a, **k: bnlab.batch_norm(*a, unbiased_running_var=True, **k),
    "renorm": lambda *a, **k: variants.batch_renorm(*a, r_max=1.5, d_max=0.5, **k),
    "renorm_fast": lambda *a, **k: variants.batch_renorm(*a, r_max=1.5, d_max=0.5,
                                                         variance="fast", **k),
    "ghost": lambda *a, **k: variants.ghost_batch_norm(*a, ghost_size=3, **k),
    "ghost_fast": lambda *a, **k: variants.ghost_batch_norm(*a, ghost_size=3, variance="fast",
                                                            **k),
    "noisy": lambda *a, **k: variants.noisy_batch_norm(
        *a, key=jax.random.key(3), shift_max=0.5, scale_max=1.5, **k),
}
# The cases with Flax's formulas: NaN running statistics for the feature, for good.
FLAX_RULE = {"batch_norm_fast", "batch_norm_flax_two_pass", "renorm_fast", "ghost_fast"}


def assert_dead_statistics(name, got, before):
  """The fully masked feature's running statistics: kept, or NaN under Flax's rule."""
  for k in ("mean", "var"):
    if name in FLAX_RULE:
      assert np.isnan(got[k][DEAD]), k
    else:
      assert got[k][DEAD] == before[k][DEAD], k


def call(name, x, mask, scale, bias, mean, var):
  return FUNCTIONS[name](x, scale, bias, mean, var, train=True, mask=mask, epsilon=EPS,
                         momentum=MOMENTUM)


def call_on_the_others(name, *args):
  """`call` on the arrays of the other features only (the noise kept per feature)."""
  if name == "noisy":
    out = call("batch_norm_shifted", *args)
    noise = variants.NoiseTransform(*(v[KEEP] for v in _noise(F)))
    return out._replace(y=variants.apply_activation_noise(out.y, noise))
  return call(name, *args)


def without_dead(*arrays):
  return [v[..., KEEP] for v in arrays]


def masked_loss(name, mask, gy, call_fn):
  def loss(x, scale, bias, mean, var):
    y = call_fn(name, x, mask, scale, bias, mean, var).y
    return jnp.sum(jnp.where(mask, y, 0.0) * gy[..., :y.shape[-1]])
  return loss


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_functions_give_nan_and_leave_the_rest(name):
  x, mask, scale, bias, mean, var = batch(0)
  out = call(name, x, mask, scale, bias, mean, var)
  assert np.isnan(out.y[..., DEAD]).all()
  assert_dead_statistics(name, out._asdict(), dict(mean=mean, var=var))
  ref = call_on_the_others(name, *without_dead(x, mask, scale, bias, mean, var))
  np.testing.assert_array_equal(out.y[..., KEEP], ref.y)
  np.testing.assert_array_equal(out.mean[KEEP], ref.mean)
  np.testing.assert_array_equal(out.var[KEEP], ref.var)
  # A later batch that counts the feature: bnlab's rule updates it as any feature.
  x2, mask2, *_ = batch(1, dead=False)
  out2 = call(name, x2, mask2, scale, bias, out.mean, out.var)
  assert np.isfinite(out2.y[..., KEEP]).all()
  if name in FLAX_RULE:  # (and Batch Renormalization, which reads them, outputs NaN)
    assert np.isnan(out2.mean[DEAD]) and np.isnan(out2.var[DEAD])
    return
  assert np.isfinite(out2.y).all()
  fresh = call(name, x2, mask2, scale, bias, mean, var)
  assert out2.mean[DEAD] == fresh.mean[DEAD] and out2.var[DEAD] == fresh.var[DEAD]
  assert out2.mean[DEAD] != mean[DEAD]


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_gradients_of_a_masked_loss(name):
  """bnlab's rule: finite, zero for the feature. Flax's: the other features' as without it
  (the feature's own are Flax's, NaN in `batch_norm`: 0 * rsqrt(NaN))."""
  x, mask, scale, bias, mean, var = batch(2)
  gy = np.random.default_rng(3).normal(size=SHAPE).astype(np.float32)
  grads = jax.grad(masked_loss(name, mask, gy, call), argnums=(0, 1, 2))(
      x, scale, bias, mean, var)
  sub_x, sub_mask, *sub_params = without_dead(x, mask, scale, bias, mean, var)
  refs = jax.grad(masked_loss(name, sub_mask, gy[..., KEEP], call_on_the_others),
                  argnums=(0, 1, 2))(sub_x, *sub_params)
  for g, ref in zip(grads, refs):
    if name not in FLAX_RULE:
      assert np.isfinite(g).all()
      np.testing.assert_array_equal(g[..., DEAD], 0)
    np.testing.assert_allclose(g[..., KEEP], ref, rtol=1e-6, atol=1e-6)


def test_ghost_batch_without_a_counted_entry():
  # Feature 1 has no counted entry in the second ghost batch only: NaN there,
  # the other ghost batches as before, and its running statistics the mean over
  # ghost batches with that one contributing them unchanged.
  x, mask, scale, bias, mean, var = batch(4, dead=False)
  cut = mask.copy()
  cut[3:6, :, 1] = False
  out = call("ghost", x, cut, scale, bias, mean, var)
  assert np.isnan(out.y[3:6, :, 1]).all()
  assert np.isfinite(np.delete(out.y, np.s_[3:6], 0)).all()
  assert np.isfinite(out.y[3:6][..., [0, 2, 3]]).all()
  full = call("ghost", x, mask, scale, bias, mean, var)
  np.testing.assert_array_equal(np.delete(out.y, np.s_[3:6], 0),
                                np.delete(full.y, np.s_[3:6], 0))
  ghosts = [call("batch_norm_shifted", x[i:i + 3], cut[i:i + 3], scale, bias, mean, var)
            for i in range(0, 12, 3)]
  np.testing.assert_allclose(out.mean, np.mean([g.mean for g in ghosts], 0), rtol=1e-6)
  np.testing.assert_allclose(out.var, np.mean([g.var for g in ghosts], 0), rtol=1e-6)


# ----------------------------------------------------------------------------
# The modules, linen and NNX

MODULES = {
    "bn": (linen.BatchNorm, {}),
    "bn_fast": (linen.BatchNorm, dict(use_fast_variance=True)),
    "bn_flax_two_pass": (linen.BatchNorm, dict(use_fast_variance=False)),
    "population": (linen.BatchNormVariant, dict(running_average="population")),
    "population_fast": (linen.BatchNormVariant, dict(running_average="population",
                                                     use_fast_variance=True)),
    "frozen": (linen.BatchNormVariant, dict(frozen=True)),
    "renorm": (linen.BatchRenorm, dict(warmup_steps=0, r_max_steps=2, d_max_steps=2)),
    "renorm_fast": (linen.BatchRenorm, dict(warmup_steps=0, r_max_steps=2, d_max_steps=2,
                                            use_fast_variance=True)),
    "ghost": (linen.GhostBatchNorm, dict(ghost_size=3)),
    "noisy": (linen.NoisyBatchNorm, {}),
}
MODULES_FLAX_RULE = {"bn_fast", "bn_flax_two_pass", "population_fast", "renorm_fast"}


class LinenLayer:
  """A linen module and its variables, stepped in train mode."""

  def __init__(self, case, x):
    cls, kw = MODULES[case]
    self.layer = cls(momentum=MOMENTUM, epsilon=EPS, **kw)
    self.v = self.layer.init(jax.random.key(0), x, use_running_average=True)

  def _apply(self, params, x, mask):
    return self.layer.apply({**self.v, "params": params}, x, use_running_average=False,
                            mask=mask, mutable=["batch_stats"], rngs={"noise": jax.random.key(5)})

  def __call__(self, x, mask):
    y, upd = self._apply(self.v["params"], x, mask)
    self.v = {**self.v, **upd}
    return np.asarray(y)

  def stats(self):
    return {k: np.asarray(self.v["batch_stats"][k]) for k in ("mean", "var")}

  def grads(self, x, mask, gy):
    def loss(params, x):
      return jnp.sum(jnp.where(mask, self._apply(params, x, mask)[0], 0.0) * gy)
    g_params, g_x = jax.grad(loss, argnums=(0, 1))(self.v["params"], x)
    return jax.tree.leaves(g_params) + [g_x]


class NNXLayer:
  """The NNX module of the same name."""

  def __init__(self, case, x):
    del x
    cls, kw = MODULES[case]
    self.noisy = case == "noisy"
    self.layer = getattr(bnlab.nnx, cls.__name__)(F, momentum=MOMENTUM, epsilon=EPS,
                                                  rngs=nnx.Rngs(0), **kw)

  @staticmethod
  def _apply(layer, x, mask, noisy):
    return layer(x, mask=mask, rngs=jax.random.key(5)) if noisy else layer(x, mask=mask)

  def __call__(self, x, mask):
    return np.asarray(self._apply(self.layer, x, mask, self.noisy))

  def stats(self):
    return {k: np.asarray(getattr(self.layer, k)[...]) for k in ("mean", "var")}

  def grads(self, x, mask, gy):
    def loss(layer, x):
      return jnp.sum(jnp.where(mask, self._apply(layer, x, mask, self.noisy), 0.0) * gy)
    g_layer, g_x = nnx.grad(loss, argnums=(0, 1))(nnx.clone(self.layer), x)
    return jax.tree.leaves(nnx.state(g_layer, nnx.Param)) + [g_x]


@pytest.mark.parametrize("api", ["linen", "nnx"])
@pytest.mark.parametrize("case", list(MODULES))
def test_modules(case, api):
  flax_rule = case in MODULES_FLAX_RULE
  x, mask, *_ = batch(6)
  layer = (LinenLayer if api == "linen" else NNXLayer)(case, x)
  before = layer.stats()
  # Gradients with respect to the parameters and the input (before the update).
  gy = np.random.default_rng(7).normal(size=SHAPE).astype(np.float32)
  for g in layer.grads(x, mask, gy):
    g = np.asarray(g)
    assert np.isfinite(g[..., KEEP]).all()
    if case != "frozen" and not flax_rule:
      np.testing.assert_array_equal(g[..., DEAD], 0)
  y = layer(x, mask)
  assert np.isfinite(y[..., KEEP]).all()
  if case == "frozen":  # normalized with the running statistics, which exist
    assert np.isfinite(y).all()
  else:
    assert np.isnan(y[..., DEAD]).all()
  after = layer.stats()
  assert_dead_statistics("batch_norm_fast" if flax_rule else case, after, before)
  assert np.isfinite(np.stack([after["mean"], after["var"]])[:, KEEP]).all()
  # A later batch that counts the feature updates its statistics (bnlab's rule).
  x2, mask2, *_ = batch(8, dead=False)
  y2 = layer(x2, mask2)
  later = layer.stats()
  for k in ("mean", "var"):
    assert np.isfinite(later[k][KEEP]).all()
    if flax_rule:  # NaN for good
      assert np.isnan(later[k][DEAD]), k
    else:
      assert np.isfinite(y2).all() and np.isfinite(later[k]).all()
      if case != "frozen":
        assert later[k][DEAD] != after[k][DEAD], k
