"""The benchmark's timer, shared by its in-process and subprocess peers (stdlib only)."""

from __future__ import annotations

import statistics
import time


def median_rate(run, steps: int, batch: int, reps: int, warm_up: bool = True) -> float:
  """Examples/s of `run(steps)`: median of `reps` timed calls (after a 3-step warm-up)."""
  if warm_up:
    run(3)
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    run(steps)
    times.append(time.perf_counter() - t0)
  return steps * batch / statistics.median(times)
