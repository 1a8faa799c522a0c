"""Which worker trains which group: one claim file per group in the shared work directory.

Any number of processes (local ones, a SLURM job array, Ray tasks) run one sweep in one
directory; each group is trained by the worker that claims it first, so none is trained
twice at once. A claim is a file created with O_EXCL, which is atomic on local disks, NFS
and Lustre (a flock is not honoured across hosts on every such mount), naming its holder;
the holder's heartbeat thread refreshes its modification time. A claim is taken over when
its holder is dead: on the same machine (same boot and pid namespace) at once, when its
process is gone; from another machine when its heartbeat is older than `timeout_s`,
measured on the file system's own clock (the age of a file this worker has just touched),
so the hosts' clocks need not agree. A takeover creates the group's next claim file
(`ID.1` after `ID.0`), which only one worker can; a holder whose claim was superseded or
removed stops at once, writing nothing more (`lost`), since another worker may be training
its group by then.

A group that fails (an error, not a diverged run) leaves `ID.failed` with its members'
errors: a worker started before that skips the group and reports those errors, so N
workers do not each fail it in turn; a worker started after it (a rerun) tries again.

Each worker also keeps a record in `_claims/workers/`: its command's fingerprint (the
groups, their members' configs, bnlab's version) and its host and pid. A worker whose
fingerprint differs from a live one's is refused before it claims anything: two commands
that group the members otherwise would train one member in two groups.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
import uuid

from absl import logging

from bnlab import config as config_lib
from bnlab.rundir import errors as rundir_errors

DIR = "_claims"
HEARTBEAT_S = 30.0
TIMEOUT_S = 300.0  # 10 missed heartbeats: a holder on another host is taken for dead


def _process_start(pid: int) -> str | None:
  """When process `pid` started (its /proc stat field 22), or None when it is gone; so a
  reused pid does not keep a dead holder's claim. Without /proc: "alive" when it exists."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except FileNotFoundError:
    if os.path.isdir("/proc"):
      return None
  except (OSError, IndexError):
    return None
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return None
  except PermissionError:
    pass
  return "alive"


def machine() -> str:
  """This machine as its processes see each other: host name, boot and pid namespace (two
  containers with one host name do not see each other's pids)."""
  parts = [socket.gethostname()]
  for path in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
    try:
      parts.append(open(path).read().strip() if "boot" in path else str(os.stat(path).st_ino))
    except OSError:
      parts.append("")
  return "/".join(parts)


def fingerprint(groups: list) -> str:
  """The sha256 of `groups` (JSON: what the workers must agree on, e.g. the groups' ids) and
  of bnlab's version and commit: what every worker of one directory must share."""
  from bnlab import __version__  # pylint: disable=g-import-not-at-top
  from bnlab.engine import provenance  # pylint: disable=g-import-not-at-top
  text = json.dumps({"groups": groups, "bnlab": [__version__, provenance.commit()]})
  return hashlib.sha256(text.encode()).hexdigest()


class Lost(Exception):
  """This worker's claim (or record) was taken over or removed while it held it."""


