"""Flax's own tools pointed at bnlab's layers give what they give on Flax's BatchNorm.

Each test runs a tool on a small model with Flax's layer and with each of
bnlab's, and compares: same rows (the class name aside), same parameter
counts, no extra rows for the layers' helpers, no warning Flax's layer does
not give. The variants' counters (`steps`, `num_batches`) and
`NoisyBatchNorm`'s noise stream are their own state, left out of the
comparison.
"""

from __future__ import annotations

import functools
import itertools
import warnings

import flax.linen as nn
from flax import nnx
from flax.linen import summary as linen_summary
from flax.nnx import bridge
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnlab.layers import linen as bl
from bnlab.layers import nnx as bx

COUNTERS = ("steps", "num_batches")
X = jnp.linspace(-1.0, 1.0, 4 * 3).reshape(4, 3)
RNGS = {"params": jax.random.key(0), "noise": jax.random.key(1)}
WIDE = {"width": 250}  # no class name elided in the rendered table


def layers(module):
  """bnlab's layer and variants in `module` (linen or NNX), small enough for X."""
  return {
      "BatchNorm": module.BatchNorm,
      "BatchRenorm": module.BatchRenorm,
      "GhostBatchNorm": functools.partial(module.GhostBatchNorm, ghost_size=2),
      "NoisyBatchNorm": module.NoisyBatchNorm,
      "BatchNormVariant": functools.partial(module.BatchNormVariant,
                                            running_average="population"),
  }


LINEN, NNX = layers(bl), layers(bx)

# tabulate's options: show_repeated x compute_flops, the vjp flops, depth and mutable.
TABULATE_OPTIONS = [
    {"show_repeated": repeated, "compute_flops": flops}
    for repeated, flops in itertools.product((False, True), repeat=2)
] + [{"compute_vjp_flops": True},
     {"show_repeated": True, "compute_flops": True, "compute_vjp_flops": True},
     {"depth": 0}, {"depth": 1, "show_repeated": True},
     {"mutable": ["params", "batch_stats"], "compute_flops": True}]
# The variants' helpers are bnlab.BatchNorm's; every option on it, the fullest on them.
TABULATE_CASES = [("BatchNorm", options) for options in TABULATE_OPTIONS] + [
    (name, {"show_repeated": True, "compute_flops": True})
    for name in LINEN if name != "BatchNorm"]


def class_name(make):
  return getattr(make, "func", make).__name__


def renamed(text: str, name: str) -> str:
  """`text` with bnlab's class name read as Flax's."""
  return text.replace(name, "BatchNorm")


def without_counters(tree):
  """A nested dict of shapes without the variants' counters and noise stream."""
  if not isinstance(tree, dict):
    return jnp.shape(tree)
  return {k: without_counters(v) for k, v in tree.items()
          if k not in COUNTERS and k != "noise_rngs"}


def recorded(fn, *args, **kwargs):
  """fn's result and the messages of the warnings it gave."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = fn(*args, **kwargs)
  return out, [str(w.message) for w in caught]


class LinenNet(nn.Module):
  """Dense, then one norm layer called twice (a repeated call) inside a block."""

  norm: object

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(3)(x)

    class Block(nn.Module):
      norm: object

      @nn.compact
      def __call__(self, x):
        layer = self.norm(use_running_average=False)
        return layer(layer(x))

    return Block(self.norm)(x)


def table_rows(norm, name, **options):
  """The rows `tabulate` renders: path, class, method, shapes, counted variables, flops."""
  options = dict(options)
  mutable = options.pop("mutable", None)
  kwargs = {} if mutable is None else {"mutable": mutable}
  table = linen_summary._get_module_table(  # pylint: disable=protected-access
      LinenNet(norm), options.get("depth"), options.get("show_repeated", False),
      options.get("compute_flops", False), options.get("compute_vjp_flops", False))(
          RNGS, X, **kwargs)
  return [(tuple(renamed(p, name) for p in row.path), renamed(type(row.module_copy).__name__, name),
           row.method, str(jax.tree.map(jnp.shape, row.inputs)),
           str(jax.tree.map(jnp.shape, row.outputs)), without_counters(row.counted_variables),
           row.flops is not None and row.flops >= 0,
           row.vjp_flops is not None and row.vjp_flops >= 0)
          for row in table]


@functools.cache
def flax_tabulate(options_items):
  """Flax's layer's text, warnings and rows for tabulate's options (cached)."""
  options = dict(options_items)
  text, caught = recorded(LinenNet(nn.BatchNorm).tabulate, RNGS, X, console_kwargs=WIDE,
                          **options)
  return text, caught, table_rows(nn.BatchNorm, "BatchNorm", **options)


