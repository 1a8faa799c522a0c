"""Work directories for the tests that open a bnlab WorkDir directly, without training."""

import json
import logging

import numpy as np

from bnlab import config as config_lib
from bnlab.rundir import workdir as workdir_lib


def config(**train):
  c = config_lib.base_config()
  c.train.checkpoint_min_interval_secs = 0  # every checkpoint offered is written
  for key, value in train.items():
    c.train[key] = value
  return c


def open_workdir(path, cfg=None):
  return workdir_lib.WorkDir(str(path), cfg or config())


def warnings_of(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def tree(value):
  return {"w": np.full(2000, value, np.float32), "b": np.arange(7, dtype=np.int32) * value}


def saved(path, steps):
  wd = open_workdir(path, config(keep_checkpoints=10))
  try:
    for step in steps:
      wd.save(step, tree(float(step)))
    wd.wait()
  finally:
    wd.close()


def strict_json(text):
  """json.loads that refuses NaN/Infinity (what other JSON readers do)."""
  def refuse(name):
    raise ValueError(f"not JSON: {name}")
  return json.loads(text, parse_constant=refuse)
