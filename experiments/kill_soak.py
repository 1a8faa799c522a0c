"""Kill soak: SIGKILL runs at random moments, restart them, and check they end exact.

Each attempt starts `python -m bnlab.main` on a fresh work directory, kills it
with SIGKILL after a random delay (1 to `--max_kills` times; half the delays
anywhere in the process's life, half once training has begun, where most time
goes to writing checkpoints), reruns the same command until it finishes, and
compares the result with an uninterrupted reference run: every array of the
final checkpoint (params, batch_stats, optimizer state, rng, metric sums) bit
for bit, metrics.jsonl and summary.json (except the timings and the environment).

  python experiments/kill_soak.py --attempts=20 --workdir=/tmp/kill_soak

Prints one line per attempt and `resumed exactly: N/M`.

`--signal=term` preempts instead: SIGTERM at the same random moments, on a run
checkpointed as by default (at most one checkpoint per
`train.checkpoint_min_interval_secs`, 30 s: none between the first and the
last here), so that only the checkpoint the signal makes keeps the work. Each
preempted process must exit with status 143 (or, signalled before its
handlers are installed, die with nothing trained); the work lost per
preemption is the steps its records reach past its newest checkpoint (0
expected). `--signal=kill` reports the same for SIGKILL, for comparison.

  python experiments/kill_soak.py --signal=term --attempts=20 --workdir=/tmp/term_soak
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny run that checkpoints every step (keeping 2: old ones are deleted as it
# goes), so kills land in checkpoint writes and deletions as well as in training.
OVERRIDES = {
    "train.num_epochs": 2,
    "train.checkpoint_every_steps": 1,
    "train.log_every_steps": 1,
    "train.eval_every_steps": 5,
    "train.keep_checkpoints": 2,
    "optimizer.learning_rate": 0.05,
}
# The preemption soak's run (--signal=term): 200 steps recorded one by one, checkpoints
# offered at each evaluation but written at most one per 30 s (the default policy), so
# a signal's work is kept by the checkpoint it makes or not at all.
TERM_OVERRIDES = {
    "train.num_epochs": 20,
    "train.checkpoint_every_steps": 0,
    "train.checkpoint_min_interval_secs": 30,
    "train.log_every_steps": 1,
    "train.eval_every_steps": 5,
    "train.keep_checkpoints": 2,
    "optimizer.learning_rate": 0.05,
}
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}
# Not results: timings, and where the run ran (the checkout may be committed to
# while a soak runs, which changes the recorded code version).
VOLATILE = ("wall_time", "time", "examples_per_sec", "environment")


def make_data(directory: str) -> str:
  """Writes the tests' tiny IDX MNIST (320 train / 100 test images) into `directory`."""
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import tiny_mnist  # pylint: disable=g-import-not-at-top
  tiny_mnist.write_mnist_dir(directory, num_train=320, num_test=100)
  return directory


def cli_args(workdir: str, data_dir: str, overrides: dict | None = None) -> list[str]:
  """The command of the soak's run (`overrides`: its config keys, default OVERRIDES)."""
  return [sys.executable, "-m", "bnlab.main", "--config=configs/seed1_mlp.py",
          f"--workdir={workdir}", "--config.data.source=idx", f"--config.data.dir={data_dir}",
          *(f"--config.{k}={v}" for k, v in (overrides or OVERRIDES).items())]


