"""First seed's MLP: Dense16, Dense32, Dense10 with relu, BN before each activation."""

from bnlab.config import base_config


def get_config():
  c = base_config()
  c.model.name = "seed1_mlp"
  c.model.norm = "batch"
  c.model.bn_position = "before"
  c.optimizer.learning_rate = 0.01
  c.train.batch_size = 32
  c.train.num_epochs = 5
  return c
