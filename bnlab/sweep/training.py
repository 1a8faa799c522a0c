"""Training a sweep's groups in this process: one group's directories, its data kept for the
next, and its failures as one line per member.

Shared by the local workers' loop (`bnlab.sweep.runner`) and the Ray tasks
(`bnlab.sweep.ray_launcher`), so a group trains alike wherever it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Sequence

from bnlab import config as config_lib
from bnlab.sweep.groups import Member
from bnlab.errors import one_line


def error_line(e: BaseException) -> str:
  """A member's error as one line of a results row (or a message), its type first."""
  text = one_line(e, None)
  return f"{type(e).__name__}: {text}"[:2000]


class GroupTrainer:
  """Trains one group after another in this process, keeping what they share: the loaded
  dataset, and the compiled programs while the groups' model and size stay the same."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.datasets: dict[str, Any] = {}
    self.sizes: dict[str, int] = {}  # `size_key` -> training examples, once loaded
    self.programs = None  # what the compiled programs in memory were made for
    self.loading = 0.0  # seconds the last group spent loading its data

  def train_group(self, group, loaded=lambda: None) -> tuple[dict[str, str], bool]:
    """Trains (or resumes) `group` in the sweep's directory, calling `loaded()` once its
    data is in memory; ({member: error} of its members that failed, whether it trained
    without an error). A failed group's members that finished before keep their results."""
    from absl import logging  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    from bnlab.engine import members as members_lib  # pylint: disable=g-import-not-at-top
    from bnlab.engine import train  # pylint: disable=g-import-not-at-top
    dirs = [os.path.join(self.workdir, m.name) for m in group]
    # A group whose programs differ from the last one's (another model, or
    # group size) first drops the compiled programs in memory: a long sweep's
    # compiled code, and its memory mappings, would otherwise grow without
    # bound (XLA:CPU maps every executable; Linux allows ~65,000 mappings).
    # The persistent compilation cache makes a program needed again cheap;
    # runs of one model one after another keep theirs.
    made_for = (members_lib.group_key(group[0].cfg), len(group))
    if self.programs not in (None, made_for):
      jax.clear_caches()
    self.programs = made_for
    try:
      key = _data_key(group[0].cfg)
      if key not in self.datasets:
        start = time.perf_counter()
        self.datasets.clear()
        self.datasets[key] = train.load_data(group[0].cfg)
        self.loading = time.perf_counter() - start
        self.sizes[size_key(group[0].cfg)] = len(self.datasets[key].train_labels)
      loaded()
      if len(group) == 1:
        train.train_and_evaluate(group[0].cfg, dirs[0], self.datasets[key])
      else:
        train.train_group([m.cfg for m in group], dirs,
                          os.path.join(self.workdir, members_lib.GROUPS_DIR, group_id(group)),
                          self.datasets[key])
    except Exception as e:  # pylint: disable=broad-except
      message = error_line(e)
      # A member that finished before keeps its results.
      failed = [m for m, d in zip(group, dirs) if not train.is_complete(m.cfg, d)]
      logging.error("Sweep members %s failed: %s", [m.name for m in failed], message)
      return {m.name: message for m in failed}, False
    return {}, True


def timesplit_seconds() -> float:
  from bnlab.engine import timesplit  # pylint: disable=g-import-not-at-top
  return timesplit.compile_seconds()


def group_complete(group: Sequence[Member], workdir: str) -> bool:
  """Whether every member of `group` has finished in `workdir` (maybe by another worker)."""
  from bnlab.engine import train  # pylint: disable=g-import-not-at-top
  return all(train.is_complete(m.cfg, os.path.join(workdir, m.name)) for m in group)


def size_key(cfg) -> str:
  """Configs with equal keys read data of one size."""
  return json.dumps(cfg.data.to_dict(), sort_keys=True)


def _data_key(cfg) -> str:
  """Groups with equal keys train on the same loaded dataset."""
  return size_key(cfg) + str(cfg.train.batch_size)


def group_id(group: Sequence[Member]) -> str:
  """The group's directory name: its members and configs, less what may change on resume.

  So a group resumes in the same directory after its length (or another key of
  `config.RESUME_SAFE_KEYS`) changed; its config check decides whether it may.
  """
  changeable = config_lib.RESUME_SAFE_KEYS + config_lib.LENGTH_KEYS
  parts = []
  for m in group:
    flat = config_lib.flatten(json.loads(m.cfg.to_json_best_effort()))
    parts.append([m.name, {k: v for k, v in sorted(flat.items()) if k not in changeable}])
  return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:12]
