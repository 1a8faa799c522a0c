"""What every built-in network is made of: its norm (`NormSpec`, from `model.norm` and
`model.bn.*`), activations and initializers by name. `bnlab.models.networks` and
`bnlab.models.resnet` both build on it, so every network takes the same choices."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnlab.layers import linen as norm_linen
from bnlab.layers.linen import BatchNorm

BATCH_STAT_NORMS = ("batch", "flax_batch", "renorm", "ghost", "noisy", "frozen")
NORMS = ("none", *BATCH_STAT_NORMS, "layer", "group")
ACTIVATIONS = {
    "relu": nn.relu,
    "sigmoid": nn.sigmoid,
    "tanh": jnp.tanh,
    "elu": nn.elu,
    "gelu": nn.gelu,
    "identity": lambda x: x,
}
KERNEL_INITS = ("lecun_normal", "glorot_uniform", "he_normal", "he_normal_fan_out", "normal")


def kernel_initializer(name: str, std: float = 0.01) -> Callable:
  """A Flax initializer by name ("normal" draws N(0, std^2))."""
  if name == "lecun_normal":
    return nn.initializers.lecun_normal()
  if name == "glorot_uniform":
    return nn.initializers.glorot_uniform()
  if name == "he_normal":
    return nn.initializers.he_normal()
  if name == "he_normal_fan_out":
    # N(0, 2 / (k*k*out_channels)), untruncated: He et al.'s init as torchvision's ResNets
    # draw it (kaiming_normal_, mode="fan_out"), kept for the backward pass's variance.
    return nn.initializers.variance_scaling(2.0, "fan_out", "normal")
  if name == "normal":
    return nn.initializers.normal(std)
  raise ValueError(f"model.kernel_init={name!r}; expected one of {KERNEL_INITS}")


def group_norm(h, train: bool, *, num_groups: int, epsilon: float, dtype=None, **kwargs):
  """Flax's GroupNorm over the last axis, in the calling module; checks the groups.
  `kwargs` (e.g. `scale_init`) go to `nn.GroupNorm`."""
  del train
  if h.shape[-1] % num_groups:
    raise ValueError(
        f"model.bn.num_groups={num_groups} does not divide the {h.shape[-1]} features of a "
        f"normalized layer")
  return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype, **kwargs)(h)


@dataclasses.dataclass(frozen=True)
class NormSpec:
  """Which norm layer a model puts where it normalizes, and its settings (`model.norm`,
  `model.bn.*`): shared by every built-in network, so each takes the same choices.

  Hashable, so a module may hold it as a field (jit caches key on the module).
  """

  norm: str = "batch"
  momentum: float = 0.99
  epsilon: float = 1e-5
  variance: str = "shifted"
  running_average: str = "ema"
  ghost_size: int = 16
  renorm_r_max: float = 3.0
  renorm_d_max: float = 5.0
  renorm_warmup_steps: int = 5000
  renorm_r_max_steps: int = 40000
  renorm_d_max_steps: int = 25000
  noise_shift_max: float = 0.5
  noise_scale_max: float = 1.5
  num_groups: int = 4
  per_activation: bool = False  # a conv map's BN statistics per (H, W, C), not per C
  dtype: Any = None

  @classmethod
  def from_config(cls, cfg, dtype=None) -> "NormSpec":
    """The norm of the `model` config section `cfg`."""
    return cls(
        norm=cfg.norm, momentum=cfg.bn.momentum, epsilon=cfg.bn.epsilon,
        variance=cfg.bn.variance, running_average=cfg.bn.running_average,
        ghost_size=cfg.bn.ghost_size, renorm_r_max=cfg.bn.renorm_r_max,
        renorm_d_max=cfg.bn.renorm_d_max, renorm_warmup_steps=cfg.bn.renorm_warmup_steps,
        renorm_r_max_steps=cfg.bn.renorm_r_max_steps,
        renorm_d_max_steps=cfg.bn.renorm_d_max_steps,
        noise_shift_max=cfg.bn.noise_shift_max, noise_scale_max=cfg.bn.noise_scale_max,
        num_groups=cfg.bn.num_groups,
        per_activation=cfg.bn.get("statistics", "model") == "activation", dtype=dtype)

  def make(self) -> Callable[..., jax.Array] | None:
    """`(h, train, scale_init=None, name=None) -> normalized h`, creating the norm layer in
    the calling module (None for norm="none").

    `scale_init` replaces the layer's scale initializer (ones), e.g. zeros for a residual
    block's last norm; `name` names a batch-statistics layer (default "BatchNorm_0" for
    the variants, Flax's automatic name for "batch"), for modules with several norms.
    """
    if self.norm not in NORMS:
      raise ValueError(f"model.norm={self.norm!r}; expected one of {NORMS}")
    if self.norm == "none":
      return None

    def init(scale_init):
      return {} if scale_init is None else {"scale_init": scale_init}

    if self.norm == "layer":
      return lambda h, train, scale_init=None, name=None: nn.LayerNorm(
          epsilon=self.epsilon, reduction_axes=tuple(range(1, h.ndim)), dtype=self.dtype,
          **init(scale_init))(h)
    if self.norm == "group":
      return lambda h, train, scale_init=None, name=None: group_norm(
          h, train, num_groups=self.num_groups, epsilon=self.epsilon, dtype=self.dtype,
          **init(scale_init))
    # Statistics and running averages stay float32 in every BN layer
    # (force_float32_reductions, on by default), whatever `dtype`.
    bn = dict(momentum=self.momentum, epsilon=self.epsilon, dtype=self.dtype)
    default_name = None
    if self.norm == "flax_batch":
      layer = functools.partial(nn.BatchNorm, **bn)
    elif self.norm == "batch" and self.running_average == "ema":
      layer = functools.partial(BatchNorm, variance=self.variance, **bn)
    else:
      bn.update(variance=self.variance, running_average=self.running_average)
      default_name = "BatchNorm_0"
      if self.norm in ("batch", "frozen"):
        layer = functools.partial(
            norm_linen.BatchNormVariant, frozen=self.norm == "frozen", **bn)
      elif self.norm == "renorm":
        layer = functools.partial(
            norm_linen.BatchRenorm, r_max=self.renorm_r_max, d_max=self.renorm_d_max,
            warmup_steps=self.renorm_warmup_steps, r_max_steps=self.renorm_r_max_steps,
            d_max_steps=self.renorm_d_max_steps, **bn)
      elif self.norm == "ghost":
        layer = functools.partial(norm_linen.GhostBatchNorm, ghost_size=self.ghost_size, **bn)
      else:  # noisy
        layer = functools.partial(
            norm_linen.NoisyBatchNorm, noise_shift_max=self.noise_shift_max,
            noise_scale_max=self.noise_scale_max, **bn)
    # Per activation, a conv map's every (H, W, C) position has its own statistics, as a
    # dense layer's BN would treat the flattened map; else per channel (the last axis).
    per = lambda h: {"axis": tuple(range(1, h.ndim))} if (  # noqa: E731
        self.per_activation and h.ndim > 2) else {}

    def apply(h, train, scale_init=None, name=None):
      named = {"name": name or default_name} if (name or default_name) else {}
      return layer(**per(h), **init(scale_init), **named)(h, use_running_average=not train)
    return apply
