"""Collapse detection: the pure watch on hand-made records, and a tiny run that collapses."""

import json
import math
import os

import pytest

from bnlab import config as config_lib
from bnlab.engine import collapse
from bnlab.engine import train
from run_files import read_jsonl


def records(losses=(), accs=()):
  """Metrics records: train losses at steps 10, 20, ... and test accuracies alongside."""
  out = []
  for i in range(max(len(losses), len(accs))):
    r = {"step": 10 * (i + 1)}
    if i < len(losses):
      r["train_loss"] = losses[i]
    if i < len(accs) and accs[i] is not None:
      r["test_accuracy"] = accs[i]
    out.append(r)
  return out


@pytest.mark.parametrize("losses, accs, expected", [
    ((2.3, 0.5, 0.1, 0.05, 0.04), (), None),  # trains
    ((2.3, 0.1, 0.05, 636_000.0, 2.31), (), 40),  # the loss explodes
    ((2.3, 0.1, 0.05, 2.0, 0.05), (), None),  # 40x its minimum but below chance: noise
    ((2.3, 0.01, 0.001, 0.02), (), None),  # 20x a tiny minimum, far below chance
    ((1e9, 2.31, 2.30, 2.31), (), None),  # never trained: blown up from the start
    ((2.3, 1.0, 0.3, 0.3, 0.3), (0.3, 0.8, 0.95, 0.12, 0.1), 40),  # accuracy back at chance
    ((2.3, 1.0, 0.3), (0.1, 0.15, 0.2), None),  # never >= 0.5: not trained, not collapsed
    ((2.3, float("nan")), (0.9, None), None),  # NaN: divergence, not collapse
])
def test_first_collapse(losses, accs, expected):
  found = collapse.first_collapse(records(losses, accs))
  assert (found and found[0]) == expected or found is None is expected


def test_the_evaluation_before_training_is_not_history():
  # A model that starts good (e.g. pretrained) and stays near chance is not a collapse:
  # the live watch never sees step 0, and a resumed run's replay must not either.
  rec = [{"step": 0, "test_accuracy": 0.9}] + records((2.3, 2.3), (0.1, 0.1))
  assert collapse.first_collapse(rec) is None


def test_thresholds_and_off_switch():
  rec = records((2.3, 0.1, 3.0))
  assert collapse.first_collapse(rec)[0] == 30
  assert "train loss 3 > 10 x its minimum 0.1" in collapse.first_collapse(rec)[1]
  assert collapse.first_collapse(rec, loss_factor=50.0) is None
  assert collapse.first_collapse(rec, loss_factor=0.0) is None
  acc = records((), (0.6, 0.25))
  assert collapse.first_collapse(acc) is None
  assert collapse.first_collapse(acc, chance_accuracy=0.3)[0] == 20
  assert collapse.first_collapse(acc, chance_accuracy=0.3, trained_accuracy=0.7) is None


def test_config_checks_collapse_keys():
  c = config_lib.base_config()
  assert (c.train.collapse_loss_factor, c.train.stop_on_collapse) == (10.0, False)
  c.train.collapse_accuracy = 1.5
  with pytest.raises(config_lib.ConfigError, match="train.collapse_accuracy"):
    config_lib.validate(c)


def collapsing_config(idx_dir, stop: bool):
  """ReLU MLP without BN: lr 0.1 trains it (100% on the fixture), lr 2 from step 50 blows it up.

  (A constant lr 2 explodes at the first steps, before training: no collapse,
  it never trained. A step schedule with decay_factor 20 makes the jump.) Its
  loss is finite and ~1,000x its minimum at the log of step 55 and NaN at
  step 58: a collapse that turns into a divergence if the run goes on.
  """
  c = config_lib.base_config()
  c.data.source, c.data.dir = "idx", idx_dir
  c.model.name, c.model.norm, c.model.activation = "paper_mlp", "none", "relu"
  c.optimizer.learning_rate = 0.1
  c.optimizer.schedule, c.optimizer.decay_every_steps = "step", 50
  c.optimizer.decay_factor = 20.0
  c.train.batch_size, c.train.num_steps, c.train.eval_every_steps = 32, 100, 10
  c.train.log_every_steps = 5
  c.train.final_train_eval = False
  c.train.stop_on_collapse = stop
  return c


@pytest.mark.parametrize("stop", [False, True])
def test_tiny_run_collapses(idx_dir, tmp_path, stop):
  wd = str(tmp_path / "run")
  summary = train.train_and_evaluate(collapsing_config(idx_dir, stop), wd)
  recs = read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert max(r.get("test_accuracy", 0) for r in recs if r["step"] <= 50) >= 0.9
  assert summary["collapsed"] is True
  assert not (stop and summary["diverged"])
  at = summary["collapsed_at_step"]
  assert at == 55 and "train loss" in summary["collapse_reason"]
  flagged = [r for r in recs if r.get("collapsed")]
  assert [r["step"] for r in flagged] == [at] and flagged[0]["collapsed_at_step"] == at
  assert math.isfinite(flagged[0]["train_loss"])
  assert summary["stopped_on_collapse"] is stop
  if stop:  # stopped at the collapse, its last accuracy kept
    assert summary["final_step"] == at and recs[-1]["step"] == at
    assert "test_accuracy" in summary and "diverged_at_step" not in recs[-1]
  elif summary["diverged"]:  # went on, and then diverged (recorded as well; on CPU)
    assert 55 < summary["diverged_at_step"] <= 60 and recs[-1]["step"] == 60
  else:  # went on to the end (a GPU's float32 products can keep the loss finite)
    assert summary["final_step"] == 100 and recs[-1]["step"] == 100
  # A finished run is not trained again; one stopped at a collapse stays stopped.
  assert train.train_and_evaluate(collapsing_config(idx_dir, stop), wd) == summary
  assert json.load(open(os.path.join(wd, "summary.json")))["collapsed"] is True


def test_chance_is_the_datas():
  # Chance is ln(num_classes): a loss of 3.0 after a minimum of 0.1 is worse than chance
  # on 10 classes (ln 10 = 2.30) but better than chance on 100 (ln 100 = 4.61).
  rec = records((2.3, 0.1, 3.0))
  assert collapse.first_collapse(rec, num_classes=10)[0] == 30
  assert collapse.first_collapse(rec, num_classes=100) is None
  assert collapse.first_collapse(records((4.6, 0.1, 5.0)), num_classes=100)[0] == 30
  assert "chance (4.61)" in collapse.first_collapse(records((4.6, 0.1, 5.0)),
                                                    num_classes=100)[1]
