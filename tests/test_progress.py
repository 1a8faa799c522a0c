"""What a sweep and a study tell the console: group k of N with its members and steps, the
sweep's ETA after each group, a line before the final evaluation; a study's verdicts in brief
and the path of its report, not the report."""

import json
import logging
import os

from bnlab import sweep
from bnlab.study import report as report_lib
from test_sweep import tiny_base


def test_a_sweep_logs_its_groups_eta_and_final_evaluations(idx_dir, tmp_path, caplog):
  base = tiny_base(idx_dir)
  base.train.num_epochs = 1
  # model.norm differs: two groups of two members (10 steps each).
  members = sweep.product(sweep.axis("model.norm", ["batch", "none"]), sweep.seeds(2))
  with caplog.at_level(logging.INFO):
    sweep.run_sweep(base, members, str(tmp_path / "sw"))
  lines = [r.getMessage() for r in caplog.records]
  starts = [l for l in lines if l.startswith("Sweep group ") and "steps left" in l]
  assert starts == ["Sweep group 1/2: 2 member(s) (norm=batch,seed=0, norm=batch,seed=1), "
                    "10 steps left",
                    "Sweep group 2/2: 2 member(s) (norm=none,seed=0, norm=none,seed=1), "
                    "10 steps left"], lines
  first = next(l for l in lines if l.startswith("Sweep group 1/2 done"))
  assert "2/4 members done" in first and "member-steps/s" in first
  assert "sweep ETA 0:" in first and "compiling" in first  # compile time stated apart
  last = next(l for l in lines if l.startswith("Sweep group 2/2 done"))
  assert "4/4 members done" in last and "sweep finished" in last
  finals = [l for l in lines if l.startswith("Final evaluation (train.final_train_eval)")]
  assert len(finals) == 2 and all("2 members' weights on the 320 training images" in l
                                  and "about " in l for l in finals), finals
  assert sum(l.startswith("Final evaluation done in") for l in lines) == 2
  caplog.clear()
  with caplog.at_level(logging.INFO):  # rerun: nothing to train
    sweep.run_sweep(base, members, str(tmp_path / "sw"))
  lines = [r.getMessage() for r in caplog.records]
  assert any("0 group(s) to train" in l and "2 complete" in l for l in lines), lines
  assert not any(l.startswith("Sweep group ") for l in lines)


def test_a_studys_console_output_is_the_verdicts_and_the_reports_path(tmp_path):
  wd = str(tmp_path)
  verdicts = ([{"claim": "bn_helps", "where": "", "verdict": "supported", "primary": True,
                "corrected": "supported"}]
              + [{"claim": "per_rate", "where": f"optimizer.learning_rate={lr}",
                  "verdict": "inconclusive" if lr < 1 else "refuted", "primary": False}
                 for lr in (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30)])
  json.dump(verdicts, open(os.path.join(wd, "claims.json"), "w"))
  rows = [{"name": f"r{i}", "status": "done" if i else "diverged"} for i in range(6)]
  json.dump({"rows": rows, "stages": []}, open(os.path.join(wd, "results.json"), "w"))
  text = report_lib.console_summary(wd, out="results/x")
  assert text.splitlines() == [
      "6 runs (5 done, 1 diverged); 11 verdicts (6 inconclusive, 4 refuted, 1 supported):",
      "- bn_helps (primary, Holm-corrected): supported.",
      "- per_rate (secondary): inconclusive at 6 of 10, refuted at 4 of 10.",
      f"Full report: {os.path.join(wd, 'report.md')} (published with its data to "
      "results/x/report.md)"]
