"""The seed and paper networks and ResNet-20 (`bnlab.models.resnet`), built from a config.

Every model takes `norm` (one of `NORMS`, built by `NormSpec`) and `bn_position`:
"before" the activation (the paper's rule: the preceding layer loses its bias, which the
norm's shift replaces) or "after" it (not resnet20, whose norms sit before, as He et al.'s).
Norms:

- "batch": `bnlab.BatchNorm` ("flax_batch": Flax's own, as a reference);
- "renorm", "ghost", "noisy": Batch Renormalization, ghost batches, BN with
  per-activation noise (see `bnlab.layers.linen`); "noisy" needs a `noise` RNG
  in train mode;
- "frozen": BN that always uses, and never updates, its running statistics;
- "layer", "group": Flax's LayerNorm (over every non-batch axis) and
  GroupNorm (`num_groups`), for comparison;
- "none".

Every batch-statistics norm is named `BatchNorm_0` in its block, so
checkpoints carry over between them (e.g. fine-tuning a "batch" run with
"frozen"). Each activation's input is sown into the `intermediates`
collection as `preact_<i>` so analyses can record its distribution; with a
batch-statistics norm before the activation, inference mode also sows BN's
normalised input x-hat = (h - running mean) / sqrt(running var + eps), before
the learned scale and shift, as `xhat_<i>`.

Your own model: `model.name="package.module:target"` (see `bnlab.models.user`).
`dtype` (train.half_precision): the computation dtype; parameters and BN
statistics stay float32, and the built-in models return float32 logits.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bnlab.models import resnet
from bnlab.models.conv import Conv, max_pool
from bnlab.models.parts import (  # noqa: F401  (re-exported: networks.NORMS, ...)
    ACTIVATIONS, BATCH_STAT_NORMS, KERNEL_INITS, NORMS, NormSpec, group_norm,
    kernel_initializer)
from bnlab.models.user import is_user_model, user_model

MODELS = ("paper_mlp", "seed_cnn", "seed1_mlp", "seed1_cnn", "resnet20")
CNN_MODELS = ("seed_cnn", "seed1_cnn", "resnet20")  # the built-in networks with convolutions
BN_POSITIONS = ("before", "after")
# Hidden widths (dense) or channels (conv) of each model when `widths` is empty.
DEFAULT_WIDTHS = {
    "paper_mlp": (100, 100, 100),
    "seed_cnn": (32, 64, 64),
    "seed1_mlp": (16, 32),
    "seed1_cnn": (32, 32),
    "resnet20": (16, 32, 64),  # the stages' filters
}


# Activations that commute with max pooling (monotone non-decreasing).
MONOTONE_ACTIVATIONS = ("relu", "sigmoid", "tanh", "elu", "identity")


class Block(nn.Module):
  """layer -> [norm] -> activation -> [norm] -> [max pool], norm placed by `bn_position`.

  Without a norm and with a monotone activation, pooling runs before the
  activation: max(act(h)) == act(max(h)) exactly, and the activation (and its
  backward pass) then touches pool**2 times fewer values.
  """

  layer: Callable[[bool], nn.Module]  # use_bias -> the linear/conv layer
  activation: str
  norm: Callable[[jax.Array, bool], jax.Array] | None  # (h, train) -> normalized h
  bn_position: str
  index: int
  flatten_before_norm: bool = False
  pool: int = 0  # max-pool window after the block (0: none)
  xhat_epsilon: float | None = None  # the BN's epsilon: sow x-hat (inference, BN before)
  bias_before_norm: bool = False  # keep the layer's bias under a norm placed before
  dropout: float = 0.0  # the rate of the dropout on the block's output

  @nn.compact
  def __call__(self, x, train: bool):
    # Dropout on the block's output in training steps only: with a `dropout` RNG stream,
    # which only the train step gives, so evaluations with batch or population statistics
    # (train-mode normalization, no RNG) score the whole network.
    drop = (nn.Dropout(self.dropout, deterministic=False)
            if self.dropout and train and self.has_rng("dropout") else lambda h: h)
    act = ACTIVATIONS[self.activation]
    before = self.norm is not None and self.bn_position == "before"
    h = self.layer(not before or self.bias_before_norm)(x)
    if self.flatten_before_norm:
      h = h.reshape(h.shape[0], -1)
    if before:
      raw = h
      h = self.norm(h, train)
      if self.xhat_epsilon is not None and not train:
        stats = self.variables["batch_stats"]["BatchNorm_0"]
        xhat = (raw.astype(jnp.float32) - stats["mean"]) * jax.lax.rsqrt(
            stats["var"] + self.xhat_epsilon)
        self.sow("intermediates", f"xhat_{self.index}", xhat)
    self.sow("intermediates", f"preact_{self.index}", h)
    if self.pool and self.norm is None and self.activation in MONOTONE_ACTIVATIONS:
      return drop(act(max_pool(h, self.pool)))
    h = act(h)
    if self.norm is not None and not before:
      h = self.norm(h, train)
    return drop(max_pool(h, self.pool) if self.pool else h)


class Classifier(nn.Module):
  """Image classifier: conv blocks (with optional pooling), dense blocks, logits.

  `conv` lists (channels, pool_after, has_bn) per 3x3 conv block; `dense`
  lists (width, has_bn) per hidden dense block; `flatten_norm` puts the last
  conv block's BN on its flattened features (the seed CNN's per-unit
  BatchNormalization after Flatten) instead of per channel.
  """

  conv: Sequence[tuple[int, bool, bool]]
  dense: Sequence[tuple[int, bool]]
  activation: str = "relu"
  norm: NormSpec = NormSpec("batch")  # which norm and its settings (`model.norm`, `model.bn.*`)
  bn_position: str = "before"
  flatten_norm: bool = False
  kernel_init: str = "lecun_normal"
  init_std: float = 0.01
  bias_before_norm: bool = False  # keep the bias a norm before the activation cancels
  dropout: float = 0.0  # dropout rate on every hidden block's output (training steps only)
  conv_implementation: str = "auto"
  num_classes: int = 10
  dtype: Any = None  # computation dtype (None: float32); parameters stay float32

  @nn.compact
  def __call__(self, images, train: bool = False):
    # uint8 pixels (MNIST's (B, 28, 28), as always) are scaled to [0, 1]; float inputs
    # (standardized by the data pipeline, (B, H, W, C)) are taken as they are.
    x = images.astype(self.dtype or jnp.float32)
    if jnp.issubdtype(images.dtype, jnp.integer):
      x = x * (1.0 / 255.0)
    init = kernel_initializer(self.kernel_init, self.init_std)
    norm = self.norm.make()
    xhat = self.norm.epsilon if self.norm.norm in BATCH_STAT_NORMS else None
    index = 0
    if self.conv:
      if x.ndim == 3:  # (B, H, W): one channel (a reshape, as MNIST's always was)
        x = x.reshape(*x.shape, 1)
      for i, (channels, pool, has_bn) in enumerate(self.conv):
        last = i == len(self.conv) - 1
        flat = last and self.flatten_norm
        x = Block(
            lambda b, c=channels: Conv(
                c, (3, 3), use_bias=b, kernel_init=init,
                implementation=self.conv_implementation, dtype=self.dtype),
            self.activation, norm if has_bn else None, self.bn_position, index,
            flatten_before_norm=flat, pool=2 if pool else 0,
            xhat_epsilon=xhat if has_bn else None, bias_before_norm=self.bias_before_norm,
            dropout=self.dropout, name=f"conv_block_{i}")(x, train)
        index += 1
    x = x.reshape(x.shape[0], -1)
    for i, (width, has_bn) in enumerate(self.dense):
      x = Block(
          lambda b, w=width: nn.Dense(w, use_bias=b, kernel_init=init, dtype=self.dtype),
          self.activation, norm if has_bn else None, self.bn_position, index,
          xhat_epsilon=xhat if has_bn else None, bias_before_norm=self.bias_before_norm,
          dropout=self.dropout, name=f"dense_block_{i}")(x, train)
      index += 1
    logits = nn.Dense(self.num_classes, kernel_init=init, dtype=self.dtype, name="logits")(x)
    return logits.astype(jnp.float32)  # the loss and accuracy in float32


def compute_dtype(half_precision: bool):
  """The models' computation dtype: bfloat16 with `train.half_precision`, else None (float32)."""
  return jnp.bfloat16 if half_precision else None


