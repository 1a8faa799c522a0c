"""Running a sweep: its directory and shared lock, then each group this worker claims,
trained in turn, failures kept.

The members' rows come from `bnlab.sweep.results` once every group has had
its turn.
"""

from __future__ import annotations

import json
import os
import time
from typing import Sequence

from bnlab import config as config_lib
from bnlab.sweep.groups import Member, plan
from bnlab.sweep.results import kept_errors, result_row, write_results
from bnlab.sweep.training import (GroupTrainer, error_line, group_complete, group_id, size_key,
                                  timesplit_seconds)


def run_sweep(base, sweep: Sequence[dict], workdir: str, grouped: bool = True,
              overrides: dict | None = None, only: str | None = None,
              max_group_size: int | None = None, num_workers: int | None = None,
              wait: bool = False, launcher: str = "local", ray_address: str = "",
              prepare=None, trained: set | None = None) -> list[dict]:
  """Runs (or resumes) every member of `sweep` over `base`; returns the result rows.

  Every member is validated before anything trains. A member whose model fails
  its check (`Member.unusable`), or that raises, is recorded as failed (its
  error on one line) and the others go on. SIGTERM or
  SIGUSR1 stops the sweep (`signals.Preempted`): the member or group in
  progress is checkpointed, the rest untouched; a rerun continues.
  `overrides` win over the members' own (see `bnlab.sweep`'s docstring); `only`
  selects the members to run (`select`); `max_group_size` caps a group's
  members (`group_members`; default: what fits the device's memory);
  `num_workers` cuts the groups until there are that many. The rows cover
  every member.

  Any number of processes may run the same sweep in `workdir` at once: each
  trains the groups it claims first (`bnlab.sweep.claims`), and takes over a
  group whose worker died, resuming it from its checkpoints. A worker ends when
  every group is done or held by another live worker; with `wait`, it waits for
  those (taking over any whose worker dies), so its rows are complete.
  `launcher="ray"` trains each group as a Ray task instead (`bnlab.sweep.ray_launcher`,
  on the cluster at `ray_address`, or a local one when empty). `prepare()` is called
  once this worker is admitted (no live worker runs another config), before anything
  trains: a study registers its claims there. The names of the members whose groups this
  process took (not its fellow workers') are added to `trained`.
  """
  from bnlab.rundir import locks  # pylint: disable=g-import-not-at-top
  from bnlab.rundir import signals  # pylint: disable=g-import-not-at-top
  from bnlab.sweep import claims as claims_lib  # pylint: disable=g-import-not-at-top
  members, groups = plan(base, sweep, grouped, overrides, only, max_group_size, num_workers)
  make_sweep_dir(workdir)
  lock_path = os.path.join(workdir, ".sweep-lock")
  # Shared: the sweep's workers run together; a process that needs the directory
  # alone (an older bnlab's sweep) is kept out.
  lock = locks.acquire_lock(lock_path, os.path.abspath(workdir), "sweep directory",
                            shared=True)
  try:
    check_members_config(members, workdir)
    # SIGTERM or SIGUSR1 stops the group in progress with a checkpoint, or the sweep
    # before its next group: signals.Preempted; a rerun trains what is missing.
    with signals.stop_signals_caught():
      # Once: the commit it reads may change while the sweep runs (the tasks get this one).
      fingerprint = worker_fingerprint(groups)
      with claims_lib.Claims(workdir, fingerprint) as claims:
        if prepare is not None:
          prepare()
        if launcher == "ray":  # the driver's record stays: it admits the tasks' fingerprint
          from bnlab.sweep import ray_launcher  # pylint: disable=g-import-not-at-top
          errors = ray_launcher.run_groups(groups, workdir, ray_address, fingerprint, trained)
        else:
          errors = _run_groups(members, groups, workdir, claims, wait, trained)
    # Members --only left out keep their failures (their directories do not record them).
    errors = {**kept_errors(workdir, {m.name for g in groups for m in g}), **errors}
    rows = [result_row(m, os.path.join(workdir, m.name), errors.get(m.name))
            for m in members]
    write_results(workdir, rows)
    return rows
  finally:
    locks.release_lock(lock_path, lock, remove=False)


def worker_fingerprint(groups) -> str:
  """What every worker of one sweep directory must share (`bnlab.sweep.claims`): the groups
  (their ids: members and configs, `group_id`), the members' lengths and bnlab's version."""
  from bnlab.sweep import claims as claims_lib  # pylint: disable=g-import-not-at-top
  return claims_lib.fingerprint(
      [[group_id(g), [[m.cfg.train.num_steps, m.cfg.train.num_epochs] for m in g]]
       for g in groups])