def config(data_dir: str, overrides: dict | None = None):
  """The config `cli_args` runs, for an in-process reference."""
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  import seed1_mlp  # pylint: disable=g-import-not-at-top
  c = seed1_mlp.get_config()
  c.data.source, c.data.dir = "idx", data_dir
  for key, value in (overrides or OVERRIDES).items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def snapshot(workdir: str) -> dict:
  """What must match between runs: final checkpoint arrays, metrics, summary."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = mngr.latest_step()
  tree = mngr.restore(step, args=ocp.args.StandardRestore())
  arrays = {jax.tree_util.keystr(path): np.asarray(x)
            for path, x in jax.tree_util.tree_leaves_with_path(tree)}
  mngr.close()
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    metrics = [{k: v for k, v in json.loads(line).items() if k not in VOLATILE}
               for line in f]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = {k: v for k, v in json.load(f).items() if k not in VOLATILE}
  return {"step": step, "arrays": arrays, "metrics": metrics, "summary": summary}


def differences(ref: dict, got: dict) -> list[str]:
  """Where `got` differs from `ref` (empty: identical)."""
  out = []
  if ref["step"] != got["step"]:
    out.append(f"final checkpoint step {got['step']} != {ref['step']}")
  if ref["arrays"].keys() != got["arrays"].keys():
    out.append("checkpoint structure differs")
  for k, a in ref["arrays"].items():
    b = got["arrays"].get(k)
    if b is None or a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
      out.append(f"checkpoint array {k} differs")
  if [r["step"] for r in ref["metrics"]] != [r["step"] for r in got["metrics"]]:
    out.append(f"metrics steps {[r['step'] for r in got['metrics']]}")
  elif ref["metrics"] != got["metrics"]:
    bad = [a["step"] for a, b in zip(ref["metrics"], got["metrics"]) if a != b]
    out.append(f"metrics differ at steps {bad}")
  if ref["summary"] != got["summary"]:
    keys = sorted(k for k in ref["summary"].keys() | got["summary"].keys()
                  if ref["summary"].get(k) != got["summary"].get(k))
    out.append(f"summary differs in {keys}")
  return out


def leftovers(workdir: str) -> list[str]:
  """State a finished run must not hold: a lock, temporaries, moved-aside checkpoints."""
  bad = [n for n in os.listdir(workdir)
         if n == ".lock" or n.startswith(".tmp-") or n == "unreadable_checkpoints"]
  bad += [f"checkpoints/{n}" for n in os.listdir(os.path.join(workdir, "checkpoints"))
          if "tmp" in n]
  return bad


def _checkpoint_in_flight(workdir: str) -> bool:
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any("tmp" in n for n in os.listdir(d))


def _training_started(workdir: str, size_at_start: int) -> bool:
  try:
    return os.path.getsize(os.path.join(workdir, "metrics.jsonl")) > size_at_start
  except OSError:
    return False


def last_record_step(workdir: str) -> int:
  """The step of the last whole record of metrics.jsonl (-1: none)."""
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
      lines = f.read().split(b"\n")[:-1]  # after the last newline: maybe a torn write
  except OSError:
    return -1
  for line in reversed(lines):
    try:
      return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
      continue
  return -1


def newest_checkpoint(workdir: str) -> int:
  """The step of the newest complete checkpoint (-1: none)."""
  try:
    return max((int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))
                if n.isdigit()), default=-1)
  except OSError:
    return -1


def kill_once(args: list[str], workdir: str, delay: float, after_training_starts: bool,
              timeout: float = 300, signum: int = signal.SIGKILL) -> dict:
  """Runs `args`, sends it `signum` `delay` s after its start (or after training starts).

  Returns {"killed": bool (the signal was sent), "in_checkpoint": bool (a
  checkpoint was being written), "rc": exit status, "at": the last recorded
  step when the signal was sent, "lost": the steps recorded past the newest
  checkpoint once the process ended (what a resume trains again)}.
  """
  try:
    size0 = os.path.getsize(os.path.join(workdir, "metrics.jsonl"))
  except OSError:
    size0 = 0
  records_before = _metrics_stamp(workdir)
  with tempfile.TemporaryFile() as err_file:  # a pipe could fill up and stall the run
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err_file)
    start = time.monotonic()
    if after_training_starts:
      while p.poll() is None and not _training_started(workdir, size0):
        if time.monotonic() - start > timeout:
          break
        time.sleep(0.005)
      start = time.monotonic()
    while p.poll() is None and time.monotonic() - start < delay:
      time.sleep(0.002)
    sent = p.poll() is None
    if sent:
      in_ckpt = _checkpoint_in_flight(workdir)
      at = last_record_step(workdir)
      ckpt_before = newest_checkpoint(workdir)
      p.send_signal(signum)
    try:
      p.wait(timeout=timeout)
    finally:
      if p.poll() is None:
        p.kill()
        p.wait()
    err_file.seek(0)
    err = err_file.read().decode(errors="replace")
  if sent:
    if signum != signal.SIGKILL and p.returncode not in (128 + signum, -signum):
      raise RuntimeError(f"run exited {p.returncode} after signal {signum}: "
                         f"{err.strip().splitlines()[-3:]}")
    # What this process recorded past its newest checkpoint (a process that recorded
    # nothing lost nothing, whatever an earlier one left).
    lost = 0 if _metrics_stamp(workdir) == records_before else max(
        0, last_record_step(workdir) - max(newest_checkpoint(workdir), 0))
    # The steps the checkpoint that the signal made keeps (past the newest one before;
    # none when the run ended anyway, its last checkpoint being the final one).
    finished = os.path.exists(os.path.join(workdir, "summary.json"))
    kept = max(0, newest_checkpoint(workdir) - max(ckpt_before, 0)) if (
        p.returncode == 128 + signum and not finished) else 0
    return {"killed": True, "in_checkpoint": in_ckpt, "rc": p.returncode, "at": at,
            "lost": lost, "kept": kept}
  if p.returncode != 0:
    raise RuntimeError(f"run exited {p.returncode}: {err.strip().splitlines()[-3:]}")
  return {"killed": False, "in_checkpoint": False, "rc": 0, "at": None, "lost": 0, "kept": 0}


def _metrics_stamp(workdir: str):
  try:
    st = os.stat(os.path.join(workdir, "metrics.jsonl"))
  except OSError:
    return None
  return st.st_size, st.st_mtime_ns


def run_to_completion(args: list[str], timeout: float = 600) -> str:
  p = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  if p.returncode != 0:
    raise RuntimeError(f"run exited {p.returncode}: {p.stderr.strip().splitlines()[-3:]}")
  return p.stderr


def attempt(workdir: str, data_dir: str, delays: list[tuple[float, bool]],
            overrides: dict | None = None, signum: int = signal.SIGKILL) -> dict:
  """Signals (kills) a fresh run once per (delay, after_training_starts), then finishes it."""
  shutil.rmtree(workdir, ignore_errors=True)
  args = cli_args(workdir, data_dir, overrides)
  kills = [kill_once(args, workdir, d, after, signum=signum) for d, after in delays]
  log = run_to_completion(args)
  sent = [k for k in kills if k["killed"]]
  return {"kills": len(sent),
          "in_checkpoint": sum(k["in_checkpoint"] for k in kills),
          "rcs": [k["rc"] for k in sent], "lost": [k["lost"] for k in sent],
          "kept": [k["kept"] for k in sent],
          "at": [k["at"] for k in sent],
          "warnings": [line for line in log.splitlines() if line.startswith("W")]}


def define_flags() -> None:
  """The soak's flags; defined only when it runs, as tests import this module beside
  bnlab.main (which defines --workdir too)."""
  flags.DEFINE_integer("attempts", 20, "killed-and-resumed runs to check")
  flags.DEFINE_integer("max_kills", 3, "most kills per attempt (each has 1 to this many)")
  flags.DEFINE_integer("seed", 0, "seed of the kill counts and delays")
  flags.DEFINE_string("workdir", "/tmp/bnlab_kill_soak",
                      "holds the data, the reference run and the attempts (emptied first)")
  flags.DEFINE_enum("signal", "kill", list(SIGNALS),
                    "kill: SIGKILL, on a run checkpointed every step; term: SIGTERM "
                    "(preemption), on a run checkpointed at most every 30 s")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # only warnings and errors, as Python logs by default
    logging.set_verbosity(logging.WARNING)
  opts = flags.FLAGS
  signum = SIGNALS[opts.signal]
  overrides = TERM_OVERRIDES if opts.signal == "term" else OVERRIDES
  start = time.perf_counter()
  rng = random.Random(opts.seed)
  shutil.rmtree(opts.workdir, ignore_errors=True)
  data_dir = make_data(os.path.join(opts.workdir, "idx"))
  ref_dir = os.path.join(opts.workdir, "reference")
  t0 = time.perf_counter()
  run_to_completion(cli_args(ref_dir, data_dir, overrides))
  lifetime = time.perf_counter() - t0
  ref = snapshot(ref_dir)
  with open(os.path.join(ref_dir, "summary.json")) as f:
    train_time = max(json.load(f)["wall_time"], 0.5)
  print(f"reference: {lifetime:.1f} s per uninterrupted run ({train_time:.1f} s training), "
        f"final step {ref['step']}", flush=True)
  exact, total_kills, in_ckpt, lost, rcs, kept = 0, 0, 0, [], [], []
  name = signal.Signals(signum).name
  for i in range(opts.attempts):
    delays = []
    for _ in range(rng.randint(1, opts.max_kills)):
      after = rng.random() < 0.5
      delays.append((rng.uniform(0, train_time if after else 0.8 * lifetime), after))
    wd = os.path.join(opts.workdir, f"attempt_{i:02d}")
    result = attempt(wd, data_dir, delays, overrides, signum)
    diffs = differences(ref, snapshot(wd)) + [f"left over: {x}" for x in leftovers(wd)]
    exact += not diffs
    total_kills += result["kills"]
    in_ckpt += result["in_checkpoint"]
    lost += result["lost"]
    kept += result["kept"]
    rcs += result["rcs"]
    shown = ", ".join(f"{d:.2f}s{'*' if a else ''}" for d, a in delays)
    print(f"attempt {i + 1}: {name} {result['kills']} at [{shown}] "
          f"({result['in_checkpoint']} while a checkpoint was being written; at steps "
          f"{result['at']}, exit {result['rcs']}, steps lost {result['lost']}, kept by the "
          f"signal's checkpoint {result['kept']}): "
          f"{'exact' if not diffs else 'DIFFERENT: ' + '; '.join(diffs[:4])}", flush=True)
    if not diffs:
      shutil.rmtree(wd)
  print(f"{name}: {total_kills} ({in_ckpt} while a checkpoint was being written); "
        "* = delay counted from the start of training")
  print("exit statuses: " + ", ".join(f"{rc}: {rcs.count(rc)}" for rc in sorted(set(rcs))))
  if lost:
    print(f"work lost per {name}: mean {sum(lost) / len(lost):.1f} steps, max {max(lost)}, "
          f"total {sum(lost)} (steps recorded past the newest checkpoint)")
    print(f"kept by the checkpoint a {name} made: {sum(kept)} steps, "
          f"{sum(k > 0 for k in kept)} times (steps past the newest checkpoint before it)")
  print(f"resumed exactly: {exact}/{opts.attempts}")
  print(f"wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  define_flags()
  app.run(main)
