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
                         timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() if out.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
  """The git commit of the bnlab checkout and whether its tree had uncommitted changes.

  `{"commit": "unknown", "dirty": None}` outside a git checkout (an installed wheel).
  Cached: the answer is fixed for the life of the process.
  """
  # A directory in a clone, a file in a `git worktree` checkout.
  if not os.path.exists(os.path.join(_REPO_ROOT, ".git")):
    return {"commit": "unknown", "dirty": None}
  commit = _git("rev-parse", "HEAD")
  if commit is None:
    return {"commit": "unknown", "dirty": None}
  status = _git("status", "--porcelain", "--untracked-files=no")
  return {"commit": commit, "dirty": None if status is None else bool(status)}


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
