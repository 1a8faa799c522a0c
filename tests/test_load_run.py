"""`bnlab.load_run`: a trained run (solo, or a grouped sweep's member) rebuilt from its
directory reproduces the accuracies the run recorded; errors are one line."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnlab
from bnlab import sweep
from bnlab.engine import train
from bnlab.rundir import per_image
from bnlab.rundir.errors import WorkDirError
from run_files import read_jsonl
from test_sweep import tiny_base


def assert_reproduces(run, ds, record):
  """`run`'s predictions on the test images are right on exactly the images, and at the
  accuracy, that `record` (a summary or metrics record) holds."""
  logits = run.model.apply(run.variables, jnp.asarray(ds.test_images), train=False)
  correct = np.asarray(jnp.argmax(logits, -1)) == ds.test_labels
  np.testing.assert_array_equal(correct, per_image.decode(record["test_correct"]))
  assert correct.sum() == round(record["test_accuracy"] * len(correct))  # a float32 ratio


def test_a_solo_run_reproduces_its_test_accuracy(idx_dir, tmp_path):
  cfg = tiny_base(idx_dir)
  cfg.model.norm = "batch"
  cfg.train.num_epochs = 2
  wd = str(tmp_path / "run")
  summary = train.train_and_evaluate(cfg, wd)
  run = bnlab.load_run(wd)
  assert run.step == summary["final_step"] == 20
  assert run.config.model.norm == "batch" and set(run.variables) == {"params", "batch_stats"}
  ds = train.load_data(run.config)
  assert_reproduces(run, ds, summary)
  first = bnlab.load_run(wd, step=10)  # an older checkpoint
  record = next(r for r in read_jsonl(os.path.join(wd, "metrics.jsonl")) if r["step"] == 10)
  assert_reproduces(first, ds, record)
  # The checkpoint's copy of the config, not an edited config.json.
  edited = json.load(open(os.path.join(wd, "config.json")))
  edited["model"]["norm"] = "none"
  json.dump(edited, open(os.path.join(wd, "config.json"), "w"))
  assert bnlab.load_run(wd).config.model.norm == "batch"


def test_a_grouped_sweep_member_reproduces_its_test_accuracy(idx_dir, tmp_path):
  base = tiny_base(idx_dir)
  base.model.norm = "batch"
  base.train.num_epochs = 2
  wd = str(tmp_path / "sw")
  members = sweep.axis("optimizer.learning_rate", [0.05, 0.1])
  with jax.default_matmul_precision("highest"):
    rows = sweep.run_sweep(base, members, wd)
  assert os.listdir(os.path.join(wd, "_groups"))  # they trained as a group
  ds = train.load_data(base)
  for row in rows:
    member = os.path.join(wd, row["name"])
    run = bnlab.load_run(member)  # its final state, in its own directory
    assert run.step == 20
    assert_reproduces(run, ds, json.load(open(os.path.join(member, "summary.json"))))
    assert run.config.optimizer.learning_rate == row["optimizer.learning_rate"]
    early = bnlab.load_run(member, step=10)  # only in the group's stacked checkpoints
    record = next(r for r in read_jsonl(os.path.join(member, "metrics.jsonl"))
                  if r["step"] == 10)
    assert_reproduces(early, ds, record)
  with pytest.raises(WorkDirError, match=r"is a sweep's directory; load one member's"):
    bnlab.load_run(wd)


def test_a_directory_without_a_run_or_checkpoint_is_one_line(tmp_path):
  cases = [(tmp_path / "missing", "is not a directory"),
           (tmp_path, "holds no bnlab run")]
  started = tmp_path / "started"
  started.mkdir()
  (started / "config.json").write_text("{}")
  cases.append((started, "holds no checkpoint yet"))
  for path, message in cases:
    with pytest.raises(WorkDirError, match=message) as e:
      bnlab.load_run(str(path))
    assert "\n" not in str(e.value)
