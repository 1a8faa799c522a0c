"""bnlab: Batch Normalization layers and experiments for JAX/Flax.

Layers: `batch_norm` / `batch_moments` (pure functions), `BatchNorm`
(flax.linen, drop-in for `flax.linen.BatchNorm`), `nnx.BatchNorm` (Flax NNX),
and the variants `BatchRenorm`, `GhostBatchNorm`, `NoisyBatchNorm`,
`BatchNormVariant` (frozen statistics, population averages; linen here, NNX
under `bnlab.nnx`) over the pure functions in `bnlab.layers.variants`.

Experiments: `train_and_evaluate(config, workdir)` (`bnlab.engine.train`) and
`load_run(workdir)` (a trained run's model, variables and config: `bnlab.engine.load`),
imported on first use so that a model using only the layers never loads the engine.
"""

from bnlab import data
from bnlab import nnx
from bnlab.layers import variants
from bnlab.layers.functional import BatchNormOutput, Moments, batch_moments, batch_norm
from bnlab.layers.linen import (BatchNorm, BatchNormVariant, BatchRenorm, GhostBatchNorm,
                                NoisyBatchNorm)

__all__ = ["data", "nnx", "variants", "BatchNorm", "BatchNormOutput", "BatchNormVariant",
           "BatchRenorm", "GhostBatchNorm", "Moments", "NoisyBatchNorm", "batch_moments",
           "batch_norm"]
__version__ = "0.1.0"


def __getattr__(name: str):
  if name == "train_and_evaluate":
    from bnlab.engine.train import train_and_evaluate  # pylint: disable=g-import-not-at-top
    return train_and_evaluate
  if name == "load_run":
    from bnlab.engine.load import load_run  # pylint: disable=g-import-not-at-top
    return load_run
  raise AttributeError(f"module 'bnlab' has no attribute {name!r}")
