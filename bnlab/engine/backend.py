"""Backend set-up: XLA's deterministic mode (before JAX starts) and the persistent compilation cache.

`train.deterministic` (default on) asks for bit-identical results run to run:
kill-and-resume, grouped-vs-solo and rerun-twice. On CPU, XLA's programs are
already deterministic and nothing is set. On a GPU, XLA's reductions,
scatters and autotuning may pick a different order or kernel on every
compilation; `--xla_gpu_deterministic_ops=true` makes them deterministic.
XLA reads that flag once, when the backend starts, so `configure()` must run
before the first JAX computation (`python -m bnlab.main`, `bnlab.sweep` and
`bnlab.study` call it first thing; in your own program, call it after
importing bnlab and before using JAX). The flag is set only where a GPU
backend can start; TPU and CPU programs never see it.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil

from jax._src import xla_bridge

GPU_DETERMINISM_FLAG = "--xla_gpu_deterministic_ops"
_GPU_PLATFORMS = ("cuda", "rocm", "gpu")


class BackendError(RuntimeError):
  """The requested backend set-up cannot be honoured; the message says how to fix it."""


def _flag_value(flags: str) -> bool | None:
  """The value `XLA_FLAGS` gives the determinism flag (the last one wins); None if unset."""
  value = None
  for item in flags.split():
    name, _, v = item.partition("=")
    if name == GPU_DETERMINISM_FLAG:
      value = v.lower() not in ("false", "0")
  return value


def gpu_backend_possible(platforms: str | None = None) -> bool:
  """Whether this process may start a GPU backend (platform list, else installed plugins).

  `platforms`: a JAX platform list such as "cuda,cpu"; None reads JAX's own
  setting (`jax_platforms`, `$JAX_PLATFORMS`).
  """
  if platforms is None:
    import jax  # pylint: disable=g-import-not-at-top
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return any(p.strip().lower() in _GPU_PLATFORMS for p in platforms.split(","))
  if importlib.util.find_spec("jax_plugins") is None:
    return False
  import jax_plugins  # pylint: disable=g-import-not-at-top
  return any(any(p in m.name.lower() for p in ("cuda", "rocm"))
             for m in pkgutil.iter_modules(jax_plugins.__path__))


def backend_started() -> bool:
  """Whether JAX has started its backends (after which XLA_FLAGS is not read again)."""
  return xla_bridge.backends_are_initialized()


def gpu_ops_deterministic() -> bool:
  """Whether XLA:GPU was (or will be) started with deterministic ops."""
  return bool(_flag_value(os.environ.get("XLA_FLAGS", "")))


def configure(deterministic: bool) -> None:
  """Sets XLA's GPU determinism flag to `deterministic` before JAX starts.

  After JAX has started, nothing can change: asking for determinism that a
  running GPU backend lacks raises BackendError; asking for speed where the
  flag is already on runs deterministically anyway (never less reproducible
  than asked). Off sets nothing: XLA's defaults, or what XLA_FLAGS says.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  current = _flag_value(flags)
  if backend_started():
    if deterministic and not current and _gpu_started():
      raise BackendError(
          "train.deterministic=True but JAX's GPU backend started without "
          f"{GPU_DETERMINISM_FLAG}=true; call bnlab.engine.backend.configure(True) before the "
          "first JAX computation (or export XLA_FLAGS="
          f"{GPU_DETERMINISM_FLAG}=true), or set train.deterministic=False")
    return
  # Off: nothing to set (a flag the user's own XLA_FLAGS sets stays as it is).
  if not deterministic or current or not gpu_backend_possible():
    return
  os.environ["XLA_FLAGS"] = f"{flags} {GPU_DETERMINISM_FLAG}=true".strip()


def enable_compilation_cache(directory: str) -> str | None:
  """Turns on JAX's persistent compilation cache in `directory`; returns the directory used.

  A rerun, a resumed run or another run of the same programs then reads its
  compiled programs from disk instead of compiling them. Every program is
  cached (`jax_persistent_cache_min_compile_time_secs=0`; bnlab's programs
  compile in well under JAX's default threshold of a second), unless
  $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS sets it. A cache directory
  already set (`jax_compilation_cache_dir`, $JAX_COMPILATION_CACHE_DIR) is
  kept: that one is returned. Takes effect from the next compilation.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  try:
    os.makedirs(directory, exist_ok=True)
  except OSError as e:
    raise BackendError(
        f"cannot create the compilation cache directory {directory} ({e.strerror or e}); "
        "set config.data.cache_dir (or $BNLAB_CACHE_DIR) to a writable directory, or "
        "config.train.compilation_cache=False") from None
  jax.config.update("jax_compilation_cache_dir", directory)
  return directory


def configure_run(cfg) -> None:
  """A run config's backend set-up, before JAX starts: deterministic mode
  (`train.deterministic`) and the compilation cache in <data cache dir>/jax
  (`train.compilation_cache`)."""
  configure(cfg.train.deterministic)
  if cfg.train.compilation_cache:
    from bnlab import data  # pylint: disable=g-import-not-at-top
    enable_compilation_cache(os.path.join(cfg.data.cache_dir or data.default_cache_dir(), "jax"))


def _gpu_started() -> bool:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.default_backend() in ("gpu", "cuda", "rocm")


def deterministic() -> bool:
  """Whether this process computes deterministically: always on CPU/TPU, per the flag on GPU."""
  return not _gpu_started() or gpu_ops_deterministic()
