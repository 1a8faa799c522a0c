"""On-device augmentation of training batches: random crop with padding, horizontal flip.

Why inside the jitted train step, keyed by the run's key and the step: the data
stays on the device (no host round trip per batch), the same seed gives the same
augmented batches on every run, and a resumed run draws, at each step, what an
uninterrupted one drew, so it stays bit-identical. Evaluations never augment.

"crop" pads the image by `PADDING` pixels of zeros on each side and takes a random
window of the original size (He et al. 2016's CIFAR recipe); zeros are black for
uint8 inputs and the training split's mean colour for standardized ones. "flip"
mirrors each image left-right with probability 1/2. Each example draws its own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AUGMENTS = ("none", "crop_flip", "crop", "flip")
PADDING = 4
# Folded into the run's key before the step: apart from the shuffling keys
# fold_in(key, epoch) and the models' noise (2**31 + 1) and dropout (2**31 + 2) streams.
AUGMENT_STREAM = 2**31 + 3


def min_image_size(kind: str) -> int:
  """The smallest height and width `kind` makes sense for: a crop needs an image larger
  than twice its padding, or most windows would be mostly padding."""
  return 2 * PADDING + 1 if kind in ("crop", "crop_flip") else 2


def step_key(rng_data: jax.Array, step: jax.Array) -> jax.Array:
  """The augmentation key of `step` from a run's raw key data (`TrainState.rng`)."""
  base = jax.random.fold_in(jax.random.wrap_key_data(rng_data), AUGMENT_STREAM)
  return jax.random.fold_in(base, step)


def random_crop(key: jax.Array, images: jax.Array, padding: int = PADDING) -> jax.Array:
  """Each image of (B, H, W[, C]) padded by `padding` zeros and cropped back to (H, W) at a
  random offset drawn per example."""
  b, h, w = images.shape[:3]
  pad = [(0, 0), (padding, padding), (padding, padding)] + [(0, 0)] * (images.ndim - 3)
  padded = jnp.pad(images, pad)
  offsets = jax.random.randint(key, (b, 2), 0, 2 * padding + 1)

  def crop(image, offset):
    start = (offset[0], offset[1]) + (0,) * (image.ndim - 2)
    return jax.lax.dynamic_slice(image, start, (h, w) + image.shape[2:])

  return jax.vmap(crop)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
  """Each image of (B, H, W[, C]) mirrored left-right with probability 1/2."""
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
  flip = flip.reshape((-1,) + (1,) * (images.ndim - 1))
  return jnp.where(flip, images[:, :, ::-1], images)


def apply(kind: str, images: jax.Array, key: jax.Array) -> jax.Array:
  """`images` augmented by `kind` (one of `AUGMENTS`) with `key`; "none" returns them as
  they are (the step's program is then what it was without augmentation)."""
  if kind == "none":
    return images
  if kind not in AUGMENTS:
    raise ValueError(f"data.augment={kind!r}; expected one of {AUGMENTS}")
  crop_key, flip_key = jax.random.split(key)
  if kind in ("crop", "crop_flip"):
    images = random_crop(crop_key, images)
  if kind in ("flip", "crop_flip"):
    images = random_flip(flip_key, images)
  return images
