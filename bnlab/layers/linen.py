"""flax.linen modules: `BatchNorm` (a drop-in replacement for `flax.linen.BatchNorm`)
and the variants over `bnlab.layers.variants`: `BatchNormVariant` (frozen statistics,
population running average), `BatchRenorm`, `GhostBatchNorm`, `NoisyBatchNorm`.

`load_batch_norm_checkpoint` loads the variables of a model with `BatchNorm`
layers into the same model with variants in their place.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax.numpy as jnp
from flax import errors
from flax import linen as nn
from flax import traverse_util
from flax.linen import initializers
from flax.linen.module import merge_param

from bnlab.layers import variants
from bnlab.layers.functional import (Axes, BatchNormOutput, any_counted, batch_norm,
                                     canonicalize_axes, variance_method)


class BatchNorm(nn.Module):
  """Batch Normalization with Flax's fields, variables and call signature.

  Same constructor fields, `__call__(x, use_running_average=None, *, mask=None)`
  and variables (`params/scale`, `params/bias`, `batch_stats/mean`,
  `batch_stats/var`) as `flax.linen.BatchNorm`, so changing the import is all a
  model needs; checkpoints carry over. As with Flax, a train-mode call outside
  `init` updates the running statistics and so needs
  `apply(..., mutable=["batch_stats"])`; without it the call raises
  `flax.errors.ModifyScopeVariableError` (unless `update_stats=False`).
  Differences, all deliberate:

  - `use_fast_variance` defaults to None: the variance is the robust one-pass
    shifted formula (see `bnlab.layers.functional`), exact where Flax's default
    loses all precision (inputs with |mean| >> std). True and False are
    Flax's formulas, computed as Flax does: bit-identical to its layer.
  - `axis_name` statistics psum sums and counts, so masks with different
    counts per device give exactly the global statistics (with Flax's
    formulas only when masked: unmasked, they pmean the means as Flax does).
  - A feature with no counted entry (`mask`) in a train-mode batch keeps its
    running statistics by default, where Flax's become NaN (0/0) for good
    (as they do here with `use_fast_variance` True or False); its output is
    NaN in both.

  Attributes:
    use_running_average: True normalizes with the running statistics stored in
      `batch_stats` (inference); False with the statistics of the batch
      (training), folding them into the running ones. May be left None here
      and passed to the call instead.
    axis: the feature axis, or a tuple of them; statistics are computed per
      feature over every other axis (default -1: the channels of NHWC).
    momentum: running = momentum * running + (1 - momentum) * batch.
    epsilon: added to the variance before the square root.
    dtype: dtype of the output (default: the result type of the input and the
      parameters).
    param_dtype: dtype of `scale` and `bias`.
    use_bias: learn a per-feature shift `bias` (beta).
    use_scale: learn a per-feature multiplier `scale` (gamma); can be dropped
      when the next layer is linear.
    bias_init: initializer of `bias` (zeros).
    scale_init: initializer of `scale` (ones).
    axis_name: name of a mapped axis (pmap, shard_map) over which the batch
      statistics are global; sums and counts are psum-ed. Under jit with
      sharded arrays no name is needed.
    axis_index_groups: subsets of the devices along `axis_name` that share
      statistics (see `jax.lax.psum`).
    use_fast_variance: None (default): bnlab's robust shifted one-pass
      formula. True: E[x^2] - E[x]^2, Flax's default, which loses all
      precision when |mean| >> std; False: Flax's two-pass E[(x - E[x])^2].
      Both are computed op for op as Flax, so bit-identical to its layer,
      a feature with no counted entry's NaN running statistics included.
    force_float32_reductions: compute the statistics and store the running
      ones in float32 whatever the input and parameter dtypes; False computes
      them in at least `dtype` (the input's when None), as Flax does.
    variance: "shifted", "two_pass", "fast" or "flax_two_pass" (see
      `bnlab.batch_moments`); overrides `use_fast_variance` when set.
    unbiased_running_var: fold m/(m-1) times the batch variance into the
      running variance (Ioffe & Szegedy 2015, Algorithm 2), m the number of
      values per feature; the batch itself is normalized with the biased one.
    update_stats: True (default) as Flax: a train-mode call outside `init`
      writes the new running statistics, so `batch_stats` must be mutable.
      False: train-mode calls normalize with the batch statistics and never
      change the running ones, mutable or not (e.g. evaluating with the
      statistics of each test batch). Flax users get the same by applying
      with `mutable=["batch_stats"]` and dropping the returned update.
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
  use_fast_variance: bool | None = None
  force_float32_reductions: bool = True
  variance: str | None = None
  unbiased_running_var: bool = False
  update_stats: bool = True

  @nn.nowrap
  def _variables(self, x):
    """Feature axes, running mean and variance variables, scale and bias (or None).

    This and the other helpers are `nn.nowrap`: Flax's method wrapper would
    make each call a module call of its own, which `tabulate` lists as an
    extra row and re-runs alone (outside `__call__`'s compact scope) for
    `compute_flops`.
    """
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

  @nn.nowrap
  def _updating(self, train: bool) -> bool:
    """Whether this call writes the running statistics.

    Raises Flax's `ModifyScopeVariableError` when it should (train mode,
    outside `init`, `update_stats`) but `batch_stats` is immutable: the
    error `flax.linen.BatchNorm` raises there.
    """
    if not train or self.is_initializing() or not self.update_stats:
      return False
    if not self.is_mutable_collection("batch_stats"):
      raise errors.ModifyScopeVariableError("batch_stats", "mean", self.scope.path_text)
    return True

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_running_average = merge_param(
        "use_running_average", self.use_running_average, use_running_average
    )
    feature_axes, ra_mean, ra_var, scale, bias = self._variables(x)
    updating = self._updating(not use_running_average)
    variance = variance_method(self.variance, self.use_fast_variance)
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
        stats_dtype=jnp.float32 if self.force_float32_reductions else self.dtype,
    )
    if updating:
      ra_mean.value = out.mean
      ra_var.value = out.var
    return out.y


