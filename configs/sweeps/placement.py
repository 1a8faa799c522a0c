"""BN before vs after the activation, for the paper MLP and the seed CNN, at two learning rates.

  python -m bnlab.sweep --config=configs/sweeps/placement.py --workdir=runs/placement

Same models and step budgets as `lr_sweep.py`; 3 seeds. Each (model,
position) pair's learning rates and seeds train as one grouped program.
"""

import importlib.util
import os

from bnlab import config as config_lib
from bnlab import sweep

LEARNING_RATES = (0.1, 1.0)
NUM_SEEDS = 3


def _lr_sweep():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lr_sweep.py")
  spec = importlib.util.spec_from_file_location("bnlab_lr_sweep_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  return config_lib.base_config()


def get_sweep():
  return sweep.product(
      _lr_sweep().model_variants(),
      sweep.axis("model.bn_position", ["before", "after"]),
      sweep.axis("optimizer.learning_rate", LEARNING_RATES),
      sweep.seeds(NUM_SEEDS))
