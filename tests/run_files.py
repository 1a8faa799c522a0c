"""Reading what a run left in its work directory, for the end-to-end tests."""

import json
import os

import jax
import numpy as np


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def final_state(workdir):
  """(step, train state as numpy arrays) of a run's newest checkpoint."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = mngr.latest_step()
  return step, jax.tree.map(np.asarray, mngr.restore(step)["state"])