@pytest.mark.parametrize("name,options", TABULATE_CASES, ids=str)
def test_linen_tabulate_as_flax(name, options):
  norm = LINEN[name]
  text, caught = recorded(LinenNet(norm).tabulate, RNGS, X, console_kwargs=WIDE, **options)
  flax_text, flax_caught, flax_rows = flax_tabulate(
      tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))
  assert caught == flax_caught
  assert "(_" not in text  # no row for a helper method
  assert text.count(class_name(norm)) == flax_text.count("BatchNorm")
  assert table_rows(norm, class_name(norm), **options) == flax_rows


def test_linen_summary_tabulate_function():
  """`nn.tabulate(module, rngs)(x)` is `Module.tabulate`: same text."""
  for norm in (nn.BatchNorm, bl.BatchNorm, bl.BatchRenorm):
    module = LinenNet(norm)
    text, caught = recorded(nn.tabulate(module, RNGS, show_repeated=True, compute_flops=True), X)
    assert not caught
    assert text == module.tabulate(RNGS, X, show_repeated=True, compute_flops=True)


@pytest.mark.parametrize("name", LINEN)
def test_linen_share_scope(name):
  """A wrapper sharing its scope with the layer has the layer's variables at its top."""

  def wrapper(norm):

    class Wrapper(nn.Module):

      def setup(self):
        self.inner = norm(use_running_average=False)
        nn.share_scope(self, self.inner)

      def __call__(self, x):
        return self.inner(x)

    return Wrapper()

  variables = wrapper(LINEN[name]).init(RNGS, X)
  flax_variables = wrapper(nn.BatchNorm).init(RNGS, X)
  assert without_counters(variables) == without_counters(flax_variables)
  _, updates = wrapper(LINEN[name]).apply(variables, X, mutable=["batch_stats"], rngs=RNGS)
  assert without_counters(updates) == without_counters({"batch_stats": flax_variables["batch_stats"]})


def nnx_layer(make, **kwargs):
  return make(3, rngs=nnx.Rngs(0), **kwargs)


