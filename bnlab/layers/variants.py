"""Batch Normalization variants as pure functions over `bnlab.layers.functional`.

- `batch_renorm`: Batch Renormalization (Ioffe 2017), with `renorm_limits`
  for the r_max / d_max ramp over training steps.
- `ghost_batch_norm`: statistics per ghost batch (Hoffer et al. 2017).
- `activation_noise`: the per-activation shift and scale of "noisy" BN
  (Santurkar et al. 2018, section 3.1).
- `population_average`: the paper's inference statistics (Ioffe & Szegedy
  2015, Algorithm 2) as a running average over the batches seen.

Like `batch_norm`, the normalizers return `BatchNormOutput(y, mean, var)` with
the new running statistics; with `momentum=0` those are the batch statistics
themselves, which is how the modules feed `population_average`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from bnlab.layers.functional import (FLAX_VARIANCES, Axes, BatchNormOutput, batch_moments,
                                     batch_norm, canonicalize_axes, layer_dtypes_and_axes,
                                     running_statistics, uncounted_to_nan)

RUNNING_AVERAGES = ("ema", "population")


class RenormLimits(NamedTuple):
  """Clipping limits of Batch Renormalization at one training step."""

  r_max: jax.Array
  d_max: jax.Array


def renorm_limits(
    step,
    *,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = 5000,
    r_max_steps: int = 40000,
    d_max_steps: int = 25000,
) -> RenormLimits:
  """r_max and d_max at `step`: 1 and 0 up to `warmup_steps`, then linear ramps.

  r_max reaches its final value at `r_max_steps`, d_max at `d_max_steps` (the
  paper's schedule: 5k, 40k and 25k steps), and both stay there. Up to
  `warmup_steps` Batch Renormalization is plain BN: with the defaults, a run
  of fewer than 5,000 steps never renormalizes.
  """
  step = jnp.asarray(step, jnp.float32)

  def ramp(end):
    span = end - warmup_steps
    if span <= 0:
      return jnp.where(step >= warmup_steps, 1.0, 0.0)
    return jnp.clip((step - warmup_steps) / span, 0.0, 1.0)

  return RenormLimits(1.0 + (r_max - 1.0) * ramp(r_max_steps), d_max * ramp(d_max_steps))


def batch_renorm(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mean: jax.Array,
    var: jax.Array,
    *,
    train: bool,
    r_max=1.0,
    d_max=0.0,
    axis: Axes = -1,
    momentum=0.99,
    epsilon: float = 1e-5,
    mask: jax.Array | None = None,
    variance: str = "shifted",
    unbiased_running_var: bool = False,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
    stats_dtype: Any = jnp.float32,
) -> BatchNormOutput:
  """Batch Renormalization (Ioffe 2017, Algorithm 1).

  Train: x_hat = (x - mu_B) / sigma_B * r + d with
  r = stop_gradient(clip(sigma_B / sigma, 1/r_max, r_max)) and
  d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max)), where
  sigma_B = sqrt(var_B + epsilon) and (mu, sigma = sqrt(var + epsilon)) are the
  running statistics before this batch; y = x_hat * scale + bias. Inference
  normalizes with the running statistics, as `batch_norm` does. With
  r_max = 1 and d_max = 0 this is `batch_norm`.

  The running mean and variance are exponential averages of the batch mean
  and variance (Flax's `momentum`), as in `batch_norm`; the paper averages
  sigma instead of the variance, a difference of order var(sigma_B).
  `r_max` and `d_max` may be traced scalars (see `renorm_limits`); the other
  arguments are those of `batch_norm`, and a feature with no counted entry
  gets NaN outputs and keeps its running statistics (NaN with Flax's
  formulas), as there.
  """
  if not train:
    return batch_norm(
        x, scale, bias, mean, var, train=False, axis=axis, epsilon=epsilon, dtype=dtype,
        stats_dtype=stats_dtype)
  reduction_axes, dtype, compute_dtype = layer_dtypes_and_axes(
      x, scale, bias, mean, var, axis=axis, dtype=dtype, stats_dtype=stats_dtype)

  def expand(v):
    return jnp.expand_dims(v, reduction_axes)

  m = batch_moments(
      x, reduction_axes, mask=mask, variance=variance, axis_name=axis_name,
      axis_index_groups=axis_index_groups, dtype=stats_dtype)
  centered = (jnp.asarray(x, compute_dtype) - expand(m.shift)) - expand(m.centered_mean)
  sigma_batch = jnp.sqrt(m.var + epsilon)
  sigma = jnp.sqrt(var.astype(compute_dtype) + epsilon)
  r = lax.stop_gradient(jnp.clip(sigma_batch / sigma, 1.0 / r_max, r_max))
  d = lax.stop_gradient(jnp.clip((m.mean - mean.astype(compute_dtype)) / sigma, -d_max, d_max))
  mul = r / sigma_batch
  add = d
  if scale is not None:
    mul = mul * scale
    add = add * scale
  if bias is not None:
    add = add + bias
  y = centered * expand(mul) + expand(add)
  if mask is not None:
    y = uncounted_to_nan(y, m.count, reduction_axes)
  new_mean, new_var = running_statistics(
      m, mean, var, momentum=momentum, unbiased_running_var=unbiased_running_var,
      keep_uncounted=variance not in FLAX_VARIANCES)
  return BatchNormOutput(jnp.asarray(y, dtype), new_mean, new_var)


def ghost_batch_norm(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mean: jax.Array,
    var: jax.Array,
    *,
    train: bool,
    ghost_size: int,
    axis: Axes = -1,
    momentum=0.99,
    epsilon: float = 1e-5,
    mask: jax.Array | None = None,
    variance: str = "shifted",
    unbiased_running_var: bool = False,
    dtype: Any = None,
    stats_dtype: Any = jnp.float32,
    axis_name: Any = None,
    axis_index_groups: Any = None,
) -> BatchNormOutput:
  """Ghost Batch Normalization (Hoffer, Hubara & Soudry 2017).

  Train: the batch axis 0 is split into consecutive ghost batches of
  `ghost_size` examples, and each is normalized with its own statistics.
  The running statistics fold in the mean over ghost batches of the ghost
  means and of the ghost variances: the statistics the layer normalized with
  during training (the full-batch variance would add the spread of the ghost
  means). With `unbiased_running_var`, each ghost variance gets its own
  m/(m-1). A ghost batch with no counted entry for a feature contributes
  that feature's running statistics unchanged, and its output for the
  feature is NaN (see `batch_norm`); a feature counted in no ghost batch
  keeps its running statistics exactly. With Flax's formulas
  (`FLAX_VARIANCES`) such a ghost batch contributes Flax's NaN instead, so
  the feature's running statistics become NaN. Inference normalizes with
  the running statistics.

  Raises ValueError if axis 0 is a feature axis, the batch size is not a
  multiple of `ghost_size`, or `axis_name` is given (ghost statistics are per
  device). The other arguments are those of `batch_norm`.
  """
  del axis_index_groups
  if axis_name is not None:
    raise ValueError("ghost batch norm computes per-device ghost statistics; axis_name is "
                     "not supported")
  if not train:
    return batch_norm(
        x, scale, bias, mean, var, train=False, axis=axis, epsilon=epsilon, dtype=dtype,
        stats_dtype=stats_dtype)
  feature_axes = canonicalize_axes(x.ndim, axis)
  if 0 in feature_axes:
    raise ValueError("ghost_batch_norm splits the batch axis 0, which must not be a feature axis")
  n = x.shape[0]
  if ghost_size <= 0 or n % ghost_size:
    raise ValueError(
        f"batch size {n} is not a multiple of ghost_size={ghost_size}; choose a ghost size "
        f"that divides the batch")
  num_ghosts = n // ghost_size
  grouped = (num_ghosts, ghost_size) + x.shape[1:]
  if mask is not None:
    mask = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape).reshape(grouped)

  def per_ghost(v):
    return None if v is None else jnp.broadcast_to(v, (num_ghosts,) + tuple(v.shape))

  out = batch_norm(
      x.reshape(grouped), per_ghost(scale), per_ghost(bias), per_ghost(mean), per_ghost(var),
      train=True, axis=(0,) + tuple(a + 1 for a in feature_axes), momentum=momentum,
      epsilon=epsilon, mask=mask, variance=variance,
      unbiased_running_var=unbiased_running_var, dtype=dtype, stats_dtype=stats_dtype)
  new_mean = jnp.mean(out.mean, 0).astype(mean.dtype)
  new_var = jnp.mean(out.var, 0).astype(var.dtype)
  if mask is not None and variance not in FLAX_VARIANCES:
    # The mean of k equal values may round away from them (k not a power of 2).
    counted = jnp.any(mask, tuple(i for i in range(mask.ndim) if i - 1 not in feature_axes))
    new_mean = jnp.where(counted, new_mean, mean)
    new_var = jnp.where(counted, new_var, var)
  return BatchNormOutput(out.y.reshape(x.shape), new_mean, new_var)


def noisy_batch_norm(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mean: jax.Array,
    var: jax.Array,
    *,
    train: bool,
    key: jax.Array | None,
    shift_max: float,
    scale_max: float,
    axis: Axes = -1,
    **kwargs,
) -> BatchNormOutput:
  """`batch_norm`, then in train mode the `activation_noise` drawn from `key` per feature.

  No noise at inference or when `key` is None. The running statistics are
  plain BN's: the noise comes after them. `kwargs` are `batch_norm`'s.
  """
  out = batch_norm(x, scale, bias, mean, var, train=train, axis=axis, **kwargs)
  if not train or key is None:
    return out
  feature_shape = tuple(x.shape[a] for a in canonicalize_axes(x.ndim, axis))
  noise = activation_noise(key, feature_shape, shift_max=shift_max, scale_max=scale_max)
  return out._replace(y=apply_activation_noise(out.y, noise, axis=axis))


class NoiseTransform(NamedTuple):
  """y -> y * scale + shift, per activation."""

  scale: jax.Array
  shift: jax.Array


def activation_noise(
    key: jax.Array, feature_shape, *, shift_max: float, scale_max: float,
    dtype: Any = jnp.float32,
) -> NoiseTransform:
  """A random affine map per activation: scale ~ U(1, scale_max), shift ~ U(-shift_max, shift_max).

  Noisy BN (Santurkar et al. 2018, section 3.1) perturbs each BN output with
  noise of non-zero mean and non-unit variance whose distribution changes
  every step: with a fresh key per step, each activation's distribution over
  the batch moves to mean shift + scale * beta and standard deviation
  scale * gamma.
  """
  k_scale, k_shift = jax.random.split(key)
  scale = jax.random.uniform(k_scale, feature_shape, dtype, 1.0, scale_max)
  shift = jax.random.uniform(k_shift, feature_shape, dtype, -shift_max, shift_max)
  return NoiseTransform(scale, shift)


def apply_activation_noise(y: jax.Array, noise: NoiseTransform, *, axis: Axes = -1) -> jax.Array:
  """y * noise.scale + noise.shift, broadcast over the non-feature axes."""
  feature_axes = canonicalize_axes(y.ndim, axis)
  reduction_axes = tuple(i for i in range(y.ndim) if i not in feature_axes)
  scale = jnp.expand_dims(noise.scale, reduction_axes)
  shift = jnp.expand_dims(noise.shift, reduction_axes)
  return (y * scale + shift).astype(y.dtype)


class PopulationStats(NamedTuple):
  """Running averages of the batch statistics and the number of batches seen."""

  mean: jax.Array
  var: jax.Array
  num_batches: jax.Array


def population_average(
    mean: jax.Array, var: jax.Array, num_batches: jax.Array,
    batch_mean: jax.Array, batch_var: jax.Array, counted: Any = True,
) -> PopulationStats:
  """Fold one batch into the averages over every batch seen (Algorithm 2).

  E[x] = mean over batches of mu_B and Var[x] = mean over batches of
  m/(m-1) * sigma_B^2 (pass the corrected `batch_var`), kept as running
  averages, a_k = a_{k-1} + (b_k - a_{k-1}) / k: sums divided by the count,
  without a large float32 sum. The first batch replaces the initial values.
  A batch with no counted entry (`counted` False, see `any_counted`) is not
  counted and changes nothing. `num_batches` is one count for all features: a feature with no
  counted entry in a counted batch keeps its averages (its `batch_mean` is
  then the running one) but the batch still counts, so later batches weigh
  1/k for it too. With Flax's formulas such a feature's `batch_mean` is NaN
  (0/0), and its averages become NaN, counted batch or not.
  """
  num_batches = jnp.asarray(num_batches)
  counted = jnp.asarray(counted)
  k = num_batches + counted.astype(num_batches.dtype)
  w = jnp.where(counted, 1.0 / jnp.maximum(k, 1).astype(mean.dtype), 0.0).astype(mean.dtype)
  new_mean = mean + (batch_mean.astype(mean.dtype) - mean) * w
  new_var = var + (batch_var.astype(var.dtype) - var) * w
  return PopulationStats(lax.stop_gradient(new_mean), lax.stop_gradient(new_var), k)