def make_sweep_dir(workdir: str) -> None:
  """Creates the sweep's directory; WorkDirError (one line) when it cannot be."""
  from bnlab.rundir import errors as rundir_errors  # pylint: disable=g-import-not-at-top
  if not isinstance(workdir, str) or not workdir.strip():
    raise rundir_errors.WorkDirError(
        f"the work directory is empty ({workdir!r}); give one with --workdir=DIR")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise rundir_errors.WorkDirError(
        f"--workdir={workdir} is a file, not a directory; choose another --workdir")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise rundir_errors.WorkDirError(
        f"sweep directory {workdir} cannot be created ({e.strerror or e}); "
        "choose another --workdir") from None


def check_members_config(members: Sequence[Member], workdir: str) -> None:
  """ConfigError when a member's directory holds a run of another config than its own now.

  A finished member would otherwise be reported done with the results of the
  old config (the sweep file or its base config changed since).
  """
  stale = []
  for m in members:
    d = os.path.join(workdir, m.name)
    try:
      ran = os.path.exists(os.path.join(d, "summary.json")) or any(
          n.isdigit() for n in os.listdir(os.path.join(d, "checkpoints")))
    except OSError:
      ran = False
    if not ran:
      continue
    from bnlab.rundir import identity  # pylint: disable=g-import-not-at-top
    old = identity.recorded_config(d)  # its checkpoints' copy: config.json may be edited
    if old is None:
      continue  # training the member reports it
    a = config_lib.flatten(old)
    b = config_lib.flatten(json.loads(m.cfg.to_json_best_effort()))
    refused, _ = config_lib.resume_refusal(a, b)
    if refused:
      k = refused[0]
      stale.append(f"{m.name} ({k}: {a.get(k)!r} -> {b.get(k)!r})")
  if stale:
    raise config_lib.ConfigError(
        f"{len(stale)} member(s) in {workdir} ran with another config than the sweep gives "
        f"them now (the sweep or its base config changed): {'; '.join(stale[:3])}"
        f"{'; ...' if len(stale) > 3 else ''}; use a new --workdir for the changed sweep, "
        "or move those members' directories aside to rerun them")


def _run_groups(members: Sequence[Member], groups, workdir: str, claims, wait: bool,
                trained_names: set | None = None) -> dict[str, str]:
  """Trains the groups this worker claims; {member: error} of those that failed. The names
  of the members of the groups it claimed are added to `trained_names`."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from bnlab.engine import progress as progress_lib  # pylint: disable=g-import-not-at-top
  from bnlab.rundir import signals  # pylint: disable=g-import-not-at-top
  errors: dict[str, str] = {}
  trainer = GroupTrainer(workdir)
  plan = _progress_plan(groups, workdir, trainer.sizes)
  progress = progress_lib.SweepProgress(plan)
  left = [g for g in plan if not g["done"]]
  logging.info("Sweep of %d members, %d selected in %d groups, in %s; %d group(s) to train%s",
               len(members), sum(len(g) for g in groups), len(groups), workdir, len(left),
               f", {len(groups) - len(left)} complete" if len(left) < len(groups) else "")
  pending, waiting = list(range(len(groups))), False
  while True:
    held, trained = [], False  # held by other live workers; whether this pass trained

    for i in pending:
      signals.raise_if_stop_requested()  # came while the last group finished
      group = groups[i]
      if plan[i]["done"]:  # complete
        continue
      if any(m.unusable for m in group):  # alone in its group (`group_members`)
        for m in group:
          logging.error("Sweep member %s failed: %s", m.name, m.unusable)
          errors[m.name] = m.unusable
        plan[i]["done"] = True
        continue
      gid = group_id(group)
      failed = claims.failed_since_start(gid)
      if failed is not None:  # by another worker, while this one ran: not tried again
        logging.error("Sweep group %d/%d failed in another worker: %s", i + 1, len(groups),
                      next(iter(failed.values()), ""))
        errors.update(failed)
        plan[i]["done"] = True
        continue
      if not claims.claim(gid):
        if not plan[i].get("elsewhere"):
          holder = claims.holder(gid) or {}
          logging.info("Sweep group %d/%d: another worker trains it (process %s on host %s)",
                       i + 1, len(groups), holder.get("pid", "?"), holder.get("host", "?"))
        plan[i]["elsewhere"] = True
        held.append(i)
        continue
      plan[i]["elsewhere"] = False
      try:
        if group_complete(group, workdir):  # another worker finished it meanwhile
          plan[i]["done"] = True
          continue
        if trained_names is not None:  # claimed: what of it is written now, this worker wrote
          trained_names.update(m.name for m in group)
        failed = _train_with_progress(trainer, i, progress, plan, groups, workdir)
        claims.record_failure(gid, failed)
        errors.update(failed)
        trained = True
      finally:
        claims.release(gid)
    pending = [i for i in held if not group_complete(groups[i], workdir)]
    for i in set(held) - set(pending):
      plan[i]["done"] = True
    if pending and not wait and trained:
      continue  # a worker may have died meanwhile: end only after a pass that claims nothing
    if not pending or not wait:
      if pending:
        logging.info("%d group(s) are trained by other workers; this worker ends (the last "
                     "worker to end writes the complete results)", len(pending))
      return errors
    if not waiting:
      logging.info("Waiting for %d group(s) that other workers train", len(pending))
      waiting = True
    for _ in range(5):  # a stop signal ends the wait within a second
      time.sleep(1.0)
      signals.raise_if_stop_requested()


def _train_with_progress(trainer, i: int, progress, plan: list[dict], groups,
                         workdir: str) -> dict[str, str]:
  """Trains group `i` with a progress line at its start (once its data is loaded) and end;
  {member: error} of its members that failed."""
  start, compiled = time.perf_counter(), timesplit_seconds()

  def loaded():
    # Where it resumes now (another worker may have trained it part way).
    plan[i]["resumed_at"] = _last_step(_checkpoint_dir(groups[i], workdir))
    _update_steps(plan, groups, trainer.sizes)  # at the data's true size
    progress.start(i, plan[i]["resumed_at"])
  trainer.loading = 0.0
  errors, trained = trainer.train_group(groups[i], loaded)
  progress.finish(i, time.perf_counter() - start, timesplit_seconds() - compiled,
                  once=trainer.loading, trained=trained)
  return errors


def _last_step(ckpt_dir: str) -> int:
  """The newest checkpoint's step in `ckpt_dir` (0: none), where a group resumes."""
  try:
    return max((int(n) for n in os.listdir(ckpt_dir) if n.isdigit()), default=0)
  except OSError:
    return 0


