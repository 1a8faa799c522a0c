"""`bnlab.BatchNorm` and `bnlab.nnx.BatchNorm` against Flax's own BatchNorm."""

from __future__ import annotations

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

import bnlab
from test_layers_functional import ref_batch_norm, rel_err

SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)


def tree_signature(tree):
  return jax.tree.map(lambda v: (v.shape, v.dtype), tree)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=rtol, atol=atol), a, b)


@functools.partial(jax.jit, static_argnums=0, static_argnames="use_running_average")
def train_step(module, variables, x, dy, **call):
  """Output, new batch_stats and gradients wrt (x, params) of sum(y * dy)."""

  def loss(x, params):
    y, state = module.apply({**variables, "params": params}, x, mutable=["batch_stats"], **call)
    return jnp.sum(y * dy), (y, state["batch_stats"])

  (_, (y, stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(
      x, variables.get("params", {}))
  return y, stats, grads


@st.composite
def configs(draw):
  ndim = draw(st.integers(2, 4))
  shape = draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim))
  shape[0] = draw(st.integers(2, 6))
  axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim - 1, unique=True))
  axis = axes[0] - ndim if len(axes) == 1 and draw(st.booleans()) else tuple(sorted(axes))
  fields = dict(
      axis=axis,
      momentum=draw(st.floats(0.0, 1.0)),
      epsilon=draw(st.floats(1e-6, 1e-1)),
      use_scale=draw(st.booleans()),
      use_bias=draw(st.booleans()),
  )
  return tuple(shape), fields, draw(st.booleans()), draw(st.integers(0, 2**16))


