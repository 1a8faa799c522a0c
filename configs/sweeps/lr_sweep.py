"""The learning-rate study's runs as a plain sweep (no report, claims or figures).

  python -m bnlab.sweep --config=configs/sweeps/lr_sweep.py --workdir=runs/lr_sweep_runs

The members are those of configs/studies/lr_sweep.py; run that study with
`python -m bnlab.study` for its report.
"""

import os

from bnlab import config as config_lib
from bnlab import sweep

_STUDY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "studies", "lr_sweep.py")


def get_config():
  return config_lib.base_config()


def get_sweep():
  return sweep.load_config_file(_STUDY).get_sweep()
