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
  config.json.edited-<time>, data.json.damaged-<time> (and the like)  a file
                   that disagreed with its checkpoint's copy, restored from it

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
  - A resume checks the config and the data against the run's, as the newest
    checkpoint's copy records them, not config.json or data.json (which a user
    may edit): a file that disagrees with that copy (edited, damaged, missing,
    a section deleted) is named in the refusal of a rerun that differs from
    the run, and restored from the copy (the file kept as
    <name>.edited-<time> or <name>.damaged-<time>) for one that does not
    (`identity.RunIdentity`); a run whose config is nowhere is refused.

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

import os

from bnlab.engine import distributed
from bnlab.rundir import checkpoints as checkpoints_lib
from bnlab.rundir import identity as identity_lib
from bnlab.rundir import records as records_lib
from bnlab.rundir.errors import WorkDirError
from bnlab.rundir.files import no_follow, refuse_link
from bnlab.rundir.locks import acquire_lock, release_lock
from bnlab.rundir.records import hparams_of


class WorkDir:
  """Owns one run's directory for the lifetime of the run.

  It opens the directory (checks, lock, clean-up) and closes it; the rest it
  hands to the helpers it owns, one a concern: `identity.RunIdentity`
  (config.json, data.json), `records.Records` (metrics, summary, TensorBoard)
  and `checkpoints.Checkpoints` (orbax, checksums).
  """

  def __init__(self, path: str, cfg):
    if not isinstance(path, str) or not path.strip():
      raise WorkDirError(f"the work directory is empty ({path!r}); give one with "
                         "--workdir=DIR (use --workdir=. for the current directory)")
    self.path = os.path.abspath(path)
    self._lock_fd = None
    # Only the primary process writes records; the others keep theirs in memory.
    self.primary = distributed.is_primary()
    self._lock_path = os.path.join(self.path, ".lock")
    self._identity = identity_lib.RunIdentity(self.path, self.primary)
    self._records = records_lib.Records(self.path, self.primary)
    self.metrics_path = self._records.metrics_path
    self._checkpoints = checkpoints_lib.Checkpoints(self.path, self.primary,
                                                    self._identity.carried)
    self._ckpt_dir = self._checkpoints.dir
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
                           lambda: self._checkpoints.open(cfg))
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
      self._identity.check_config(cfg)
      self._records.hparams = hparams_of(self._identity.config_json)
      self._checkpoints.make_dir()
      if self.primary:
        self._records.repair_metrics()
    except BaseException:
      self.close_lock()
      raise

  def _refuse_links(self) -> None:
    """WorkDirError for a symbolic link where a file or directory of bnlab's belongs."""
    for name in (".lock", "config.json", "data.json", "metrics.jsonl", "summary.json",
                 "checkpoints",
                 "tensorboard", "unreadable_checkpoints"):
      refuse_link(os.path.join(self.path, name))
    if os.path.isdir(self._ckpt_dir):
      for name in os.listdir(self._ckpt_dir):
        refuse_link(os.path.join(self._ckpt_dir, name))

  def _probe_writable(self) -> None:
    """Writes and removes a small file (removed on every path, a failed write included)."""
    probe = os.path.join(self.path, f".write-probe-{os.getpid()}")
    try:
      if os.path.lexists(probe):  # left by a process with this pid; maybe a link
        os.remove(probe)
      with open(probe, "x", opener=no_follow) as f:
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

    Those in checkpoints/ too (`checkpoints.Checkpoints.remove_temporaries`).
    """
    for name in os.listdir(self.path):
      if name.startswith((".tmp-", ".write-probe-")):
        try:
          os.remove(os.path.join(self.path, name))
        except OSError:
          pass
    self._checkpoints.remove_temporaries()

  def close(self) -> None:
    """Waits for pending checkpoint writes, then releases the directory."""
    try:
      self._checkpoints.close()
    finally:
      self._records.close()
      self.close_lock()

  def check_data(self, identity: dict) -> None:
    """Compares the data with the run's (data.json) and records it (`RunIdentity.check_data`)."""
    self._identity.check_data(identity)

  # -- records (each write first writes the config.json of a changed config) ---
  def read_metrics(self) -> list[dict]:
    """Every record (the lines that are no record, e.g. torn writes, are left out)."""
    return self._records.read_metrics()

  def truncate_metrics_after(self, step: int) -> None:
    """Keeps the records up to `step` (the checkpoint resumed from), each step once."""
    self._identity.write_pending_config()
    self._records.truncate_metrics_after(step)

  def write_metrics(self, record: dict) -> None:
    """Appends `record` to metrics.jsonl, and its scalars to TensorBoard."""
    self._identity.write_pending_config()
    self._records.write_metrics(record)

  def read_summary(self) -> dict | None:
    """The run's summary.json (None before it is written)."""
    return self._records.read_summary()

  def write_summary(self, summary: dict) -> None:
    """Writes summary.json: the run's final numbers, written last."""
    self._identity.write_pending_config()
    self._records.write_summary(summary)

  # -- checkpoints ----------------------------------------------------------
  def save(self, step: int, target, force: bool = False, replace: bool = False) -> bool:
    """Starts writing checkpoint `step` if the save policy wants it, or `force`; whether it did.

    Orbax publishes a checkpoint only once complete. The checkpoints written
    before are finished first (orbax would wait for them anyway) and sealed
    with their checksums. `replace`: a checkpoint `step` already there (from
    an attempt killed before it finished the run) is written anew.
    """
    self.wait()
    self._identity.write_pending_config()
    return self._checkpoints.save(step, target, force=force, replace=replace)

  def wait(self) -> None:
    """Waits for the checkpoints being written, then writes their checksums."""
    self._checkpoints.wait()

  def restore_latest(self, target):
    """The newest readable checkpoint restored into `target`'s structure, or None.

    Unreadable newer checkpoints are moved aside (`checkpoints.Checkpoints.restore_latest`).
    """
    return self._checkpoints.restore_latest(target)
