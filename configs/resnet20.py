"""ResNet-20 with BN, He et al. 2016's CIFAR-10 recipe (Deep Residual Learning, §4.2).

`--config=configs/resnet20.py` (or `:bn`) is the paper's network and training;
`--config=configs/resnet20.py:nobn` the same network and training without BN (convs
regain their biases), the comparison BN studies make.

The recipe: SGD with momentum 0.9 (not Nesterov), batch 128, learning rate 0.1 divided by
10 at 32k and 48k steps, 64k steps, weight decay on the kernels (not BN's scale and shift,
nor biases), He init, shortcut option A (parameter-free).

Where bnlab differs from the paper, and why:
- Weight decay: bnlab's is decoupled (`-learning_rate * weight_decay * param`, outside the
  momentum), the paper's an L2 term in the gradient, which momentum 0.9 accumulates to
  1 / (1 - 0.9) = 10 times its size in steady state; 1e-3 decoupled is the paper's 1e-4
  L2 at every learning rate.

Data: MNIST (the default) runs now, 28x28 grey images into the same network (stride-2
stages: 28 -> 14 -> 7). The paper's data is CIFAR-10 (`--config.data.name=cifar10`, once
prepared), with 4-pixel padding, random 32x32 crops and horizontal flips for training.
"""

from bnlab.config import base_config


def get_config(variant: str = "bn"):
  if variant not in ("bn", "nobn"):
    raise ValueError(f"configs/resnet20.py:{variant}: expected ':bn' or ':nobn'")
  c = base_config()
  c.model.name = "resnet20"
  c.model.norm = "batch" if variant == "bn" else "none"
  c.model.bn_position = "before"  # conv -> BN -> ReLU; a block's last BN before the addition
  c.model.kernel_init = "he_normal_fan_out"  # He et al. 2015, as torchvision's ResNets
  c.model.resnet.shortcut = "A"  # zero-padded identity: the paper's CIFAR networks
  c.model.bn.momentum = 0.9  # Torch's BN (the paper's implementation): 0.1 of each batch
  c.model.bn.epsilon = 1e-5
  c.model.bn.statistics = "channel"  # per feature map, as a conv net's BN (the paper's)
  c.optimizer.name = "momentum"
  c.optimizer.momentum = 0.9
  c.optimizer.learning_rate = 0.1
  c.optimizer.schedule = "piecewise"
  c.optimizer.decay_factor = 0.1
  c.optimizer.decay_boundaries = (32_000, 48_000)
  c.optimizer.weight_decay = 1e-3  # decoupled; = the paper's 1e-4 L2 under momentum 0.9
  c.optimizer.weight_decay_mask = "kernels"
  c.train.batch_size = 128
  c.train.num_steps = 64_000
  c.train.eval_every_steps = 2_000
  c.train.log_every_steps = 500
  return c
