"""The ReLU learning-rate and small-batch studies end to end at :runlocal on the tiny fixture."""

import json
import os

import pytest

from bnlab import study
from bnlab import sweep
from test_study import run_local

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NEW = ("relu_lr", "small_batches")


def test_configs_are_valid_and_short():
  for name in NEW:
    path = os.path.join(ROOT, "configs", "studies", f"{name}.py")
    module = sweep.load_config_file(path)
    for arg in (None, "runlocal"):
      study.validate(module.get_config(arg))
      sweep.resolve_members(study.load_run_config(""), module.get_sweep(arg))
    # small_batches carries its train_gap amendment (the measured gap and its claims).
    assert len(open(path).read().splitlines()) <= (150 if name == "small_batches" else 100)
  full = sweep.load_config_file(os.path.join(ROOT, "configs", "studies", "relu_lr.py"))
  assert len(full.get_sweep()) == 140 and max(m["optimizer.learning_rate"]
                                             for m in full.get_sweep()) >= 3


@pytest.mark.parametrize("name", NEW)
def test_relu_lr_and_small_batches_run_end_to_end(name, idx_dir, tmp_path):
  wd = str(tmp_path / name)
  text = run_local(name, idx_dir, wd)
  rows = json.load(open(os.path.join(wd, "results.json")))["rows"]
  assert rows and all(r["status"] in ("done", "diverged") for r in rows)
  assert text.index("## Claims") < text.index("## Verdicts") < text.index("## Results")
  claims = json.load(open(os.path.join(wd, "claims.json")))
  names = sweep.load_config_file(os.path.join(ROOT, "configs", "studies", f"{name}.py")
                                 ).get_config("runlocal").claims
  assert {c["claim"] for c in claims} == set(names)
  assert all(c["verdict"] in study.VERDICTS for c in claims)
  if name == "relu_lr":
    assert all("final_acc_population" in r and "collapsed" in r for r in rows)
    assert any(r["final_acc_population"] is not None for r in rows)
  else:
    assert any(r.get("gap") is not None for r in rows)
    # The measured gap: for every run; exactly 0 without batch statistics (the controls).
    assert all(r["gap_running"] is not None for r in rows)
    assert all(r["gap_running"] == r["gap_population"] == 0 for r in rows
               if r["model.norm"] in ("layer", "group"))
  assert run_local(name, idx_dir, wd, stage="report") == text  # rebuilt from the files
