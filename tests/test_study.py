"""Studies: metric reductions, cell statistics and claim rules as pure functions; every study
config end to end at :runlocal on the tiny MNIST fixture; the report rebuilt from files."""

import json
import math
import os
import subprocess
import sys

import pytest

from bnlab import config as config_lib
from bnlab import study
from bnlab import sweep
from bnlab.study import published
from bnlab.study import report as report_lib
from bnlab.study import runs as runs_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDIES = ("seed_comparison", "lr_sweep", "placement", "bn_batch_size")


# -- metrics -------------------------------------------------------------------------

def make_run(records, summary=None):
  return study.Run("r", "", {}, {}, records, {"diverged": False} if summary is None else summary)


RECORDS = [  # two epochs of 4 steps, logged every 2 steps; evaluations at steps 0, 4 and 8
    {"step": 0, "epoch": 0.0, "test_accuracy": 0.1},
    {"step": 2, "epoch": 0.5, "interval_steps": 2, "train_loss": 2.0},
    {"step": 4, "epoch": 1.0, "interval_steps": 2, "train_loss": 1.0, "test_accuracy": 0.8},
    {"step": 6, "epoch": 1.5, "interval_steps": 2, "train_loss": 0.6},
    {"step": 8, "epoch": 2.0, "interval_steps": 2, "train_loss": 0.2, "test_accuracy": 0.7},
]


def test_metric_reductions():
  run = make_run(RECORDS, {"diverged": False, "test_accuracy": 0.7, "train_loss": float("nan")})
  assert study.last(run, "test_accuracy") == 0.7
  assert study.max_(run, "test_accuracy") == 0.8
  assert study.first_step_at_least(run, "test_accuracy", 0.75) == 4
  assert study.first_step_at_least(run, "test_accuracy", 0.9) is None
  assert study.epoch_means(run, "train_loss") == [[1, 1.5], [2, 0.4]]
  assert study.mean_over_last_epoch(run, "train_loss") == 0.4
  assert study.series(run, "test_accuracy") == [[0, 0.1], [4, 0.8], [8, 0.7]]
  assert study.summary_value(run, "test_accuracy") == 0.7
  assert study.summary_value(run, "train_loss") is None  # non-finite
  assert study.diverged(run) is False and study.diverged_at(run) is None
  metrics = {"acc": ("summary", "test_accuracy"), "trained": ("at_least", "acc", 0.9),
             "stalled": ("below", "acc", 0.2), "diverged": ("diverged",),
             "failed": ("any", "stalled", "diverged")}
  gone = study.evaluate_metrics(make_run(RECORDS, {"diverged": True, "diverged_at_step": 5}),
                                metrics, {})
  assert gone.values == {"acc": None, "trained": False, "stalled": False, "diverged": True,
                         "failed": True}
  unfinished = study.evaluate_metrics(study.Run("u", "", {}, None, [], None), metrics, {})
  assert set(unfinished.values.values()) == {None}


def test_metric_order_and_bad_references():
  assert study.metric_order({"t": ("at_least", "a", 0.9), "a": ("last", "x")}) == ["a", "t"]
  with pytest.raises(config_lib.ConfigError, match="no metric named 'b'"):
    study.metric_order({"t": ("at_least", "b", 0.9)})
  with pytest.raises(config_lib.ConfigError, match="unknown metric 'mean'"):
    study.metric_order({"t": ("mean", "x")})


def test_cell_statistics():
  d = study.describe_values([0.90, 0.92, 0.94, None])
  assert (d["n"], d["of"], d["min"], d["max"]) == (3, 4, 0.90, 0.94)
  assert d["mean"] == pytest.approx(0.92)
  # sd = 0.02; t(0.975, 2) = 4.3027: half-width 4.3027 * 0.02 / sqrt(3)
  assert d["ci"] == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-5)
  assert study.describe_values([0.5])["ci"] is None
  assert study.describe_values([True, False, True]) == {"n": 3, "of": 3, "count": 2}
  assert study.binomial_se(0.98, 10_000) == pytest.approx(0.0014)
  assert report_lib._fmt(study.describe_values([4000, 4500, None])).endswith(
      "[4,000..4,500] (2/3)")
  # Values that would all print as 0.0000 keep their size; zeros and larger ones do not.
  assert report_lib._fmt(study.describe_values([1e-7, 3e-7])).startswith("2.00e-07 ±")
  assert report_lib._fmt(study.describe_values([0.0, 0.0])) == "0.0000 ±0.0000 [0.0000..0.0000]"