def build_model(cfg, dtype=None, num_classes: int = 10) -> nn.Module:
  """The model described by `cfg` (the `model` section of a run config).

  `cfg.name` is a built-in network (`MODELS`) or your own, "package.module:target",
  imported and built here (`user_model`). `dtype`: the computation dtype.
  `num_classes`: the data's (`DataSpec.num_classes`), the built-in networks' logits.
  """
  if is_user_model(cfg.name):
    return user_model(cfg, dtype)
  if cfg.name not in MODELS:
    raise ValueError(f"model.name={cfg.name!r}; expected one of {MODELS}")
  if cfg.name == "resnet20":
    return _resnet20(cfg, dtype, num_classes)
  if cfg.activation not in ACTIVATIONS:
    raise ValueError(f"model.activation={cfg.activation!r}; expected one of {tuple(ACTIVATIONS)}")
  if cfg.bn_position not in BN_POSITIONS:
    raise ValueError(f"model.bn_position={cfg.bn_position!r}; expected one of {BN_POSITIONS}")
  widths = tuple(cfg.widths) or DEFAULT_WIDTHS[cfg.name]
  common = dict(
      activation=cfg.activation, norm=NormSpec.from_config(cfg, dtype),
      bn_position=cfg.bn_position, kernel_init=cfg.kernel_init, init_std=cfg.init_std,
      bias_before_norm=cfg.bn.get("bias_before", False), dropout=cfg.get("dropout", 0.0),
      conv_implementation=cfg.conv_implementation, num_classes=num_classes, dtype=dtype)
  if cfg.name in ("paper_mlp", "seed1_mlp"):
    return _classifier(conv=(), dense=tuple((w, True) for w in widths), **common)
  if cfg.name == "seed_cnn":
    # Conv32 relu, MaxPool 2, Conv64 relu, Flatten, BN, Dense64 relu, Dense10.
    c1, c2, d = _expect_widths(cfg, widths, 3)
    return _classifier(conv=((c1, True, False), (c2, False, True)),
                       dense=((d, False),),
                       flatten_norm=cfg.bn.get("statistics", "model") != "channel", **common)
  c1, c2 = _expect_widths(cfg, widths, 2)  # seed1_cnn: Conv32, Conv32, Dense10
  return _classifier(conv=((c1, False, True), (c2, False, True)), dense=(), **common)


