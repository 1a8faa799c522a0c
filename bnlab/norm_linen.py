"""`BatchNorm` for flax.linen: a drop-in replacement for `flax.linen.BatchNorm`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers
from flax.linen.module import merge_param

from bnlab.norm import Axes, batch_norm, canonicalize_axes


class BatchNorm(nn.Module):
  """Batch Normalization with Flax's fields, variables and call signature.

  Same constructor fields, `__call__(x, use_running_average=None, *, mask=None)`
  and variables (`params/scale`, `params/bias`, `batch_stats/mean`,
  `batch_stats/var`) as `flax.linen.BatchNorm`, so changing the import is all a
  model needs; checkpoints carry over. Differences, all deliberate:

  - `use_fast_variance` defaults to False: the variance is the robust one-pass
    shifted formula (see `bnlab.norm`), exact where Flax's default loses all
    precision (inputs with |mean| >> std).
  - Running statistics are updated only when `batch_stats` is mutable (and
    never during `init`); with an immutable `batch_stats` a train-mode call
    normalizes with batch statistics and leaves the running ones alone.
  - `axis_name` statistics psum sums and counts, so masks with different
    counts per device give exactly the global statistics.

  Extra fields: `variance` ("shifted", "two_pass", "fast"; overrides
  `use_fast_variance` when set) and `unbiased_running_var` (the paper's
  m/(m-1) correction of the running variance).
  """

  use_running_average: bool | None = None
  axis: Axes = -1
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Any = initializers.zeros
  scale_init: Any = initializers.ones
  axis_name: Any = None
  axis_index_groups: Any = None
  use_fast_variance: bool = False
  force_float32_reductions: bool = True
  variance: str | None = None
  unbiased_running_var: bool = False

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_running_average = merge_param(
        "use_running_average", self.use_running_average, use_running_average
    )
    feature_axes = canonicalize_axes(x.ndim, self.axis)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(feature_shape, stats_dtype))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(feature_shape, stats_dtype))
    scale = (
        self.param("scale", self.scale_init, feature_shape, self.param_dtype)
        if self.use_scale else None
    )
    bias = (
        self.param("bias", self.bias_init, feature_shape, self.param_dtype)
        if self.use_bias else None
    )
    variance = self.variance or ("fast" if self.use_fast_variance else "shifted")
    initializing = self.is_initializing()
    out = batch_norm(
        x, scale, bias, ra_mean.value, ra_var.value,
        train=not use_running_average,
        axis=feature_axes,
        momentum=self.momentum,
        epsilon=self.epsilon,
        mask=mask,
        variance=variance,
        unbiased_running_var=self.unbiased_running_var,
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=self.axis_index_groups,
        dtype=self.dtype,
        stats_dtype=jnp.float32 if self.force_float32_reductions else None,
    )
    if (not use_running_average and not initializing
        and self.is_mutable_collection("batch_stats")):
      ra_mean.value = out.mean
      ra_var.value = out.var
    return out.y
