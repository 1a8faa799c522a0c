"""`train.profile_steps`: a JAX profiler trace of those steps in WORKDIR/profile/, the run's
results unchanged; bad values are one-line config errors."""

import json
import os

import pytest

from bnlab import config as config_lib
from bnlab.engine import train
from test_sweep import tiny_base


def test_a_trace_is_written_and_the_results_are_unchanged(idx_dir, tmp_path):
  cfg = tiny_base(idx_dir)
  cfg.train.num_epochs = 2
  plain = train.train_and_evaluate(cfg, str(tmp_path / "plain"))
  # One epoch untraced, then made longer with the trace on: the key may change on resume.
  wd = str(tmp_path / "traced")
  cfg.train.num_epochs = 1
  train.train_and_evaluate(cfg, wd)
  assert not os.path.exists(os.path.join(wd, "profile"))
  cfg.train.num_epochs, cfg.train.profile_steps = 2, (12, 15)
  traced = train.train_and_evaluate(cfg, wd)
  files = [n for _, _, names in os.walk(os.path.join(wd, "profile")) for n in names]
  assert any(n.endswith(".xplane.pb") for n in files), files
  assert any(n.endswith(".trace.json.gz") for n in files), files  # Perfetto's
  for key in ("test_accuracy", "test_loss", "train_loss", "full_train_loss"):
    assert traced[key] == plain[key], key  # the calls keep their boundaries
  assert json.load(open(os.path.join(wd, "config.json")))["train"]["profile_steps"] == [12, 15]


@pytest.mark.parametrize("steps, message", [
    ((5, 5), "0 <= start < stop"),
    ((7, 3), "0 <= start < stop"),
    ((-1, 3), "0 <= start < stop"),
    ((1, 2, 3), "two step numbers"),
    ((0, 50), "within the run's 30 steps"),
])
def test_bad_profile_steps_are_one_line(idx_dir, steps, message):
  cfg = tiny_base(idx_dir)
  cfg.train.num_steps = 30
  cfg.train.profile_steps = steps
  with pytest.raises(config_lib.ConfigError, match=r"config\.train\.profile_steps=") as e:
    config_lib.validate(cfg)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_profile_steps_past_an_epoch_run_are_refused_once_its_length_is_known(idx_dir,
                                                                             tmp_path):
  cfg = tiny_base(idx_dir)  # 3 epochs of 10 steps
  cfg.train.profile_steps = (20, 40)
  config_lib.validate(cfg)  # the data's size decides the length
  with pytest.raises(config_lib.ConfigError, match=r"within the run's 30 steps"):
    train.train_and_evaluate(cfg, str(tmp_path / "run"))
