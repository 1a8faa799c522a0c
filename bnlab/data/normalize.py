"""Per-channel standardization of uint8 images: the statistics and the mapping.

Why a lookup table: a uint8 pixel has 256 values, so (v / 255 - mean_c) / std_c is
computed once per value and channel in float64 and rounded to float32; every image,
on the host for the device-resident data or in a grain worker for streamed batches,
then gets exactly the same float32 numbers, and the result equals a float64
reference rounded once.

The statistics are those of the training split as loaded (all of it, before
`data.num_train` takes a subset, so a subset run standardizes as the full run does),
from the pixel-value histogram per channel: exact in float64 and one pass over the
bytes, whatever the dataset's size.
"""

from __future__ import annotations

import numpy as np

Stats = tuple[tuple[float, ...], tuple[float, ...]]  # (mean per channel, std per channel)
# A channel whose training pixels all have one value has std 0; it is divided by 1.
MIN_STD = 1e-12


def channels(images: np.ndarray) -> int:
  """Channels of a batch of images: (N, H, W) has one, (N, H, W, C) has C."""
  return 1 if images.ndim == 3 else images.shape[-1]


def histogram(images: np.ndarray) -> np.ndarray:
  """(channels, 256) int64 counts of each pixel value per channel."""
  c = channels(images)
  flat = np.asarray(images, np.uint8).reshape(-1, c)
  return np.stack([np.bincount(flat[:, k], minlength=256) for k in range(c)]).astype(np.int64)


def stats_from_histogram(counts: np.ndarray) -> Stats:
  """Mean and (population) standard deviation per channel of pixels in [0, 1]."""
  values = np.arange(256, dtype=np.float64) / 255.0
  n = counts.sum(axis=1).astype(np.float64)
  if not np.all(n > 0):
    raise ValueError("per-channel statistics of an empty training split")
  mean = (counts * values).sum(axis=1) / n
  var = (counts * (values[None, :] - mean[:, None]) ** 2).sum(axis=1) / n
  std = np.sqrt(var)
  return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def channel_stats(images: np.ndarray) -> Stats:
  """(mean, std) per channel of uint8 `images` scaled to [0, 1], in float64."""
  return stats_from_histogram(histogram(images))


def lookup_table(stats: Stats) -> np.ndarray:
  """(channels, 256) float32: the standardized value of each uint8 pixel per channel."""
  mean, std = (np.asarray(s, np.float64) for s in stats)
  std = np.where(std < MIN_STD, 1.0, std)
  values = np.arange(256, dtype=np.float64) / 255.0
  return ((values[None, :] - mean[:, None]) / std[:, None]).astype(np.float32)


def standardize(images: np.ndarray, stats: Stats | None, table: np.ndarray | None = None
                ) -> np.ndarray:
  """uint8 `images` as the model takes them: unchanged without `stats`, else float32
  (v / 255 - mean_c) / std_c per channel (the last axis; (N, H, W) is one channel)."""
  if stats is None:
    return images
  table = lookup_table(stats) if table is None else table
  images = np.asarray(images)
  if images.ndim == 3 or images.shape[-1] == 1:
    return table[0][images]
  out = np.empty(images.shape, np.float32)
  for k in range(images.shape[-1]):
    out[..., k] = table[k][images[..., k]]
  return out