@SETTINGS
@given(configs(), st.sampled_from(["shifted", "two_pass", "fast", "flax_two_pass"]))
def test_linen_parity_with_flax_exact_variance(config, variance):
  shape, fields, at_construction, seed = config
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(rng.uniform(-3, 3), rng.uniform(0.5, 2), shape), jnp.float32)
  dy = jnp.asarray(rng.normal(size=shape), jnp.float32)
  ours = bnlab.BatchNorm(variance=variance, **fields)
  theirs = nn.BatchNorm(use_fast_variance=False, **fields)
  if at_construction:
    modes = [dict(ours=ours.clone(use_running_average=u), theirs=theirs.clone(use_running_average=u),
                  call={}) for u in (False, True)]
  else:
    modes = [dict(ours=ours, theirs=theirs, call={"use_running_average": u}) for u in (False, True)]
  train, infer = modes

  @jax.jit
  def run(key, x, dy, offsets):
    v_ours = train["ours"].init(key, x, **train["call"])
    v_theirs = train["theirs"].init(key, x, **train["call"])
    v = jax.tree.map(jnp.add, v_theirs, offsets)  # non-trivial params and statistics

    def step(module):
      def loss(x, params):
        y, state = module.apply({**v, "params": params}, x, mutable=["batch_stats"], **train["call"])
        return jnp.sum(y * dy), (y, state["batch_stats"])
      (_, (y, stats)), grads = jax.value_and_grad(loss, (0, 1), has_aux=True)(x, v.get("params", {}))
      return y, stats, grads

    got, want = step(train["ours"]), step(train["theirs"])
    v_new = {**v, "batch_stats": want[1]}
    y_inf = [infer[k].apply(v_new, x, **infer["call"]) for k in ("ours", "theirs")]
    return v_ours, v_theirs, got, want, y_inf

  template = jax.eval_shape(lambda: theirs.init(jax.random.key(0), x, use_running_average=False))
  offsets = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.1, 1, a.shape), a.dtype), template)
  v_ours, v_theirs, got, want, (inf_ours, inf_theirs) = run(jax.random.key(seed), x, dy, offsets)
  assert tree_signature(v_ours) == tree_signature(v_theirs)
  assert_trees_close(v_ours, v_theirs, rtol=0, atol=0)
  # y and dx are sums of O(1 / sqrt(eps)) terms: tolerance relative to that
  assert_trees_close(got, want, rtol=1e-4, atol=2e-5 / np.sqrt(fields["epsilon"]))
  np.testing.assert_allclose(inf_ours, inf_theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,axis", [((64, 16), -1), ((8, 3, 4, 5), (1, 3))])
def test_linen_close_to_flax_default_on_well_conditioned_data(shape, axis):
  x = jax.random.normal(jax.random.key(1), shape)
  dy = jax.random.normal(jax.random.key(2), shape)
  v = nn.BatchNorm(axis=axis).init(jax.random.key(0), x, False)
  got = train_step(bnlab.BatchNorm(axis=axis), v, x, dy, use_running_average=False)
  want = train_step(nn.BatchNorm(axis=axis), v, x, dy, use_running_average=False)
  assert_trees_close(got, want, rtol=1e-4, atol=1e-4)
  # use_fast_variance=True selects the same formula as flax's default
  got = train_step(bnlab.BatchNorm(axis=axis, use_fast_variance=True), v, x, dy,
                   use_running_average=False)
  assert_trees_close(got, want, rtol=1e-5, atol=1e-5)


def test_linen_fields_and_signature_match_flax():
  ours = {f.name for f in bnlab.BatchNorm.__dataclass_fields__.values()}
  theirs = {f.name for f in nn.BatchNorm.__dataclass_fields__.values()}
  assert theirs <= ours
  assert ours - theirs == {"variance", "unbiased_running_var", "update_stats"}
  for name in theirs - {"use_fast_variance", "parent", "name"}:
    assert getattr(bnlab.BatchNorm(), name) == getattr(nn.BatchNorm(), name), name
  # None: bnlab's robust variance; True and False are Flax's formulas, computed as Flax does
  assert bnlab.BatchNorm().use_fast_variance is None
  x = jnp.ones((2, 3))
  with pytest.raises(Exception):  # use_running_average given nowhere
    bnlab.BatchNorm().init(jax.random.key(0), x)
  with pytest.raises(Exception):  # given twice
    bnlab.BatchNorm(use_running_average=True).init(jax.random.key(0), x, True)


def test_linen_param_dtype_and_float32_reductions():
  x = jax.random.normal(jax.random.key(0), (8, 4), jnp.bfloat16)
  for kw in (dict(param_dtype=jnp.bfloat16, dtype=jnp.float32),
             dict(force_float32_reductions=False, param_dtype=jnp.bfloat16)):
    v_ours = bnlab.BatchNorm(**kw).init(jax.random.key(1), x, False)
    v_theirs = nn.BatchNorm(**kw).init(jax.random.key(1), x, False)
    assert tree_signature(v_ours) == tree_signature(v_theirs)
    y_ours, s_ours = bnlab.BatchNorm(**kw).apply(v_ours, x, False, mutable=True)
    y_theirs, s_theirs = nn.BatchNorm(use_fast_variance=False, **kw).apply(
        v_theirs, x, False, mutable=True)
    assert y_ours.dtype == y_theirs.dtype
    assert tree_signature(s_ours) == tree_signature(s_theirs)
    np.testing.assert_allclose(np.float32(y_ours), np.float32(y_theirs), rtol=2e-2, atol=2e-2)


def test_low_precision_statistics_neither_overflow_nor_drop_the_layer_dtype():
  # float16 in float16: 65,536 values per feature made a float16 count inf (NaN outputs).
  x = jax.random.normal(jax.random.key(0), (64, 32, 32, 2), jnp.float16)
  mean, var = bnlab.batch_moments(x, (0, 1, 2), dtype=None)[1:3]
  ref = np.asarray(x, np.float64).reshape(-1, 2)
  np.testing.assert_allclose(np.float32(var), ref.var(0), rtol=2e-3)
  m = bnlab.BatchNorm(use_running_average=False, force_float32_reductions=False)
  y, _ = m.apply(m.init(jax.random.key(1), x), x, mutable=["batch_stats"])
  assert np.isfinite(np.float32(y)).all()
  # With float32 reductions off, `dtype` is the statistics' least precision, as in Flax.
  x = (jax.random.normal(jax.random.key(2), (256, 4)) * 3 + 1).astype(jnp.bfloat16)
  kw = dict(use_running_average=False, force_float32_reductions=False, dtype=jnp.float32,
            momentum=0.0)
  got = [M(**kw).apply(M(**kw).init(jax.random.key(1), x), x, mutable=["batch_stats"])[1]
         for M in (bnlab.BatchNorm, nn.BatchNorm)]
  np.testing.assert_allclose(got[0]["batch_stats"]["var"], got[1]["batch_stats"]["var"],
                             rtol=1e-6)
  assert rel_err(got[0]["batch_stats"]["var"], np.asarray(x, np.float64).var(0)) < 1e-6


@pytest.mark.parametrize("shape, axis", [((5,), -1), ((3, 4), (0, 1))])
def test_no_reduced_axis_normalizes_to_the_bias_like_flax(shape, axis):
  x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape) + 1.0
  out = [M(use_running_average=False, axis=axis).apply(
      M(use_running_average=False, axis=axis).init(jax.random.key(0), x), x,
      mutable=["batch_stats"]) for M in (bnlab.BatchNorm, nn.BatchNorm)]
  assert_trees_close(out[0], out[1])
  np.testing.assert_array_equal(out[0][0], np.zeros(shape))
  bn = bnlab.nnx.BatchNorm(shape[-1], rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(bn(x.reshape(-1)[-shape[-1]:]), np.zeros(shape[-1]))


def test_complex_input_matches_flax():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 3)) + 2j * rng.normal(size=(8, 3)), jnp.complex64)
  kw = dict(use_running_average=False, use_scale=False, use_bias=False, momentum=0.0)
  out = [M(**kw).apply(M(**kw).init(jax.random.key(0), x), x, mutable=["batch_stats"])
         for M in (bnlab.BatchNorm, nn.BatchNorm)]
  assert_trees_close(out[0], out[1], rtol=1e-5, atol=1e-5)
  xn = np.asarray(x, np.complex128)
  np.testing.assert_allclose(out[0][1]["batch_stats"]["var"],
                             (np.abs(xn - xn.mean(0)) ** 2).mean(0), rtol=1e-5)


