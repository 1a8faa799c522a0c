"""bnlab: Batch Normalization layers and experiments for JAX/Flax.

Layers: `batch_norm` / `batch_moments` (pure functions), `BatchNorm`
(flax.linen, drop-in for `flax.linen.BatchNorm`), `nnx.BatchNorm` (Flax NNX).
"""

from bnlab import data
from bnlab import norm_nnx as nnx
from bnlab.norm import BatchNormOutput, Moments, batch_moments, batch_norm
from bnlab.norm_linen import BatchNorm

__all__ = ["data", "BatchNorm", "BatchNormOutput", "Moments", "batch_moments", "batch_norm", "nnx"]
__version__ = "0.1.0"
