"""The seed comparison: the Keras tutorial CNN, SGD, batch 32, 20 epochs.

`--config=configs/seed_cnn.py` (or `:bn`) is the BN side at lr 0.01;
`--config=configs/seed_cnn.py:nobn` is the same CNN without BN at lr 0.001.
"""

from bnlab.config import base_config


def get_config(variant: str = "bn"):
  if variant not in ("bn", "nobn"):
    raise ValueError(f"configs/seed_cnn.py:{variant}: expected ':bn' or ':nobn'")
  c = base_config()
  c.model.name = "seed_cnn"
  c.model.norm = "batch" if variant == "bn" else "none"
  c.model.bn_position = "after"  # the seed: Flatten -> BatchNormalization
  c.model.kernel_init = "glorot_uniform"  # Keras' default
  c.model.bn.momentum = 0.99  # Keras' default
  c.model.bn.epsilon = 1e-3  # Keras' default
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.01 if variant == "bn" else 0.001
  c.train.batch_size = 32  # Keras' default
  c.train.num_epochs = 20
  c.train.log_every_steps = 625  # three progress lines per epoch
  return c