@pytest.mark.parametrize("direction", ["flax_to_bnlab", "bnlab_to_flax"])
def test_checkpoints_carry_over(direction):
  class Net(nn.Module):
    norm: type

    @nn.compact
    def __call__(self, x, train):
      x = nn.Dense(4)(x)
      x = self.norm(use_running_average=not train, momentum=0.8, use_fast_variance=False)(x)
      return self.norm(use_running_average=not train, axis=(1, 3))(nn.relu(x))

  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 2))
  src, dst = (nn.BatchNorm, bnlab.BatchNorm)
  if direction == "bnlab_to_flax":
    src, dst = dst, src
  v = Net(src).init(jax.random.key(1), x, False)
  _, state = Net(src).apply(v, x * 2 + 1, True, mutable=["batch_stats"])
  v = {**v, **state}
  saved = flax.serialization.to_bytes(v)
  template = Net(dst).init(jax.random.key(2), x, False)
  restored = flax.serialization.from_bytes(template, saved)
  assert_trees_close(restored, v, rtol=0, atol=0)
  np.testing.assert_allclose(Net(dst).apply(restored, x, False), Net(src).apply(v, x, False),
                             rtol=1e-5, atol=1e-5)
  y_dst, s_dst = Net(dst).apply(restored, x, True, mutable=["batch_stats"])
  y_src, s_src = Net(src).apply(v, x, True, mutable=["batch_stats"])
  assert_trees_close((y_dst, s_dst), (y_src, s_src), rtol=1e-4, atol=1e-5)


def test_linen_mutability_semantics():
  rng = np.random.default_rng(3)
  x = rng.normal(4.0, 2.0, (16, 3)).astype(np.float32)
  module = bnlab.BatchNorm(momentum=0.9)
  v = module.init(jax.random.key(0), x, use_running_average=False)
  # init never folds its input into the statistics
  np.testing.assert_array_equal(v["batch_stats"]["mean"], np.zeros(3))
  np.testing.assert_array_equal(v["batch_stats"]["var"], np.ones(3))
  y_ref, m_ref, v_ref = ref_batch_norm(x, np.ones(3), np.zeros(3), np.zeros(3), np.ones(3),
                                       train=True, momentum=0.9)
  # immutable: Flax's error, as nn.BatchNorm
  for layer in (module, nn.BatchNorm(momentum=0.9)):
    with pytest.raises(flax.errors.ModifyScopeVariableError):
      layer.apply(v, x, use_running_average=False)
  # update_stats=False: batch-normalized output, no state returned nor changed
  quiet = bnlab.BatchNorm(momentum=0.9, update_stats=False)
  np.testing.assert_allclose(quiet.apply(v, x, use_running_average=False), y_ref, rtol=1e-5,
                             atol=1e-5)
  y, state = quiet.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  assert_trees_close(state["batch_stats"], v["batch_stats"], rtol=0, atol=0)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  # mutable: the paper's running update
  y, state = module.apply(v, x, use_running_average=False, mutable=["batch_stats"])
  np.testing.assert_allclose(state["batch_stats"]["mean"], m_ref, rtol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["var"], v_ref, rtol=1e-5)
  # inference never changes them, mutable or not
  _, same = module.apply(state | {"params": v["params"]}, x, use_running_average=True,
                         mutable=["batch_stats"])
  assert_trees_close(same, state, rtol=0, atol=0)
  # masks and the unbiased running variance through the module
  mask = np.arange(16)[:, None] < 5
  _, state = bnlab.BatchNorm(momentum=0.9, unbiased_running_var=True).apply(
      v, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
  _, m_ref, v_ref = ref_batch_norm(x, None, None, np.zeros(3), np.ones(3), train=True,
                                   momentum=0.9, mask=mask, unbiased=True)
  np.testing.assert_allclose(state["batch_stats"]["mean"], m_ref, rtol=1e-5)
  np.testing.assert_allclose(state["batch_stats"]["var"], v_ref, rtol=1e-5)


# ----------------------------------------------------------------------------
# NNX


def nnx_pair(**kw):
  ours = bnlab.nnx.BatchNorm(6, rngs=nnx.Rngs(0), **kw)
  theirs = nnx.BatchNorm(6, rngs=nnx.Rngs(0), use_fast_variance=False, **kw)
  return ours, theirs


def test_nnx_state_matches_flax():
  for kw in ({}, dict(use_scale=False), dict(use_bias=False, param_dtype=jnp.bfloat16)):
    ours, theirs = nnx_pair(**kw)
    s_ours, s_theirs = nnx.state(ours), nnx.state(theirs)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)
    assert tree_signature(s_ours) == tree_signature(s_theirs)
    assert {type(v) for v in jax.tree.leaves(s_ours, is_leaf=lambda v: isinstance(v, nnx.Variable))} \
        == {type(v) for v in jax.tree.leaves(s_theirs, is_leaf=lambda v: isinstance(v, nnx.Variable))}
    for name in ("num_features", "use_running_average", "axis", "momentum", "epsilon", "dtype",
                 "param_dtype", "use_bias", "use_scale", "axis_name", "axis_index_groups"):
      assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize("shape", [(10, 6), (3, 4, 4, 6)])
