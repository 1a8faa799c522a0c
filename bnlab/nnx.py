"""bnlab's Flax NNX layers as a module: `from bnlab.nnx import BatchNorm`.

`BatchNorm`, `BatchRenorm`, `GhostBatchNorm`, `NoisyBatchNorm` and `BatchNormVariant`
live in `bnlab.layers.nnx` (beside the linen ones in `bnlab.layers.linen`); this
module re-exports them so that both `bnlab.nnx.BatchNorm` and `from bnlab.nnx import
...` work, as they do for `flax.nnx`. Any other name of `bnlab.layers.nnx` is reached
through it too (module `__getattr__`), so what the layers gain appears here unchanged.
"""

from __future__ import annotations

from bnlab.layers import nnx as _layers_nnx
from bnlab.layers.nnx import (BatchNorm, BatchNormVariant, BatchRenorm, GhostBatchNorm,
                              NoisyBatchNorm)

__all__ = ["BatchNorm", "BatchNormVariant", "BatchRenorm", "GhostBatchNorm", "NoisyBatchNorm"]


def __getattr__(name: str):
  try:
    return getattr(_layers_nnx, name)
  except AttributeError:
    raise AttributeError(f"module 'bnlab.nnx' has no attribute {name!r}") from None


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(dir(_layers_nnx)))