# -- claim rules -----------------------------------------------------------------------

def cells_of(rows):
  return study.make_cells(rows, ("norm", "lr"), [k for k in rows[0] if k not in ("norm", "lr")])


def test_difference_and_below_everywhere():
  cells = cells_of([{"norm": "bn", "lr": 0.01, "acc": 0.93, "loss": [[1, 0.5], [2, 0.2]]},
                    {"norm": "bn", "lr": 0.01, "acc": 0.95, "loss": [[1, 0.3], [2, 0.2]]},
                    {"norm": "no", "lr": 0.01, "acc": 0.90, "loss": [[1, 0.6], [2, 0.1]]}])
  verdict, numbers = study.difference_at_least(cells, "acc", "norm=bn", "norm=no", 0.03)
  assert verdict == "supported" and numbers["difference"] == pytest.approx(0.04)
  assert study.difference_at_least(cells, "acc", "norm=bn", "norm=no", 0.05)[0] == "refuted"
  assert study.difference_at_least(cells, "acc", "norm=bn", "norm=gn", 0.0)[0] == "inconclusive"
  verdict, numbers = study.below_everywhere(cells, "loss", "norm=bn", "norm=no")
  assert verdict == "refuted" and numbers["points_not_below"] == [2]  # 0.2 vs 0.1 at epoch 2
  assert study.below_everywhere(cells, "loss", "norm=no", "lr=1")[0] == "inconclusive"


def test_separated_is_inconclusive_when_seeds_overlap_or_fail():
  rows = [{"norm": n, "lr": 1, "acc": a, "ok": a > 0.5}
          for n, accs in (("after", (0.97, 0.98)), ("before", (0.95, 0.96)),
                          ("mixed", (0.955, 0.99)), ("broken", (0.1, 0.99)))
          for a in accs]
  cells = cells_of(rows)
  assert study.separated(cells, "acc", "norm=after", "norm=before")[0] == "supported"
  assert study.separated(cells, "acc", "norm=before", "norm=after")[0] == "refuted"
  assert study.separated(cells, "acc", "norm=before", "norm=after", higher=False)[0] == \
      "supported"
  verdict, numbers = study.separated(cells, "acc", "norm=mixed", "norm=before")
  assert verdict == "inconclusive" and numbers["reason"] == "the seed ranges overlap"
  verdict, numbers = study.separated(cells, "acc", "norm=broken", "norm=before", require="ok")
  assert verdict == "inconclusive" and numbers["reason"] == "not every seed ok"


def test_wins_above_best_and_each():
  rows = []
  for lr, (no_acc, bn_acc) in {0.1: (0.95, 0.96), 1.0: (0.97, 0.97), 3.0: (0.1, 0.95)}.items():
    rows += [{"norm": "none", "lr": lr, "acc": no_acc, "fails": no_acc < 0.2, "trains": False},
             {"norm": "batch", "lr": lr, "acc": bn_acc, "fails": False, "trains": bn_acc >= 0.9}]
  cells = cells_of(rows)
  verdict, numbers = study.wins_above_best(cells, "acc", "lr", "norm=batch", "norm=none",
                                           "fails", "trains")
  assert verdict == "supported" and numbers["base_best"] == 1.0
  assert numbers["treat_trains_there"] == [3.0]
  claims = {"c": {"statement": "s", "rule": "difference_at_least", "metric": "acc",
                  "a": "norm=batch", "b": "norm=none", "threshold": 0.005, "each": ["lr"]}}
  assert [(v["where"], v["verdict"]) for v in study.judge(claims, cells)] == [
      ("lr=0.1", "supported"), ("lr=1", "refuted"), ("lr=3", "supported")]


def seeded_cells(acc_a, acc_b, n_test=None, curve=None):
  """Cells a and b, one run per seed; `acc` a test accuracy (binomial noise when n_test)."""
  rows = [{"norm": n, "lr": 1, "seed": i, "acc": v, "drift": None if v is None else 1.0 + v,
           "curve": [[0, 0.1], [10, v]] if curve is None else curve(n, i, v)}
          for n, accs in (("a", acc_a), ("b", acc_b)) for i, v in enumerate(accs)]
  cells = study.make_cells(rows, ("norm", "lr"), ["acc", "drift", "curve"])
  for c in cells:
    if n_test:
      c["stats"]["acc"]["n_test"] = c["stats"]["curve"]["n_test"] = n_test
  return cells


