"""Checkpoints: orbax writes them; bnlab seals them with checksums and checks them.

Orbax publishes a checkpoint only once it is complete; what befalls it after (a
file damaged, removed or added) only a check against what was written finds.
So each finished checkpoint gets bnlab_checksums.json (the sha256 of every file,
and a copy of the run's config and data identity, from which a lost config.json
is restored), verified before the checkpoint is restored; one that fails is
moved aside and an older one used. `Checkpoints` is the part of
`bnlab.rundir.workdir.WorkDir` that talks to orbax.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import shutil
from typing import Any, Callable

import flax.serialization
import orbax.checkpoint as ocp
from absl import logging

from bnlab.data import sha256_file
from bnlab.engine import distributed
from bnlab.rundir.errors import WorkDirError, io_error
from bnlab.rundir.files import atomic_write, refuse_link
from bnlab.rundir.signals import interrupts_deferred
from bnlab.errors import one_line


CHECKSUMS = "bnlab_checksums.json"


def _checkpoint_files(step_dir: str) -> dict[str, str]:
  """{relative path: absolute path} of a checkpoint's files (not its checksums).

  Raises ValueError for a symbolic link inside it (it could point anywhere).
  """
  out = {}
  for dirpath, dirnames, files in os.walk(step_dir):
    for name in dirnames + files:
      path = os.path.join(dirpath, name)
      rel = os.path.relpath(path, step_dir)
      if os.path.islink(path):
        raise ValueError(f"{rel} is a symbolic link")
      if name in files and not (dirpath == step_dir and (
          name == CHECKSUMS or name.startswith(".tmp-"))):
        out[rel] = path
  return out


def _checksums(step_dir: str) -> dict:
  return {rel: {"size": os.path.getsize(path), "sha256": sha256_file(path)}
          for rel, path in sorted(_checkpoint_files(step_dir).items())}


def _verify_checkpoint(step_dir: str) -> bool:
  """True when the checkpoint matches its checksums; False when it has none.

  Raises ValueError naming the first file that is missing, extra or differs.
  """
  path = os.path.join(step_dir, CHECKSUMS)
  if not os.path.lexists(path):
    return False
  try:
    if os.path.islink(path):
      raise ValueError("is a symbolic link")
    with open(path) as f:
      expected = json.load(f)["files"]
    if not isinstance(expected, dict):
      raise ValueError("no file list")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{CHECKSUMS} is unreadable ({one_line(e, 80)})") from None
  files = _checkpoint_files(step_dir)
  for rel in sorted(expected.keys() | files.keys()):
    if rel not in files:
      raise ValueError(f"{rel} is missing (listed in {CHECKSUMS})")
    if rel not in expected:
      raise ValueError(f"{rel} is not listed in {CHECKSUMS}")
    want = expected[rel]
    if not isinstance(want, dict) or os.path.getsize(files[rel]) != want.get("size") or \
        sha256_file(files[rel]) != want.get("sha256"):
      raise ValueError(f"{rel} does not match its checksum in {CHECKSUMS}: damaged")
  return True


def save_decision_policy(train_cfg):
  """Which offered checkpoints orbax writes (`train.checkpoint_*`).

  With `checkpoint_every_steps` set, or `checkpoint_min_interval_secs=0`, every
  one offered; else at most one per `checkpoint_min_interval_secs` seconds
  (orbax's ContinuousCheckpointingPolicy, which also skips a save while one is
  being written, and decides on the primary process for all). The loop offers
  a checkpoint at each checkpoint step and forces the last.
  """
  secs = train_cfg.get("checkpoint_min_interval_secs", 0)
  if train_cfg.get("checkpoint_every_steps", 0) or not secs:
    return None  # orbax's default: every step offered (save_interval_steps=1)
  return ocp.checkpoint_managers.ContinuousCheckpointingPolicy(minimum_interval_secs=secs)


def newest_record(ckpt_dir: str, key: str):
  """What the newest checkpoint that has one records under `key` ("config", "data")."""
  try:
    steps = sorted((int(n) for n in os.listdir(ckpt_dir) if n.isdigit()),
                   reverse=True)
  except OSError:
    return None
  for step in steps:
    try:
      with open(os.path.join(ckpt_dir, str(step), CHECKSUMS)) as f:
        value = json.load(f).get(key)
    except (OSError, ValueError, AttributeError):
      continue
    if isinstance(value, dict):
      return value
  return None


def read_checkpoint(step_dir: str) -> dict:
  """What checkpoint `step_dir` holds, as host (numpy) arrays, once verified against its
  checksums (one without them is read as it is); for readers outside a run
  (`bnlab.engine.load`). WorkDirError (one line) where it is damaged or unreadable.

  Host arrays, so a checkpoint written on any devices (a mesh over several
  processes) reads in one process on any device.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  fix = "load another step (step=...), or train the run again"
  try:
    _verify_checkpoint(step_dir)
  except ValueError as e:
    raise WorkDirError(f"checkpoint {step_dir} is damaged ({e}); {fix}") from None
  path = os.path.join(step_dir, "default")
  # The item is read on its own, without the step's metadata file, which orbax warns of.
  quiet = _Dropping("Metadata file does not exist")
  std_logging.getLogger("absl").addFilter(quiet)
  try:
    checkpointer = ocp.PyTreeCheckpointer()
    meta = checkpointer.metadata(path)
    meta = getattr(meta, "item_metadata", meta).tree
    args = jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    return checkpointer.restore(path, restore_args=args)
  except Exception as e:  # pylint: disable=broad-except
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise WorkDirError(f"checkpoint {step_dir} is unreadable ({reason}); {fix}") from None
  finally:
    std_logging.getLogger("absl").removeFilter(quiet)