class NNXBlock(nnx.Module):

  def __init__(self, norm, rngs):
    self.linear = nnx.Linear(3, 3, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.norm = norm(3, rngs=rngs)

  def __call__(self, x):
    return self.norm(self.dropout(self.linear(x)))


@pytest.mark.parametrize("name", NNX)
def test_nnx_view_and_view_info(name):
  make = NNX[name]
  block, flax_block = NNXBlock(make, nnx.Rngs(0)), NNXBlock(nnx.BatchNorm, nnx.Rngs(0))
  info, caught = recorded(nnx.view_info, nnx_layer(make))
  assert not caught
  assert renamed(info, class_name(make)) == nnx.view_info(nnx_layer(nnx.BatchNorm))
  assert class_name(make) + ":" in nnx.view_info(block)
  for b in (block, flax_block):
    view = nnx.view(b, use_running_average=True, deterministic=True)
    assert view.norm.use_running_average and not b.norm.use_running_average
    with pytest.raises(ValueError, match="Unused keys"):
      nnx.view(b, use_running_avg=True)
  view = nnx.view(block, use_running_average=True, deterministic=True)
  before = nnx.state(block, nnx.BatchStat)
  view(X)  # inference: the running statistics stay
  assert jax.tree.all(jax.tree.map(jnp.array_equal, nnx.state(block, nnx.BatchStat), before))


def header(text: str) -> str:
  """The first line of an NNX repr without the class name and non-Param counts."""
  return text.splitlines()[0].split("#")[1].split(",")[0]


@pytest.mark.parametrize("name", NNX)
def test_nnx_display(name, capsys):
  layer = nnx_layer(NNX[name])
  _, caught = recorded(nnx.display, layer)
  text = capsys.readouterr().out
  nnx.display(nnx_layer(nnx.BatchNorm))
  flax_text = capsys.readouterr().out
  assert not caught
  assert text.startswith(class_name(NNX[name]) + "(")
  assert header(text) == header(flax_text)  # the Param count and bytes


@pytest.mark.parametrize("name", NNX)
def test_nnx_display_treescope(name):
  treescope = pytest.importorskip("treescope", reason="treescope renders nnx.display in IPython")
  # Flax's layer first: a process's first render may warn whatever the layer (with jax 0.8.1,
  # "jax.ArrayRef is deprecated"); bnlab's must give no warning Flax's does not.
  recorded(treescope.render_to_text, nnx_layer(nnx.BatchNorm))
  text, caught = recorded(treescope.render_to_text, nnx_layer(NNX[name]))
  assert not caught
  assert class_name(NNX[name]) in text


@pytest.mark.parametrize("name", NNX)
def test_nnx_split_merge_state(name):
  layer, flax_layer = nnx_layer(NNX[name]), nnx_layer(nnx.BatchNorm)
  for m in (layer, flax_layer):
    m(X)
  graphdef, params, stats, rest = nnx.split(layer, nnx.Param, nnx.BatchStat, ...)
  _, flax_params, flax_stats = nnx.split(flax_layer, nnx.Param, nnx.BatchStat)
  assert without_counters(nnx.to_pure_dict(params)) == without_counters(
      nnx.to_pure_dict(flax_params))
  assert without_counters(nnx.to_pure_dict(stats)) == without_counters(
      nnx.to_pure_dict(flax_stats))
  assert without_counters(nnx.to_pure_dict(nnx.state(layer))) == without_counters(
      nnx.to_pure_dict(nnx.state(flax_layer)))
  merged = nnx.merge(graphdef, params, stats, rest)
  x = X * 2 + 1
  assert jnp.array_equal(merged(x, use_running_average=True), layer(x, use_running_average=True))


@pytest.mark.parametrize("name", NNX)
def test_nnx_tabulate(name):
  make = NNX[name]
  table, caught = recorded(nnx.tabulate, nnx_layer(make), X, compute_flops=True,
                           console_kwargs={"width": 200, "color_system": None})
  flax_table = nnx.tabulate(nnx_layer(nnx.BatchNorm), X, compute_flops=True,
                            console_kwargs={"width": 200, "color_system": None})
  assert not caught
  assert "normalize" not in table  # no row for a helper method
  assert table.count(class_name(make)) == flax_table.count("BatchNorm")  # title, one row
  assert "Total Parameters: 12 (48 B)" in flax_table
  if name not in ("BatchRenorm", "BatchNormVariant", "NoisyBatchNorm"):  # no counters
    assert "Total Parameters: 12 (48 B)" in table


@pytest.mark.parametrize("name", NNX)
def test_bridge_to_linen(name):
  make = NNX[name]
  lin = bridge.to_linen(getattr(make, "func", make), 3, **getattr(make, "keywords", {}))
  flax_lin = bridge.to_linen(nnx.BatchNorm, 3)
  variables, caught = recorded(lin.init, RNGS, X)
  flax_variables = flax_lin.init(RNGS, X)
  assert not caught
  assert without_counters(variables) == without_counters(flax_variables)
  _, updates = lin.apply(variables, X, mutable=["batch_stats"], rngs=RNGS)
  assert without_counters(updates) == {"batch_stats": without_counters(flax_variables)["batch_stats"]}


@pytest.mark.parametrize("name", LINEN)
def test_bridge_to_nnx(name):
  def wrapped(norm):
    m = bridge.ToNNX(norm(use_running_average=False), rngs=nnx.Rngs(0, noise=1))
    bridge.lazy_init(m, X)
    return m

  m, caught = recorded(wrapped, LINEN[name])
  flax_m = wrapped(nn.BatchNorm)
  assert not caught
  for kind in (nnx.Param, nnx.BatchStat):
    assert without_counters(nnx.to_pure_dict(nnx.state(m, kind))) == without_counters(
        nnx.to_pure_dict(nnx.state(flax_m, kind)))
  before = nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))
  m(X, mutable=["batch_stats"])
  after = nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))
  assert not jnp.array_equal(before["mean"], after["mean"])  # the update came back


@pytest.mark.parametrize("name", ["BatchNorm", "BatchRenorm"])
def test_bridge_round_trip(name):
  """NNX layer -> to_linen variables -> the linen layer, and back through ToNNX."""
  variables = bridge.to_linen(NNX[name], 3).init(RNGS, X)
  linen_layer = LINEN[name](use_running_average=True)
  y = linen_layer.apply(variables, X)
  back = bridge.ToNNX(linen_layer, rngs=nnx.Rngs(0))
  bridge.lazy_init(back, X)
  nnx.update(back, nnx.State(variables["params"]), nnx.State(variables["batch_stats"]))
  assert jnp.allclose(back(X), y)
  assert jnp.allclose(nnx_layer(NNX[name])(X, use_running_average=True), y)


@pytest.mark.parametrize("serialized", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_jax_export_round_trip(train, serialized):
  """A model with bnlab's layer exports with `jax.export` (StableHLO, no TensorFlow), and
  the exported program (serialized and read back too, where jax's optional flatbuffers is
  installed) computes what the model does."""
  from jax import export  # pylint: disable=g-import-not-at-top
  if serialized:
    pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.Dense(8, use_bias=False)(x)
      return bl.BatchNorm(use_running_average=not train)(x)

  model, x = Net(), jnp.arange(48, dtype=jnp.float32).reshape(6, 8) / 7.0
  variables = model.init(jax.random.key(0), x, train=False)

  def f(v, x):
    return model.apply(v, x, train=train, mutable=["batch_stats"] if train else False)

  exported = export.export(jax.jit(f))(variables, x)
  if serialized:
    exported = export.deserialize(exported.serialize())
  got, want = exported.call(variables, x), jax.jit(f)(variables, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
