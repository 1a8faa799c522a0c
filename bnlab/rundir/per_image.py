"""Which test images a run classified correctly, as compact text for its records.

An evaluation's `test_correct*` record value holds one bit per test image (1:
classified correctly), in the test set's order: `f"{n}:{b64}"`, `n` the number
of images and `b64` the standard base64 of `np.packbits(correct,
bitorder="little")` (image i is bit i % 8 of byte i // 8; the last byte's
unused bits are 0). ASCII, self-describing, ~1.7 KB per 10,000 images.

Why: two models scored on the same test images are paired, so the test-set noise
of their accuracy difference comes from the images on which they disagree
(e.g. McNemar's test, or a paired bootstrap over images); accuracies alone
cannot give it. numpy only: the study package imports it without JAX.
"""

from __future__ import annotations

import base64
import binascii
import re

import numpy as np

_FORMAT = re.compile(r"(0|[1-9][0-9]*):([A-Za-z0-9+/]*={0,2})")


def encode(correct) -> str:
  """`correct` (a 1-D vector of bools, one per test image, in order) as `"{n}:{base64}"`."""
  correct = np.asarray(correct)
  if correct.ndim != 1:
    raise ValueError(f"per-image results are a 1-D vector, not of shape {correct.shape}")
  if correct.dtype != np.bool_:
    raise ValueError(f"per-image results are bools, not {correct.dtype}")
  packed = np.packbits(correct, bitorder="little")
  return f"{correct.size}:{base64.b64encode(packed.tobytes()).decode('ascii')}"


def decode(text: str) -> np.ndarray:
  """The bool vector that `encode` wrote as `text`; ValueError when `text` is not such text."""
  if not isinstance(text, str):
    raise ValueError(f"per-image results are text \"N:BASE64\", not {type(text).__name__}")
  shown = text if len(text) <= 40 else text[:37] + "..."
  match = _FORMAT.fullmatch(text)
  if match is None:
    raise ValueError(f"per-image results {shown!r} are not \"N:BASE64\" (N the number of "
                     "images, then the base64 of their bits)")
  n = int(match.group(1))
  try:
    raw = base64.b64decode(match.group(2), validate=True)
  except (binascii.Error, ValueError) as e:
    raise ValueError(f"per-image results {shown!r}: the bits are not valid base64 ({e})") from None
  if len(raw) != -(-n // 8):
    raise ValueError(f"per-image results {shown!r}: {len(raw)} bytes of bits, but {n} images "
                     f"take {-(-n // 8)}")
  bits = np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")
  if bits[n:].any():
    raise ValueError(f"per-image results {shown!r}: bits set past the {n} images")
  return bits[:n].astype(bool)