class BatchNormVariant(BatchNorm):
  """`BatchNorm` with a choice of running statistics; the base of the variants.

  Same variables as `BatchNorm`, plus `batch_stats/num_batches` with the
  population average. Subclasses override `_normalize` (and may add variables
  there: it runs in `__call__`'s compact scope, never wrapped by Flax as a
  module method of its own, so `tabulate` shows one row per layer). Train
  mode needs a mutable `batch_stats`, as `BatchNorm` does, unless `frozen` or
  `update_stats=False`.

  Attributes:
    running_average: "ema" (the exponential average of `BatchNorm`, with
      `momentum`) or "population": the average over every batch seen of the
      batch means and of the m/(m-1)-corrected batch variances (Ioffe &
      Szegedy 2015, Algorithm 2), counted in `batch_stats/num_batches`;
      `momentum` and `unbiased_running_var` are then unused.
    frozen: always normalize with the running statistics and never update
      them, in train mode too (fine-tuning); `batch_stats` need not be
      mutable.

  The other attributes are `BatchNorm`'s.
  """

  running_average: str = "ema"
  frozen: bool = False

  def __init_subclass__(cls, **kwargs):
    # A subclass's `_normalize` is a helper of `__call__` too: mark it before
    # Flax's own hook wraps the new class's methods.
    if "_normalize" in cls.__dict__:
      nn.nowrap(cls.__dict__["_normalize"])
    super().__init_subclass__(**kwargs)

  @nn.nowrap
  def _normalize(self, x, scale, bias, mean, var, *, train: bool, updating: bool,
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
    variance = variance_method(self.variance, self.use_fast_variance)
    initializing = self.is_initializing()
    train = not use_running_average and not self.frozen
    updating = self._updating(train)
    out = self._normalize(
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
        stats_dtype=jnp.float32 if self.force_float32_reductions else self.dtype,
    )
    if updating:
      if population:
        stats = variants.population_average(
            ra_mean.value, ra_var.value, num_batches.value, out.mean, out.var,
            any_counted(mask, None if initializing else self.axis_name,
                        self.axis_index_groups))
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

  With the defaults the layer is plain BN for its first 5,000 updates
  (`warmup_steps`): a shorter run never renormalizes. Lower `warmup_steps`
  (and the ramps) for short runs.

  A `batch_stats` without `steps` (variables saved from a `BatchNorm`) counts
  as 0 updates; the counter is added at the first update. The auto-name
  differs (`BatchRenorm_0`, not `BatchNorm_0`): see
  `load_batch_norm_checkpoint`.

  Attributes:
    r_max: the final bound of the correction r = sigma_B / sigma, clipped to
      [1/r_max, r_max].
    d_max: the final bound of the correction d = (mu_B - mu) / sigma,
      clipped to [-d_max, d_max].
    warmup_steps: updates during which r_max = 1 and d_max = 0, i.e. the layer
      is plain BN (default 5,000, the paper's).
    r_max_steps: the update at which r_max reaches its final value, linearly
      from 1 at `warmup_steps` (40,000).
    d_max_steps: the update at which d_max reaches its final value, linearly
      from 0 at `warmup_steps` (25,000).

  The other attributes are `BatchNormVariant`'s.
  """

  r_max: float = 3.0
  d_max: float = 5.0
  warmup_steps: int = 5000
  r_max_steps: int = 40000
  d_max_steps: int = 25000

  def _normalize(self, x, scale, bias, mean, var, *, train: bool, updating: bool,
                 **kwargs) -> BatchNormOutput:
    if updating or self.has_variable("batch_stats", "steps") or self.is_initializing():
      steps = self.variable("batch_stats", "steps", lambda: jnp.zeros((), jnp.int32))
      count = steps.value
    else:  # a BatchNorm's statistics: no update so far counted
      steps, count = None, jnp.zeros((), jnp.int32)
    limits = variants.renorm_limits(
        count, r_max=self.r_max, d_max=self.d_max, warmup_steps=self.warmup_steps,
        r_max_steps=self.r_max_steps, d_max_steps=self.d_max_steps)
    if updating:
      steps.value = count + 1
    return variants.batch_renorm(
        x, scale, bias, mean, var, train=train, r_max=limits.r_max, d_max=limits.d_max,
        **kwargs)


class GhostBatchNorm(BatchNormVariant):
  """Ghost Batch Normalization over `variants.ghost_batch_norm`.

  Statistics per ghost batch of `ghost_size` examples in train mode; the
  running statistics fold in the mean of the ghost statistics.

  Attributes:
    ghost_size: examples per ghost batch; the batch size must be a multiple
      of it. `axis_name` is not supported (ghost statistics are per device).

  The other attributes are `BatchNormVariant`'s.
  """

  ghost_size: int = 16

  def _normalize(self, x, scale, bias, mean, var, *, train: bool, updating: bool,
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

  Attributes:
    noise_shift_max: the shift m is uniform in [-noise_shift_max,
      noise_shift_max].
    noise_scale_max: the scale s is uniform in [1, noise_scale_max].

  The other attributes are `BatchNormVariant`'s.
  """

  noise_shift_max: float = 0.5
  noise_scale_max: float = 1.5

  def _normalize(self, x, scale, bias, mean, var, *, train: bool, updating: bool,
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


_VARIANT_NAME = re.compile(r"^(?:BatchRenorm|GhostBatchNorm|NoisyBatchNorm|BatchNormVariant)_(\d+)$")
_COUNTERS = ("steps", "num_batches")


def load_batch_norm_checkpoint(checkpoint: Mapping[str, Any], template: Mapping[str, Any],
                               renames: Mapping[str, str] | None = None) -> dict:
  """The variables of a model whose `BatchNorm` layers became variants, from its old ones.

  Swapping `BatchNorm` for a variant changes the layer's auto-name
  (`BatchNorm_0` becomes `BatchRenorm_0`, `GhostBatchNorm_0`, ...) and may add
  counters (`batch_stats/.../steps`, `num_batches`), so the old variables no
  longer fit the new model. Given `template`, the new model's variables (e.g.
  from `init`), every entry is taken from `checkpoint` at the same path, else
  with the variant's auto-name `<Variant>_<k>` read as `BatchNorm_<k>`; a
  counter the checkpoint lacks keeps the template's value (0: no update so
  far).

  Args:
    checkpoint: variables of the model with `BatchNorm` layers (nested
      dicts, e.g. `{"params": ..., "batch_stats": ...}`).
    template: variables of the model with the variants, of the shapes wanted.
    renames: module paths of the template (slash-separated below the
      collection, e.g. "Block_1/BatchRenorm_0") mapped to the checkpoint's
      ("Block_1/BatchNorm_1"), for layers the auto-names cannot pair (only some
      of a module's `BatchNorm` layers swapped). Applied before the auto-names.

  Returns:
    Nested dicts of `template`'s structure with the checkpoint's values.

  Raises:
    ValueError: a template entry has no source in the checkpoint, two take
      the same one, a shape differs, or a checkpoint entry is left unused
      (each names the paths; pass `renames` to pair them).
  """
  src = traverse_util.flatten_dict(dict(checkpoint))
  dst = traverse_util.flatten_dict(dict(template))
  renames = {tuple(k.split("/")): tuple(v.split("/")) for k, v in (renames or {}).items()}

  def candidates(path):
    col, modules, leaf = path[0], path[1:-1], path[-1]
    yield path
    for old, new in renames.items():
      if modules[:len(old)] == old:
        yield (col,) + new + modules[len(old):] + (leaf,)
    auto = tuple(_VARIANT_NAME.sub(r"BatchNorm_\1", m) for m in modules)
    if auto != modules:
      yield (col,) + auto + (leaf,)

  out, used, missing = {}, {}, []
  for path, value in dst.items():
    source = next((c for c in candidates(path) if c in src), None)
    if source is None:
      if path[0] == "batch_stats" and path[-1] in _COUNTERS:
        out[path] = value
        continue
      missing.append("/".join(path))
      continue
    if source in used:
      raise ValueError(
          f"{'/'.join(path)} and {'/'.join(used[source])} both read the checkpoint's "
          f"{'/'.join(source)}; pair the layers with renames={{template path: checkpoint path}}")
    if jnp.shape(src[source]) != jnp.shape(value):
      raise ValueError(f"{'/'.join(path)} has shape {jnp.shape(value)} but the checkpoint's "
                       f"{'/'.join(source)} has {jnp.shape(src[source])}")
    used[source] = path
    out[path] = src[source]
  unused = sorted("/".join(p) for p in src if p not in used)
  if missing or unused:
    raise ValueError(
        f"checkpoint and model do not pair up: in the model only {missing}, in the checkpoint "
        f"only {unused}; pair the layers with renames={{template path: checkpoint path}}")
  return traverse_util.unflatten_dict(out)
