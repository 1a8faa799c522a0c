"""A run's work directory: config snapshot, lock, metrics, TensorBoard, checkpoints.

Layout:
  config.json      the resolved config (a rerun must match it to resume)
  data.json        the data's identity: source, sizes, sha256 (a resume must match it)
  metrics.jsonl    one JSON object per log/eval step
  tensorboard/     TensorBoard event files
  checkpoints/     orbax checkpoints of the train state and metric sums, each
                   with bnlab_checksums.json (sha256 of its files, and a copy
                   of the run's config and data identity)
  summary.json     written last: the run's final numbers
  .lock            held (flock) by the process using the directory; names it
  unreadable_checkpoints/  checkpoints that failed to restore, moved aside
  metrics.jsonl.damaged-<time>   lines of metrics.jsonl that were no record
  <name>.replaced-<time>  config.json, metrics.jsonl and tensorboard/ of an
                   attempt that saved no checkpoint, replaced by a new config

Every failure to read or write these raises WorkDirError naming the file and
the fix. A run killed at any moment leaves nothing that blocks or misleads
the next one: the lock dies with its process, temporary files are removed,
and orbax publishes a checkpoint only once it is complete.

What is kept, and what is refused:
  - No record is dropped silently. A line of metrics.jsonl that is not a
    record (a torn write) is moved to metrics.jsonl.damaged-<time>, every other
    record is kept, and a warning names the file and the line numbers. A
    resume whose records stop before the checkpoint it resumes from (the file
    removed or cut short) is refused (`bnlab.engine.loop`), naming the fix.
  - bnlab never writes through a symbolic link: a link where one of its files
    or directories belongs stops the run with an error naming it (the link's
    target is left alone).
  - A checkpoint is verified against its checksums before it is restored; one
    that does not match is treated as unreadable (moved aside, an older one
    used). A checkpoint without checksums (written by an older bnlab, or whose
    writer was killed between orbax publishing it and bnlab sealing it) is
    restored with a warning.
  - A directory that holds no checkpoint (and no summary) accepts another
    config: nothing was trained, so a failed start costs nothing.
  - A resume checks the config and the data against the run's: a missing
    config.json or data.json is taken from the newest checkpoint's copy (and
    config.json restored); a run whose config is nowhere is refused.

Non-finite numbers: metrics.jsonl and summary.json are strict JSON. A NaN or
infinite value is written as null, and the object gets a "nonfinite" entry
naming it: {"train_loss": null, "nonfinite": {"train_loss": "NaN"}} (the
kinds are "NaN", "Infinity", "-Infinity"; inside a list or object value, the
entry is a list of [path, kind] pairs, path being the indices/keys within the
value). A reader that ignores "nonfinite" sees null (no value); `decode_nonfinite`
restores the floats (read_metrics and read_summary do).

In a multi-process run (bnlab.engine.distributed) every process opens the same
directory: process 0 (the primary) holds the lock and writes config.json,
metrics, TensorBoard events, checksums and the summary; the others only read,
keep their records in memory, and call the checkpoint manager with the primary
(orbax needs every process; it writes replicated arrays from process 0 only).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from typing import Any

import flax.serialization
import orbax.checkpoint as ocp
from absl import logging

from bnlab import data as data_lib
from bnlab.engine import distributed
from bnlab.data import _sha256_file  # pylint: disable=protected-access
from bnlab.config import ConfigError, changed_keys, flatten, resume_refusal


class _QuietLibraries:
  """Drops the INFO chatter (below Python logging.WARNING = 30) of checkpointing."""

  noisy = ("/orbax/", "/etils/", "jax/_src/xla_bridge.py")

  def filter(self, record) -> bool:
    path = record.pathname.replace("\\", "/")
    if not any(n in path for n in self.noisy):
      return True
    if record.levelno < 30:
      return False
    # A failed checkpoint write (full disk, file size limit) is reported by
    # bnlab in one line; orbax's tracebacks of it from each of its threads are not shown.
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += f" {record.exc_info[1]}"
    return not is_storage_full(text)


class _QuietAsyncio:
  """Drops asyncio's "exception was never retrieved" of a failed checkpoint write."""

  def filter(self, record) -> bool:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += f" {record.exc_info[1]}"
    return not is_storage_full(text)


