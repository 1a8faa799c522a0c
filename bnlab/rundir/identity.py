"""A run's identity: its config and its data, which a rerun must match to resume it.

config.json and data.json say what the directory's run trained; a rerun
with another config or other data would mix two runs in one directory's
checkpoints and records, so it is refused, naming the difference, unless the
directory holds nothing to resume (then the new config starts over) or the
change is one a resume allows (`bnlab.config.resume_refusal`).
"""

from __future__ import annotations

import json
import os

from absl import logging

from bnlab import data as data_lib
from bnlab.config import ConfigError, changed_keys, flatten, resume_refusal
from bnlab.rundir.checkpoints import newest_record
from bnlab.rundir.errors import WorkDirError, io_error
from bnlab.rundir.files import aside_path, atomic_write, read_json_object


class RunIdentity:
  """Checks and writes config.json and data.json; the copy each checkpoint carries."""

  def __init__(self, path: str, primary: bool):
    self.path = path
    self.primary = primary
    self._ckpt_dir = os.path.join(path, "checkpoints")
    self._metrics_path = os.path.join(path, "metrics.jsonl")
    self.config_json: dict | None = None  # the run's config, copied into each checkpoint
    self._pending_config: dict | None = None  # config.json to write at the run's first write
    self._data_identity: dict | None = None  # and the data's (check_data)

  def carried(self) -> dict:
    """What each checkpoint carries of the run (restores a lost config.json or data.json)."""
    return {"config": self.config_json, "data": self._data_identity}

  def check_config(self, cfg) -> None:
    """Compares `cfg` with config.json; writes it to a directory without one.

    A directory that holds no checkpoint and no summary has trained nothing
    that could be resumed: it accepts another config (the old config.json,
    and with it the metrics and TensorBoard events of that attempt, if any,
    are kept as <name>.replaced-<time>). A run whose config.json is missing
    is compared with the copy its newest checkpoint carries (config.json is
    then restored from it); without any copy it is refused.
    """
    path = os.path.join(self.path, "config.json")
    new = json.loads(cfg.to_json_best_effort())
    self.config_json = new
    old, restored = None, False
    if os.path.exists(path):
      try:
        old = read_json_object(path, ": this run's config is unknown; restore the file, or "
                                "use a new --workdir")
      except WorkDirError:
        if self._holds_a_run():
          raise
    elif self._holds_a_run():
      old = newest_record(self._ckpt_dir, "config")
      if old is None:
        raise WorkDirError(
            f"{path} is missing, and no checkpoint in {self._ckpt_dir} carries a copy: this "
            "run's config is unknown; restore the file, or use a new --workdir")
      restored = True
      logging.warning("%s is missing: comparing with the config the newest checkpoint "
                      "carries, and restoring it", path)
    if old is not None:
      a, b = flatten(old), flatten(new)
      # Keys the snapshot lacks were added to bnlab after the run started; a
      # resumed run takes their defaults, so they do not count as a change; nor
      # do `distributed` keys (`changed_keys`): a run may resume with other
      # processes or addresses. RESUME_SAFE_KEYS and the run's length may change.
      diff = changed_keys(a, b)
      if not diff and not restored:
        return
      refused, reason = resume_refusal(a, b)
      shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}"
                        for k in (refused or diff)[:5])
      where = " (config.json is missing; compared with its newest checkpoint's copy)" \
          if restored else ""
      if refused and self._holds_a_run():
        if reason:
          raise ConfigError(f"work directory {self.path} holds a run that cannot resume "
                            f"with {shown}{where}: {reason}")
        raise ConfigError(
            f"work directory {self.path} holds a run with a different config "
            f"({shown}){where}; use a new --workdir, or rerun with the same config to resume "
            "(what may change on resume: bnlab.config.RESUME_SAFE_KEYS and the run's "
            "length)")
      if not refused:
        if diff:
          logging.info("Resuming the run in %s with %s", self.path, shown)
        if self.primary and restored:
          atomic_write(path, json.dumps(old, indent=2, sort_keys=True) + "\n")
        # The new config replaces config.json with the run's first write: a run refused
        # before it (e.g. made shorter) leaves the file as it was.
        self._pending_config = new if diff else None
        return
      if self.primary:
        self._replace_config(shown)
    elif os.path.exists(path) and self.primary:
      self._replace_config("config.json unreadable")
    if self.primary:
      atomic_write(path, json.dumps(new, indent=2, sort_keys=True) + "\n")

  def check_data(self, identity: dict) -> None:
    """Compares the data's identity with the run's (data.json); records it.

    `identity`: what names the data (source, sizes, sha256 of its arrays). A
    run that holds a checkpoint or summary resumes only on the same data;
    without data.json, its newest checkpoint's copy counts. Raises DataError
    naming what changed.
    """
    path = os.path.join(self.path, "data.json")
    old = None
    if os.path.exists(path):
      try:
        old = read_json_object(path, "")
      except WorkDirError:
        old = None
    if old is None and self._holds_a_run():
      old = newest_record(self._ckpt_dir, "data")
    self._data_identity = dict(identity)
    if old is not None and old != identity and self._holds_a_run():
      changed = [k for k in sorted(identity.keys() | old.keys())
                 if old.get(k) != identity.get(k)]
      shown = ", ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}" for k in changed[:4])
      raise data_lib.DataError(
          f"the data differs from the data the run in {self.path} was trained on ({shown}); "
          "put that run's data files back, or use a new --workdir to train on this data")
    if self.primary and old != identity:
      atomic_write(path, json.dumps(identity, indent=2, sort_keys=True) + "\n")

  def _holds_a_run(self) -> bool:
    """Whether the directory holds a checkpoint or a summary (something to resume or keep)."""
    if os.path.lexists(os.path.join(self.path, "summary.json")):
      return True
    try:
      return any(name.isdigit() for name in os.listdir(self._ckpt_dir))
    except OSError:
      return False

  def _replace_config(self, change: str) -> None:
    """Moves aside what an attempt without a checkpoint left, if it recorded anything."""
    try:
      recorded = os.path.getsize(self._metrics_path) > 0
    except OSError:
      recorded = False
    kept = []
    if recorded:  # the records first: a kill in between must not leave them to be dropped
      for name in ("metrics.jsonl", "tensorboard", "config.json"):
        src = os.path.join(self.path, name)
        if os.path.lexists(src):
          dest = aside_path(src, "replaced")
          try:
            os.rename(src, dest)
          except OSError as e:
            raise io_error("moving aside", src, e) from e
          kept.append(os.path.basename(dest))
    logging.warning(
        "Work directory %s holds no checkpoint: starting over with the new config (%s)%s",
        self.path, change, f"; the earlier attempt is kept as {', '.join(kept)}" if kept else "")

  def write_pending_config(self) -> None:
    """config.json of a resumed run whose config changed (`check_config`), once it writes."""
    config, self._pending_config = self._pending_config, None
    if config is not None and self.primary:
      atomic_write(os.path.join(self.path, "config.json"),
                   json.dumps(config, indent=2, sort_keys=True) + "\n")
