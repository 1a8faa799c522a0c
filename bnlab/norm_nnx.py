"""`BatchNorm` and its variants for Flax NNX over the same functional core.

`BatchRenorm`, `GhostBatchNorm`, `NoisyBatchNorm` and `BatchNormVariant`
(frozen statistics, population averages) mirror the linen modules of
`bnlab.norm_linen`: same fields, same extra variables (`steps`,
`num_batches`), same pure functions from `bnlab.variants` underneath.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import initializers

from bnlab import variants
from bnlab.norm import Axes, BatchNormOutput, batch_norm


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
    use_running_average = self._mode(use_running_average)
    operands, dtype = self._operands(x)
    out = batch_norm(
        x, *operands,
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

  def _mode(self, use_running_average: bool | None) -> bool:
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError("pass use_running_average to the layer's constructor or to its call")
    return use_running_average

  def _operands(self, x):
    """(scale, bias, mean, var) and the computation dtype."""
    scale = None if self.scale is None else self.scale[...]
    bias = None if self.bias is None else self.bias[...]
    mean, var = self.mean[...], self.var[...]
    # Like flax.nnx, the output dtype defaults to that of all operands,
    # the statistics included.
    dtype = self.dtype
    if dtype is None:
      dtype = jnp.result_type(x, mean, var, *(v for v in (scale, bias) if v is not None))
    return (scale, bias, mean, var), dtype

  def set_view(self, use_running_average: bool | None = None):
    """Lets `nnx.view(model, use_running_average=...)` switch modes."""
    if use_running_average is not None:
      self.use_running_average = use_running_average


class BatchNormVariant(BatchNorm):
  """`BatchNorm` with a choice of running statistics; the base of the variants.

  As `bnlab.norm_linen.BatchNormVariant`: `running_average="ema"` (`momentum`)
  or `"population"` (the average of every batch's mean and m/(m-1)-corrected
  variance, Ioffe & Szegedy 2015, Algorithm 2; adds the `num_batches`
  `nnx.BatchStat`), and `frozen=True` to normalize with the running
  statistics and never update them, in train mode too. Subclasses change
  `normalize`.
  """

  def __init__(self, num_features: int, *, running_average: str = "ema",
               frozen: bool = False, rngs: nnx.Rngs, **kwargs):
    if running_average not in variants.RUNNING_AVERAGES:
      raise ValueError(f"running_average={running_average!r}; expected one of "
                       f"{variants.RUNNING_AVERAGES}")
    super().__init__(num_features, rngs=rngs, **kwargs)
    self.running_average = running_average
    self.frozen = frozen
    if running_average == "population":
      self.num_batches = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def normalize(self, x, scale, bias, mean, var, *, train: bool, updating: bool,
                **kwargs) -> BatchNormOutput:
    """The output and new running statistics; `kwargs` are `batch_norm`'s."""
    del updating
    return batch_norm(x, scale, bias, mean, var, train=train, **kwargs)

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    return self._forward(x, use_running_average, mask)

  def _forward(self, x, use_running_average, mask, **extra):
    """Normalizes (`extra` goes to `normalize`) and updates the running statistics."""
    train = not self._mode(use_running_average) and not self.frozen
    operands, dtype = self._operands(x)
    population = self.running_average == "population"
    out = self.normalize(
        x, *operands,
        train=train,
        updating=train,
        axis=self.axis,
        momentum=0.0 if population else self.momentum,
        epsilon=self.epsilon,
        mask=mask,
        variance=self.variance,
        unbiased_running_var=population or self.unbiased_running_var,
        axis_name=self.axis_name,
        axis_index_groups=self.axis_index_groups,
        dtype=dtype,
        **extra,
    )
    if train:
      if population:
        stats = variants.population_average(
            self.mean[...], self.var[...], self.num_batches[...], out.mean, out.var)
        self.mean[...], self.var[...], self.num_batches[...] = stats
      else:
        self.mean[...] = out.mean
        self.var[...] = out.var
    return out.y