def _total_steps(cfg, sizes: dict[str, int]) -> int:
  """A member's length; its epochs over the data's size once loaded, else an estimate
  (`data.num_train`, or MNIST's 60,000)."""
  from bnlab.engine import members as members_lib  # pylint: disable=g-import-not-at-top
  t = cfg.train
  if t.num_steps:
    return t.num_steps
  n = sizes.get(size_key(cfg)) or cfg.data.num_train or members_lib.MNIST_TRAIN
  return t.num_epochs * (n // t.batch_size)


def _progress_plan(groups, workdir: str, sizes: dict[str, int]) -> list[dict]:
  """Per group what `SweepProgress` counts: members, steps left, whether it compiles
  (its programs differ from the group trained before it), whether it is done."""
  from bnlab.engine import members as members_lib  # pylint: disable=g-import-not-at-top
  from bnlab.engine import train  # pylint: disable=g-import-not-at-top
  plan, programs = [], None
  for group in groups:
    dirs = [os.path.join(workdir, m.name) for m in group]
    done = all(train.is_complete(m.cfg, d) for m, d in zip(group, dirs))
    unusable = any(m.unusable for m in group)
    resumed = 0 if done or unusable else _last_step(_checkpoint_dir(group, workdir))
    made_for = None if done or unusable else (members_lib.group_key(group[0].cfg), len(group))
    plan.append({"members": [m.name for m in group], "done": done, "resumed_at": resumed,
                 "compiles": made_for is not None and made_for != programs})
    programs = made_for or programs
  _update_steps(plan, groups, sizes)
  return plan


def _checkpoint_dir(group, workdir: str) -> str:
  """Where a group's checkpoints are: its member's own for a solo run."""
  from bnlab.engine import members as members_lib  # pylint: disable=g-import-not-at-top
  if len(group) == 1:
    return os.path.join(workdir, group[0].name, "checkpoints")
  return os.path.join(workdir, members_lib.GROUPS_DIR, group_id(group), "checkpoints")


def _update_steps(plan: list[dict], groups, sizes: dict[str, int]) -> None:
  for g, group in zip(plan, groups):
    if not g["done"]:
      usable = not any(m.unusable for m in group)
      g["steps"] = max(_total_steps(group[0].cfg, sizes) - g["resumed_at"], 0) if usable else 0
    else:
      g.setdefault("steps", 0)


def planned_status(m: Member, path: str) -> tuple[str, str | None]:
  """(status, error) that running the sweep now would record for member `m` in `path`:
  what `--dry_run` shows, so that it reports the outcome the sweep will.

  A complete member keeps its row's status (`result_row`: "done", "diverged", or
  "failed" when its records were cut short or its summary is unreadable); an
  `unusable` one is "failed" without training; any other is "to train".
  """
  from bnlab.engine import train  # pylint: disable=g-import-not-at-top
  if train.is_complete(m.cfg, path):
    row = result_row(m, path, None)
    return row["status"], row["error"]
  if m.unusable:
    return "failed", m.unusable
  return "to train", None
