"""Fixtures shared by the end-to-end tests."""

import pytest

import tiny_mnist


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  """A tiny learnable MNIST look-alike (320 train / 100 test) as an IDX directory."""
  d = str(tmp_path_factory.mktemp("idx"))
  tiny_mnist.write_mnist_dir(d, num_train=320, num_test=100)
  return d
