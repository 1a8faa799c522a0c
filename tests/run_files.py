"""Reading (and damaging) what a run left in its work directory, for the end-to-end tests."""

import json
import os

import jax
import numpy as np

from bnlab.rundir import strict_json


def files(wd):
  """{relative path: bytes} of every file under `wd` ({} if it is not a directory)."""
  out = {}
  if os.path.isdir(wd):
    for dirpath, _, names in os.walk(wd):
      for name in names:
        path = os.path.join(dirpath, name)
        with open(path, "rb") as f:
          out[os.path.relpath(path, wd)] = f.read()
  return out


def read_jsonl(path):
  """The records of a .jsonl file, non-finite numbers restored (see bnlab.rundir.workdir)."""
  with open(path) as f:
    return [strict_json.decode_nonfinite(json.loads(line)) for line in f]


def damage_checkpoint_payload(step_dir):
  """Flips bytes amid a checkpoint's largest array data file; returns its path in step_dir.

  orbax alone restores such a checkpoint without complaint (wrong numbers).
  """
  data = [os.path.join(d, n) for d, _, files in os.walk(os.path.join(step_dir, "default"))
          for n in files if os.path.basename(d) == "d"]
  path = max(data, key=os.path.getsize)
  with open(path, "rb") as f:
    raw = bytearray(f.read())
  for i in range(len(raw) // 2, len(raw) // 2 + 16):
    raw[i] ^= 0xFF
  with open(path, "wb") as f:
    f.write(bytes(raw))
  return os.path.relpath(path, step_dir)


def final_state(workdir):
  """(step, train state as numpy arrays) of a run's newest checkpoint.

  Restored as host arrays, so it reads checkpoints written on any devices
  (e.g. a mesh over several processes) in this one process.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt_dir = os.path.join(workdir, "checkpoints")
  step = ocp.CheckpointManager(ckpt_dir).latest_step()
  path = os.path.join(ckpt_dir, str(step), "default")
  checkpointer = ocp.PyTreeCheckpointer()
  meta = checkpointer.metadata(path)
  meta = getattr(meta, "item_metadata", meta).tree  # orbax 0.11.20: the tree metadata itself
  args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  return step, checkpointer.restore(path, restore_args=args)["state"]