def test_nnx_matches_flax_nnx_and_linen(shape):
  rng = np.random.default_rng(4)
  ours, theirs = nnx_pair(momentum=0.8)
  linen = bnlab.BatchNorm(momentum=0.8)
  lv = linen.init(jax.random.key(0), jnp.zeros(shape), False)
  for step in range(3):
    x = jnp.asarray(rng.normal(step, 1 + step, shape), jnp.float32)
    y_ours, y_theirs = ours(x), theirs(x)
    y_linen, lstate = linen.apply(lv, x, False, mutable=["batch_stats"])
    lv = {**lv, **lstate}
    np.testing.assert_allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_ours, y_linen, rtol=1e-6, atol=1e-6)
    for name in ("mean", "var"):
      np.testing.assert_allclose(getattr(ours, name)[...], getattr(theirs, name)[...], rtol=1e-5)
      np.testing.assert_allclose(getattr(ours, name)[...], lstate["batch_stats"][name], rtol=1e-6)
  # eval modes: construction flag, call flag, model.eval(), nnx.view
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  y_eval = linen.apply(lv, x, True)
  before = jax.tree.map(jnp.copy, nnx.state(ours, nnx.BatchStat))
  np.testing.assert_allclose(ours(x, use_running_average=True), y_eval, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(nnx.view(ours, use_running_average=True)(x), y_eval, rtol=1e-6, atol=1e-6)
  assert ours.use_running_average is False
  ours.eval()
  theirs.eval()
  np.testing.assert_allclose(ours(x), y_eval, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
  assert_trees_close(nnx.state(ours, nnx.BatchStat), before, rtol=0, atol=0)
  ours.train()
  ours(x)
  assert not np.allclose(ours.mean[...], before["mean"][...])


def test_nnx_grads_and_dtypes_match_flax_nnx():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(2.0, 3.0, (12, 6)), jnp.float32)
  dy = jnp.asarray(rng.normal(size=(12, 6)), jnp.float32)
  results = []
  for model in nnx_pair():
    @nnx.jit
    def step(model, x):
      def loss(model, x):
        return jnp.sum(model(x) * dy)
      return nnx.grad(loss, argnums=(0, 1))(model, x)

    g_model, g_x = step(model, x)
    results.append((nnx.state(g_model, nnx.Param), g_x, nnx.state(model, nnx.BatchStat)))
  assert_trees_close(*results, rtol=1e-4, atol=1e-5)
  xb = x.astype(jnp.bfloat16)
  for kw in ({}, dict(use_scale=False, use_bias=False), dict(dtype=jnp.bfloat16)):
    ours, theirs = nnx_pair(**kw)
    for ura in (False, True):
      assert ours(xb, ura).dtype == theirs(xb, ura).dtype, (kw, ura)


def test_readme_layer_examples_run():
  """The README's 'Using the layers' code (linen, functional, NNX) runs as printed."""
  import os
  import re
  readme = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "README.md")).read()
  section = readme.split("## Using the layers in your own model", 1)[1].split("\n## ", 1)[0]
  blocks = re.findall(r"```python\n(.*?)```", section, re.S)
  assert len(blocks) == 2, "expected the linen and the NNX example"
  ns = {}
  for block in blocks:
    exec(block, ns)  # pylint: disable=exec-used
  assert ns["logits"].shape == (32, 10)
  assert int(ns["model"].bn.steps[...]) == 1  # one train-mode call, then eval
