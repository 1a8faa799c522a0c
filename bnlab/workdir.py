"""A run's work directory: config snapshot, lock, metrics, TensorBoard, checkpoints.

Layout:
  config.json      the resolved config (a rerun must match it to resume)
  metrics.jsonl    one JSON object per log/eval step
  tensorboard/     TensorBoard event files
  checkpoints/     orbax checkpoints of the train state and metric sums
  summary.json     written last: the run's final numbers
  .lock            the pid of the process using the directory
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import flax.serialization
import orbax.checkpoint as ocp
from absl import logging

from bnlab.config import ConfigError


class _QuietLibraries:
  """Drops the INFO chatter (below Python logging.WARNING = 30) of checkpointing."""

  noisy = ("/orbax/", "/etils/", "jax/_src/xla_bridge.py")

  def filter(self, record) -> bool:
    path = record.pathname.replace("\\", "/")
    return record.levelno >= 30 or not any(n in path for n in self.noisy)


def quiet_library_logs() -> None:
  """Keeps the progress log readable (unless --verbosity asks for debug output)."""
  if logging.get_verbosity() < logging.DEBUG:
    logging.get_absl_handler().addFilter(_QuietLibraries())


class WorkDirError(RuntimeError):
  """The work directory cannot be used; the message says why and what to do."""


def _atomic_write(path: str, text: str) -> None:
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


class WorkDir:
  """Owns one run's directory for the lifetime of the run."""

  def __init__(self, path: str, cfg):
    self.path = os.path.abspath(path)
    try:
      os.makedirs(self.path, exist_ok=True)
      probe = os.path.join(self.path, ".write-probe")
      with open(probe, "w") as f:
        f.write("ok")
      os.remove(probe)
    except OSError as e:
      raise WorkDirError(
          f"work directory {self.path} is not writable ({e.strerror}); "
          "choose another --workdir") from None
    self._lock_path = os.path.join(self.path, ".lock")
    self._acquire_lock()
    self._check_config(cfg)
    self.metrics_path = os.path.join(self.path, "metrics.jsonl")
    self._tb = None
    self._manager = ocp.CheckpointManager(
        os.path.join(self.path, "checkpoints"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=cfg.train.keep_checkpoints, create=True))

  # -- lock -----------------------------------------------------------------
  def _acquire_lock(self) -> None:
    me = str(os.getpid())
    for _ in range(2):
      try:
        fd = os.open(self._lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "w") as f:
          f.write(me)
        return
      except FileExistsError:
        try:
          other = int(open(self._lock_path).read().strip() or 0)
        except (OSError, ValueError):
          other = 0
        if other and other != os.getpid() and _pid_alive(other):
          raise WorkDirError(
              f"work directory {self.path} is in use by process {other}; wait for "
              "it to finish, stop it, or choose another --workdir") from None
        logging.warning("Taking over stale lock of process %s in %s", other, self.path)
        os.remove(self._lock_path)
    raise WorkDirError(f"could not lock {self.path}; remove {self._lock_path}")

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
    if self._tb is not None:
      self._tb.close()
    if os.path.exists(self._lock_path):
      os.remove(self._lock_path)

  # -- config ---------------------------------------------------------------
  def _check_config(self, cfg) -> None:
    path = os.path.join(self.path, "config.json")
    new = json.loads(cfg.to_json_best_effort())
    if os.path.exists(path):
      with open(path) as f:
        old = json.load(f)
      a, b = _flatten(old), _flatten(new)
      # Keys the snapshot lacks were added to bnlab after the run started; a
      # resumed run takes their defaults, so they do not count as a change.
      diff = sorted(k for k in a if a.get(k) != b.get(k))
      if diff:
        self.close_lock()
        shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:5])
        raise ConfigError(
            f"work directory {self.path} holds a run with a different config "
            f"({shown}); use a new --workdir, or rerun with the same config to resume")
    else:
      _atomic_write(path, json.dumps(new, indent=2, sort_keys=True) + "\n")

  def close_lock(self) -> None:
    if os.path.exists(self._lock_path):
      os.remove(self._lock_path)

  # -- metrics --------------------------------------------------------------
  def read_metrics(self) -> list[dict]:
    if not os.path.exists(self.metrics_path):
      return []
    records = []
    with open(self.metrics_path) as f:
      for line in f:
        line = line.strip()
        if not line:
          continue
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          break  # a torn last line from a killed run
    return records

  def truncate_metrics_after(self, step: int) -> None:
    """Drops records past `step` (written after the checkpoint we resume from)."""
    records = [r for r in self.read_metrics() if r["step"] <= step]
    _atomic_write(self.metrics_path, "".join(json.dumps(r) + "\n" for r in records))

  def write_metrics(self, record: dict) -> None:
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
    if self._tb is None:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(self.path, "tensorboard"))
    for key, value in record.items():
      if key not in ("step",) and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, record["step"])
    self._tb.flush()

  def last_metrics(self) -> dict | None:
    """The latest value of every metric over the run's records."""
    merged: dict = {}
    for r in self.read_metrics():
      merged.update(r)
    return merged or None

  def read_summary(self) -> dict | None:
    path = os.path.join(self.path, "summary.json")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      return json.load(f)

  def write_summary(self, summary: dict) -> None:
    _atomic_write(os.path.join(self.path, "summary.json"),
                  json.dumps(summary, indent=2, sort_keys=True) + "\n")

  # -- checkpoints ----------------------------------------------------------
  def save(self, step: int, target) -> None:
    self._manager.save(step, args=ocp.args.StandardSave(flax.serialization.to_state_dict(target)))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore_latest(self, target):
    """The newest readable checkpoint restored into `target`'s structure, or None.

    A checkpoint that fails to restore is reported and skipped in favour of the
    one before it.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        template = flax.serialization.to_state_dict(target)
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(template))
        return flax.serialization.from_state_dict(target, restored)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Checkpoint at step %d in %s is unreadable (%s); trying an "
                        "older one", step, self.path, str(e).splitlines()[0][:200])
    return None
