"""The layers: BN as pure functions (`functional`, `variants`) and as Flax modules (`linen`, `nnx`).

Nothing here imports the engine, so a model that only wants the layers pays for
jax and flax alone.
"""
