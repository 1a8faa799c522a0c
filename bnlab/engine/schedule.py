"""A run's step schedule: where its compiled calls end, and the trigger of all periodic work.

Pure arithmetic on step numbers, apart from the loop that follows it: the
call boundaries depend on the step alone (see `Schedule`).
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Where a run's steps are grouped into compiled calls and what happens after.

  Call boundaries are a fixed function of the absolute step (epoch ends,
  log/eval/checkpoint steps, `steps_per_call` multiples), so a resumed run
  executes exactly the same compiled programs on the same data as an
  uninterrupted one and ends bit-identical on the same platform.
  """

  total_steps: int
  steps_per_epoch: int
  steps_per_call: int
  eval_every: int
  log_every: int
  checkpoint_every: int

  def next_boundary(self, step: int) -> int:
    """The first step after `step` at which a call ends."""
    candidates = [self.total_steps]
    for every in (self.steps_per_epoch, self.eval_every, self.log_every,
                  self.checkpoint_every):
      candidates.append((step // every + 1) * every)
    epoch_start = step // self.steps_per_epoch * self.steps_per_epoch
    k = self.steps_per_call
    candidates.append(epoch_start + ((step - epoch_start) // k + 1) * k)
    return min(candidates)

  def due(self, step: int, every: int) -> bool:
    """The trigger of all periodic work: every `every` steps, and at the final step."""
    return step % every == 0 or step == self.total_steps

  def is_eval(self, step: int) -> bool:
    return self.due(step, self.eval_every)

  def is_log(self, step: int) -> bool:
    return self.due(step, self.log_every) or self.is_eval(step)

  def is_checkpoint(self, step: int) -> bool:
    return self.due(step, self.checkpoint_every)

  def last_log_at_or_before(self, step: int) -> int:
    """The last step up to `step` with a record (`is_log`); 0 if none."""
    return max(step // self.log_every * self.log_every,
               step // self.eval_every * self.eval_every,
               step if step == self.total_steps else 0)


def make_schedule_plan(cfg, num_train: int) -> Schedule:
  """The step schedule for the `train` config section over `num_train` examples.

  `train.steps_per_call=0`: calls of the greatest common divisor of the
  epoch, log, evaluation and checkpoint intervals when it is at least a
  quarter epoch, so that every call but the last has one length and
  compiles one program (epochs of 1,000 steps evaluated every 2,500: calls of
  500, not of 1,000 and 500); else of an epoch.
  """
  t = cfg.train
  spe = num_train // t.batch_size
  total = t.num_steps or t.num_epochs * spe
  eval_every = t.eval_every_steps or t.eval_every_epochs * spe
  log_every = t.log_every_steps or eval_every
  ckpt_every = t.checkpoint_every_steps or eval_every
  per_call = t.steps_per_call
  if not per_call:
    common = math.gcd(spe, eval_every, log_every, ckpt_every)
    per_call = common if common >= spe / 4 else spe
  return Schedule(total, spe, per_call, eval_every, log_every, ckpt_every)
