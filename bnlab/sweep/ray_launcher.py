"""Ray as the engine: each group of a sweep a Ray task that trains it in the work directory.

Why a task per group: a group is what a local worker claims (`bnlab.sweep.claims`), so a
task does exactly what a worker does for one group (claims it, resumes it from its
checkpoints, trains it, lets it go), and a Ray run, local workers and a SLURM array can
share one directory. A task whose worker process dies (killed, or its node lost) is
retried by Ray and resumes from the group's checkpoints, taking over the dead worker's
claim. The driver trains nothing: it submits the groups left, with one GPU each where
the cluster has GPUs (else one CPU), and logs a line as each ends.

Ray is optional (`pip install 'bnlab[ray]'`); the work directory must be on a file system
every Ray node shares, and bnlab importable there.
"""

from __future__ import annotations

import os
import socket
import time

from absl import logging

from bnlab import config as config_lib
from bnlab.errors import one_line

RETRIES = 3  # attempts after the first, for a task whose worker process died


class RayError(config_lib.ConfigError):
  """Ray missing, or its cluster unreachable: one line with the fix."""


def connect(address: str) -> bool:
  """Joins the Ray cluster at `address` ("auto", "HOST:PORT", "ray://HOST:PORT"), or starts
  a local one when it is empty; whether this process started it. RayError (one line)
  when Ray is not installed or nothing answers there."""
  try:
    import ray  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise RayError("--launcher=ray needs Ray, which is not installed: pip install "
                   "'bnlab[ray]' (or pip install ray)") from None
  if address and address != "auto":
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
      raise RayError(f"--ray_address={address} is not HOST:PORT (e.g. 10.0.0.5:6379), "
                     "ray://HOST:PORT or auto")
    try:  # Ray itself would retry for a minute or more before it gives up
      socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
      raise RayError(f"no Ray cluster answers at --ray_address={address} "
                     f"({e.strerror or type(e).__name__}); start one there with `ray start "
                     "--head --port=PORT`, or give the address it printed") from None
  try:
    ray.init(address=address or None, include_dashboard=False, log_to_driver=True,
             logging_level="WARNING", configure_logging=False)
  except (ConnectionError, RuntimeError, ValueError) as e:
    detail = one_line(e)
    raise RayError(f"Ray could not connect to --ray_address={address or '(a new local one)'} "
                   f"({detail}); start a cluster with `ray start --head`, or leave "
                   "--ray_address out to start one here") from None
  return not address


def run_groups(groups, workdir: str, address: str, fingerprint: str,
               trained: set | None = None) -> dict[str, str]:
  """Trains the groups not yet complete as Ray tasks, each a worker of `fingerprint`
  (`bnlab.sweep.claims`); {member: error} of those that failed. The names of the members
  of the groups its tasks trained are added to `trained`."""
  import ray  # pylint: disable=g-import-not-at-top
  from bnlab.rundir import signals  # pylint: disable=g-import-not-at-top
  from bnlab.sweep import training  # pylint: disable=g-import-not-at-top
  errors: dict[str, str] = {}
  todo = []
  for i, group in enumerate(groups):
    if any(m.unusable for m in group):
      errors.update({m.name: m.unusable for m in group})
    elif not training.group_complete(group, workdir):
      todo.append(i)
  logging.info("Sweep of %d groups in %s: %d to train as Ray tasks", len(groups), workdir,
               len(todo))
  if not todo:
    return errors
  started = connect(address)
  try:
    gpus = ray.cluster_resources().get("GPU", 0) >= 1
    task = ray.remote(num_gpus=1 if gpus else 0, num_cpus=0 if gpus else 1,
                      max_retries=RETRIES, retry_exceptions=False)(train_task)
    start = time.perf_counter()
    refs = {task.remote(workdir, groups[i], fingerprint): i for i in todo}
    done, members = 0, sum(len(groups[i]) for i in todo)
    while refs:
      ready, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
      signals.raise_if_stop_requested()
      for ref in ready:
        i = refs.pop(ref)
        try:
          result = ray.get(ref)
        except ray.exceptions.RayError as e:  # it raised, or its worker died RETRIES + 1 times
          # A task's own exception (e.g. a worker of another config refused), not Ray's
          # wrapping with the remote traceback.
          message = training.error_line(getattr(e, "cause", None) or e)
          errors.update({m.name: message for m in groups[i]})
          logging.error("Ray: group %d/%d failed: %s", i + 1, len(groups), message)
          continue
        errors.update(result["errors"])
        if result["trained"] and trained is not None:
          trained.update(m.name for m in groups[i])
        done += len(groups[i])
        logging.info("Ray: group %d/%d done in %.1f s on host %s (process %d) | %d/%d members "
                     "done | %.1f s since the first task was submitted", i + 1, len(groups),
                     result["seconds"], result["host"], result["pid"], done, members,
                     time.perf_counter() - start)
    return errors
  finally:
    if started:
      ray.shutdown()


_TRAINERS: dict = {}  # work directory -> training.GroupTrainer, kept by a Ray worker process


def train_task(workdir: str, group, fingerprint: str) -> dict:
  """A Ray task: claims `group` (waiting while a live worker holds it), trains or resumes it,
  lets it go; {"errors": {member: error}, "trained" (whether this task trained it: not
  when another worker had finished it), "seconds", "host", "pid"}.

  The worker process keeps its loaded data between tasks (`_TRAINERS`)."""
  from bnlab.engine import backend  # pylint: disable=g-import-not-at-top
  from bnlab.sweep import claims as claims_lib  # pylint: disable=g-import-not-at-top
  from bnlab.sweep import training  # pylint: disable=g-import-not-at-top
  backend.configure_run(group[0].cfg)  # before anything starts JAX in this process
  start = time.perf_counter()
  errors: dict[str, str] = {}
  trained = False
  gid = training.group_id(group)
  with claims_lib.Claims(workdir, fingerprint) as claims:
    while not claims.claim(gid):  # another worker has it; it ends, or dies and is taken over
      if training.group_complete(group, workdir):
        break
      time.sleep(1.0)
    else:
      try:
        if not training.group_complete(group, workdir):
          trainer = _TRAINERS.setdefault(workdir, training.GroupTrainer(workdir))
          errors, trained = trainer.train_group(group)
          claims.record_failure(gid, errors)  # as a local worker does: the others see it
      finally:
        claims.release(gid)
  return {"errors": errors, "trained": trained, "seconds": time.perf_counter() - start,
          "host": socket.gethostname(), "pid": os.getpid()}
