"""Which stored training examples a run holds out for validation and which it trains on.

Why a fixed, seeded hold-out: a study that chooses each method's learning rate must choose
on images the runs never trained on and that are not the test set, and every run of the
study must be scored on the same images, so the choice compares methods, not samples.

The order: the `validation_size` held-out examples are drawn first from the whole stored
training split with their own seed (`validation_seed`, not the run's); `data.num_train`'s
subset is then drawn from the examples left (the first N of them in stored order, or a
sample with `subset_seed`), so a subset never overlaps the held-out images and the held-out
images do not depend on `num_train`. With `validation_size` 0 the subset is exactly what it
was without this module's hold-out (the first N, or `subset_seed`'s sample of the split).
"""

from __future__ import annotations

import numpy as np


def held_out(num_examples: int, size: int, seed: int) -> np.ndarray:
  """The stored positions of the `size` held-out examples among `num_examples`, ascending:
  a uniform sample drawn with `seed` (the same for every run that names the seed)."""
  if size <= 0:
    return np.zeros((0,), np.int64)
  return np.sort(np.random.default_rng(seed).permutation(num_examples)[:size]).astype(np.int64)


def training_positions(num_examples: int, held: np.ndarray, num_train: int,
                       subset_seed: int):
  """The stored positions a run trains on: of the examples not `held` (in stored order),
  all (num_train 0), the first `num_train` (subset_seed < 0), or a sample of `num_train`
  drawn with `subset_seed` (kept in stored order; each epoch shuffles anyway).

  Without held-out examples it is what the subset always was: a slice of the first N, or
  the sorted sample `permutation(num_examples)[:N]` of `subset_seed`.
  """
  n = num_train or num_examples - len(held)
  if not len(held):
    if subset_seed < 0 or not num_train:
      return slice(n)
    return np.sort(np.random.default_rng(subset_seed).permutation(num_examples)[:n])
  rest = np.setdiff1d(np.arange(num_examples, dtype=np.int64), held, assume_unique=True)
  if subset_seed < 0 or not num_train:
    return rest[:n]
  return rest[np.sort(np.random.default_rng(subset_seed).permutation(len(rest))[:n])]
