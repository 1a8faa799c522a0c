"""Functional Batch Normalization: pure functions over arrays.

`batch_norm` normalizes with batch statistics (train) or running statistics
(inference) and returns the output with the new running statistics. The
variance is numerically robust by default: a one-pass *shifted* formula,
Var[x] = E[(x - k)^2] - E[x - k]^2 with k a per-feature mean of the batch's
first examples, which reads the batch once, like the fast E[x^2] - E[x]^2,
but keeps full precision when |mean| >> std.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

Axes = int | Sequence[int]

VARIANCE_METHODS = ("shifted", "two_pass", "fast", "flax_two_pass")
# Flax's two formulas (use_fast_variance=True and False): in train mode `batch_norm` repeats
# Flax's computation op for op, and a feature with no counted entry gets Flax's NaN (0/0)
# running statistics in every layer and variant, so that Flax's options give Flax's results.
FLAX_VARIANCES = ("fast", "flax_two_pass")


def variance_method(variance: str | None, use_fast_variance: bool | None) -> str:
  """A layer's variance method: `variance` if set, else from Flax's `use_fast_variance`.

  True and False are Flax's own options, so they give Flax's formulas ("fast",
  "flax_two_pass"); None, the layers' default, gives bnlab's robust "shifted".
  """
  if variance is not None:
    return variance
  return {None: "shifted", True: "fast", False: "flax_two_pass"}[use_fast_variance]


class Moments(NamedTuple):
  """Batch moments; the mean is `shift + centered_mean`, kept apart for precision."""

  shift: jax.Array
  centered_mean: jax.Array
  var: jax.Array
  count: jax.Array

  @property
  def mean(self) -> jax.Array:
    return self.shift + self.centered_mean


class BatchNormOutput(NamedTuple):
  """Normalized output and the running statistics to store."""

  y: jax.Array
  mean: jax.Array
  var: jax.Array


def canonicalize_axes(ndim: int, axes: Axes) -> tuple[int, ...]:
  """Sorted, non-negative, unique axes; raises on out-of-range axes."""
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  out = []
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(f"axis {a} is out of range for an input of rank {ndim}")
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"feature axes {axes} repeat an axis")
  return tuple(sorted(out))


def batch_moments(
    x: jax.Array,
    reduction_axes: Axes,
    *,
    mask: jax.Array | None = None,
    variance: str = "shifted",
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = jnp.float32,
) -> Moments:
  """Mean and (biased) variance of `x` over `reduction_axes`.

  All methods accumulate s1 = sum(x - k) and s2 = sum((x - k)^2) in one fused
  reduction and return mean = k + s1/n, var = s2/n - (s1/n)^2, for a
  per-feature shift k (a constant for autodiff: the moments do not depend on
  it). They differ in k:

  - "shifted" (default): k = the mean of the batch's first examples, enough of
    them for `SHIFT_VALUES` values per feature (one image of a conv layer, 16
    rows of a dense one). One pass over `x`; the cancellation costs a factor
    1 + (mean - k)^2 / var, of order one since k is a sample mean (a single
    example far out in a feature's tail moves it 1/16 as far). Falls back to
    "two_pass" under a mask (the first examples might be masked out), with no
    reduced axis, and where a reduced axis is sharded in `x`'s type (JAX's
    explicit sharding: its first examples cannot be sliced out).
  - "two_pass": k = sum(x)/n from a first pass; the corrected two-pass
    algorithm (Chan, Golub & LeVeque 1983): exact mean and variance.
  - "fast": k = 0, i.e. E[x^2] - E[x]^2 as in Flax's default; loses all
    precision when |mean| >> std.
  - "flax_two_pass": Flax's `use_fast_variance=False`, E[|x - mean|^2] with
    mean = sum(x)/n (k, not a constant here): "two_pass" without its
    correction term, which is of the order of the mean's rounding error.

  Args:
    x: input array.
    reduction_axes: axes to reduce; the others are feature axes.
    mask: optional boolean array broadcastable to `x`; False entries are left
      out of the statistics, whatever their value (inf and NaN included).
    variance: one of `VARIANCE_METHODS`.
    axis_name, axis_index_groups: named mapped axis (pmap / shard_map) over
      which the statistics are global: sums and counts are psum-ed, so unequal
      masks per device are weighted exactly.
    dtype: dtype of the moments; at least float32 by default. None keeps the
      input's dtype. The sums and the count accumulate in at least float32
      whatever it is (a float16 count reaches inf at 65,536 values).

  Returns:
    `Moments` with per-feature arrays (feature axes in order) and the count
    of reduced elements. For complex `x` the variance is E|x - mean|^2 (real).
  """
  if variance not in VARIANCE_METHODS:
    raise ValueError(f"variance={variance!r}; expected one of {VARIANCE_METHODS}")
  axes = canonicalize_axes(x.ndim, reduction_axes)
  dtype = x.dtype if dtype is None else jnp.promote_types(x.dtype, dtype)
  out_dtype, dtype = dtype, jnp.promote_types(dtype, jnp.float32)
  x = jnp.asarray(x, dtype)
  if variance == "shifted" and (not axes or _sharded_in_type(x, axes)):
    variance = "two_pass"
  if mask is not None:
    mask = jnp.broadcast_to(jnp.asarray(mask, bool), x.shape)
    # Zero the left-out entries so that padding (even inf or NaN) can reach
    # neither the statistics nor, through 0 * inf, their gradients.
    x = jnp.where(mask, x, 0)
    count = jnp.sum(mask, axes, dtype=dtype)
    if variance == "shifted":
      variance = "two_pass"
  else:
    count = _full_count(x, axes, dtype)

  def total(v):
    return jnp.sum(v, axes, where=mask)

  def psum(v):
    if axis_name is None:
      return v
    return lax.psum(v, axis_name, axis_index_groups=axis_index_groups)

  corrected = variance != "flax_two_pass"
  if not corrected:
    variance = "two_pass"
  if variance == "fast":
    shift = jnp.zeros(count.shape, dtype)
  elif variance == "two_pass":
    s0, count = psum(jnp.stack([total(x), count]))
    count = jnp.real(count)
    shift = s0 / jnp.maximum(count, 1)
    if corrected:  # else the mean itself, which needs its gradient
      shift = lax.stop_gradient(shift)
  else:
    per_example = math.prod(x.shape[a] for a in axes[1:])
    rows = min(x.shape[axes[0]], -(-SHIFT_VALUES // per_example))
    first = lax.slice_in_dim(x, 0, rows, axis=axes[0])
    shift = lax.stop_gradient(jnp.mean(first, axes))
    if axis_name is not None:  # the same k on every device
      shift = lax.pmean(shift, axis_name, axis_index_groups=axis_index_groups)
  d = x - jnp.expand_dims(shift, axes)
  if not corrected:
    s2 = psum(total(_abs_squared(d)))
    s1 = jnp.zeros_like(s2)
  elif variance == "two_pass":
    s1, s2 = psum(jnp.stack([total(d), total(_abs_squared(d))]))
  else:
    s1, s2, count = psum(jnp.stack([total(d), total(_abs_squared(d)), count]))
  count = jnp.real(count)  # in the accumulation dtype's real part: exact to 2**24 or 2**53
  safe = jnp.maximum(count, 1)
  centered = s1 / safe
  var = jnp.maximum(jnp.real(s2) / safe - _abs_squared(centered), 0.0)
  return Moments(jnp.asarray(shift, out_dtype), jnp.asarray(centered, out_dtype),
                 jnp.asarray(var, jnp.finfo(out_dtype).dtype), count)


def any_counted(mask, axis_name: Any = None, axis_index_groups: Any = None) -> jax.Array:
  """Whether a batch has an entry its statistics count (on any device of `axis_name`)."""
  if mask is None:
    return jnp.asarray(True)
  n = jnp.sum(jnp.asarray(mask, jnp.int32))
  if axis_name is not None:
    n = lax.psum(n, axis_name, axis_index_groups=axis_index_groups)
  return n > 0


# Values per feature the "shifted" variance averages into its shift.
SHIFT_VALUES = 16


def _full_count(x, axes, dtype) -> jax.Array:
  """The count of every feature of an unmasked `x` reduced over `axes`, in `dtype`."""
  return jnp.full([d for i, d in enumerate(x.shape) if i not in axes],
                  math.prod(x.shape[a] for a in axes), dtype)


def _abs_squared(v):
  return jnp.real(v * jnp.conj(v)) if jnp.iscomplexobj(v) else v * v


def _sharded_in_type(x, axes) -> bool:
  """Whether one of `axes` of `x` is sharded in its type (JAX's explicit sharding)."""
  typeof = getattr(jax, "typeof", None)
  spec = getattr(getattr(typeof(x), "sharding", None), "spec", None) if typeof else None
  return spec is not None and any(a < len(spec) and spec[a] is not None for a in axes)


def batch_norm(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    mean: jax.Array,
    var: jax.Array,
    *,
    train: bool,
    axis: Axes = -1,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    mask: jax.Array | None = None,
    variance: str = "shifted",
    unbiased_running_var: bool = False,
    axis_name: Any = None,
    axis_index_groups: Any = None,
    dtype: Any = None,
    stats_dtype: Any = jnp.float32,
) -> BatchNormOutput:
  """Batch Normalization (Ioffe & Szegedy 2015, Algorithm 1).

  y = (x - mu) / sqrt(sigma^2 + epsilon) * scale + bias, with (mu, sigma^2)
  the batch moments over every axis but `axis` when `train`, else the running
  `mean` and `var`.

  Args:
    x: input, e.g. (N, F) dense or (N, H, W, C) conv activations.
    scale, bias: per-feature arrays of the feature shape, or None.
    mean, var: running statistics of the feature shape.
    train: use (and fold into the running statistics) the batch moments.
    axis: feature axis or axes; statistics are per feature, reduced over the
      rest (so NHWC with axis=-1 gives the paper's per-feature-map rule).
    momentum: running = momentum * running + (1 - momentum) * batch (Flax's
      convention).
    epsilon: added to the variance.
    mask: boolean, broadcastable to `x`; False entries do not count in the
      batch statistics (they are still normalized). In train mode a feature
      with no counted entry has no batch statistics: its output is NaN (as in
      Flax; x / sqrt(epsilon) would pass for a normalized value, see
      `uncounted_to_nan`). Its running statistics stay as they were (a later
      batch that counts it updates them), except with Flax's formulas
      (`FLAX_VARIANCES`), which give Flax's NaN (0/0) there too.
    variance: "shifted" (default, robust one pass), "two_pass", "fast" or
      "flax_two_pass"; see `batch_moments`. In train mode "fast" and
      "flax_two_pass" repeat Flax's computation (`use_fast_variance=True`
      and False) op for op: bit-identical results and gradients, NaN
      included, except with a mask under `axis_name` or for complex `x`.
    unbiased_running_var: fold m/(m-1) * batch variance into the running
      variance (the paper's Algorithm 2); the batch itself is normalized with
      the biased variance either way.
    axis_name, axis_index_groups: compute global statistics across a named
      mapped axis.
    dtype: output dtype; default: the result type of `x`, `scale`, `bias`
      (float32 for integer inputs).
    stats_dtype: minimum precision of the statistics (None: that of `x`).

  Returns:
    `BatchNormOutput(y, mean, var)`: the output and the new running
    statistics (unchanged when not `train`).
  """
  reduction_axes, dtype, compute_dtype = layer_dtypes_and_axes(
      x, scale, bias, mean, var, axis=axis, dtype=dtype, stats_dtype=stats_dtype)

  def expand(v):
    return jnp.expand_dims(v, reduction_axes)

  if not train:
    centered = jnp.asarray(x, compute_dtype) - expand(mean.astype(compute_dtype))
    y = _scale_and_shift(centered, var.astype(compute_dtype), scale, bias, epsilon, expand)
    return BatchNormOutput(jnp.asarray(y, dtype), mean, var)
  flax_formula = variance in FLAX_VARIANCES
  if flax_formula and _flax_can_match(x, mask, axis_name):
    m, y = _flax_normalize(
        jnp.asarray(x, compute_dtype), scale, bias, mask, reduction_axes=reduction_axes,
        fast=variance == "fast", axis_name=axis_name, axis_index_groups=axis_index_groups,
        epsilon=epsilon)  # an uncounted feature's y is already NaN (0/0), as Flax's
  else:
    m, y = _normalize_with_batch_moments(
        x, scale, bias, mask, reduction_axes=reduction_axes, variance=variance,
        axis_name=axis_name, axis_index_groups=axis_index_groups, stats_dtype=stats_dtype,
        compute_dtype=compute_dtype, epsilon=epsilon)
    if mask is not None:
      y = uncounted_to_nan(y, m.count, reduction_axes)
  new_mean, new_var = running_statistics(
      m, mean, var, momentum=momentum, unbiased_running_var=unbiased_running_var,
      keep_uncounted=not flax_formula)
  return BatchNormOutput(jnp.asarray(y, dtype), new_mean, new_var)


def layer_dtypes_and_axes(x, scale, bias, mean, var, *, axis, dtype, stats_dtype):
  """(reduction axes, output dtype, compute dtype) of a BN call; checks the feature shapes.

  The output dtype is `dtype`, or the result type of `x`, `scale`, `bias`
  (float32 for integer inputs); statistics are computed in at least
  `stats_dtype`.
  """
  feature_axes = canonicalize_axes(x.ndim, axis)
  reduction_axes = tuple(i for i in range(x.ndim) if i not in feature_axes)
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  for name, v in (("scale", scale), ("bias", bias), ("mean", mean), ("var", var)):
    if v is not None and tuple(v.shape) != feature_shape:
      raise ValueError(
          f"{name} has shape {tuple(v.shape)}, expected the feature shape "
          f"{feature_shape} of input {tuple(x.shape)} with axis={axis}"
      )
  if dtype is None:
    dtype = jnp.result_type(*(v for v in (x, scale, bias) if v is not None))
    if not jnp.issubdtype(dtype, jnp.inexact):
      dtype = jnp.promote_types(dtype, jnp.float32)
  compute_dtype = x.dtype if stats_dtype is None else jnp.promote_types(x.dtype, stats_dtype)
  return reduction_axes, dtype, compute_dtype


def running_statistics(m: Moments, mean, var, *, momentum, unbiased_running_var: bool,
                       keep_uncounted: bool = True):
  """The running (mean, var) after folding in batch moments `m` (Flax's momentum rule).

  With `unbiased_running_var` the batch variance folded in is m/(m-1) times
  the biased one. A feature with no counted entry keeps both when
  `keep_uncounted` (bnlab's rule: one batch without it does not lose what
  the earlier ones measured); else both become NaN, Flax's 0/0, for good.
  """
  update = m.var
  if unbiased_running_var:
    update = m.var * m.count / jnp.maximum(m.count - 1, 1)
  seen = m.count > 0
  new_mean = momentum * mean + (1 - momentum) * m.mean
  new_var = momentum * var + (1 - momentum) * update
  new_mean = jnp.where(seen, new_mean, mean if keep_uncounted else jnp.nan)
  new_var = jnp.where(seen, new_var, var if keep_uncounted else jnp.nan)
  # A complex input's mean stays complex (as in Flax); the variance is real.
  mean_dtype = (jnp.result_type(mean.dtype, new_mean.dtype) if jnp.iscomplexobj(new_mean)
                else mean.dtype)
  return (lax.stop_gradient(new_mean.astype(mean_dtype)),
          lax.stop_gradient(new_var.astype(var.dtype)))


def uncounted_to_nan(y, count, reduction_axes):
  """`y` with NaN for every feature whose `count` of counted entries is 0.

  Such a feature has no batch statistics: normalized with mean and variance 0
  it would come out as x / sqrt(epsilon), hundreds of times the input, easy to
  take for an activation. NaN (Flax's 0/0) cannot be. It is a constant in the
  unselected branch, so a loss that drops the masked entries (e.g.
  `jnp.where(mask, y, 0)`) back-propagates zeros through it, never NaN, and the
  other features' values and gradients are unchanged.
  """
  return jnp.where(jnp.expand_dims(count > 0, reduction_axes), y, jnp.nan)


def _scale_and_shift(centered, var, scale, bias, epsilon, expand):
  mul = lax.rsqrt(var + epsilon)
  if scale is not None:
    mul = mul * scale
  y = centered * expand(mul)
  return y if bias is None else y + expand(bias)


def _flax_can_match(x, mask, axis_name) -> bool:
  """Whether Flax's formulas (`FLAX_VARIANCES`) can repeat its computation op for op.

  Not for complex inputs, nor for a mask together with `axis_name`: there
  Flax's pmean of per-device means weighs devices equally, while bnlab's
  psum-ed sums and counts give the global masked statistics.
  """
  return not jnp.iscomplexobj(x) and (mask is None or axis_name is None)


def _flax_normalize(x, scale, bias, mask, *, reduction_axes, fast, axis_name,
                    axis_index_groups, epsilon):
  """Flax's BN in train mode, op for op: bit-identical outputs and gradients.

  The same jnp/lax operations in the same order as `_compute_stats` of
  flax.linen.normalization (`fast`: means of x and of lax.square(x), one
  stacked pmean over `axis_name`, then max(0, E[x^2] - E[x]^2); else the
  mean, then the mean of lax.square(x - mean), each pmean-ed) and its
  `_normalize` ((x - mean) * (rsqrt(var + eps) * scale) + bias), so XLA
  compiles the same reductions and autodiff the same backward pass. The
  mask goes to `jnp.mean` unbroadcast, as Flax passes it: a broadcast mask
  compiles to another reduction loop, which rounded a variance 1 ulp off.
  Neither rematerialized nor behind an optimization barrier, as Flax's layer
  is not. A feature with no counted entry gets Flax's 0/0: NaN statistics
  and outputs.
  """

  def pmean(v):
    if axis_name is None:
      return v
    return lax.pmean(v, axis_name, axis_index_groups=axis_index_groups)

  # In Flax's order: the order of the operations changes the gradient's rounding.
  sq = lax.square(x) if fast else None
  mask = None if mask is None else jnp.asarray(mask, bool)
  if fast:
    mu = jnp.mean(x, reduction_axes, where=mask)
    mu2 = jnp.mean(sq, reduction_axes, where=mask)
    if axis_name is not None:
      mus = pmean(jnp.stack((mu, mu2), axis=0))
      mu, mu2 = mus[0], mus[1]
    var = jnp.maximum(0.0, mu2 - lax.square(mu))
  else:
    mu = pmean(jnp.mean(x, reduction_axes, where=mask))
    var = pmean(jnp.mean(lax.square(x - jnp.expand_dims(mu, reduction_axes)), reduction_axes,
                         where=mask))
  feature_shape = [1 if i in reduction_axes else d for i, d in enumerate(x.shape)]
  y = x - jnp.expand_dims(mu, reduction_axes)
  mul = lax.rsqrt(jnp.expand_dims(var, reduction_axes) + epsilon)
  if scale is not None:
    mul = mul * scale.reshape(feature_shape)
  y = y * mul
  if bias is not None:
    y = y + bias.reshape(feature_shape)
  if mask is None:
    count = _full_count(x, reduction_axes, x.dtype)
  else:
    count = jnp.sum(jnp.broadcast_to(mask, x.shape), reduction_axes, dtype=x.dtype)
  return Moments(jnp.zeros_like(mu), mu, var, count), y


_MOMENTS = "bn_batch_moments"


def _normalize_with_batch_moments(x, scale, bias, mask, *, reduction_axes, variance,
                                  axis_name, axis_index_groups, stats_dtype, compute_dtype,
                                  epsilon):
  """Batch moments and the normalized output, differentiated with rematerialization.

  Only the per-feature moments are kept for the backward pass; the full-size
  intermediates (x - shift, the centered input) are recomputed there inside
  the gradient's fused loops instead of being written to and read back from
  memory. Same values and gradients; on a 2-core CPU forward+backward ran in
  ~0.6x the time of Flax's fast-variance layer (experiments/bn_speed.py).
  """

  def expand(v):
    return jnp.expand_dims(v, reduction_axes)

  def normalize(x, scale, bias, mask):
    m = batch_moments(
        x, reduction_axes, mask=mask, variance=variance, axis_name=axis_name,
        axis_index_groups=axis_index_groups, dtype=stats_dtype)
    m = Moments(*(checkpoint_name(v, _MOMENTS) for v in m))
    centered = (jnp.asarray(x, compute_dtype) - expand(m.shift)) - expand(m.centered_mean)
    return m, _scale_and_shift(centered, m.var, scale, bias, epsilon, expand)

  policy = jax.checkpoint_policies.save_only_these_names(_MOMENTS)
  if jax.default_backend() == "cpu":
    # XLA:CPU otherwise copies the input's producers (e.g. a conv's bias and
    # ReLU) into each of the layer's forward and backward loops, whose index
    # arithmetic then no longer vectorizes; reading the stored input instead
    # made the seed CNN's training step 5% (batch 32) to 11% (batch 128)
    # faster and the paper MLP's no slower (2-core CPU, jaxlib 0.10.2).
    x = lax.optimization_barrier(x)
  return jax.checkpoint(normalize, policy=policy)(x, scale, bias, mask)