def _resnet20(cfg, dtype, num_classes: int) -> nn.Module:
  """ResNet-20 (`bnlab.models.resnet`) from the `model` section: its norms before the
  activations, as the paper's."""
  if cfg.activation not in ACTIVATIONS:
    raise ValueError(f"model.activation={cfg.activation!r}; expected one of {tuple(ACTIVATIONS)}")
  if cfg.bn_position != "before":
    raise ValueError(f"model.bn_position={cfg.bn_position!r}: resnet20 puts each norm before "
                     "the activation (He et al. 2016); set model.bn_position='before'")
  options = cfg.get("resnet", {})
  return _cached(
      resnet.ResNet, stage_widths=tuple(_expect_widths(cfg, tuple(cfg.widths)
                                                       or DEFAULT_WIDTHS[cfg.name], 3)),
      num_classes=num_classes, norm=NormSpec.from_config(cfg, dtype),
      activation=cfg.activation, shortcut=options.get("shortcut", "A"),
      zero_init_last_scale=options.get("zero_init_last_scale", False),
      kernel_init=cfg.kernel_init, init_std=cfg.init_std,
      bias_before_norm=cfg.bn.get("bias_before", False), dropout=cfg.get("dropout", 0.0),
      conv_implementation=cfg.conv_implementation, dtype=dtype)


@functools.lru_cache(maxsize=128)
def _cached(cls, **fields) -> nn.Module:
  """One module per class and fields, as `_classifier`."""
  return cls(**fields)


@functools.lru_cache(maxsize=128)
def _classifier(**fields) -> Classifier:
  """One `Classifier` per set of fields: runs of one model in a process share its
  instance, and with it their compiled steps and evaluations (jit caches key on
  the `apply` bound to it)."""
  return Classifier(**fields)


