"""A trained run rebuilt from its work directory: `load_run` (also `bnlab.load_run`).

Why from the checkpoint's own copy of the config: config.json is a plain file a
user may have edited, while each checkpoint carries the config it was trained
with (`bnlab.rundir.identity`); the model built from that copy is the one the
weights belong to. A member of a grouped sweep finds its steps in its own
directory (the final state, written there at the end) and in its group's
stacked checkpoints (`SWEEP/_groups/ID/`), sliced to the member.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import jax
import ml_collections

from bnlab import config as config_lib
from bnlab import data as data_lib
from bnlab.engine.evaluation import eval_model_config
from bnlab.engine.members import GROUPS_DIR
from bnlab.models import networks as models
from bnlab.rundir import checkpoints as checkpoints_lib
from bnlab.rundir import identity
from bnlab.rundir.errors import WorkDirError


class LoadedRun(NamedTuple):
  """A run's model, trained variables, config and the step they are of.

  `model.apply(variables, images, train=False)` gives the logits the run's
  evaluations gave (the model built as it evaluates: `evaluation.eval_model_config`).
  """

  model: Any  # a flax.linen Module (an NNX model: its flax.nnx.bridge.to_linen wrapper)
  variables: dict  # {"params": ..., "batch_stats": ...} on the default device
  config: ml_collections.ConfigDict
  step: int


def load_run(workdir: str, step: int | None = None) -> LoadedRun:
  """The run in `workdir` at its newest checkpoint (or at `step`); WorkDirError (one line)
  naming what is missing where `workdir` holds no run, or no checkpoint (at `step`).

  `workdir`: a run's --workdir, or a sweep member's directory (SWEEP/NAME).
  """
  workdir = os.path.abspath(os.fspath(workdir))
  _check_is_run(workdir)
  found = _checkpoints(workdir)
  if not found:
    raise WorkDirError(f"{workdir} holds no checkpoint yet (a run saves its first at its first "
                       "evaluation); train it further, or load another run")
  if step is None:
    step = max(found)
  if isinstance(step, bool) or not isinstance(step, int) or step not in found:
    raise WorkDirError(f"{workdir} has no checkpoint at step {step!r}; it has steps "
                       f"{sorted(found)} (step=None: the newest)")
  step_dir, index = found[step]
  state = checkpoints_lib.read_checkpoint(step_dir)["state"]
  if index is None:
    cfg_json = _carried_config(step_dir) or identity.recorded_config(workdir)
  else:  # the group's stacked state, and the member's own config
    state = jax.tree.map(lambda x: x[index], state)
    cfg_json = identity.recorded_config(workdir)
  if not isinstance(cfg_json, dict):
    raise WorkDirError(f"the config of the run in {workdir} is unknown (no checkpoint carries "
                       "it and config.json is missing or damaged); restore config.json")
  cfg = config_of(cfg_json)
  model = models.build_model(eval_model_config(cfg.model),
                             dtype=models.compute_dtype(cfg.train.half_precision),
                             num_classes=_num_classes(cfg, workdir))
  variables = {"params": state["params"], "batch_stats": state.get("batch_stats") or {}}
  return LoadedRun(model, jax.device_put(variables), cfg, step)


def _num_classes(cfg, workdir: str) -> int:
  """The classes of the run's data (its logits), from the dataset's info."""
  try:
    return data_lib.spec_of(cfg.data).num_classes
  except data_lib.DataError as e:
    raise WorkDirError(f"the run in {workdir} trained on data.name={cfg.data.name!r}, whose "
                       f"classes are read from its TFDS info: {e}") from None


def config_of(recorded: dict) -> ml_collections.ConfigDict:
  """A run config from its recorded JSON over `base_config()`: keys an older run lacks take
  their defaults (as when it resumes)."""
  def merge(node, values: dict, prefix: str) -> None:
    for key, value in values.items():
      if (isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict)
          and f"{prefix}{key}" not in config_lib.FREE_FORM):
        merge(node[key], value, f"{prefix}{key}.")
      else:
        node[key] = value
  cfg = config_lib.base_config()
  merge(cfg, recorded, "")
  return cfg


def _check_is_run(workdir: str) -> None:
  if not os.path.isdir(workdir):
    raise WorkDirError(f"{workdir} is not a directory; give a run's --workdir")
  names = set(os.listdir(workdir))
  if names & {"config.json", "checkpoints", "summary.json", "metrics.jsonl"}:
    return
  if names & {GROUPS_DIR, "results.json", ".sweep-lock"}:
    members = sorted(n for n in names if os.path.isdir(os.path.join(workdir, n))
                     and not n.startswith(("_", ".")))
    raise WorkDirError(f"{workdir} is a sweep's directory; load one member's, e.g. "
                       f"{os.path.join(workdir, members[0] if members else 'NAME')}")
  if "runs" in names or "study.json" in names:
    raise WorkDirError(f"{workdir} is a study's directory; load one of its runs, in "
                       f"{os.path.join(workdir, 'runs')}/NAME")
  raise WorkDirError(f"{workdir} holds no bnlab run (no config.json, no checkpoints/); give "
                     "a run's --workdir, or a sweep member's directory")


def _steps(ckpt_dir: str) -> list[int]:
  try:
    return [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()]
  except OSError:
    return []


def _checkpoints(workdir: str) -> dict[int, tuple[str, int | None]]:
  """{step: (checkpoint directory, the member's index in it or None)}: the run's own
  checkpoints, and for a sweep member those of its groups (its own first)."""
  found = {}
  groups = os.path.join(os.path.dirname(workdir), GROUPS_DIR)
  name = os.path.basename(workdir)
  for group in sorted(os.listdir(groups)) if os.path.isdir(groups) else []:
    path = os.path.join(groups, group)
    recorded = identity.recorded_config(path) or {}
    listed = [m.get("workdir") for m in recorded.get("members") or []
              if isinstance(m, dict)]
    if name in listed:
      for step in _steps(os.path.join(path, "checkpoints")):
        found[step] = (os.path.join(path, "checkpoints", str(step)), listed.index(name))
  for step in _steps(os.path.join(workdir, "checkpoints")):
    found[step] = (os.path.join(workdir, "checkpoints", str(step)), None)
  return found


def _carried_config(step_dir: str) -> dict | None:
  """The config checkpoint `step_dir` carries (`checkpoints.CHECKSUMS`), or None."""
  try:
    with open(os.path.join(step_dir, checkpoints_lib.CHECKSUMS)) as f:
      value = json.load(f).get("config")
  except (OSError, ValueError, AttributeError):
    return None
  return value if isinstance(value, dict) else None
