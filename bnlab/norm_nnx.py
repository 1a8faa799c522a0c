"""`BatchNorm` for Flax NNX over the same functional core."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

import jax.numpy as jnp
from flax import nnx
from flax.nnx import initializers

from bnlab.norm import Axes, batch_norm


class BatchNorm(nnx.Module):
  """Batch Normalization with the fields and variables of `flax.nnx.BatchNorm`.

  Variables: `scale`, `bias` (`nnx.Param`), `mean`, `var` (`nnx.BatchStat`).
  The variance is the robust one-pass shifted formula unless
  `use_fast_variance=True` or `variance` says otherwise. Modes switch as with
  Flax: `use_running_average` at construction or call, `model.train()` /
  `model.eval()`, or `nnx.view(model, use_running_average=...)`. `axis_name`
  statistics psum sums and counts (exact for unequal masks per device).
  """

  def __init__(
      self,
      num_features: int,
      *,
      use_running_average: bool | None = False,
      axis: Axes = -1,
      momentum: float = 0.99,
      epsilon: float = 1e-5,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      use_bias: bool = True,
      use_scale: bool = True,
      bias_init: Any = initializers.zeros_init(),
      scale_init: Any = initializers.ones_init(),
      axis_name: Any = None,
      axis_index_groups: Any = None,
      use_fast_variance: bool = False,
      variance: str | None = None,
      unbiased_running_var: bool = False,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      scale_metadata: Mapping[str, Any] = MappingProxyType({}),
  ):
    shape = (num_features,)
    self.mean = nnx.BatchStat(jnp.zeros(shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(shape, jnp.float32))
    self.scale = (
        nnx.Param(scale_init(rngs.params(), shape, param_dtype), **scale_metadata)
        if use_scale else nnx.data(None)
    )
    self.bias = (
        nnx.Param(bias_init(rngs.params(), shape, param_dtype), **bias_metadata)
        if use_bias else nnx.data(None)
    )
    self.num_features = num_features
    self.param_dtype = param_dtype
    self.use_bias = use_bias
    self.use_scale = use_scale
    self.use_fast_variance = use_fast_variance
    self.use_running_average = use_running_average
    self.axis = axis
    self.momentum = momentum
    self.epsilon = epsilon
    self.dtype = dtype
    self.axis_name = axis_name
    self.axis_index_groups = axis_index_groups
    self.variance = variance or ("fast" if use_fast_variance else "shifted")
    self.unbiased_running_var = unbiased_running_var

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError("pass use_running_average to BatchNorm(...) or to its call")
    scale = None if self.scale is None else self.scale[...]
    bias = None if self.bias is None else self.bias[...]
    mean, var = self.mean[...], self.var[...]
    # Like flax.nnx, the output dtype defaults to that of all operands,
    # the statistics included.
    dtype = self.dtype
    if dtype is None:
      dtype = jnp.result_type(x, mean, var, *(v for v in (scale, bias) if v is not None))
    out = batch_norm(
        x, scale, bias, mean, var,
        train=not use_running_average,
        axis=self.axis,
        momentum=self.momentum,
        epsilon=self.epsilon,
        mask=mask,
        variance=self.variance,
        unbiased_running_var=self.unbiased_running_var,
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        dtype=dtype,
    )
    if not use_running_average:
      self.mean[...] = out.mean
      self.var[...] = out.var
    return out.y

  def set_view(self, use_running_average: bool | None = None):
    """Lets `nnx.view(model, use_running_average=...)` switch modes."""
    if use_running_average is not None:
      self.use_running_average = use_running_average
