"""experiments/flax_conformance.py's offline pieces: case selection, the swap plugin, the report.

Nothing here downloads: the run against Flax's own tests is the script's job.
"""

import importlib.util
import json
import os
import textwrap

import flax.linen
import flax.linen.normalization
import flax.nnx
import flax.nnx.nn.normalization
import jax
import jax.numpy as jnp
import pytest

import bnlab
from experiments import flax_conformance as fc

FAKE_TEST_FILE = textwrap.dedent('''
    from absl.testing import parameterized
    from flax import linen as nn
    from flax import nnx


    class Block(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.BatchNorm(True)(x)


    def make_model():
      return Block()  # a helper of a helper


    UNUSED = 3


    class LayersTest(parameterized.TestCase):

      def test_direct(self):
        nnx.BatchNorm(3, rngs=nnx.Rngs(0))

      @parameterized.parameters((nnx.BatchNorm,), (nnx.LayerNorm,))
      def test_parametrized(self, layer):
        del layer

      def test_through_helper(self):
        make_model()

      def test_unrelated(self):
        nn.Dense(3)

      def helper_not_a_test(self):
        nn.BatchNorm()


    def test_module_level():
      Block()


    def test_module_level_unrelated():
      assert UNUSED == 3
    ''')


def test_cases_mention_batchnorm_directly_in_decorators_or_through_helpers():
  assert fc.batchnorm_cases(FAKE_TEST_FILE) == [
      "LayersTest.test_direct", "LayersTest.test_parametrized",
      "LayersTest.test_through_helper", "test_module_level"]


def test_select_takes_an_examples_test_file_whole(tmp_path):
  for file in ("tests/a_test.py", "examples/imagenet/models_test.py"):
    (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / file).write_text(FAKE_TEST_FILE)
  selected = fc.select(str(tmp_path), ["tests/a_test.py", "examples/imagenet/models_test.py"])
  assert selected["examples/imagenet/models_test.py"] == "*"
  assert len(selected["tests/a_test.py"]) == 4


def test_missing_module_names_the_top_level_package():
  assert fc.missing_module("E   ModuleNotFoundError: No module named 'tensorflow.compat'") == (
      "tensorflow")
  assert fc.missing_module("AssertionError") is None


def test_download_uses_an_unpacked_tree_without_pip(tmp_path, monkeypatch):
  root = tmp_path / "flax-9.9"
  (root / "tests/nnx/nn").mkdir(parents=True)
  (root / "pyproject.toml").write_text("")
  (root / "tests/nnx/nn/normalization_test.py").write_text("")
  monkeypatch.setattr(fc.subprocess, "run", lambda *a, **k: pytest.fail("downloaded"))
  assert fc.download("9.9", str(tmp_path)) == str(root)


def test_table_counts_each_mode_and_names_failures_and_files_not_run():
  runs = {"bnlab": {
      "tests/a_test.py": {"outcomes": {"tests/a_test.py::T::test_x": "passed",
                                       "tests/a_test.py::T::test_y": "failed",
                                       "tests/a_test.py::T::test_z": "skipped"},
                          "not_run": {}, "swapped": []},
      "examples/imagenet/train_test.py": {
          "outcomes": {}, "swapped": [],
          "not_run": {"examples/imagenet/train_test.py": "No module named 'tensorflow'"}}}}
  text = fc.table("9.9", {"tests/a_test.py": [], "examples/imagenet/train_test.py": "*"}, runs)
  assert "| bnlab | 3 | 1 | 1 | 1 | 1 files |" in text
  assert "tests/a_test.py::T::test_y" in text
  assert "examples/imagenet/train_test.py: not run (missing tensorflow)" in text


@pytest.mark.parametrize("swap", fc.MODES)
def test_plugin_swaps_every_alias(tmp_path, monkeypatch, swap):
  path = tmp_path / "bnlab_flax_swap.py"
  path.write_text(fc.PLUGIN)
  monkeypatch.setenv("BNLAB_CONFORMANCE_SWAP", swap)
  monkeypatch.setenv("BNLAB_CONFORMANCE_CASES", json.dumps({}))
  monkeypatch.setenv("BNLAB_CONFORMANCE_RESULTS", os.fspath(tmp_path / "results.json"))
  modules = (flax.linen, flax.linen.normalization, flax.nnx, flax.nnx.nn.normalization)
  for module in modules:  # restored after the test
    monkeypatch.setattr(module, "BatchNorm", module.BatchNorm)
  flax_linen, flax_nnx = flax.linen.BatchNorm, flax.nnx.BatchNorm
  spec = importlib.util.spec_from_file_location(f"bnlab_flax_swap_{swap}", path)
  plugin = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(plugin)
  if swap == "none":
    assert plugin.SWAPPED == [] and flax.linen.BatchNorm is flax_linen
    return
  if swap.endswith(("_linen", "_nnx")):  # one API swapped, the other Flax's
    linen_only = swap.endswith("_linen")
    assert (flax.nnx.BatchNorm is flax_nnx) is linen_only
    assert (flax.linen.BatchNorm is flax_linen) is not linen_only
    fast = True if swap.startswith("bnlab_fast") else None  # None: bnlab's robust default
    if linen_only:
      assert issubclass(flax.linen.BatchNorm, bnlab.BatchNorm)
      assert flax.linen.BatchNorm(use_running_average=False).use_fast_variance is fast
    else:
      assert issubclass(flax.nnx.BatchNorm, bnlab.nnx.BatchNorm)
      assert flax.nnx.BatchNorm(3, rngs=flax.nnx.Rngs(0)).use_fast_variance is fast
    assert (flax.linen.BatchNorm if linen_only else flax.nnx.BatchNorm).__name__ == "BatchNorm"
    return
  assert set(plugin.SWAPPED) >= {"flax.linen.BatchNorm", "flax.linen.normalization.BatchNorm",
                                 "flax.nnx.BatchNorm", "flax.nnx.nn.normalization.BatchNorm"}
  linen_bn, nnx_bn = flax.linen.BatchNorm, flax.nnx.BatchNorm
  assert flax.linen.normalization.BatchNorm is linen_bn and issubclass(linen_bn, bnlab.BatchNorm)
  assert flax.nnx.nn.normalization.BatchNorm is nnx_bn
  assert issubclass(nnx_bn, bnlab.nnx.BatchNorm)
  assert linen_bn.__name__ == nnx_bn.__name__ == "BatchNorm"  # linen auto-name BatchNorm_0
  fast = True if swap == "bnlab_fast" else None  # None: bnlab's robust default
  assert linen_bn(use_running_average=False).use_fast_variance is fast
  assert nnx_bn(3, rngs=flax.nnx.Rngs(0)).use_fast_variance is fast
  x = jnp.ones((2, 3))
  variables = linen_bn(use_running_average=False).init(jax.random.key(0), x)
  assert set(variables) == {"params", "batch_stats"}
