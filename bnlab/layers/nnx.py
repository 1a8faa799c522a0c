"""`BatchNorm` and its variants for Flax NNX over the same functional core.

`BatchRenorm`, `GhostBatchNorm`, `NoisyBatchNorm` and `BatchNormVariant`
(frozen statistics, population averages) mirror the linen modules of
`bnlab.layers.linen`: same fields, same extra variables (`steps`,
`num_batches`), same pure functions from `bnlab.layers.variants` underneath.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import initializers
from flax.nnx.nn import dtypes

from bnlab.layers import variants
from bnlab.layers.functional import (Axes, BatchNormOutput, any_counted, batch_norm,
                                     variance_method)


class BatchNorm(nnx.Module):
  """Batch Normalization with the fields and variables of `flax.nnx.BatchNorm`.

  Variables: `scale`, `bias` (`nnx.Param`), `mean`, `var` (`nnx.BatchStat`).
  The variance is the robust one-pass shifted formula unless
  `use_fast_variance` (True or False: Flax's formulas, bit-identical to its
  layer) or `variance` says otherwise. Modes switch as with
  Flax: `use_running_average` at construction or call, `model.train()` /
  `model.eval()`, or `nnx.view(model, use_running_average=...)`. A train-mode
  call updates `mean` and `var`, as Flax's. `axis_name` statistics psum sums
  and counts (exact for unequal masks per device).

  Attributes:
    num_features: the size of the feature axis.
    use_running_average: True normalizes with the running statistics `mean`
      and `var` (inference), False with the statistics of the batch
      (training), folding them into the running ones; None: pass it to the
      call.
    axis: the feature axis, one int (the statistics have shape
      `(num_features,)`); a tuple of several axes is refused at construction.
    momentum: running = momentum * running + (1 - momentum) * batch.
    epsilon: added to the variance before the square root.
    dtype: dtype of the computation and output (default: promoted from the
      input, the parameters and the statistics by `promote_dtype`).
    param_dtype: dtype of `scale` and `bias`.
    use_bias: learn a per-feature shift `bias` (beta).
    use_scale: learn a per-feature multiplier `scale` (gamma).
    bias_init: initializer of `bias` (zeros).
    scale_init: initializer of `scale` (ones).
    axis_name: name of a mapped axis (pmap, shard_map) over which the batch
      statistics are global.
    axis_index_groups: subsets of the devices along `axis_name` that share
      statistics (see `jax.lax.psum`).
    use_fast_variance: None (default): bnlab's robust shifted one-pass
      formula. True: E[x^2] - E[x]^2, Flax's default, imprecise when
      |mean| >> std; False: Flax's two-pass E[(x - E[x])^2]. Both are
      computed op for op as Flax, so bit-identical to its layer, a feature
      with no counted entry's NaN running statistics included.
    variance: "shifted", "two_pass", "fast" or "flax_two_pass" (see
      `bnlab.batch_moments`); overrides `use_fast_variance` when set.
    unbiased_running_var: fold m/(m-1) times the batch variance into the
      running variance (Ioffe & Szegedy 2015, Algorithm 2).
    update_stats: True (default): a train-mode call writes the new running
      statistics. False: train-mode calls normalize with the batch statistics
      and leave every statistic (and a variant's step count) as it was, as the
      linen layer's `update_stats=False` (e.g. scoring with each test batch's
      own statistics).
    promote_dtype: as Flax's: called with `(x, mean, var, scale, bias)` and
      `dtype=dtype`, returns them cast to a common dtype for the
      normalization (default `flax.nnx.nn.dtypes.promote_dtype`). The running
      statistics are updated in their own dtype (float32).
    rngs: the `params` stream initializes `scale` and `bias`.
    bias_metadata: metadata of the `bias` `nnx.Param` (e.g. sharding).
    scale_metadata: metadata of the `scale` `nnx.Param`.
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
      use_fast_variance: bool | None = None,
      variance: str | None = None,
      unbiased_running_var: bool = False,
      update_stats: bool = True,
      promote_dtype: Any = dtypes.promote_dtype,
      rngs: nnx.Rngs,
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      scale_metadata: Mapping[str, Any] = MappingProxyType({}),
  ):
    if isinstance(axis, (tuple, list)):
      axes = tuple(axis)
      if len(axes) != 1:
        raise ValueError(
            f"axis={axis!r}: {type(self).__name__} normalizes over one feature axis (its "
            f"statistics have shape (num_features,)); reshape the input so that the "
            f"features lie on one axis, or use the linen bnlab.BatchNorm, whose axis may "
            f"be a tuple")
      axis = axes[0]
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
    self.variance = variance_method(variance, use_fast_variance)
    self.unbiased_running_var = unbiased_running_var
    self.update_stats = update_stats
    self.promote_dtype = promote_dtype

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_running_average = self._mode(use_running_average)
    x, operands, dtype = self._operands(x, not use_running_average)
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
    if not use_running_average and self.update_stats:
      self._store(out.mean, out.var)
    return out.y

  def _store(self, mean, var):
    """The new running statistics, in the variables' own dtypes."""
    self.mean[...] = jnp.asarray(mean, self.mean[...].dtype)
    self.var[...] = jnp.asarray(var, self.var[...].dtype)

  def _mode(self, use_running_average: bool | None) -> bool:
    if use_running_average is None:
      use_running_average = self.use_running_average
    if use_running_average is None:
      raise ValueError("pass use_running_average to the layer's constructor or to its call")
    return use_running_average

  def _operands(self, x, train: bool):
    """The input, (scale, bias, mean, var) and the computation dtype, via `promote_dtype`.

    Like flax.nnx, the dtype defaults to that of all operands, the statistics
    included. In train mode the stored statistics are passed unpromoted: they
    only enter the running update (and Batch Renormalization's corrections),
    kept in their own precision.
    """
    scale = None if self.scale is None else self.scale[...]
    bias = None if self.bias is None else self.bias[...]
    x, mean, var, scale, bias = self.promote_dtype(
        (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype)
    if train:
      mean, var = self.mean[...], self.var[...]
    dtype = self.dtype
    if dtype is None:
      dtype = jnp.result_type(*(v for v in (x, scale, bias) if v is not None))
    return x, (scale, bias, mean, var), dtype

  def set_view(self, use_running_average: bool | None = None):
    """Lets `nnx.view(model, use_running_average=...)` switch modes.

    `nnx.view_info` prints each argument's description from `Args:`.

    Args:
      use_running_average: if True, the stored batch statistics will be
        used instead of computing the batch statistics on the input.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average


class BatchNormVariant(BatchNorm):
  """`BatchNorm` with a choice of running statistics; the base of the variants.

  As `bnlab.layers.linen.BatchNormVariant`: `running_average="ema"` (`momentum`)
  or `"population"` (the average of every batch's mean and m/(m-1)-corrected
  variance, Ioffe & Szegedy 2015, Algorithm 2; adds the `num_batches`
  `nnx.BatchStat`), and `frozen=True` to normalize with the running
  statistics and never update them, in train mode too. Subclasses override
  `_normalize` (private, so `nnx.tabulate` shows one row per layer, as for
  Flax's own).

  Attributes:
    running_average: "ema" (`momentum`) or "population" (counted in the
      `num_batches` `nnx.BatchStat`; `momentum` and `unbiased_running_var`
      unused).
    frozen: normalize with the running statistics and never update them, in
      train mode too (fine-tuning).

  The other attributes and constructor arguments are `BatchNorm`'s.
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

  def _normalize(self, x, scale, bias, mean, var, *, train: bool, updating: bool,
                 **kwargs) -> BatchNormOutput:
    """The output and new running statistics; `kwargs` are `batch_norm`'s."""
    del updating
    return batch_norm(x, scale, bias, mean, var, train=train, **kwargs)

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    return self._forward(x, use_running_average, mask)

  def _forward(self, x, use_running_average, mask, **extra):
    """Normalizes (`extra` goes to `_normalize`) and updates the running statistics."""
    train = not self._mode(use_running_average) and not self.frozen
    updating = train and self.update_stats
    x, operands, dtype = self._operands(x, train)
    population = self.running_average == "population"
    out = self._normalize(
        x, *operands,
        train=train,
        updating=updating,
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
    if updating:
      if population:
        stats = variants.population_average(
            self.mean[...], self.var[...], self.num_batches[...], out.mean, out.var,
            any_counted(mask, self.axis_name, self.axis_index_groups))
        self._store(stats.mean, stats.var)
        self.num_batches[...] = stats.num_batches
      else:
        self._store(out.mean, out.var)
    return out.y


class BatchRenorm(BatchNormVariant):
  """Batch Renormalization (Ioffe 2017) over `variants.batch_renorm`.

  r_max and d_max follow `variants.renorm_limits` of the train-mode calls so
  far, counted in the `steps` `nnx.BatchStat`. With the defaults the layer is
  plain BN for its first 5,000 train-mode calls (`warmup_steps`): a shorter
  run never renormalizes; lower `warmup_steps` (and the ramps) for short runs.

  Attributes:
    r_max: the final bound of the correction r = sigma_B / sigma, clipped to
      [1/r_max, r_max].
    d_max: the final bound of the correction d = (mu_B - mu) / sigma,
      clipped to [-d_max, d_max].
    warmup_steps: train-mode calls during which r_max = 1 and d_max = 0, i.e.
      the layer is plain BN (default 5,000, the paper's).
    r_max_steps: the call at which r_max reaches its final value, linearly
      from 1 at `warmup_steps` (40,000).
    d_max_steps: the call at which d_max reaches its final value, linearly
      from 0 at `warmup_steps` (25,000).

  The other attributes and constructor arguments are `BatchNormVariant`'s.
  """

  def __init__(self, num_features: int, *, r_max: float = 3.0, d_max: float = 5.0,
               warmup_steps: int = 5000, r_max_steps: int = 40000,
               d_max_steps: int = 25000, rngs: nnx.Rngs, **kwargs):
    super().__init__(num_features, rngs=rngs, **kwargs)
    self.r_max, self.d_max = r_max, d_max
    self.warmup_steps, self.r_max_steps, self.d_max_steps = (
        warmup_steps, r_max_steps, d_max_steps)
    self.steps = nnx.BatchStat(jnp.zeros((), jnp.int32))

  def _normalize(self, x, scale, bias, mean, var, *, train: bool, updating: bool,
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
  """`bnlab.layers.linen.GhostBatchNorm` for NNX: `variants.ghost_batch_norm` per call.

  Attributes:
    ghost_size: examples per ghost batch; the batch size must be a multiple
      of it. `axis_name` is refused (ghost statistics are per device).

  The other attributes and constructor arguments are `BatchNormVariant`'s.
  """

  def __init__(self, num_features: int, *, ghost_size: int = 16, rngs: nnx.Rngs,
               **kwargs):
    super().__init__(num_features, rngs=rngs, **kwargs)
    if self.axis_name is not None:
      raise ValueError("GhostBatchNorm computes per-device ghost statistics; axis_name "
                       "is not supported")
    self.ghost_size = ghost_size

  def _normalize(self, x, scale, bias, mean, var, *, train: bool, updating: bool,
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
  or `nnx.Rngs` passed to the call (same fallback). Inference adds no noise.
  An `rngs` with neither a `noise` nor a `default` stream raises ValueError.

  Attributes:
    noise_shift_max: the shift m is uniform in [-noise_shift_max,
      noise_shift_max].
    noise_scale_max: the scale s is uniform in [1, noise_scale_max].
    noise_rngs: the stream the noise is drawn from (forked from `rngs`).

  The other attributes and constructor arguments are `BatchNormVariant`'s.
  """

  def __init__(self, num_features: int, *, noise_shift_max: float = 0.5,
               noise_scale_max: float = 1.5, rngs: nnx.Rngs, **kwargs):
    super().__init__(num_features, rngs=rngs, **kwargs)
    self.noise_shift_max, self.noise_scale_max = noise_shift_max, noise_scale_max
    self.noise_rngs = _noise_stream(rngs).fork()

  def __call__(self, x, use_running_average: bool | None = None, *, mask=None,
               rngs: nnx.Rngs | jax.Array | None = None):
    if isinstance(rngs, nnx.Rngs):
      rngs = _noise_stream(rngs)()
    return self._forward(x, use_running_average, mask, noise_key=rngs)

  def _normalize(self, x, scale, bias, mean, var, *, train: bool, updating: bool,
                 noise_key: jax.Array | None = None, **kwargs) -> BatchNormOutput:
    del updating
    key = (self.noise_rngs() if noise_key is None else noise_key) if train else None
    return variants.noisy_batch_norm(
        x, scale, bias, mean, var, train=train, key=key, shift_max=self.noise_shift_max,
        scale_max=self.noise_scale_max, **kwargs)


def _noise_stream(rngs: nnx.Rngs):
  """The `noise` stream of `rngs`, else its `default` one; ValueError naming the fix."""
  for name in ("noise", "default"):
    if name in rngs:
      return rngs[name]
  raise ValueError(
      "NoisyBatchNorm draws its noise from the 'noise' stream of rngs (or its 'default' "
      "stream), and this nnx.Rngs has neither: pass e.g. nnx.Rngs(params=0, noise=1) or "
      "nnx.Rngs(0)")
