"""A run's identity: its config and its data, which a rerun must match to resume it.

config.json and data.json say what the directory's run trained; a rerun
with another config or other data would mix two runs in one directory's
checkpoints and records, so it is refused, naming the difference, unless the
directory holds nothing to resume (then the new config starts over) or the
change is one a resume allows (`bnlab.config.resume_refusal`).

The copy each checkpoint carries is the truth, not the files: config.json and
data.json are plain files a user can edit (to match a new command, say), and a
rerun that trusted them would continue at another learning rate, labelled as
if the run had always had it. So a rerun is compared with the newest
checkpoint's copy; a file that disagrees with it (edited, damaged, missing a
section) is named, and restored from that copy with a warning when the rerun
resumes (the file kept aside as <name>.edited-<time> or <name>.damaged-<time>:
no record is lost), or the rerun is refused, naming the keys and the fix. Only
a run whose checkpoints carry no copy (an older bnlab's) is compared with the
files.
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


def recorded_config(path: str) -> dict | None:
  """The config the run in directory `path` trained with: the copy its newest checkpoint
  carries, else its config.json; None where neither can be read.

  For readers that compare a run with a sweep or study (`check_members_config`,
  `bnlab.study.runs`): config.json alone may have been edited.
  """
  carried = newest_record(os.path.join(path, "checkpoints"), "config")
  if carried is not None:
    return carried
  try:
    return read_json_object(os.path.join(path, "config.json"), "")
  except WorkDirError:
    return None

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
    """Compares `cfg` with the run's config; writes config.json to a directory without one.

    A directory that holds no checkpoint and no summary has trained nothing
    that could be resumed: it accepts another config (the old config.json,
    and with it the metrics and TensorBoard events of that attempt, if any,
    are kept as <name>.replaced-<time>). A run whose checkpoints carry a copy
    of its config is compared with that copy (`_check_config_with`); one
    whose checkpoints carry none (an older bnlab's) with config.json, and a
    run whose config is nowhere is refused.
    """
    path = os.path.join(self.path, "config.json")
    new = json.loads(cfg.to_json_best_effort())
    self.config_json = new
    carried = newest_record(self._ckpt_dir, "config") if self._holds_a_run() else None
    if carried is not None:
      self._check_config_with(carried, new)
      return
    holds = self._holds_a_run()  # and its checkpoints carry no copy of its config
    old = None
    if os.path.exists(path):
      try:
        old = read_json_object(path, ": this run's config is unknown; restore the file, or "
                                "use a new --workdir")
      except WorkDirError:
        if holds:
          raise
    elif holds:
      raise WorkDirError(
          f"{path} is missing, and no checkpoint in {self._ckpt_dir} carries a copy: this "
          "run's config is unknown; restore the file, or use a new --workdir")
    if old is not None:
      a, b = flatten(old), flatten(new)
      # Keys the snapshot lacks were added to bnlab after the run started; a
      # resumed run takes their defaults, so they do not count as a change; nor
      # do `distributed` keys (`changed_keys`): a run may resume with other
      # processes or addresses. RESUME_SAFE_KEYS and the run's length may change.
      diff = changed_keys(a, b)
      if not diff:
        return
      refused, reason = resume_refusal(a, b)
      shown = _shown(refused or diff, a, b)
      if refused and holds:
        if reason:
          raise ConfigError(f"work directory {self.path} holds a run that cannot resume "
                            f"with {shown}: {reason}")
        raise ConfigError(
            f"work directory {self.path} holds a run with a different config "
            f"({shown}); use a new --workdir, or rerun with the same config to resume "
            "(what may change on resume: bnlab.config.RESUME_SAFE_KEYS and the run's "
            "length)")
      if not refused:
        logging.info("Resuming the run in %s with %s", self.path, shown)
        # The new config replaces config.json with the run's first write: a run refused
        # before it (e.g. made shorter) leaves the file as it was.
        self._pending_config = new
        return
      if self.primary:
        self._replace_config(shown)
    elif os.path.exists(path) and self.primary:
      self._replace_config("config.json unreadable")
    if self.primary:
      atomic_write(path, json.dumps(new, indent=2, sort_keys=True) + "\n")

  def _check_config_with(self, carried: dict, new: dict) -> None:
    """`new` compared with `carried`, the config the run's newest checkpoint carries.

    config.json is only the readable copy of it: it may disagree with it where
    a resume changed a resume-safe key or the length since that checkpoint
    (bnlab writes the new config with the resumed run's first record); any
    other difference, a missing key (a section deleted) or a damaged file was
    made by hand. Such a file decides nothing: the rerun is refused if `new`
    is not the run's config (the message names the file too, since it agrees
    with the new command), and otherwise config.json is restored from
    `carried`, with a warning, the file kept aside.
    """
    path = os.path.join(self.path, "config.json")
    file, damage = _read_record(path)
    if damage == "is not a file":
      raise WorkDirError(
          f"{path} is unreadable (not a file); move it aside (it is restored from the copy "
          "the run's checkpoints carry), or use a new --workdir")
    a, b = flatten(carried), flatten(new)
    edited = False
    if file is not None:
      f = flatten(file)
      missing = [k for k in a if k not in f and not k.startswith("distributed.")]
      # What a resume may change, bnlab may have written; the rest was edited.
      changed, _ = resume_refusal({k: v for k, v in a.items() if k in f}, f)
      if changed:
        edited = True
        damage = "was edited (" + _shown(changed, a, f) + ")"
      elif missing:
        damage = f"lacks {_keys_shown(missing, a)}"
    refused, reason = resume_refusal(a, b)
    if refused:
      shown = _shown(refused, a, b)
      # The file is named: it may agree with the new command, and seem to allow it.
      where = (f"; {path} {damage}, but the config the run's checkpoints carry is the one "
               "it trained with" if damage else "")
      if reason:
        raise ConfigError(f"work directory {self.path} holds a run that cannot resume "
                          f"with {shown}{where}: {reason}")
      raise ConfigError(
          f"work directory {self.path} holds a run with a different config "
          f"({shown}){where}; use a new --workdir, or rerun with the run's config to resume"
          f"{' (config.json is then restored)' if damage else ''} (what may change on "
          "resume: bnlab.config.RESUME_SAFE_KEYS and the run's length)")
    on_disk = file
    if damage:
      on_disk = carried
      kept = ""
      if self.primary:
        kept = _move_aside(path, "edited" if edited else "damaged")
        atomic_write(path, json.dumps(carried, indent=2, sort_keys=True) + "\n")
      logging.warning(
          "%s %s: restored from the copy of the config the run's checkpoints carry%s",
          path, damage, f" (the file is kept as {kept})" if kept else "")
    diff = changed_keys(a, b)
    if diff:
      logging.info("Resuming the run in %s with %s", self.path, _shown(diff, a, b))
    # The new config replaces config.json with the run's first write: a run refused
    # before it (e.g. made shorter) leaves the file as it was.
    self._pending_config = new if changed_keys(flatten(on_disk), b) else None

  def check_data(self, identity: dict) -> None:
    """Compares the data's identity with the run's; records it in data.json.

    `identity`: what names the data (source, sizes, sha256 of its arrays). A
    run that holds a checkpoint or summary resumes only on the same data: the
    data its newest checkpoint's copy names, or, where none carries a copy,
    data.json's. Raises DataError naming what changed. data.json is only the
    readable copy: one that disagrees with the checkpoint's copy (edited,
    damaged, missing) does not block the run whose data is unchanged; it is
    restored, with a warning, and kept aside.
    """
    path = os.path.join(self.path, "data.json")
    file, damage = _read_record(path)
    holds = self._holds_a_run()
    carried = newest_record(self._ckpt_dir, "data") if holds else None
    self._data_identity = dict(identity)
    old = carried if carried is not None else file
    if carried is not None and file is not None and file != carried:
      damage = "was edited (" + _shown(_differing(carried, file), carried, file) + ")"
    if old is not None and old != identity and holds:
      where = (f"; {path} {damage}, but the data identity the run's checkpoints carry is "
               "that of the data it trained on" if carried is not None and damage else "")
      raise data_lib.DataError(
          f"the data differs from the data the run in {self.path} was trained on "
          f"({_shown(_differing(old, identity), old, identity)}){where}; put that run's "
          "data files back, or use a new --workdir to train on this data")
    if carried is not None and damage and damage != "is not a file":
      kept = _move_aside(path, "edited" if file is not None else "damaged") \
          if self.primary else ""
      logging.warning(
          "%s %s: restored from the copy of the data identity the run's checkpoints carry, "
          "which the data matches%s", path, damage,
          f" (the file is kept as {kept})" if kept else "")
    # A directory where data.json belongs is left alone where the checkpoints carry the
    # identity (nothing is lost without the file); elsewhere writing it names the problem.
    if self.primary and file != identity and not (carried and damage == "is not a file"):
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


def _read_record(path: str) -> tuple[dict | None, str | None]:
  """(the JSON object in `path`, None), or (None, what is wrong with the file)."""
  if not os.path.lexists(path):
    return None, "is missing"
  if not os.path.isfile(path):
    return None, "is not a file"
  try:
    return read_json_object(path, ""), None
  except WorkDirError as e:
    return None, str(e)[len(path) + 1:]  # "is unreadable (...)"


def _move_aside(path: str, tag: str) -> str:
  """`path`, if it is a file, renamed to <path>.<tag>-<time> (its name; "" if none)."""
  if not os.path.isfile(path):
    return ""
  dest = aside_path(path, tag)
  try:
    os.rename(path, dest)
  except OSError as e:
    raise io_error("moving aside", path, e) from e
  return os.path.basename(dest)


def _differing(a: dict, b: dict) -> list[str]:
  """The keys whose values `a` and `b` differ in (one lacking it included), sorted."""
  return [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def _shown(keys: list[str], old: dict, new: dict) -> str:
  """"key: old -> new" for the first five `keys`."""
  more = ", ..." if len(keys) > 5 else ""
  return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:5]) + more


def _keys_shown(missing: list[str], whole: dict) -> str:
  """The `missing` keys of flattened `whole`, a section all of whose keys are missing as
  "section.*"."""
  out = []
  for key in missing:
    section = key.split(".")[0]
    if "." in key and all(k in missing for k in whole if k.startswith(section + ".")):
      key = section + ".*"
    if key not in out:
      out.append(key)
  return ", ".join(out[:4]) + (", ..." if len(out) > 4 else "")
