"""Locks: one process at a time on a work directory (or a sweep's directory).

A flock, not a pid file: the kernel releases it when its process dies, so a
lock left by a killed run never blocks the next one; the file's contents only
name the holder of a live lock in the error a second run gets. A shared lock
lets the workers of one sweep or study in together while keeping out a process
that needs the directory alone (a study's register and report stages).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys

from absl import logging

from bnlab.rundir.errors import WorkDirError, io_error


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


def acquire_lock(lock_path: str, owner: str, what: str, shared: bool = False) -> int:
  """An exclusive flock on `lock_path` (the fd), released by the kernel when its process dies.

  A lock left by a killed run is therefore never live, whatever pid it names
  (pid reuse cannot keep it); the file only tells who holds a live one.
  WorkDirError names the holder when `what` `owner` is in use. `shared`: a
  shared flock, which other shared holders may hold too (the file then names
  the last of them); release it with `remove=False`.
  """
  for _ in range(5):
    try:
      fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
      raise io_error("creating the lock file", lock_path, e) from e
    try:
      fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe_holder(_read_lock_info(fd))
      os.close(fd)
      raise WorkDirError(
          f"{what} {owner} is in use by {holder}; wait for it to "
          "finish, stop it, or choose another --workdir") from None
    except OSError as e:
      os.close(fd)
      raise io_error("locking", lock_path, e) from e
    try:  # the file may have been removed by its last holder meanwhile
      same = os.fstat(fd).st_ino == os.lstat(lock_path).st_ino
    except FileNotFoundError:
      same = False
    if not same:
      os.close(fd)
      continue
    old = _read_lock_info(fd)
    if old and not shared:  # a shared lock's last holder may well be alive
      logging.warning("Taking over the lock left in %s by %s, which has ended",
                      owner, _describe_holder(old))
    info = {"pid": os.getpid(), "host": socket.gethostname(), "argv": sys.argv[:8]}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps(info).encode())
    return fd
  raise WorkDirError(f"could not lock {owner}: its lock file keeps changing; "
                     "check that no other run uses it, then rerun")


def release_lock(lock_path: str, fd: int, remove: bool = True) -> None:
  """Removes and releases a lock of `acquire_lock` (removal first: no window for a third).

  `remove=False` for a shared lock: removing the file while others hold it would
  let an exclusive holder lock a new file beside theirs.
  """
  if remove:
    try:
      os.remove(lock_path)
    except OSError:
      pass
  os.close(fd)


@contextlib.contextmanager
def held_briefly(lock_path: str):
  """An exclusive flock on `lock_path` held while the block runs, waiting for it: for a
  read-modify-write of a file that concurrent workers share (milliseconds, so waiting is
  right). The file stays (removing it would let two lock different files)."""
  try:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
  except OSError as e:
    raise io_error("creating the lock file", lock_path, e) from e
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)
