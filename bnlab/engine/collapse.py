"""Collapse detection: a run that blows up without its loss turning NaN/inf.

Pure and host-side, apart from the loop: the rules read records only, so they
are tested on records alone (`first_collapse`) and a resumed run replays them.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class CollapseWatch:
  """Detects a collapse in a run's metrics records, one record at a time (pure, host-side).

  A collapse is a run that blows up without its loss turning NaN/inf:
  - loss: a log interval's mean train loss above `loss_factor` x the smallest
    interval loss before it, and above chance (ln `num_classes`, 2.30 for 10
    classes: worse than predicting the uniform distribution), so that noise after
    a very small minimum is not a collapse; `loss_factor=0` turns this rule off;
  - accuracy: a test accuracy <= `chance_accuracy` after an earlier one was
    >= `trained_accuracy` (the run had trained, then fell back near chance).
  `update` returns the reason of a collapse at that record, else None. The
  evaluation before training (step 0) is not part of the run's history: a run
  and the same run resumed see the same records.
  """

  loss_factor: float = 10.0
  chance_accuracy: float = 0.2
  trained_accuracy: float = 0.5
  num_classes: int = 10  # the data's: chance is ln 100 = 4.61 for 100 classes
  min_loss: float = math.inf
  best_accuracy: float = -math.inf

  @classmethod
  def of(cls, train_cfg, num_classes: int) -> CollapseWatch:
    return cls(train_cfg.collapse_loss_factor, train_cfg.collapse_accuracy,
               train_cfg.collapse_trained_accuracy, num_classes)

  @property
  def chance_loss(self) -> float:
    """The cross-entropy of predicting the uniform distribution over the classes."""
    return math.log(self.num_classes)

  def update(self, record: dict) -> str | None:
    if record.get("step") == 0:
      return None
    reason = None
    loss = record.get("train_loss")
    if isinstance(loss, (int, float)) and math.isfinite(loss):
      if (self.loss_factor > 0 and loss > self.loss_factor * self.min_loss
          and loss > self.chance_loss):
        reason = (f"train loss {loss:.4g} > {self.loss_factor:g} x its minimum "
                  f"{self.min_loss:.4g} and > chance ({self.chance_loss:.2f})")
      self.min_loss = min(self.min_loss, loss)
    acc = record.get("test_accuracy")
    if isinstance(acc, (int, float)) and math.isfinite(acc):
      if (reason is None and self.best_accuracy >= self.trained_accuracy
          and acc <= self.chance_accuracy):
        reason = (f"test accuracy {acc:.4f} <= {self.chance_accuracy:g} after "
                  f"{self.best_accuracy:.4f} >= {self.trained_accuracy:g}")
      self.best_accuracy = max(self.best_accuracy, acc)
    return reason


def first_collapse(records, **thresholds) -> tuple[int, str] | None:
  """(step, reason) of the first collapse in a sequence of metrics records, or None."""
  watch = CollapseWatch(**thresholds)
  for r in records:
    reason = watch.update(r)
    if reason is not None:
      return r["step"], reason
  return None
