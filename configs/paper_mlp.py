"""Ioffe & Szegedy (2015), section 4.1: 784-100-100-100-10 sigmoid MLP, batch 60, 50,000 SGD steps.

BN sits before each sigmoid and the preceding Dense has no bias. The paper does
not state the learning rate or initialisation; these are bnlab's choices.
"""

from bnlab.config import base_config


def get_config():
  c = base_config()
  c.model.name = "paper_mlp"
  c.model.norm = "batch"
  c.model.bn_position = "before"
  c.model.activation = "sigmoid"
  c.model.kernel_init = "normal"  # N(0, 1): "small random Gaussian values" leave
  c.model.init_std = 1.0          # the sigmoid inputs drifting, as in the paper
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.5
  c.train.batch_size = 60
  c.train.num_steps = 50_000
  c.train.eval_every_steps = 1_000
  c.train.log_every_steps = 1_000
  return c
