"""ResNet-20: He et al. 2016's CIFAR network (Deep Residual Learning, §4.2), a conv net
whose depth BN is known to matter for.

A 3x3 conv of 16 filters, then three stages of n=3 basic blocks (two 3x3 convs each) of
16, 32 and 64 filters, the first block of stages 2 and 3 halving the map with stride 2,
then global average pooling and a dense layer to the classes: 6n+2 = 20 weighted layers,
269,722 parameters on 3-channel input with BN (0.27M, the paper's table 6).

Each conv is followed by the norm (`model.norm`, any of `bnlab.models.parts.NORMS`, built
by `bnlab.models.parts.NormSpec` as in the other networks) and then the activation; a block's second
norm comes before the addition of the shortcut, and the activation after it, as in the
paper. A conv followed by a norm has no bias (BN's mean subtraction cancels it, its shift
replaces it) unless `model.bn.bias_before`. Shortcuts where the shape changes:

- "A" (the paper's CIFAR choice): the identity, subsampled with the stride (every
  second row and column, as fb.resnet.torch's 1x1 stride-2 pooling) and zero-padded
  with the new channels after the old ones: no parameters.
- "B": a 1x1 conv with the stride, followed by the norm (a projection).

Elsewhere the shortcut is the identity. Convs take `model.kernel_init` ("he_normal_fan_out",
the paper's He init as torchvision's ResNets draw it, in `configs/resnet20.py`); the
dense layer keeps Flax's default (LeCun normal), as torchvision's keeps PyTorch's.
`zero_init_last_scale` starts each block's last norm scale at 0, so each block starts as
its shortcut (Goyal et al. 2017); off by default, as in the paper.

Inputs (batch, H, W) or (batch, H, W, C) of any size: integer images are scaled by
1/255, floating ones are taken as they are (already normalized). Each activation's
input is sown as `preact_<i>` (i = 0 the stem, 2b+1 and 2b+2 the two of block b), and
in inference mode, with a batch-statistics norm, the x-hat of the BN feeding it (the
residual branch's last BN for an activation after an addition) as `xhat_<i>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnlab.models import parts
from bnlab.models.conv import Conv

SHORTCUTS = ("A", "B")
STAGE_WIDTHS = (16, 32, 64)
BLOCKS_PER_STAGE = 3  # n: 6n+2 = 20 layers


def shortcut_a(x: jax.Array, features: int, stride: int) -> jax.Array:
  """Option A: `x` (NHWC) subsampled with `stride` and zero-padded to `features` channels,
  the new channels after the old ones."""
  if features < x.shape[-1]:
    raise ValueError(f"shortcut A cannot shrink {x.shape[-1]} channels to {features}; "
                     "use model.resnet.shortcut='B' or non-decreasing model.widths")
  x = x[:, ::stride, ::stride, :]
  return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, features - x.shape[-1])))


def _xhat(module: nn.Module, raw: jax.Array, name: str, epsilon: float) -> jax.Array:
  """BN `name`'s normalized input (raw - running mean) / sqrt(running var + eps)."""
  stats = module.variables["batch_stats"][name]
  return (raw.astype(jnp.float32) - stats["mean"]) * jax.lax.rsqrt(stats["var"] + epsilon)


class _Unit(nn.Module):
  """What the stem and the blocks share: conv -> norm, sowing x-hat under an index."""

  norm: parts.NormSpec
  kernel_init: Any
  bias_before_norm: bool
  conv_implementation: str
  dtype: Any

  def conv_norm(self, x, features, kernel, stride, train, index, *, position,
                scale_init=None, sow=True):
    """conv (`Conv_<position>`) -> norm (`BatchNorm_<position>` for batch statistics);
    x-hat sown as `xhat_<index>` in inference mode when `sow`."""
    norm = self.norm.make()
    pad = (kernel - 1) // 2
    h = Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)),
             use_bias=norm is None or self.bias_before_norm, kernel_init=self.kernel_init,
             implementation=self.conv_implementation, dtype=self.dtype,
             name=f"Conv_{position}")(x)
    if norm is None:
      return h
    batch_stats = self.norm.norm in parts.BATCH_STAT_NORMS
    name = f"BatchNorm_{position}" if batch_stats else None
    out = norm(h, train, scale_init=scale_init, name=name)
    if sow and batch_stats and not train:
      self.sow("intermediates", f"xhat_{index}", _xhat(self, h, name, self.norm.epsilon))
    return out


