"""Ioffe & Szegedy (2015), section 4.1: 784-100-100-100-10 sigmoid MLP, batch 60, 50,000 SGD steps.

BN sits before each sigmoid and the preceding Dense has no bias. The paper does
not state the learning rate or initialisation; bnlab's choices, fixed by rule
before looking at test results (see results/paper_figure1/report.md):
- LeCun normal N(0, 1/fan_in) init: "small random Gaussian values" that start
  every sigmoid input with O(1) spread;
- lr 1.0: of {0.01, 0.1, 1}, the rate at which the network *without* BN reaches
  the lowest training loss, so the baseline gets its best rate.
"""

from bnlab.config import base_config


def get_config():
  c = base_config()
  c.model.name = "paper_mlp"
  c.model.norm = "batch"
  c.model.bn_position = "before"
  c.model.activation = "sigmoid"
  c.model.kernel_init = "lecun_normal"
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 1.0
  c.train.batch_size = 60
  c.train.num_steps = 50_000
  c.train.eval_every_steps = 1_000
  c.train.log_every_steps = 1_000
  return c
