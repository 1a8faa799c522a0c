"""The learning-rate study: {paper MLP, seed CNN} x {BN, no BN} x 8 learning rates x 3 seeds.

  python -m bnlab.sweep --config=configs/sweeps/lr_sweep.py --workdir=runs/lr_sweep

Each model keeps its own config file's setup (`configs/paper_mlp.py`: sigmoid,
BN before the activation, batch 60; `configs/seed_cnn.py`: batch
32) with a fixed step budget and frequent evaluation for "steps to 97%". The
24 members of each (model, norm) pair differ only in learning rate and seed:
the MLP's train as one grouped program; the CNN's run one by one on CPU
(vmapped convolutions are slower there, see `bnlab.train.grouping_helps`).

Budget, measured on the shared 2-core CPU (load ~6): the grouped MLP costs
~1.3 ms per member-step, so 48 x 10,000 steps ~ 10 min; a solo seed CNN step
~16 ms plus ~8 s of compiling and 10,000-image evaluations per run, so
48 x 600 steps ~ 13 min: about 23 minutes in all, less on an idle machine.
"""

import os

from bnlab import config as config_lib
from bnlab import sweep

LEARNING_RATES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
NUM_SEEDS = 3
MLP_STEPS = 10_000  # 10 epochs at batch 60
MLP_EVAL_EVERY = 250
CNN_STEPS = 600  # 19,200 examples, a third of an epoch at batch 32
CNN_EVAL_EVERY = 150

_CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def model_variants(mlp_steps=MLP_STEPS, cnn_steps=CNN_STEPS):
  """The two models as labelled override bundles, with their step budgets."""
  mlp = sweep.load_config_file(os.path.join(_CONFIGS, "paper_mlp.py")).get_config()
  mlp.train.num_steps = mlp_steps
  mlp.train.eval_every_steps = mlp.train.log_every_steps = MLP_EVAL_EVERY
  cnn = sweep.load_config_file(os.path.join(_CONFIGS, "seed_cnn.py")).get_config("bn")
  cnn.train.num_steps = cnn_steps
  cnn.train.eval_every_steps = cnn.train.log_every_steps = CNN_EVAL_EVERY
  cnn.train.final_train_eval = False  # 60,000-image evaluations would dominate
  return sweep.variants("model", {"paper_mlp": sweep.config_overrides(mlp),
                                  "seed_cnn": sweep.config_overrides(cnn)})


def get_config():
  return config_lib.base_config()


def get_sweep():
  return sweep.product(
      model_variants(),
      sweep.axis("model.norm", ["batch", "none"]),
      sweep.axis("optimizer.learning_rate", LEARNING_RATES),
      sweep.seeds(NUM_SEEDS))