def test_same_verdict_reports_where_the_statistics_change_it():
  rows = [{"norm": n, "lr": 1, "seed": i, "running": r, "population": p}
          for i in range(3) for n, r, p in (("bn", 0.88 + i / 1000, 0.96 + i / 1000),
                                            ("none", 0.95 + i / 1000, 0.95 + i / 1000))]
  cells = study.make_cells(rows, ("norm", "lr"), ["running", "population"])
  verdict, numbers = study.same_verdict(cells, ("running", "population"), "norm=bn", "norm=none")
  assert verdict == "refuted"
  assert (numbers["running"], numbers["population"]) == ("refuted", "supported")
  assert study.same_verdict(cells, ("running", "running"), "norm=bn", "norm=none")[0] == \
      "supported"
  assert study.same_verdict(cells, ("running",), "norm=bn", "norm=gn")[0] == "inconclusive"


def test_the_statistics_behind_a_metric_are_named():
  metrics = {"acc": ("summary", "test_accuracy"), "pop": ("summary", "test_accuracy_population"),
             "ok": ("at_least", "pop", 0.9), "gap": ("summary_difference", "train_accuracy",
                                                     "full_train_accuracy"),
             "ics": ("measured", "ics", "x")}
  assert study.statistics_of("acc", metrics) == ["running averages (inference mode)"]
  assert study.statistics_of("ok", metrics) == [study.STATISTICS["test_accuracy_population"]]
  assert study.statistics_of("gap", metrics) == ["batch statistics (train mode)",
                                                 "running averages (inference mode)"]
  assert study.statistics_of("ics", metrics) == []
  assert published.test_accuracy_metrics(metrics) == ["acc", "pop"]


def test_measurement_and_percentile_figure(tmp_path):
  records = [{"step": s, "epoch": s / 10, "preact_2/percentiles": [[-1 - s, s, 1 + 2 * s]]}
             for s in (0, 5, 10)]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))
  drift = study.percentile_drift(str(tmp_path), {}, {"kind": "percentile_drift", "from_step": 5})
  assert drift == {"preact_2/median_drift": 5.0, "preact_2/spread_drift": 15.0}
  run = study.evaluate_metrics(
      study.Run("r", str(tmp_path), {}, {}, records, {"diverged": False}),
      {"p": ("series", "preact_2/percentiles"), "d": ("measured", "drift", "preact_2/median_drift")},
      {"drift": {"kind": "percentile_drift"}})
  assert run.values["d"] == 10.0 and os.path.exists(tmp_path / "measurements" / "drift.json")
  cells = study.make_cells([{"norm": "bn", "p": run.values["p"]}], ("norm",), ["p"])
  assert study.percentiles(cells, str(tmp_path / "p"), study.FigureContext(), "p")
  assert os.path.getsize(tmp_path / "p.png") > 0


# -- configs ---------------------------------------------------------------------------

def test_stage_wall_time_counts_concurrent_workers_once():
  from bnlab.study import report
  stage = lambda t, s: {"started": f"2026-01-01T10:{t}", "wall_s": s}  # noqa: E731
  # One after another: the sum. Two workers from 10:00:00 and 10:00:30 for 60 s each: 90 s.
  assert report.stage_wall_s([stage("00:00", 60), stage("05:00", 30)]) == (90, 0)
  assert report.stage_wall_s([stage("00:30", 60), stage("00:00", 60)]) == (90, 2)
  assert report.stage_wall_s([stage("00:00", 60), stage("00:10", 5), stage("02:00", 1)]) == (
      61, 2)  # a stage inside another adds nothing
  assert report.stage_wall_s([stage("00:00", 60.5), stage("01:00", 10)]) == (70.5, 0)
  assert report.stage_wall_s([]) == (0, 0)