class BatchRenorm(BatchNormVariant):
  """Batch Renormalization (Ioffe 2017) over `variants.batch_renorm`.

  r_max and d_max follow `variants.renorm_limits` of the train-mode calls so
  far, counted in the `steps` `nnx.BatchStat`.
  """

  def __init__(self, num_features: int, *, r_max: float = 3.0, d_max: float = 5.0,
               warmup_steps: int = 5000, r_max_steps: int = 40000,
               d_max_steps: int = 25000, rngs: nnx.Rngs, **kwargs):
    super().__init__(num_features, rngs=rngs, **kwargs)
    self.r_max, self.d_max = r_max, d_max
    self.warmup_steps, self.r_max_steps, self.d_max_steps = (
        warmup_steps, r_max_steps, d_max_steps)
    self.steps = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def normalize(self, x, scale, bias, mean, var, *, train: bool, updating: bool,
                **kwargs) -> BatchNormOutput:
    limits = variants.renorm_limits(
        self.steps[...], r_max=self.r_max, d_max=self.d_max,
        warmup_steps=self.warmup_steps, r_max_steps=self.r_max_steps,
        d_max_steps=self.d_max_steps)
    if updating:
      self.steps[...] = self.steps[...] + 1
    return variants.batch_renorm(
        x, scale, bias, mean, var, train=train, r_max=limits.r_max, d_max=limits.d_max,
        **kwargs)


class GhostBatchNorm(BatchNormVariant):
  """`bnlab.norm_linen.GhostBatchNorm` for NNX: `variants.ghost_batch_norm` per call."""

  def __init__(self, num_features: int, *, ghost_size: int = 16, rngs: nnx.Rngs,
               **kwargs):
    super().__init__(num_features, rngs=rngs, **kwargs)
    if self.axis_name is not None:
      raise ValueError("GhostBatchNorm computes per-device ghost statistics; axis_name "
                       "is not supported")
    self.ghost_size = ghost_size

  def normalize(self, x, scale, bias, mean, var, *, train: bool, updating: bool,
                **kwargs) -> BatchNormOutput:
    del updating
    return variants.ghost_batch_norm(
        x, scale, bias, mean, var, train=train, ghost_size=self.ghost_size, **kwargs)


class NoisyBatchNorm(BatchNormVariant):
  """BN followed, in train mode, by per-activation noise resampled every call.

  y -> y * s + m with s ~ U(1, `noise_scale_max`) and
  m ~ U(-`noise_shift_max`, `noise_shift_max`) per feature (see
  `variants.activation_noise`), drawn from the `noise` stream of the
  constructor's `rngs` (its `default` stream if it has none), or from a key
  or `nnx.Rngs` passed to the call. Inference adds no noise.
  """

  def __init__(self, num_features: int, *, noise_shift_max: float = 0.5,
               noise_scale_max: float = 1.5, rngs: nnx.Rngs, **kwargs):
    super().__init__(num_features, rngs=rngs, **kwargs)
    self.noise_shift_max, self.noise_scale_max = noise_shift_max, noise_scale_max
    self.noise_rngs = rngs["noise"].fork()

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None,
               rngs: nnx.Rngs | jax.Array | None = None):
    if isinstance(rngs, nnx.Rngs):
      rngs = rngs["noise"]()
    return self._forward(x, use_running_average, mask, noise_key=rngs)

  def normalize(self, x, scale, bias, mean, var, *, train: bool, updating: bool,
                noise_key: jax.Array | None = None, **kwargs) -> BatchNormOutput:
    del updating
    key = (self.noise_rngs() if noise_key is None else noise_key) if train else None
    return variants.noisy_batch_norm(
        x, scale, bias, mean, var, train=train, key=key, shift_max=self.noise_shift_max,
        scale_max=self.noise_scale_max, **kwargs)
