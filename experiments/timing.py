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


def interleaved_rates(runs: dict, steps: int, batch: int, reps: int) -> dict:
  """Examples/s of each `runs[name](steps)`, timed round-robin: median of `reps` rounds.

  Each runner is called once untimed first (warm-up). Interleaving makes a
  slow spell of a shared machine fall on every runner alike instead of on
  whichever happened to be timing then.
  """
  for run in runs.values():
    run(steps)
  times = {name: [] for name in runs}
  for _ in range(reps):
    for name, run in runs.items():
      t0 = time.perf_counter()
      run(steps)
      times[name].append(time.perf_counter() - t0)
  return {name: steps * batch / statistics.median(t) for name, t in times.items()}