def test_parse_arg():
  a = study.parse_arg("epochs=2,runlocal,fair=false", epochs=20, fair=True, runlocal=False)
  assert (a.epochs, a.fair, a.runlocal) == (2, False, True)
  with pytest.raises(config_lib.ConfigError, match="unknown study argument 'epoch'"):
    study.parse_arg("epoch=2", epochs=20)
  with pytest.raises(config_lib.ConfigError, match="not a int"):
    study.parse_arg("epochs=two", epochs=20)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.__setattr__("claim", {}), "unknown key 'claim'"),
    (lambda s: s.run.__setattr__("overide", 1), "unknown key 'run.overide'"),
    (lambda s: s.__setattr__("metrics", {"m": ("mean", "x")}), "unknown metric 'mean'"),
    (lambda s: s.__setattr__("figures", {"f": {"kind": "curves", "metrik": "m"}}),
     "figures.f: missing a required argument: .metric."),
    (lambda s: s.__setattr__("claims", {"c": {"statement": "s", "rule": "separated"}}),
     "claims.c.*missing a required argument"),
])
def test_validate_rejects_bad_configs(change, message):
  s = study.base_config()
  change(s)
  with pytest.raises(config_lib.ConfigError, match=message):
    study.validate(s)


def test_study_configs_are_valid_and_small():
  for name in STUDIES:
    module = sweep.load_config_file(os.path.join(ROOT, "configs", "studies", f"{name}.py"))
    for arg in (None, "runlocal"):
      study.validate(module.get_config(arg))
      sweep.resolve_members(study.load_run_config(""), module.get_sweep(arg))
  with open(os.path.join(ROOT, "configs", "studies", "bn_batch_size.py")) as f:
    example = f.read()
  assert len(example.splitlines()) < 60
  with open(os.path.join(ROOT, "docs", "studies.md")) as f:
    page = f.read().split("## Writing a study", 1)[1]
  shown = page.split("```python\n", 1)[1].split("```", 1)[0]
  assert example.endswith(shown)  # the docs show the config file as it is, less its docstring


# -- end to end ------------------------------------------------------------------------

def run_local(name, idx_dir, workdir, stage="all", num_steps=None):
  """Study `name` at :runlocal on the IDX files (with `num_steps`, that long)."""
  path = os.path.join("configs", "studies", f"{name}.py")
  cfg = sweep.load_config_file(os.path.join(ROOT, path)).get_config("runlocal")
  cfg.data.source, cfg.data.dir = "idx", idx_dir
  if num_steps:
    cfg.run.overrides.train.num_steps = num_steps
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    return study.run_study(study.Study.from_file(path, "runlocal", cfg), workdir, stage)
  finally:
    os.chdir(cwd)


@pytest.fixture(scope="module")
def local_runs(idx_dir, tmp_path_factory):
  """name -> (work directory, report) of each study run once at :runlocal."""
  base = tmp_path_factory.mktemp("studies")
  done = {}

  def get(name):
    if name not in done:
      wd = str(base / name)
      done[name] = wd, run_local(name, idx_dir, wd)
    return done[name]
  return get


@pytest.mark.parametrize("name", STUDIES)
def test_study_runs_end_to_end(name, idx_dir, local_runs):
  wd, text = local_runs(name)
  rows = json.load(open(os.path.join(wd, "results.json")))["rows"]
  assert rows and all(r["status"] in ("done", "diverged") for r in rows)
  assert not any(isinstance(v, list) for r in rows for v in r.values())  # series stay in runs/
  assert text.index("## Claims") < text.index("## Verdicts") < text.index("## Results")
  for claim in json.load(open(os.path.join(wd, "claims.json"))):
    assert claim["verdict"] in study.VERDICTS and f"| {claim['claim']} |" in text
  assert "Student t" in text and "binomial standard error" in text and "## Time" in text
  assert "python 3." in text and "1 run stage(s)" in text  # provenance and the time split
  assert os.path.exists(os.path.join(wd, "cells.csv"))
  for fig in sweep.load_config_file(os.path.join(ROOT, "configs", "studies", f"{name}.py")
                                    ).get_config("runlocal").figures:
    assert f"figures/{fig}.png" in text and os.path.exists(os.path.join(wd, "figures", f"{fig}.png"))
  assert run_local(name, idx_dir, wd, stage="report") == text  # rebuilt from the files alone