class _Dropping(std_logging.Filter):
  """Drops the log records whose message starts with `prefix`."""

  def __init__(self, prefix: str):
    super().__init__()
    self.prefix = prefix

  def filter(self, record) -> bool:
    return not str(record.msg).startswith(self.prefix)


class Checkpoints:
  """A run's checkpoints/: orbax's manager, and the checksums bnlab adds to what it writes.

  Every process calls the manager (orbax needs them all); only the primary
  writes checksums and moves unreadable checkpoints aside.
  """

  def __init__(self, path: str, primary: bool, carried: Callable[[], dict]):
    """`path`: the work directory; `carried()`: what each checkpoint's CHECKSUMS also holds."""
    self.dir = os.path.join(path, "checkpoints")
    self._aside_dir = os.path.join(path, "unreadable_checkpoints")
    self.primary = primary
    self._carried = carried
    self._manager = None
    # Checkpoints saved whose checksums are not written yet (orbax may still be
    # writing them).
    self._unsealed: list[int] = []

  def open(self, cfg) -> None:
    """Opens orbax's manager of the directory, keeping `cfg.train.keep_checkpoints`."""
    try:
      self._manager = ocp.CheckpointManager(
          self.dir,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=cfg.train.keep_checkpoints, create=True,
              save_decision_policy=save_decision_policy(cfg.train)))
    except Exception as e:  # pylint: disable=broad-except
      raise io_error("opening the checkpoint directory", self.dir, e) from e

  def make_dir(self) -> None:
    """Creates checkpoints/ (the primary); WorkDirError where a file stands in its place."""
    if os.path.exists(self.dir) and not os.path.isdir(self.dir):
      raise WorkDirError(f"{self.dir} is not a directory; move it aside or "
                         "choose another --workdir")
    if self.primary:
      try:
        os.makedirs(self.dir, exist_ok=True)
      except OSError as e:
        raise io_error("creating the checkpoint directory", self.dir, e) from e

  def remove_temporaries(self) -> None:
    """What a killed run left in checkpoints/ half-written (never read: safe to drop).

    Orbax's `<step>.orbax-checkpoint-tmp*` directories are removed here,
    synchronously, rather than by orbax's background clean-up, which an early
    exit (a bad config found after the directory opened) could race at
    interpreter shutdown.
    """
    ckpt_dir = self.dir
    if os.path.isdir(ckpt_dir):
      for name in os.listdir(ckpt_dir):
        path = os.path.join(ckpt_dir, name)
        if ".orbax-checkpoint-tmp" in name:
          shutil.rmtree(path, ignore_errors=True)
        elif os.path.isdir(path) and not os.path.islink(path):
          for inner in os.listdir(path):  # a checksum file's temporary
            if inner.startswith(".tmp-"):
              try:
                os.remove(os.path.join(path, inner))
              except OSError:
                pass

  def close(self) -> None:
    """Waits for pending checkpoint writes, seals them and closes the manager."""
    try:
      if self._manager is not None:
        manager, self._manager = self._manager, None
        try:
          manager.wait_until_finished()
          self._seal()
        finally:
          manager.close()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(self._unsealed, e) from e

  def save(self, step: int, target, force: bool = False, replace: bool = False) -> bool:
    """Starts writing checkpoint `step` (`WorkDir.save` says when), once `wait` sealed the
    last; whether orbax started it (its save policy may skip it)."""
    try:
      with interrupts_deferred():
        if replace and step in self._manager.all_steps():
          self._manager.delete(step)
        started = bool(self._manager.save(
            step, args=ocp.args.StandardSave(flax.serialization.to_state_dict(target)),
            force=force))
        if started:
          self._unsealed.append(step)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error([step], e) from e
    return started

  def wait(self) -> None:
    """Waits for the checkpoints being written, then writes their checksums."""
    try:
      with interrupts_deferred():
        self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(self._unsealed, e) from e
    self._seal()

  def _save_error(self, steps: list[int], e: BaseException) -> WorkDirError:
    """The WorkDirError of a checkpoint write that failed: which step, and where a rerun resumes."""
    what = (f"saving checkpoint {', '.join(map(str, steps))} in" if steps
            else "saving a checkpoint in")
    error = io_error(what, self.dir, e)
    try:
      done = [int(n) for n in os.listdir(self.dir) if n.isdigit() and int(n) not in steps]
    except OSError:
      done = []
    if str(error).endswith("rerun the same command to resume"):
      where = (f"the last complete checkpoint (step {max(done)})" if done
               else "the start (no checkpoint is complete)")
      error = WorkDirError(f"{error} from {where}")
    return error

  def _seal(self) -> None:
    """Writes bnlab_checksums.json into each finished checkpoint (the primary)."""
    steps, self._unsealed = self._unsealed, []
    if not self.primary:
      return
    for step in steps:
      step_dir = os.path.join(self.dir, str(step))
      if not os.path.isdir(step_dir):  # orbax did not publish it, or removed it since
        continue
      path = os.path.join(step_dir, CHECKSUMS)
      try:
        manifest = {"format": 1, "step": step, "algorithm": "sha256",
                    "files": _checksums(step_dir), **self._carried()}
      except (OSError, ValueError) as e:
        raise io_error(f"computing the checksums of checkpoint {step} in", step_dir,
                       e) from e
      atomic_write(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")

  def restore_latest(self, target):
    """The newest readable checkpoint restored into `target`'s structure, or None.

    Unreadable newer checkpoints are reported and moved aside to
    unreadable_checkpoints/ (so the resumed run can write those steps again).
    Raises WorkDirError, touching nothing, when checkpoints exist but none fits.
    """
    template = flax.serialization.to_state_dict(target)
    bad = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      step_dir = os.path.join(self.dir, str(step))
      try:
        if not _verify_checkpoint(step_dir):
          logging.warning(
              "Checkpoint %s has no %s (written by an older bnlab, or its run was stopped "
              "just after writing it): restoring it unverified", step_dir, CHECKSUMS)
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(template))
        _check_same_structure(template, restored)
        result = flax.serialization.from_state_dict(target, restored)
      except Exception as e:  # pylint: disable=broad-except
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        logging.warning("Checkpoint %s is unreadable (%s); trying an older one",
                        os.path.join(self.dir, str(step)), reason)
        bad.append((step, reason))
        continue
      for s, _ in bad:
        self._move_aside(s)
      return result
    if bad:
      step, reason = bad[0]
      raise WorkDirError(
          f"no checkpoint in {self.dir} fits this run (step {step}: {reason}); "
          "they are damaged or from another model: move that directory aside to start "
          "over, or use a new --workdir")
    return None

  def _move_aside(self, step: int) -> None:
    src = os.path.join(self.dir, str(step))
    dest_dir = self._aside_dir

    def move():  # by the primary; then every process reloads the directory
      if not self.primary:
        return
      dest = os.path.join(dest_dir, str(step))
      n = 1
      while os.path.exists(dest):
        dest, n = os.path.join(dest_dir, f"{step}.{n}"), n + 1
      refuse_link(dest_dir)
      try:
        os.makedirs(dest_dir, exist_ok=True)
        shutil.move(src, dest)
      except OSError as e:
        raise io_error("moving the unreadable checkpoint", src, e) from e
      logging.warning("Moved unreadable checkpoint %s to %s", src, dest)

    distributed.together(f"moving the unreadable checkpoint {src} aside", move)
    self._manager.reload()


def _check_same_structure(template, restored) -> None:
  """Raises ValueError when `restored` differs from `template` in keys, shapes or dtypes."""
  a, b = _flatten_tree(template), _flatten_tree(restored)
  if a.keys() != b.keys():
    missing = sorted(a.keys() - b.keys())[:3] or sorted(b.keys() - a.keys())[:3]
    raise ValueError(f"different structure (e.g. {missing})")
  for k, v in a.items():
    w = b[k]
    for attr in ("shape", "dtype"):
      x, y = getattr(v, attr, None), getattr(w, attr, None)
      if x is not None and y is not None and x != y:
        raise ValueError(f"{k} has {attr} {y}, expected {x}")


def _flatten_tree(d, prefix: str = "") -> dict[str, Any]:
  out = {}
  if isinstance(d, dict):
    for k, v in d.items():
      out.update(_flatten_tree(v, f"{prefix}{k}/"))
  elif d is not None:
    out[prefix] = d
  return out