def _after_a_failed_write(exc) -> bool:
  """Whether `exc` is the echo, in a library's thread, of a write bnlab reports itself.

  After a checkpoint or event file write fails (a full disk), the threads of
  orbax/tensorstore and tensorboardX still finishing print tracebacks of it
  ("Event loop is closed", the writer's flush at exit); bnlab's `error:` line
  says what happened and what to do.
  """
  if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
    return True
  return isinstance(exc, OSError) and (
      getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
      or str(exc) == "handle is closed")


def quiet_library_logs() -> None:
  """Keeps the progress log readable (unless --verbosity asks for debug output)."""
  if logging.get_verbosity() < logging.DEBUG:
    for where in (logging.get_absl_handler(), logging.get_absl_logger()):
      if not any(isinstance(f, _QuietLibraries) for f in where.filters):
        where.addFilter(_QuietLibraries())
    import logging as py_logging  # pylint: disable=g-import-not-at-top
    asyncio_logger = py_logging.getLogger("asyncio")
    if not any(isinstance(f, _QuietAsyncio) for f in asyncio_logger.filters):
      asyncio_logger.addFilter(_QuietAsyncio())
    if not getattr(sys.excepthook, "bnlab_quiet", False):
      import threading  # pylint: disable=g-import-not-at-top
      hooks = (sys.excepthook, sys.unraisablehook, threading.excepthook)

      def excepthook(kind, value, tb):  # tensorstore's callbacks print through it
        if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
          hooks[0](kind, value, tb)

      def unraisablehook(info):
        if not _after_a_failed_write(info.exc_value):
          hooks[1](info)

      def thread_excepthook(args):
        if not _after_a_failed_write(args.exc_value):
          hooks[2](args)
      excepthook.bnlab_quiet = True
      sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
      threading.excepthook = thread_excepthook


# TensorBoard tags of the metrics records' keys: train_* and test_* under train/
# and test/, and these; other keys (e.g. lists of percentiles) are not written.
TENSORBOARD_TAGS = {"learning_rate": "train/learning_rate", "epoch": "progress/epoch",
                    "examples_per_sec": "progress/examples_per_sec",
                    "wall_time": "progress/wall_time"}
# The metrics the HParams dashboard shows for each run.
HPARAM_METRICS = ("test/accuracy", "test/loss", "train/accuracy", "train/loss")


def tensorboard_tag(key: str) -> str | None:
  """The TensorBoard tag of a metrics record's key, or None (not written)."""
  for prefix in ("train_", "test_"):
    if key.startswith(prefix):
      return f"{prefix[:-1]}/{key[len(prefix):]}"
  return TENSORBOARD_TAGS.get(key)


def hparams_of(config: dict) -> dict:
  """A run's config as TensorBoard hyperparameters: dotted keys, scalar values.

  Sequences become their text (e.g. "(100, 100)"); empty sections are left out.
  """
  out = {}
  for key, value in flatten(config).items():
    if isinstance(value, (bool, int, float, str)):
      out[key] = value
    elif isinstance(value, (list, tuple)):
      out[key] = str(tuple(value))
    elif value is not None and value != {}:
      out[key] = str(value)
  return out


class WorkDirError(RuntimeError):
  """The work directory cannot be used; the message says why and what to do."""


