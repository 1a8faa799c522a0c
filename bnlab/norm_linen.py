"""flax.linen modules: `BatchNorm` (a drop-in replacement for `flax.linen.BatchNorm`)
and the variants over `bnlab.variants`: `BatchNormVariant` (frozen statistics,
population running average), `BatchRenorm`, `GhostBatchNorm`, `NoisyBatchNorm`."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.linen import initializers
from flax.linen.module import merge_param

from bnlab import variants
from bnlab.norm import Axes, BatchNormOutput, batch_norm, canonicalize_axes


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

  def _variables(self, x):
    """Feature axes, running mean and variance variables, scale and bias (or None)."""
    feature_axes = canonicalize_axes(x.ndim, self.axis)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    stats_dtype = jnp.float32 if self.force_float32_reductions else self.param_dtype
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(feature_shape, stats_dtype))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(feature_shape, stats_dtype))
    scale = (self.param("scale", self.scale_init, feature_shape, self.param_dtype)
             if self.use_scale else None)
    bias = (self.param("bias", self.bias_init, feature_shape, self.param_dtype)
            if self.use_bias else None)
    return feature_axes, ra_mean, ra_var, scale, bias

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_running_average = merge_param(
        "use_running_average", self.use_running_average, use_running_average
    )
    feature_axes, ra_mean, ra_var, scale, bias = self._variables(x)
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


class BatchNormVariant(BatchNorm):
  """`BatchNorm` with a choice of running statistics; the base of the variants.

  Same variables as `BatchNorm`, plus `batch_stats/num_batches` with the
  population average. Extra fields:

  - `running_average`: "ema" (`momentum`, as `BatchNorm`) or "population":
    the average over every batch seen of the batch means and of the
    m/(m-1)-corrected batch variances (Ioffe & Szegedy 2015, Algorithm 2);
    `momentum` and `unbiased_running_var` are then unused.
  - `frozen`: always normalize with the running statistics and never update
    them, in train mode too (fine-tuning).

  Subclasses change `normalize` (and may add variables there).
  """

  running_average: str = "ema"
  frozen: bool = False

  def normalize(self, x, scale, bias, mean, var, *, train: bool, updating: bool,
                **kwargs) -> BatchNormOutput:
    """The output and new running statistics; `kwargs` are `batch_norm`'s."""
    del updating
    return batch_norm(x, scale, bias, mean, var, train=train, **kwargs)

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    if self.running_average not in variants.RUNNING_AVERAGES:
      raise ValueError(f"running_average={self.running_average!r}; expected one of "
                       f"{variants.RUNNING_AVERAGES}")
    use_running_average = merge_param(
        "use_running_average", self.use_running_average, use_running_average
    )
    feature_axes, ra_mean, ra_var, scale, bias = self._variables(x)
    population = self.running_average == "population"
    if population:
      num_batches = self.variable(
          "batch_stats", "num_batches", lambda: jnp.zeros((), jnp.int32))
    variance = self.variance or ("fast" if self.use_fast_variance else "shifted")
    initializing = self.is_initializing()
    train = not use_running_average and not self.frozen
    updating = train and not initializing and self.is_mutable_collection("batch_stats")
    out = self.normalize(
        x, scale, bias, ra_mean.value, ra_var.value,
        train=train,
        updating=updating,
        axis=feature_axes,
        momentum=0.0 if population else self.momentum,
        epsilon=self.epsilon,
        mask=mask,
        variance=variance,
        unbiased_running_var=population or self.unbiased_running_var,
        axis_name=None if initializing else self.axis_name,
        axis_index_groups=self.axis_index_groups,
        dtype=self.dtype,
        stats_dtype=jnp.float32 if self.force_float32_reductions else None,
    )
    if updating:
      if population:
        stats = variants.population_average(
            ra_mean.value, ra_var.value, num_batches.value, out.mean, out.var)
        ra_mean.value, ra_var.value, num_batches.value = stats
      else:
        ra_mean.value = out.mean
        ra_var.value = out.var
    return out.y


class BatchRenorm(BatchNormVariant):
  """Batch Renormalization (Ioffe 2017) over `variants.batch_renorm`.

  r_max and d_max follow `variants.renorm_limits` of the number of updates so
  far, counted in the variable `batch_stats/steps` (incremented whenever the
  running statistics are), so a training loop needs no change.
  """

  r_max: float = 3.0
  d_max: float = 5.0
  warmup_steps: int = 5000
  r_max_steps: int = 40000
  d_max_steps: int = 25000

  def normalize(self, x, scale, bias, mean, var, *, train: bool, updating: bool,
                **kwargs) -> BatchNormOutput:
    steps = self.variable("batch_stats", "steps", lambda: jnp.zeros((), jnp.int32))
    limits = variants.renorm_limits(
        steps.value, r_max=self.r_max, d_max=self.d_max, warmup_steps=self.warmup_steps,
        r_max_steps=self.r_max_steps, d_max_steps=self.d_max_steps)
    if updating:
      steps.value = steps.value + 1
    return variants.batch_renorm(
        x, scale, bias, mean, var, train=train, r_max=limits.r_max, d_max=limits.d_max,
        **kwargs)


class GhostBatchNorm(BatchNormVariant):
  """Ghost Batch Normalization over `variants.ghost_batch_norm`.

  Statistics per ghost batch of `ghost_size` examples in train mode; the
  running statistics fold in the mean of the ghost statistics.
  """

  ghost_size: int = 16

  def normalize(self, x, scale, bias, mean, var, *, train: bool, updating: bool,
                **kwargs) -> BatchNormOutput:
    del updating
    return variants.ghost_batch_norm(
        x, scale, bias, mean, var, train=train, ghost_size=self.ghost_size, **kwargs)


class NoisyBatchNorm(BatchNormVariant):
  """BN followed, in train mode, by per-activation noise resampled every call.

  y -> y * s + m with s ~ U(1, `noise_scale_max`) and
  m ~ U(-`noise_shift_max`, `noise_shift_max`) per feature (see
  `variants.activation_noise`), drawn from the `noise` RNG stream: train-mode
  calls need `rngs={"noise": key}` with a new key each step. Inference (and
  `init`) adds no noise.
  """

  noise_shift_max: float = 0.5
  noise_scale_max: float = 1.5

  def normalize(self, x, scale, bias, mean, var, *, train: bool, updating: bool,
                **kwargs) -> BatchNormOutput:
    del updating
    key = None
    if train and not self.is_initializing():  # noise changes no variable
      if not self.has_rng("noise"):
        raise ValueError(
            "NoisyBatchNorm in train mode needs a 'noise' RNG: call apply(..., "
            "rngs={'noise': key}) with a fresh key every step")
      key = self.make_rng("noise")
    return variants.noisy_batch_norm(
        x, scale, bias, mean, var, train=train, key=key, shift_max=self.noise_shift_max,
        scale_max=self.noise_scale_max, **kwargs)