def test_a_published_study_verifies_from_its_files_alone(idx_dir, local_runs, tmp_path):
  wd, text = local_runs("bn_batch_size")
  out = str(tmp_path / "published")
  path = os.path.join("configs", "studies", "bn_batch_size.py")
  cfg = sweep.load_config_file(os.path.join(ROOT, path)).get_config("runlocal")
  cfg.data.source, cfg.data.dir = "idx", idx_dir
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    assert study.run_study(study.Study.from_file(path, "runlocal", cfg), wd, "report",
                           out=out) == text
  finally:
    os.chdir(cwd)
  for name in ("report.md", "claims.json", "study.json", "data.json.gz", "registration.json",
               "figures/final_acc.png"):
    assert os.path.exists(os.path.join(out, name)), name
  assert "## Registration" in text and "**Method.**" in text and "| Holm |" in text
  cmd = [sys.executable, "-m", "bnlab.study", "--stage=verify", f"--workdir={out}",
         f"--config={path}:runlocal"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"verified: 1 verdicts recomputed from {out} alone, all as published" in proc.stdout
  claims = json.load(open(os.path.join(out, "claims.json")))
  claims[0]["verdict"] = "supported" if claims[0]["verdict"] != "supported" else "refuted"
  json.dump(claims, open(os.path.join(out, "claims.json"), "w"))
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "verdict published" in proc.stderr, proc.stderr[-2000:]


def test_a_run_whose_records_were_cut_short_is_left_out_and_named(idx_dir, tmp_path):
  wd = str(tmp_path / "study")
  run_local("bn_batch_size", idx_dir, wd)
  rows = json.load(open(os.path.join(wd, "results.json")))["rows"]
  damaged = os.path.join(wd, "runs", rows[0]["name"], "metrics.jsonl")
  lines = open(damaged).read().splitlines()
  open(damaged, "w").write(lines[0] + "\n")  # e.g. a partial copy
  text = run_local("bn_batch_size", idx_dir, wd, stage="report")
  rows = json.load(open(os.path.join(wd, "results.json")))["rows"]
  assert rows[0]["status"] == "failed" and rows[0]["final_acc"] is None
  assert f"{damaged} ends at step {json.loads(lines[0])['step']}, but the run finished at step" \
      in rows[0]["error"] and "move the run's directory aside and rerun" in rows[0]["error"]
  assert all(r["status"] == "done" for r in rows[1:])
  assert f"{len(rows)} runs: {len(rows) - 1} done, 1 failed" in text


def test_a_report_leaves_out_runs_made_with_another_config(idx_dir, tmp_path):
  # --stage=report after the study's run config changed: the runs are not this study's.
  wd = str(tmp_path / "study")
  run_local("bn_batch_size", idx_dir, wd)
  run_local("bn_batch_size", idx_dir, wd, stage="report", num_steps=40)
  rows = json.load(open(os.path.join(wd, "results.json")))["rows"]
  assert all(r["status"] == "failed" and "differs from the study's config of this run in "
             "train.num_steps (30 -> 40)" in r["error"] for r in rows)
  run_local("bn_batch_size", idx_dir, wd, num_steps=40)  # trains them on to 40 steps
  rows = json.load(open(os.path.join(wd, "results.json")))["rows"]
  assert all(r["status"] == "done" for r in rows)
  stages = json.load(open(os.path.join(wd, "stages.json")))
  assert [s["trained"] for s in stages] == [len(rows)] * 2  # made longer counts as trained


def test_a_second_study_on_a_directory_in_use_is_refused_and_records_nothing(idx_dir,
                                                                             tmp_path):
  # The first study holds the study directory (and, while it trains, runs/'s sweep lock).
  from bnlab.rundir import locks  # pylint: disable=g-import-not-at-top
  from bnlab.rundir.errors import WorkDirError  # pylint: disable=g-import-not-at-top
  wd = tmp_path / "study"
  (wd / "runs").mkdir(parents=True)
  held = [(str(wd / ".study-lock"), locks.acquire_lock(str(wd / ".study-lock"), "x", "x")),
          (str(wd / "runs" / ".sweep-lock"),
           locks.acquire_lock(str(wd / "runs" / ".sweep-lock"), "x", "x"))]
  try:
    before = sorted(os.listdir(wd))
    for stage in ("all", "run", "register"):
      with pytest.raises(WorkDirError, match=f"study directory {wd} is in use by process "
                                             f"{os.getpid()}"):
        run_local("seed_comparison", idx_dir, str(wd), stage=stage)
      assert sorted(os.listdir(wd)) == before  # no stage record, study.json or registration
  finally:
    for path, fd in held:
      locks.release_lock(path, fd)


def test_a_study_made_shorter_than_its_runs_names_the_fix_that_works(idx_dir, tmp_path):
  # The run stage cannot shorten a run; its report must not send the user back to it.
  wd = str(tmp_path / "study")
  run_local("bn_batch_size", idx_dir, wd)
  run_local("bn_batch_size", idx_dir, wd, num_steps=20)  # the whole study, run stage first
  rows = json.load(open(os.path.join(wd, "results.json")))["rows"]
  for r in rows:
    assert r["status"] == "failed" and "without --stage=report" not in r["error"], r
    assert "the study now asks for 20 steps, but the run trained 30, and a run can be made " \
        "longer, not shorter; give the study its runs' length back (train.num_steps=30" \
        in r["error"] and f"or move runs/{r['name']} aside" in r["error"], r["error"]
  run_local("bn_batch_size", idx_dir, wd, stage="report")  # the length given back: all done
  rows = json.load(open(os.path.join(wd, "results.json")))["rows"]
  assert all(r["status"] == "done" for r in rows)


def test_a_report_of_runs_of_another_config_says_to_move_them_or_use_a_new_workdir():
  ran = {"train": {"num_steps": 30}, "optimizer": {"learning_rate": 0.1}}
  configured = {"train.num_steps": 30, "optimizer.learning_rate": 0.2}
  message = runs_lib._configured_otherwise("/s/runs/m", ran, configured, {})
  assert "without --stage=report" not in message
  assert message.endswith("it ran as another study; use a new --workdir for the changed "
                          "study, or move runs/m aside to train it again as configured")


def test_command_line_rebuilds_and_resumes(idx_dir, local_runs):
  wd, text = local_runs("seed_comparison")
  # One seed at :runlocal: no seed interval, so no difference is called.
  assert "| seed_claim | all | **inconclusive** |" in text
  assert "| matched_rates | optimizer.learning_rate=0.01 | **inconclusive** |" in text
  assert "reason: fewer than 2 seed pairs" in text
  cmd = [sys.executable, "-m", "bnlab.study", f"--workdir={wd}",
         "--config=configs/studies/seed_comparison.py:runlocal",
         "--config.data.source=idx", f"--config.data.dir={idx_dir}"]
  os.remove(os.path.join(wd, "report.md"))
  proc = subprocess.run(cmd + ["--stage=report"], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  # The console gets the verdicts in brief and the report's path, not the report.
  out = proc.stdout.strip().splitlines()
  assert out[0].startswith("2 runs (2 done); ") and "- seed_claim (" in proc.stdout
  assert out[-1] == f"Full report: {os.path.join(wd, 'report.md')}" and len(out) < 10
  # The same report, its command with the overrides it was given.
  given = "configs/studies/seed_comparison.py:runlocal"
  assert open(os.path.join(wd, "report.md")).read() == text.replace(
      f"--config={given} --workdir",
      f"--config={given} --config.data.source=idx --config.data.dir={idx_dir} --workdir")
  proc = subprocess.run(cmd + ["--stage=run"], cwd=ROOT, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  stages = json.load(open(os.path.join(wd, "stages.json")))
  assert [s["trained"] for s in stages] == [2, 0]  # finished runs are not repeated


def test_bad_study_config_is_one_error_line(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text("from bnlab import study\n\ndef get_config(arg=None):\n"
                 "  s = study.base_config()\n  s.claimz = {}\n  return s\n\n"
                 "def get_sweep(arg=None):\n  return [{}]\n")
  proc = subprocess.run([sys.executable, "-m", "bnlab.study", f"--config={bad}",
                         f"--workdir={tmp_path / 'wd'}"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and "'claimz'" in lines[0], proc.stderr


def test_an_invalid_run_config_names_the_studys_fix_not_a_run_flag():
  path = "configs/studies/seed_comparison.py"
  run_key = ("config.train.num_epochs=0 is invalid: expected num_epochs > 0 or num_steps > 0. "
             "Set it with --config.train.num_epochs=...")
  fixed = study.study_fix(run_key, path)
  assert "--config.train.num_epochs" not in fixed
  assert f"--config={path}:..." in fixed and "run.overrides" in fixed
  study_key = "config.data.source='x' is invalid: expected ... Set it with --config.data.source=..."
  assert study.study_fix(study_key, path) == study_key  # a study flag: the hint stands