def read_json_object(path: str, consequence: str) -> dict:
  """The JSON object in `path`; WorkDirError (problem + `consequence`) if it is unreadable."""
  try:
    with open(path) as f:
      value = json.load(f)
    if not isinstance(value, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as e:
    raise WorkDirError(
        f"{path} is unreadable ({' '.join(str(e).split())[:120]}){consequence}") from None
  return value


def read_summary_file(path: str) -> dict:
  """A run's summary.json; WorkDirError naming the fix when it is unreadable or holds no
  final step (e.g. `{}`), which would otherwise stand for a finished run."""
  fix = "; delete it and rerun to redo the final evaluation from the last checkpoint"
  summary = read_json_object(path, fix)
  final = summary.get("final_step")
  if not isinstance(final, int) or isinstance(final, bool) or final < 0:
    raise WorkDirError(f"{path} is unreadable (its final_step is {final!r}, not a step){fix}")
  return decode_nonfinite(summary)


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without importing torch.

  tensorboardX imports torch, if installed, only to accept its tensors; bnlab
  writes plain floats, and importing torch costs ~2-3 s at every run's start.
  """
  if "tensorboardX" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    return SummaryWriter
  sys.modules["torch"] = None  # makes `import torch` raise ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return SummaryWriter


_FULL_MARKERS = ("No space left", "ENOSPC", "RESOURCE_EXHAUSTED", "quota", "Disk quota",
                 "File too large", "os_error_code='28'", "os_error_code='27'",
                 "os_error_code='122'")


def is_storage_full(text: str) -> bool:
  """Whether an error's text says the disk (or quota, or file size limit) is full."""
  return any(t in text for t in _FULL_MARKERS)


def _storage_reason(e: BaseException) -> str:
  """A short reason for a failed write: the OS's words, not a library's whole message."""
  if getattr(e, "strerror", None):
    return e.strerror
  text = str(e)
  for marker, reason in (("No space left", "No space left on device"),
                         ("os_error_code='28'", "No space left on device"),
                         ("quota", "Disk quota exceeded"),
                         ("os_error_code='122'", "Disk quota exceeded"),
                         ("File too large", "File too large: the file size limit (ulimit -f)"),
                         ("os_error_code='27'", "File too large: the file size limit (ulimit -f)")):
    if marker in text:
      return reason
  return " ".join(text.split())[:200] or type(e).__name__


def _io_error(what: str, path: str, e: BaseException) -> WorkDirError:
  """A WorkDirError for a failed read/write of `path`, with the fix."""
  if getattr(e, "errno", None) == errno.ELOOP:  # O_NOFOLLOW met a link
    return _link_error(path)
  reason = getattr(e, "strerror", None) or " ".join(str(e).split())[:200] or type(e).__name__
  text = str(e)
  if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) or is_storage_full(
      text):
    reason = _storage_reason(e)
    fix = "free space on that disk, then rerun the same command to resume"
  elif getattr(e, "errno", None) == errno.EISDIR:
    fix = ("a directory stands where bnlab keeps a file: move it aside, then rerun the same "
           "command to resume")
  elif getattr(e, "errno", None) == errno.ENOTDIR:
    fix = ("a file stands where bnlab keeps a directory: move it aside, then rerun the same "
           "command to resume")
  elif getattr(e, "errno", None) in (errno.EACCES, errno.EPERM, errno.EROFS):
    fix = "make it writable or choose another --workdir"
  else:
    fix = "check the disk and the path, then rerun the same command to resume"
  return WorkDirError(f"{what} {path} failed ({reason}); {fix}")


def _link_error(path: str) -> WorkDirError:
  return WorkDirError(
      f"{path} is a symbolic link, and bnlab does not write through links; remove the link "
      "(what it points to is left alone), then rerun")


def _refuse_link(path: str) -> None:
  """WorkDirError if `path` is a symbolic link (bnlab writes only its own files)."""
  if os.path.islink(path):
    raise _link_error(path)


def _no_follow(path: str, flags: int) -> int:
  """An `opener` for open() that does not follow a link in the last component."""
  return os.open(path, flags | os.O_NOFOLLOW, 0o666)


def _aside_path(path: str, tag: str) -> str:
  """`path`.`tag`-<time>, not yet taken, next to `path`."""
  base = f"{path}.{tag}-{time.strftime('%Y%m%d-%H%M%S')}"
  dest, n = base, 1
  while os.path.lexists(dest):
    dest, n = f"{base}.{n}", n + 1
  return dest


# -- non-finite numbers in strict JSON --------------------------------------------

_KINDS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _kind(x: float) -> str:
  return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _strip_nonfinite(value, path: list, found: list):
  """`value` with non-finite floats as None; appends their ([path], kind) to `found`."""
  if isinstance(value, float) and not math.isfinite(value):
    found.append((list(path), _kind(value)))
    return None
  if isinstance(value, (list, tuple)):
    return [_strip_nonfinite(v, path + [i], found) for i, v in enumerate(value)]
  if isinstance(value, dict):
    return {k: _strip_nonfinite(v, path + [k], found) for k, v in value.items()}
  return value


def encode_nonfinite(obj: dict) -> dict:
  """`obj` as strict JSON can hold it: NaN/inf -> null, named under "nonfinite"."""
  out, flags = {}, {}
  for key, value in obj.items():
    found: list = []
    out[key] = _strip_nonfinite(value, [], found)
    if found:
      flags[key] = found[0][1] if found[0][0] == [] else [[p, k] for p, k in found]
  if flags:
    out["nonfinite"] = flags
  return out


