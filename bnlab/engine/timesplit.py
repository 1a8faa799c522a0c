"""Where a run's wall time goes: start-up, compilation, train steps, evaluation, checkpoints, logs.

JAX reports every compilation it does (tracing, lowering, XLA compilation or a
persistent-cache read) through `jax.monitoring`; `compile_seconds()` sums
those reports in this process. `TimeSplit` measures named phases and moves
the compilation that happened inside each one into its own part, so that
"train" is the train steps proper and "compile" every compilation, wherever
it happened.
"""

from __future__ import annotations

import contextlib
import threading
import time

from jax import monitoring

# The compilation events JAX records (jax._src.dispatch): a top-level trace,
# lowering to MLIR, and XLA's compilation (or the persistent cache's read).
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
PARTS = ("startup", "compile", "train", "evaluate", "checkpoint", "log")

_lock = threading.Lock()
_compile_by_thread: dict[int, float] = {}


def _on_duration(event: str, duration: float, **_) -> None:
  if event in _COMPILE_EVENTS:
    thread = threading.get_ident()
    with _lock:
      _compile_by_thread[thread] = _compile_by_thread.get(thread, 0.0) + duration


monitoring.register_event_duration_secs_listener(_on_duration)


def compile_seconds() -> float:
  """Seconds this thread has spent compiling (tracing, lowering, XLA) so far.

  Per thread: compilations in background threads (a checkpointer's) overlap
  the run instead of adding to it.
  """
  with _lock:
    return _compile_by_thread.get(threading.get_ident(), 0.0)


class TimeSplit:
  """The wall time since `start` (a `time.perf_counter()` value) split into `PARTS`.

  `phase(name)` times a block: its seconds go to `name`, less the compilation
  inside it (on the calling thread), which goes to "compile". `mark_startup()` closes the start-up
  phase (from `start` to now). `as_dict()` adds "total" (since `start`) and
  "other" (what no phase covered).
  """

  def __init__(self, start: float | None = None):
    self.start = time.perf_counter() if start is None else start
    self._compile_at_start = compile_seconds()
    self.seconds = dict.fromkeys(PARTS, 0.0)

  def _add(self, name: str, wall: float, compiled: float) -> None:
    # JAX reports a compilation when it ends: one begun before the block counts
    # whole, so at most the block's own wall time is booked as compilation.
    compiled = min(max(compiled, 0.0), wall)
    self.seconds[name] += wall - compiled
    self.seconds["compile"] += compiled

  def mark_startup(self) -> None:
    """Books the time from `start` to now as start-up (its compilation as compile)."""
    self._add("startup", time.perf_counter() - self.start,
              compile_seconds() - self._compile_at_start)

  @contextlib.contextmanager
  def phase(self, name: str):
    if name not in PARTS or name in ("compile", "startup"):
      raise ValueError(f"phase {name!r}; expected one of {PARTS[2:]}")
    t0, c0 = time.perf_counter(), compile_seconds()
    try:
      yield
    finally:
      self._add(name, time.perf_counter() - t0, compile_seconds() - c0)

  def as_dict(self) -> dict[str, float]:
    total = time.perf_counter() - self.start
    out = {"total": total, **self.seconds}
    out["other"] = max(total - sum(self.seconds.values()), 0.0)
    return {k: round(v, 3) for k, v in out.items()}


def describe(split: dict[str, float]) -> str:
  """One line: '14.9 s: startup 1.2 s, compile 3.1 s, train 4.8 s, ...'."""
  parts = [f"{k} {split[k]:.1f} s" for k in PARTS + ("other",) if k in split]
  return f"{split['total']:.1f} s: " + ", ".join(parts)
