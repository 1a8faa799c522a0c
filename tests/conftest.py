"""Fixtures shared by the end-to-end tests."""

import os

import jax
import pytest

from bnlab.engine import backend
from bnlab import data
import tiny_mnist

# The tests compare runs bit for bit (resume, reruns): XLA's deterministic mode,
# set before any test starts JAX's backend, as `python -m bnlab.main` does.
backend.configure(deterministic=True)
# One persistent compilation cache for every test (a run would otherwise put it
# under the first run's data.cache_dir, which may be a test's temporary directory).
backend.enable_compilation_cache(os.path.join(data.default_cache_dir(), "jax"))


@pytest.fixture
def float32_matmuls():
  """Matrix products and convolutions at full float32 precision on every backend.

  JAX's default float32 precision on NVIDIA GPUs is TF32 (a 10-bit mantissa,
  ~1e-3 relative per product); on CPU it is already full float32, so this
  changes nothing there. Tests that compare against float64 or hand-derived
  references use it, so GPU results are held to the CPU's tolerances.
  """
  with jax.default_matmul_precision("highest"):
    yield


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  """A tiny learnable MNIST look-alike (320 train / 100 test) as an IDX directory."""
  d = str(tmp_path_factory.mktemp("idx"))
  tiny_mnist.write_mnist_dir(d, num_train=320, num_test=100)
  return d