def _exit_lost(message: str) -> None:
  """What a worker does when its claim is lost: one line, and stop at once (no checkpoint,
  no record: another worker may own the group now)."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  os._exit(2)  # pylint: disable=protected-access


class Claims:
  """This worker's claims on the groups of the sweep in `sweep_dir`, and its record.

  Use as a context manager: entering writes the record (refusing a fingerprint that
  differs from a live worker's) and starts the heartbeat; leaving releases every claim.
  `on_lost(message)` is called from the heartbeat thread when a claim or the record is
  gone or superseded (default: one line on stderr, exit status 2).
  """

  def __init__(self, sweep_dir: str, fingerprint_: str, heartbeat_s: float = HEARTBEAT_S,
               timeout_s: float = TIMEOUT_S, on_lost=_exit_lost):
    self.dir = os.path.join(sweep_dir, DIR)
    self.fingerprint = fingerprint_
    self.heartbeat_s, self.timeout_s, self.on_lost = heartbeat_s, timeout_s, on_lost
    self.machine = machine()
    self.token = uuid.uuid4().hex
    self.record = os.path.join(self.dir, "workers", f"{socket.gethostname()}-{os.getpid()}-"
                               f"{self.token[:8]}.json")
    self.held: dict[str, str] = {}  # group id -> its claim file
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread = None
    self.seen_others = False  # another live worker was seen in this directory
    self.started = 0.0  # when the record was written, on the file system's clock

  # -- the record ---------------------------------------------------------------------
  def _info(self) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "pid_start": _process_start(os.getpid()), "machine": self.machine,
            "token": self.token, "fingerprint": self.fingerprint, "argv": sys.argv[:8]}

  def __enter__(self) -> "Claims":
    try:
      os.makedirs(os.path.join(self.dir, "workers"), exist_ok=True)
      _create(self.record, self._info())
    except OSError as e:
      raise rundir_errors.io_error("writing the worker record", self.record, e) from None
    self.started = os.stat(self.record).st_mtime  # on the file system's clock
    try:
      self._check_other_workers()
    except BaseException:
      _remove(self.record)
      raise
    self._thread = threading.Thread(target=self._beat, name="bnlab-claims", daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    with self._lock:
      for gid in list(self.held):
        self._release(gid)
    _remove(self.record)

  def now(self) -> float:
    """The file system's clock: this worker's record touched, then its mtime read."""
    try:
      os.utime(self.record)
      return os.stat(self.record).st_mtime
    except FileNotFoundError:
      raise rundir_errors.WorkDirError(
          f"this worker's record {self.record} vanished; the work directory must be one "
          "directory that every worker shares and nobody removes") from None

  def alive(self, info: dict, mtime: float, now: float) -> bool:
    """Whether the holder `info` of a file last touched at `mtime` is alive ({}: a file
    being written, alive while young)."""
    if info.get("machine") == self.machine:
      pid = info.get("pid")
      return isinstance(pid, int) and _process_start(pid) == info.get("pid_start")
    return now - mtime <= self.timeout_s

  def _check_other_workers(self) -> None:
    """ConfigError (one line) when a live worker runs this directory with another
    fingerprint; the records of dead workers are removed."""
    folder = os.path.join(self.dir, "workers")
    now = self.now()
    for name in sorted(os.listdir(folder)):
      path = os.path.join(folder, name)
      if path == self.record:
        continue
      info, mtime = _read(path)
      if info is None:
        continue
      if not self.alive(info, mtime, now):
        _remove(path)
        continue
      self.seen_others = True
      if info.get("fingerprint") != self.fingerprint:
        raise config_lib.ConfigError(
            f"worker process {info.get('pid')} on host {info.get('host')} "
            f"({' '.join(info.get('argv') or [])[:160]}) runs {os.path.dirname(self.dir)} "
            "with another config, grouping or bnlab version (its fingerprint "
            f"{str(info.get('fingerprint'))[:12]} is not this worker's "
            f"{self.fingerprint[:12]}); start every worker of one directory with the same "
            "command (config, overrides, --num_workers, --max_group_size) and the same "
            "bnlab, or use another --workdir")

  # -- claims ---------------------------------------------------------------------------
  def _numbers(self, gid: str) -> list[int]:
    """The numbers of the group's claim files, newest first."""
    return sorted((int(n) for stem, _, n in (name.rpartition(".") for name in os.listdir(self.dir))
                   if stem == gid and n.isdigit()), reverse=True)

  def _current(self, gid: str) -> tuple[int | None, dict | None, float]:
    """(number, holder, mtime) of the group's newest claim file; (None, None, 0): unclaimed.

    A file released while it is read is looked for again: a takeover (the next number)
    may follow only a file that is there and whose holder is dead, never one just
    released, which a worker finding no file at all claims as number 0 (O_EXCL, once)."""
    for _ in range(100):
      numbers = self._numbers(gid)
      if not numbers:
        return None, None, 0.0
      path = os.path.join(self.dir, f"{gid}.{numbers[0]}")
      info, mtime = _read(path)
      if info is not None:
        return numbers[0], info, mtime
      try:  # being written, or left empty by a holder killed then: its age decides
        return numbers[0], {}, os.stat(path).st_mtime
      except OSError:
        continue  # released meanwhile
    raise rundir_errors.WorkDirError(
        f"the claims of group {gid} in {self.dir} keep changing; check that no other program "
        "writes there, then rerun")

  def holder(self, gid: str) -> dict | None:
    """The live holder of group `gid` other than this worker, or None."""
    _, info, mtime = self._current(gid)
    if info is None or info.get("token") == self.token:
      return None
    if not self.alive(info, mtime, self.now()):
      return None
    self.seen_others = True
    return info

  def claim(self, gid: str) -> bool:
    """Claims group `gid`: True when this worker now holds it, False when another does."""
    with self._lock:
      if gid in self.held:
        return True
      n, info, mtime = self._current(gid)
      if info is not None and self.alive(info, mtime, self.now()):
        self.seen_others = True
        return False
      path = os.path.join(self.dir, f"{gid}.{0 if n is None else n + 1}")
      try:
        _create(path, self._info())
      except FileExistsError:
        return False
      numbers = self._numbers(gid)
      if int(path.rpartition(".")[2]) not in numbers:
        raise rundir_errors.WorkDirError(
            f"the claim {path} this worker has just written is not there; the work "
            "directory must be one directory that every worker shares and nobody removes")
      if numbers[0] != int(path.rpartition(".")[2]):  # a takeover came between: it wins
        _remove(path)
        return False
      if info:
        logging.warning("Taking over group %s from worker process %s on host %s, which has "
                        "ended; it resumes from its checkpoints", gid, info.get("pid"),
                        info.get("host"))
      for k in range(n + 1 if n is not None else 0):
        _remove(os.path.join(self.dir, f"{gid}.{k}"))
      self.held[gid] = path
      return True

  def release(self, gid: str) -> None:
    with self._lock:
      self._release(gid)

  def _release(self, gid: str) -> None:
    path = self.held.pop(gid, None)
    if path is not None and (_read(path)[0] or {}).get("token") == self.token:
      _remove(path)

  # -- failures -------------------------------------------------------------------------
  def record_failure(self, gid: str, errors: dict[str, str]) -> None:
    """Records that group `gid` failed with `errors` ({member: error}); none: it trained,
    and an older record of a failure goes."""
    path = os.path.join(self.dir, f"{gid}.failed")
    if not errors:
      _remove(path)
      return
    from bnlab.rundir import files as rundir_files  # pylint: disable=g-import-not-at-top
    rundir_files.atomic_write(path, json.dumps({"errors": errors}))

  def failed_since_start(self, gid: str) -> dict[str, str] | None:
    """{member: error} of group `gid` when a worker failed it after this one started (this
    worker then leaves it alone), else None."""
    info, mtime = _read(os.path.join(self.dir, f"{gid}.failed"))
    if info is None or mtime < self.started or not isinstance(info.get("errors"), dict):
      return None
    return info["errors"]

  # -- the heartbeat --------------------------------------------------------------------
  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        self.check()
      except Lost as e:
        self.on_lost(str(e))
        return

  def check(self) -> None:
    """Refreshes the record and every claim held; `Lost` when one is gone or superseded."""
    with self._lock:
      if not os.path.isdir(self.dir):
        raise Lost(f"the claims directory {self.dir} vanished while this worker ran; the "
                   "work directory must be one directory that every worker shares and "
                   "nobody removes: stopped without writing more, rerun the same command")
      for path in [self.record, *self.held.values()]:
        info, _ = _read(path)
        if info is None or info.get("token") != self.token:
          raise Lost(f"this worker's claim {path} was taken over or removed (its heartbeat "
                     f"may have been older than {self.timeout_s:.0f} s, or the directory is "
                     "not the same for every worker): stopped without writing more; another "
                     "worker resumes the group from its checkpoints")
        gid, _, n = os.path.basename(path).rpartition(".")
        if path != self.record and os.path.exists(os.path.join(self.dir, f"{gid}.{int(n) + 1}")):
          raise Lost(f"this worker's claim on group {gid} was taken over by another worker "
                     f"(its heartbeat may have been older than {self.timeout_s:.0f} s): "
                     "stopped without writing more; the other worker resumes the group")
        try:
          os.utime(path)
        except OSError:
          pass


def _create(path: str, info: dict) -> None:
  """`path` created with O_EXCL (FileExistsError when it exists) holding `info`."""
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
  try:
    os.write(fd, json.dumps(info).encode())
    os.fsync(fd)
  finally:
    os.close(fd)


def _read(path: str) -> tuple[dict | None, float]:
  """(the JSON object in `path`, its mtime); (None, 0) when it is missing or unreadable."""
  try:
    with open(path) as f:
      mtime = os.fstat(f.fileno()).st_mtime
      info = json.load(f)
  except (OSError, ValueError):
    return None, 0.0
  return (info if isinstance(info, dict) else None), mtime


def _remove(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass
