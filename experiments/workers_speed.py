"""A study's run stage spread over workers: one process, N local workers, Ray; Ray's overhead.

  python experiments/workers_speed.py [--study=configs/studies/lr_sweep.py:runlocal]
      [--workers=2] [--modes=one,local,ray] [--rounds=1] [--noop_tasks=50]

Each mode trains the study's run stage from an empty work directory with the same
`--num_workers` (so every mode trains the same groups) and prints its wall time, from the
first process started to the last one ended: `one` is one `python -m bnlab.study
--stage=run`; `local` is --workers such processes started together on one directory;
`ray` is one driver with `--launcher=ray` and a local Ray cluster it starts (as many CPUs
as the machine has). With --rounds, the modes take turns, so a change in the machine's
load (it is shared) falls on each alike. Per group, each mode's overhead is the worker time
not spent in a group: (workers x wall - the groups' own times, as their "done in" lines
give them) / groups; it holds starting the processes, importing JAX, waiting for the last
group and, for Ray, the cluster and its workers. Ray's own costs apart: its cluster start
(`ray.init`) and the round trip of a no-op task (--noop_tasks of them in turn, mean). The
runs' results must be the same in every mode (the script checks results.json, times aside).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app, flags  # noqa: E402

_STUDY = flags.DEFINE_string("study", "configs/studies/lr_sweep.py:runlocal", "study config")
_WORKERS = flags.DEFINE_integer("workers", 2, "local workers, and --num_workers of every mode")
_MODES = flags.DEFINE_list("modes", ["one", "local", "ray"], "modes to time")
_NOOP = flags.DEFINE_integer("noop_tasks", 50, "no-op Ray tasks timed for the round trip")
_ROUNDS = flags.DEFINE_integer("rounds", 1, "times each mode runs, taking turns")
GROUP_DONE = re.compile(r"(?:Sweep group|Ray: group) \d+/\d+ done in ([\d.]+) s")


def command(workdir: str, *extra: str) -> list[str]:
  return [sys.executable, "-m", "bnlab.study", f"--config={_STUDY.value}",
          f"--workdir={workdir}", "--stage=run", f"--num_workers={_WORKERS.value}", *extra]


def timed(commands: list[list[str]]) -> tuple[float, str]:
  """Wall seconds of `commands` started together, until the last ends; their stderr."""
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  start = time.perf_counter()
  procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True) for c in commands]
  errs = [p.communicate()[1] for p in procs]
  seconds = time.perf_counter() - start
  for p, err in zip(procs, errs):
    if p.returncode:
      raise SystemExit(f"a worker failed ({p.returncode}):\n{err[-3000:]}")
  return seconds, "\n".join(errs)


def results(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "runs", "results.json")) as f:
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in json.load(f)]


def ray_round_trip(n: int) -> tuple[float, float]:
  """(seconds to start a local Ray cluster, mean seconds of a no-op task's round trip)."""
  import ray  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  ray.init(include_dashboard=False, logging_level="WARNING")
  started = time.perf_counter() - start
  noop = ray.remote(num_cpus=1)(lambda: None)
  ray.get(noop.remote())  # a worker process started
  start = time.perf_counter()
  for _ in range(n):
    ray.get(noop.remote())
  trip = (time.perf_counter() - start) / n
  ray.shutdown()
  return started, trip


def main(argv):
  del argv
  base = tempfile.mkdtemp(prefix="workers_speed_")
  rows, groups = {}, None
  for r in range(_ROUNDS.value):
    for mode in _MODES.value:
      wd = os.path.join(base, f"{mode}{r}")
      slots = 1 if mode == "one" else _WORKERS.value
      if mode == "ray":
        wall, err = timed([command(wd, "--launcher=ray")])
      else:
        wall, err = timed([command(wd)] * slots)
      rows[mode] = results(wd)
      found = re.search(r"in (\d+) groups", err)
      groups = int(found.group(1)) if found else groups
      inside = sum(float(t) for t in GROUP_DONE.findall(err))
      print(f"round {r + 1} {mode}: {wall:.1f} s wall; {(slots * wall - inside) / groups:.1f} s "
            f"per group outside the groups ({slots} worker(s), {groups} groups)", flush=True)
  first = next(iter(rows.values()))
  assert all(r == first for r in rows.values()), "the modes' results differ"
  print(f"results identical in {', '.join(rows)} ({len(first)} runs, {groups} groups)")
  if "ray" in _MODES.value:
    started, trip = ray_round_trip(_NOOP.value)
    print(f"ray: cluster start {started:.1f} s; no-op task round trip {trip * 1e3:.1f} ms")


if __name__ == "__main__":
  app.run(main)