def sown_names(model: nn.Module) -> tuple[str, ...]:
  """The names a model sows into `intermediates` from its submodules (`analysis.layers`).

  Like the built-ins' `preact_<i>`, a name counts when a direct submodule of
  the model sows it (`intermediates[submodule][name]`), where analyses read it.
  """
  variables = jax.eval_shape(
      lambda: model.init(init_rngs(jax.random.key(0)), jnp.zeros((2, 28, 28), jnp.uint8),
                         train=False, mutable=True))
  names = set()
  for block in variables.get("intermediates", {}).values():
    if isinstance(block, dict):
      names.update(k for k, v in block.items() if isinstance(v, tuple))
  return tuple(sorted(names))


def _expect_widths(cfg, widths, n):
  if len(widths) != n:
    raise ValueError(f"model.widths={widths} for {cfg.name} needs {n} entries")
  return widths


# Folded into the run's key before the step, so noise keys never equal the
# per-epoch shuffling keys fold_in(key, epoch).
NOISE_STREAM = 2**31 + 1
DROPOUT_STREAM = 2**31 + 2


def init_rngs(key: jax.Array) -> dict[str, jax.Array]:
  """The RNG streams of a model's `init`: `params` is `key` itself (what `model.init(key, ...)`
  gives, so parameters are unchanged), `dropout` and `noise` are folded from it.

  An NNX model takes its streams when it is built (`nnx.Dropout(rate, rngs=rngs)`,
  `bnlab.nnx.NoisyBatchNorm`), and through `nnx.bridge.to_linen` it is built at init
  with only the streams init is given: without these it could not be built.
  """
  return {"params": key,
          **{name: jax.random.fold_in(key, stream)
             for name, stream in (("noise", NOISE_STREAM), ("dropout", DROPOUT_STREAM))}}


def train_rngs(rng_data: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
  """The RNG streams of a train-mode apply at `step`, from a run's raw key data.

  {"noise": key, "dropout": key}: a key per step each, for norm="noisy" and for
  users' models with dropout (unused otherwise).
  """
  base = jax.random.wrap_key_data(rng_data)
  return {name: jax.random.fold_in(jax.random.fold_in(base, stream), step)
          for name, stream in (("noise", NOISE_STREAM), ("dropout", DROPOUT_STREAM))}


def normalized_features(cfg, image_hw: tuple[int, int] = (28, 28)) -> tuple[int, ...]:
  """The feature count (last axis) of each normalized layer of the model `cfg` describes,
  on images of `image_hw` (height, width)."""
  widths = tuple(cfg.widths) or DEFAULT_WIDTHS[cfg.name]
  statistics = cfg.bn.get("statistics", "model")
  h, w = image_hw
  if cfg.name == "seed_cnn" and statistics != "channel":
    # BN on the flattened maps of conv 2: 3x3 valid conv, pool 2, 3x3 valid conv (11x11).
    return (widths[1] * ((h - 2) // 2 - 2) * ((w - 2) // 2 - 2),)
  if cfg.name == "seed1_cnn" and statistics == "activation":
    # every (H, W, C) position of two 3x3 valid convs (26x26, 24x24)
    return tuple(c * (h - 2 * k) * (w - 2 * k) for c, k in zip(widths, (1, 2)))
  return widths


def pre_activation_names(name: str) -> tuple[str, ...]:
  """The names a model may sow, per hidden block: `preact_<i>`, then `xhat_<i>` (sown only
  where a batch-statistics norm sits before the activation)."""
  blocks = {"paper_mlp": 3, "seed_cnn": 3, "seed1_mlp": 2, "seed1_cnn": 2,
            "resnet20": 19}.get(name, 0)  # resnet20: the stem's, two per block
  return (tuple(f"preact_{i}" for i in range(blocks))
          + tuple(f"xhat_{i}" for i in range(blocks)))


def pre_activations(model: nn.Module, variables, images) -> dict[str, jax.Array]:
  """Each activation's input (`preact_<i>`) in inference mode, by name."""
  _, state = model.apply(variables, images, train=False, mutable=["intermediates"])
  inter = state["intermediates"]
  out = {}
  for block in inter.values():
    for name, values in block.items():
      out[name] = values[0]
  return out
