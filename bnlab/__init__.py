"""bnlab: Batch Normalization layers and experiments for JAX/Flax."""
