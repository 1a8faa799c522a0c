"""Where and with what a run ran: backend, devices, library versions, code version.

Every run's `summary.json`, its first log line and every study report carry
`environment()`, so a number can be traced to the machine and the code that
made it. Nothing here is written by hand: it is read from JAX, the installed
packages and git at run time.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import re
import subprocess
from typing import Any

import jax

# Distributions whose versions determine a run's numbers.
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _version(package: str) -> str:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return "not installed"


def _git(*args: str) -> str | None:
  try:
    out = subprocess.run(["git", "-C", _REPO_ROOT, *args], capture_output=True, text=True,
                         timeout=60, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


def _read(path: str) -> str | None:
  try:
    with open(path) as f:
      return f.read().strip()
  except OSError:
    return None


def _head_from_files() -> str | None:
  """HEAD's commit read from the repository's files: no subprocess, so no timeout.

  No subprocess, so cheap enough for every worker's start (`commit`) and free of
  git's timeout on a loaded machine. Handles a
  clone (`.git/` directory), a worktree (`.git` file naming its gitdir), a
  detached HEAD and packed refs. None where anything is unexpected (then git is
  asked).
  """
  dot_git = os.path.join(_REPO_ROOT, ".git")
  gitdir = dot_git
  if os.path.isfile(dot_git):
    line = _read(dot_git) or ""
    if not line.startswith("gitdir:"):
      return None
    gitdir = os.path.join(_REPO_ROOT, line[len("gitdir:"):].strip())
  head = _read(os.path.join(gitdir, "HEAD"))
  if head is None:
    return None
  if not head.startswith("ref:"):
    return head if re.fullmatch(r"[0-9a-f]{40}", head) else None
  ref = head[len("ref:"):].strip()
  # A worktree's branch refs live in the main repository ("commondir").
  common = _read(os.path.join(gitdir, "commondir"))
  roots = [gitdir] + ([os.path.join(gitdir, common)] if common else [])
  for root in roots:
    sha = _read(os.path.join(root, ref))
    if sha and re.fullmatch(r"[0-9a-f]{40}", sha):
      return sha
    packed = _read(os.path.join(root, "packed-refs")) or ""
    for line in packed.splitlines():
      parts = line.split()
      if len(parts) == 2 and parts[1] == ref and re.fullmatch(r"[0-9a-f]{40}", parts[0]):
        return parts[0]
  return None


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
  """The git commit of the bnlab checkout and whether its tree had uncommitted changes.

  `{"commit": "unknown", "dirty": None}` outside a git checkout (an installed wheel).
  Cached: the answer is fixed for the life of the process.
  """
  # A directory in a clone, a file in a `git worktree` checkout.
  if not os.path.exists(os.path.join(_REPO_ROOT, ".git")):
    return {"commit": "unknown", "dirty": None}
  commit = _head_from_files() or _git("rev-parse", "HEAD")
  if commit is None:
    return {"commit": "unknown", "dirty": None}
  status = _git("status", "--porcelain", "--untracked-files=no")
  return {"commit": commit, "dirty": None if status is None else bool(status)}


def commit() -> str:
  """HEAD's commit read from the checkout's files alone ("unknown" outside a checkout, or
  where they say nothing): quick enough to ask at every worker's start."""
  if not os.path.exists(os.path.join(_REPO_ROOT, ".git")):
    return "unknown"
  return _head_from_files() or "unknown"


def versions() -> dict[str, str]:
  """Python and the versions of the libraries that determine a run's numbers."""
  return {"python": platform.python_version(), **{p: _version(p) for p in _PACKAGES}}


def environment(deterministic: bool | None = None) -> dict[str, Any]:
  """The backend, devices, CPU cores, versions and code version of this process.

  `deterministic`: the run's `train.deterministic` setting, recorded as given
  (None where it does not apply, e.g. a report over several runs).
  Starts the JAX backend if it has not started yet.
  """
  devices = jax.devices()
  return {
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "process_count": jax.process_count(),
      "cpu_cores": os.cpu_count(),
      "deterministic": deterministic,
      "versions": versions(),
      "code": code_version(),
  }


def describe(env: dict[str, Any]) -> str:
  """One line for logs and reports, e.g. 'gpu: 1 x NVIDIA H100 ..., 16 CPU cores, ...'."""
  v = env["versions"]
  code = env["code"]
  commit = code["commit"][:12] if code["commit"] != "unknown" else "unknown"
  if code.get("dirty"):
    commit += " with uncommitted changes"
  det = env.get("deterministic")
  det_text = "" if det is None else f", deterministic {'on' if det else 'off'}"
  procs = f" in {env['process_count']} processes" if env.get("process_count", 1) > 1 else ""
  return (f"{env['backend']}: {env['device_count']} x {env['device_kind']}{procs}, "
          f"{env['cpu_cores']} CPU cores{det_text}; python {v['python']}, jax {v['jax']}, "
          f"jaxlib {v['jaxlib']}, flax {v['flax']}, optax {v['optax']}, "
          f"orbax-checkpoint {v['orbax-checkpoint']}; bnlab {commit}")