class Stem(_Unit):
  """3x3 conv -> norm -> activation: activation 0."""

  features: int = 16
  activation: str = "relu"
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    h = self.conv_norm(x, self.features, 3, 1, train, 0, position=0)
    self.sow("intermediates", "preact_0", h)
    return _dropout(self, parts.ACTIVATIONS[self.activation](h), train)


class BasicBlock(_Unit):
  """conv3x3(stride) -> norm -> act -> conv3x3 -> norm, + shortcut, -> act
  (activations `index` and `index` + 1)."""

  features: int = 16
  stride: int = 1
  index: int = 1
  activation: str = "relu"
  shortcut: str = "A"
  zero_init_last_scale: bool = False
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool):
    act = parts.ACTIVATIONS[self.activation]
    h = self.conv_norm(x, self.features, 3, self.stride, train, self.index, position=0)
    self.sow("intermediates", f"preact_{self.index}", h)
    h = act(h)
    h = self.conv_norm(
        h, self.features, 3, 1, train, self.index + 1, position=1,
        scale_init=nn.initializers.zeros if self.zero_init_last_scale else None)
    if self.stride == 1 and x.shape[-1] == self.features:
      shortcut = x
    elif self.shortcut == "A":
      shortcut = shortcut_a(x, self.features, self.stride).astype(h.dtype)
    elif self.shortcut == "B":
      shortcut = self.conv_norm(x, self.features, 1, self.stride, train, None,
                                position=2, sow=False)
    else:
      raise ValueError(f"model.resnet.shortcut={self.shortcut!r}; expected one of {SHORTCUTS}")
    h = h + shortcut
    self.sow("intermediates", f"preact_{self.index + 1}", h)
    return _dropout(self, act(h), train)


def _dropout(module: nn.Module, h, train: bool):
  """Dropout of rate `module.dropout` in training steps with a `dropout` stream (only the
  train step gives one, so evaluations score the whole network), else `h`."""
  if module.dropout and train and module.has_rng("dropout"):
    return nn.Dropout(module.dropout, deterministic=False)(h)
  return h


class ResNet(nn.Module):
  """He et al. 2016's CIFAR ResNet (6n+2 layers, n = `blocks_per_stage`); see the module
  docstring. `norm=None` or a NormSpec with norm="none": no normalization."""

  stage_widths: Sequence[int] = STAGE_WIDTHS
  blocks_per_stage: int = BLOCKS_PER_STAGE
  num_classes: int = 10
  norm: parts.NormSpec = parts.NormSpec("batch")
  activation: str = "relu"
  shortcut: str = "A"
  zero_init_last_scale: bool = False
  kernel_init: str = "he_normal_fan_out"
  init_std: float = 0.01
  bias_before_norm: bool = False
  dropout: float = 0.0
  conv_implementation: str = "auto"
  dtype: Any = None

  @nn.compact
  def __call__(self, images, train: bool = False):
    if self.shortcut not in SHORTCUTS:
      raise ValueError(f"model.resnet.shortcut={self.shortcut!r}; expected one of {SHORTCUTS}")
    if images.ndim == 3:
      images = images[..., None]  # (batch, H, W) grey images: one channel
    if images.ndim != 4:
      raise ValueError(f"ResNet takes (batch, H, W) or (batch, H, W, C) images, got "
                       f"{images.shape}")
    x = images.astype(self.dtype or jnp.float32)
    if jnp.issubdtype(images.dtype, jnp.integer):
      x = x * (1.0 / 255.0)
    unit = dict(norm=self.norm, kernel_init=parts.kernel_initializer(
        self.kernel_init, self.init_std), bias_before_norm=self.bias_before_norm,
                conv_implementation=self.conv_implementation, dtype=self.dtype,
                activation=self.activation, dropout=self.dropout)
    x = Stem(features=self.stage_widths[0], name="stem", **unit)(x, train)
    index = 1
    for s, features in enumerate(self.stage_widths):
      for b in range(self.blocks_per_stage):
        x = BasicBlock(
            features=features, stride=2 if s > 0 and b == 0 else 1, index=index,
            shortcut=self.shortcut, zero_init_last_scale=self.zero_init_last_scale,
            name=f"block_{s}_{b}", **unit)(x, train)
        index += 2
    x = jnp.mean(x, axis=(1, 2))  # global average pooling
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="logits")(x)
    return logits.astype(jnp.float32)


def num_activations(blocks_per_stage: int = BLOCKS_PER_STAGE, stages: int = 3) -> int:
  """The activations a ResNet sows `preact_<i>` for: the stem's and two per block."""
  return 1 + 2 * blocks_per_stage * stages