def decode_nonfinite(obj: dict) -> dict:
  """The inverse of `encode_nonfinite` (objects without "nonfinite" pass as they are)."""
  flags = obj.get("nonfinite")
  if not isinstance(flags, dict):
    return obj
  out = {k: v for k, v in obj.items() if k != "nonfinite"}
  for key, where in flags.items():
    if key not in out:
      continue
    if isinstance(where, str):
      if where in _KINDS and out[key] is None:
        out[key] = _KINDS[where]
      continue
    out[key] = json.loads(json.dumps(out[key]))  # a copy to fill in
    for path, kind in where if isinstance(where, list) else ():
      try:
        parent = out[key]
        for step in path[:-1]:
          parent = parent[step]
        if parent[path[-1]] is None and kind in _KINDS:
          parent[path[-1]] = _KINDS[kind]
      except (KeyError, IndexError, TypeError):
        pass
  return out


def _dumps(obj: dict, **kwargs) -> str:
  return json.dumps(encode_nonfinite(obj), allow_nan=False, **kwargs)


# -- checkpoint checksums -----------------------------------------------------------

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
  return {rel: {"size": os.path.getsize(path), "sha256": _sha256_file(path)}
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
    raise ValueError(f"{CHECKSUMS} is unreadable ({' '.join(str(e).split())[:80]})") from None
  files = _checkpoint_files(step_dir)
  for rel in sorted(expected.keys() | files.keys()):
    if rel not in files:
      raise ValueError(f"{rel} is missing (listed in {CHECKSUMS})")
    if rel not in expected:
      raise ValueError(f"{rel} is not listed in {CHECKSUMS}")
    want = expected[rel]
    if not isinstance(want, dict) or os.path.getsize(files[rel]) != want.get("size") or \
        _sha256_file(files[rel]) != want.get("sha256"):
      raise ValueError(f"{rel} does not match its checksum in {CHECKSUMS}: damaged")
  return True


def _atomic_write(path: str, text: str) -> None:
  _refuse_link(path)
  tmp = None
  try:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except OSError as e:
    if tmp and os.path.exists(tmp):
      os.remove(tmp)
    raise _io_error("writing", path, e) from e
  except BaseException:
    if tmp and os.path.exists(tmp):
      os.remove(tmp)
    raise


def _describe_holder(info: dict) -> str:
  parts = [f"process {info.get('pid', '?')}"]
  if info.get("host") and info["host"] != socket.gethostname():
    parts.append(f"on host {info['host']}")
  if info.get("argv"):
    parts.append(f"({' '.join(info['argv'])[:160]})")
  return " ".join(parts)


def _read_lock_info(fd: int) -> dict:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode(errors="replace").strip()
  except OSError:
    return {}
  if text.isdigit():  # the older format: just a pid
    return {"pid": int(text)}
  try:
    info = json.loads(text)
  except ValueError:
    return {}
  return info if isinstance(info, dict) else {}


def acquire_lock(lock_path: str, owner: str, what: str) -> int:
  """An exclusive flock on `lock_path` (the fd), released by the kernel when its process dies.

  A lock left by a killed run is therefore never live, whatever pid it names
  (pid reuse cannot keep it); the file only tells who holds a live one.
  WorkDirError names the holder when `what` `owner` is in use.
  """
  for _ in range(5):
    try:
      fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
      raise _io_error("creating the lock file", lock_path, e) from e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe_holder(_read_lock_info(fd))
      os.close(fd)
      raise WorkDirError(
          f"{what} {owner} is in use by {holder}; wait for it to "
          "finish, stop it, or choose another --workdir") from None
    except OSError as e:
      os.close(fd)
      raise _io_error("locking", lock_path, e) from e
    try:  # the file may have been removed by its last holder meanwhile
      same = os.fstat(fd).st_ino == os.lstat(lock_path).st_ino
    except FileNotFoundError:
      same = False
    if not same:
      os.close(fd)
      continue
    old = _read_lock_info(fd)
    if old:
      logging.warning("Taking over the lock left in %s by %s, which has ended",
                      owner, _describe_holder(old))
    info = {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv[:8]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(info).encode())
    return fd
  raise WorkDirError(f"could not lock {owner}: its lock file keeps changing; "
                     "check that no other run uses it, then rerun")


def release_lock(lock_path: str, fd: int) -> None:
  """Removes and releases a lock of `acquire_lock` (removal first: no window for a third)."""
  try:
    os.remove(lock_path)
  except OSError:
    pass
  os.close(fd)


@contextlib.contextmanager
def interrupts_deferred():
  """Ctrl-C (SIGINT) held until the block ends, then raised (main thread only).

  An orbax save interrupted midway leaves its threads waiting on each other
  (for minutes, with tracebacks) before the process can exit; a checkpoint
  finishes in moments, so Ctrl-C stops the run just after it instead.
  """
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  caught = []
  previous = signal.signal(signal.SIGINT, lambda *_: caught.append(True))
  try:
    yield
  finally:
    signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
    if caught:
      raise KeyboardInterrupt


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


class WorkDir:
  """Owns one run's directory for the lifetime of the run."""

  def __init__(self, path: str, cfg):
    if not isinstance(path, str) or not path.strip():
      raise WorkDirError(f"the work directory is empty ({path!r}); give one with "
                         "--workdir=DIR (use --workdir=. for the current directory)")
    self.path = os.path.abspath(path)
    self._config_json: dict | None = None  # the run's config, copied into each checkpoint
    self._pending_config: dict | None = None  # config.json to write at the run's first write
    self._data_identity: dict | None = None  # and the data's (check_data)
    self._lock_fd = None
    self._manager = None
    self._tb = None
    self._hparams: dict = {}  # the config as TensorBoard hyperparameters
    # Only the primary process writes records; the others keep theirs here.
    self.primary = distributed.is_primary()
    self._records: list[dict] | None = None
    self._summary: dict | None = None
    self._lock_path = os.path.join(self.path, ".lock")
    self.metrics_path = os.path.join(self.path, "metrics.jsonl")
    self._ckpt_dir = os.path.join(self.path, "checkpoints")
    # Checkpoints saved whose checksums are not written yet (orbax may still be
    # writing them).
    self._unsealed: list[int] = []
    # Steps agreed by every process (a process that fails stops all of them
    # instead of leaving them in the checkpoint manager's barrier).
    try:
      # First of all (before config.json is written): the same config everywhere.
      distributed.together(
          "comparing the configs", lambda: None,
          fingerprint=lambda _: distributed.config_fingerprint(cfg),
          differs="have another config than process 0 (only config.distributed.* may differ); "
          "give every process the same config file and overrides")
      distributed.together(f"opening the work directory {self.path}",
                           lambda: self._open(cfg))
      distributed.together(f"opening the checkpoint directory {self._ckpt_dir}",
                           lambda: self._open_manager(cfg))
    except BaseException:
      self.close_lock()
      raise

  def _open(self, cfg) -> None:
    """Checks, locks and cleans the directory (the primary), checks the config (all)."""
    try:
      os.makedirs(self.path, exist_ok=True)
    except OSError as e:
      raise WorkDirError(
          f"work directory {self.path} is not writable ({e.strerror or e}); "
          "choose another --workdir") from None
    self._refuse_links()
    if self.primary:
      self._probe_writable()
      self._acquire_lock()
    try:
      if self.primary:
        self._remove_temporaries()
      self._check_config(cfg)
      if os.path.exists(self._ckpt_dir) and not os.path.isdir(self._ckpt_dir):
        raise WorkDirError(f"{self._ckpt_dir} is not a directory; move it aside or "
                           "choose another --workdir")
      if self.primary:
        try:
          os.makedirs(self._ckpt_dir, exist_ok=True)
        except OSError as e:
          raise _io_error("creating the checkpoint directory", self._ckpt_dir, e) from e
        self._repair_metrics()
    except BaseException:
      self.close_lock()
      raise

  def _refuse_links(self) -> None:
    """WorkDirError for a symbolic link where a file or directory of bnlab's belongs."""
    for name in (".lock", "config.json", "data.json", "metrics.jsonl", "summary.json",
                 "checkpoints",
                 "tensorboard", "unreadable_checkpoints"):
      _refuse_link(os.path.join(self.path, name))
    if os.path.isdir(self._ckpt_dir):
      for name in os.listdir(self._ckpt_dir):
        _refuse_link(os.path.join(self._ckpt_dir, name))

  def _probe_writable(self) -> None:
    """Writes and removes a small file (removed on every path, a failed write included)."""
    probe = os.path.join(self.path, f".write-probe-{os.getpid()}")
    try:
      if os.path.lexists(probe):  # left by a process with this pid; maybe a link
        os.remove(probe)
      with open(probe, "x", opener=_no_follow) as f:
        f.write("ok")
    except OSError as e:
      raise WorkDirError(
          f"work directory {self.path} is not writable ({e.strerror or e}); "
          "choose another --workdir") from None
    finally:
      try:
        os.remove(probe)
      except OSError:
        pass

  def _open_manager(self, cfg) -> None:
    try:
      self._manager = ocp.CheckpointManager(
          self._ckpt_dir,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=cfg.train.keep_checkpoints, create=True,
              save_decision_policy=save_decision_policy(cfg.train)))
    except Exception as e:  # pylint: disable=broad-except
      raise _io_error("opening the checkpoint directory", self._ckpt_dir, e) from e

  # -- lock -----------------------------------------------------------------
  def _acquire_lock(self) -> None:
    self._lock_fd = acquire_lock(self._lock_path, self.path, "work directory")

  def close_lock(self) -> None:
    """Removes and releases the lock (removal first: no window for a third run)."""
    if self._lock_fd is None:
      return
    fd, self._lock_fd = self._lock_fd, None
    release_lock(self._lock_path, fd)

  def _remove_temporaries(self) -> None:
    """Half-written files a killed run left behind (never read: safe to drop).

    Includes orbax's `<step>.orbax-checkpoint-tmp*` directories, removed here,
    synchronously, rather than by orbax's background clean-up, which an early
    exit (a bad config found after the directory opened) could race at
    interpreter shutdown.
    """
    for name in os.listdir(self.path):
      if name.startswith((".tmp-", ".write-probe-")):
        try:
          os.remove(os.path.join(self.path, name))
        except OSError:
          pass
    ckpt_dir = os.path.join(self.path, "checkpoints")
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
    """Waits for pending checkpoint writes, then releases the directory."""
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
    finally:
      if self._tb is not None:
        try:
          self._tb.close()
        except Exception:  # pylint: disable=broad-except
          pass
        self._tb = None
      self.close_lock()

  # -- config ---------------------------------------------------------------
  def _check_config(self, cfg) -> None:
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
    self._hparams = hparams_of(new)
    self._config_json = new
    old, restored = None, False
    if os.path.exists(path):
      try:
        old = read_json_object(path, ": this run's config is unknown; restore the file, or "
                                "use a new --workdir")
      except WorkDirError:
        if self._holds_a_run():
          raise
    elif self._holds_a_run():
      old = self._checkpoint_record("config")
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
          _atomic_write(path, json.dumps(old, indent=2, sort_keys=True) + "\n")
        # The new config replaces config.json with the run's first write: a run refused
        # before it (e.g. made shorter) leaves the file as it was.
        self._pending_config = new if diff else None
        return
      if self.primary:
        self._replace_config(shown)
    elif os.path.exists(path) and self.primary:
      self._replace_config("config.json unreadable")
    if self.primary:
      _atomic_write(path, json.dumps(new, indent=2, sort_keys=True) + "\n")

  def _checkpoint_record(self, key: str):
    """What the newest checkpoint that has one records under `key` ("config", "data")."""
    try:
      steps = sorted((int(n) for n in os.listdir(self._ckpt_dir) if n.isdigit()),
                     reverse=True)
    except OSError:
      return None
    for step in steps:
      try:
        with open(os.path.join(self._ckpt_dir, str(step), CHECKSUMS)) as f:
          value = json.load(f).get(key)
      except (OSError, ValueError, AttributeError):
        continue
      if isinstance(value, dict):
        return value
    return None

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
      old = self._checkpoint_record("data")
    self._data_identity = dict(identity)
    if old is not None and old != identity and self._holds_a_run():
      changed = [k for k in sorted(identity.keys() | old.keys())
                 if old.get(k) != identity.get(k)]
      shown = ", ".join(f"{k}: {old.get(k)!r} -> {identity.get(k)!r}" for k in changed[:4])
      raise data_lib.DataError(
          f"the data differs from the data the run in {self.path} was trained on ({shown}); "
          "put that run's data files back, or use a new --workdir to train on this data")
    if self.primary and old != identity:
      _atomic_write(path, json.dumps(identity, indent=2, sort_keys=True) + "\n")

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
      recorded = os.path.getsize(self.metrics_path) > 0
    except OSError:
      recorded = False
    kept = []
    if recorded:  # the records first: a kill in between must not leave them to be dropped
      for name in ("metrics.jsonl", "tensorboard", "config.json"):
        src = os.path.join(self.path, name)
        if os.path.lexists(src):
          dest = _aside_path(src, "replaced")
          try:
            os.rename(src, dest)
          except OSError as e:
            raise _io_error("moving aside", src, e) from e
          kept.append(os.path.basename(dest))
    logging.warning(
        "Work directory %s holds no checkpoint: starting over with the new config (%s)%s",
        self.path, change, f"; the earlier attempt is kept as {', '.join(kept)}" if kept else "")

  # -- metrics --------------------------------------------------------------
  def _scan_metrics(self) -> tuple[list[dict], list[tuple[int, bytes]],
                                   list[tuple[int, bytes]]]:
    """(records, [(line number, line)] of the records, the same of the lines that are not)."""
    if not os.path.exists(self.metrics_path):
      return [], [], []
    try:
      with open(self.metrics_path, "rb") as f:
        data = f.read()
    except OSError as e:
      raise _io_error("reading", self.metrics_path, e) from e
    records, good, bad = [], [], []
    for number, line in enumerate(data.split(b"\n"), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line.decode())
      except ValueError:  # JSONDecodeError and UnicodeDecodeError
        record = None
      if not isinstance(record, dict) or type(record.get("step")) is not int:
        bad.append((number, line))
        continue
      records.append(decode_nonfinite(record))
      good.append((number, line))
    return records, good, bad

  def read_metrics(self) -> list[dict]:
    """Every record (the lines that are no record, e.g. torn writes, are left out)."""
    if self._records is not None:
      return list(self._records)
    return self._scan_metrics()[0]

  def _repair_metrics(self) -> None:
    """Moves the lines of metrics.jsonl that are no record aside, keeping every record.

    A torn last line is what a kill during a write leaves; a damaged line
    before it is not, and the warning says which. Either way the lines are
    kept in metrics.jsonl.damaged-<time> and every record stays.
    """
    _, good, bad = self._scan_metrics()
    if not bad:
      return
    dest = _aside_path(self.metrics_path, "damaged")
    try:
      with open(dest, "xb", opener=_no_follow) as f:
        f.write(b"".join(line + b"\n" for _, line in bad))
    except OSError as e:
      raise _io_error("writing", dest, e) from e
    _atomic_write(self.metrics_path, "".join(line.decode() + "\n" for _, line in good))
    numbers = ", ".join(str(n) for n, _ in bad[:20]) + (", ..." if len(bad) > 20 else "")
    last_only = len(bad) == 1 and (not good or bad[0][0] > good[-1][0])
    logging.warning(
        "%s: line%s %s %s no record (%s); moved %s to %s and kept every other record (%d)",
        self.metrics_path, "s" if len(bad) > 1 else "", numbers,
        "are" if len(bad) > 1 else "is",
        "a write cut off by a kill" if last_only else "damaged",
        "them" if len(bad) > 1 else "it", dest, len(good))

  def _write_pending_config(self) -> None:
    """config.json of a resumed run whose config changed (`_check_config`), once it writes."""
    config, self._pending_config = self._pending_config, None
    if config is not None and self.primary:
      _atomic_write(os.path.join(self.path, "config.json"),
                    json.dumps(config, indent=2, sort_keys=True) + "\n")

  def truncate_metrics_after(self, step: int) -> None:
    """Keeps the records up to `step` (the checkpoint resumed from), each step once."""
    self._write_pending_config()
    records, last = [], None
    for r in self.read_metrics():
      if r["step"] > step:
        break
      if last is not None and r["step"] <= last:
        continue
      records.append(r)
      last = r["step"]
    if not self.primary:
      self._records = records
      return
    _atomic_write(self.metrics_path, "".join(_dumps(r) + "\n" for r in records))

  def write_metrics(self, record: dict) -> None:
    self._write_pending_config()
    if not self.primary:
      if self._records is None:
        self._records = self.read_metrics()
      self._records.append(record)
      return
    try:  # the run's first record: nothing recorded before it
      first = os.path.getsize(self.metrics_path) == 0
    except OSError:
      first = True
    try:
      with open(self.metrics_path, "a", opener=_no_follow) as f:
        f.write(_dumps(record) + "\n")
        f.flush()
    except OSError as e:
      raise _io_error("appending to", self.metrics_path, e) from e
    self._write_tensorboard(record, first=first)

  def _write_tensorboard(self, record: dict, first: bool) -> None:
    """The record's scalars under namespaced tags; the run's hyperparameters with its first."""
    tb_dir = os.path.join(self.path, "tensorboard")
    try:
      if self._tb is None:
        self._tb = _summary_writer_class()(tb_dir)
      if first and self._hparams:
        # Written into the run's own event file (tensorboardX's add_hparams would
        # open a sub-directory), so the HParams dashboard pairs them with its scalars.
        from tensorboardX.summary import hparams  # pylint: disable=g-import-not-at-top
        for summary in hparams(self._hparams, {tag: 0.0 for tag in HPARAM_METRICS}):
          self._tb.file_writer.add_summary(summary)
      for key, value in record.items():
        tag = tensorboard_tag(key)
        if tag and isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(tag, value, record["step"])
      self._tb.flush()
    except OSError as e:
      raise _io_error("writing TensorBoard events to", tb_dir, e) from e

  def read_summary(self) -> dict | None:
    if self._summary is not None:
      return dict(self._summary)
    path = os.path.join(self.path, "summary.json")
    if not os.path.exists(path):
      return None
    return read_summary_file(path)

  def write_summary(self, summary: dict) -> None:
    self._write_pending_config()
    if not self.primary:
      self._summary = dict(summary)
      return
    _atomic_write(os.path.join(self.path, "summary.json"),
                  _dumps(summary, indent=2, sort_keys=True) + "\n")

  # -- checkpoints ----------------------------------------------------------
  def save(self, step: int, target, force: bool = False, replace: bool = False) -> None:
    """Starts writing checkpoint `step` if the save policy wants it, or `force`.

    Orbax publishes a checkpoint only once complete. The checkpoints written
    before are finished first (orbax would wait for them anyway) and sealed
    with their checksums. `replace`: a checkpoint `step` already there (from
    an attempt killed before it finished the run) is written anew.
    """
    self.wait()
    self._write_pending_config()
    try:
      with interrupts_deferred():
        if replace and step in self._manager.all_steps():
          self._manager.delete(step)
        if self._manager.save(
            step, args=ocp.args.StandardSave(flax.serialization.to_state_dict(target)),
            force=force):
          self._unsealed.append(step)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error([step], e) from e

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
    error = _io_error(what, self._ckpt_dir, e)
    try:
      done = [int(n) for n in os.listdir(self._ckpt_dir) if n.isdigit() and int(n) not in steps]
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
      step_dir = os.path.join(self._ckpt_dir, str(step))
      if not os.path.isdir(step_dir):  # orbax did not publish it, or removed it since
        continue
      path = os.path.join(step_dir, CHECKSUMS)
      try:
        manifest = {"format": 1, "step": step, "algorithm": "sha256",
                    "files": _checksums(step_dir), "config": self._config_json,
                    "data": self._data_identity}
      except (OSError, ValueError) as e:
        raise _io_error(f"computing the checksums of checkpoint {step} in", step_dir,
                        e) from e
      _atomic_write(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")

  def restore_latest(self, target):
    """The newest readable checkpoint restored into `target`'s structure, or None.

    Unreadable newer checkpoints are reported and moved aside to
    unreadable_checkpoints/ (so the resumed run can write those steps again).
    Raises WorkDirError, touching nothing, when checkpoints exist but none fits.
    """
    template = flax.serialization.to_state_dict(target)
    bad = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      step_dir = os.path.join(self._ckpt_dir, str(step))
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
                        os.path.join(self._ckpt_dir, str(step)), reason)
        bad.append((step, reason))
        continue
      for s, _ in bad:
        self._move_aside(s)
      return result
    if bad:
      step, reason = bad[0]
      raise WorkDirError(
          f"no checkpoint in {self._ckpt_dir} fits this run (step {step}: {reason}); "
          "they are damaged or from another model: move that directory aside to start "
          "over, or use a new --workdir")
    return None

  def _move_aside(self, step: int) -> None:
    src = os.path.join(self._ckpt_dir, str(step))
    dest_dir = os.path.join(self.path, "unreadable_checkpoints")

    def move():  # by the primary; then every process reloads the directory
      if not self.primary:
        return
      dest = os.path.join(dest_dir, str(step))
      n = 1
      while os.path.exists(dest):
        dest, n = os.path.join(dest_dir, f"{step}.{n}"), n + 1
      _refuse_link(dest_dir)
      try:
        os.makedirs(dest_dir, exist_ok=True)
        shutil.move(src, dest)
      except OSError as e:
        raise _io_error("moving the unreadable checkpoint", src, e) from e
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
