"""A study's files: written whole or not at all, and a damaged or unwritable one is one line.

Each damaged file the run and report stages read (study.json, stages.json, registration.json,
runs/results.json, a run's summary.json and config.json) stops the stage with a WorkDirError
naming the file and the fix; a damaged measurement cache is measured again, with a warning.
Where the report cannot be written (--out is the work directory, a file where a directory
belongs, a read-only directory) it stops before anything trains, with one line.
"""

import errno
import gzip
import json
import os
import subprocess
import sys
import tempfile

import pytest

from bnlab import study
from bnlab.rundir.errors import WorkDirError
from bnlab.study import files
from bnlab.study import figures
from bnlab.study import metrics as metrics_lib
from bnlab.study import registration
from bnlab.study import registry
from bnlab.study import runner
from bnlab.study import runs as runs_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_study():
  cfg = json.loads(json.dumps(study.base_config().to_dict()))
  cfg["cells"] = ["norm"]
  cfg["metrics"] = {"acc": ["summary", "test_accuracy"]}
  cfg["claims"] = {"above": {"statement": "BN is above.", "rule": "paired_interval",
                             "metric": "acc", "a": "norm=bn", "b": "norm=none"}}
  members = [{"name": f"norm={n},seed={s}", "key": {"norm": n, "seed": s}}
             for n in ("bn", "none") for s in range(2)]
  return study.Study("configs/studies/x.py", "", "", cfg, members)


def one_line(e) -> str:
  text = str(e.value)
  assert "\n" not in text and "Traceback" not in text
  return text


# -- damaged files ------------------------------------------------------------------------


@pytest.mark.parametrize("name, fix", [
    ("stages.json", "it records each run stage's time and machine"),
    ("registration.json", "restore it (e.g. from the published"),
    ("study.json", "it is written from the study config: delete it and rerun the study"),
    ("runs/results.json", "the run stage writes it again: rerun the study without "
                          "--stage=report"),
    ("runs/m/summary.json", "delete it and rerun the study without --stage=report"),
    ("runs/m/config.json", "the run restores it from its checkpoints"),
])
@pytest.mark.parametrize("damage, why", [
    ('{"cut', "Unterminated string"), ("", "Expecting value"), ("7", "it holds a int"),
    (None, "Is a directory")])
def test_a_damaged_file_is_one_line_naming_it_and_the_fix(tmp_path, name, fix, damage, why):
  path = tmp_path / name
  path.parent.mkdir(parents=True, exist_ok=True)
  if damage is None:
    path.mkdir()
  else:
    path.write_text(damage)
  with pytest.raises(WorkDirError) as e:
    files.read_json(str(path), None)
  assert one_line(e).startswith(f"{path} is damaged (") and why in str(e.value)
  assert fix in str(e.value)


def test_a_list_of_something_else_is_damaged(tmp_path):
  path = tmp_path / "stages.json"
  path.write_text('[{"started": "x"}, 3]')
  with pytest.raises(WorkDirError, match="not every entry is a JSON object"):
    files.read_json(str(path), [])
  path.write_text('{"started": "x"}')
  with pytest.raises(WorkDirError, match="it holds a dict, not a JSON list"):
    files.read_json(str(path), [])
  assert files.read_json(str(tmp_path / "none.json"), "default") == "default"


def test_a_damaged_registration_stops_the_register_stage(tmp_path):
  wd = str(tmp_path)
  s = make_study()
  assert registration.register(s, wd) == "registered"
  path = os.path.join(wd, registration.FILE)
  with open(path, "r+") as f:
    f.truncate(100)
  with pytest.raises(WorkDirError, match=f"^{path} is damaged .*restore it"):
    runner.run_study(s, wd, "register")


def test_a_damaged_run_file_stops_the_report(tmp_path):
  run = tmp_path / "runs" / "norm=bn,seed=0"
  run.mkdir(parents=True)
  (run / "summary.json").write_text('{"final_step": 3, "test_acc')
  with pytest.raises(WorkDirError, match=f"^{run / 'summary.json'} is damaged .*final "
                                         "evaluation from its last checkpoint$"):
    runs_lib.read_run(str(run), run.name, {"norm": "bn", "seed": 0})
  (run / "summary.json").write_text('{"final_step": 3}')
  (run / "config.json").write_text("[]")
  with pytest.raises(WorkDirError, match="config.json is damaged .it holds a list"):
    runs_lib.read_run(str(run), run.name, {"norm": "bn", "seed": 0})


def test_a_damaged_sweep_results_file_stops_the_report(tmp_path):
  wd = tmp_path / "wd"
  (wd / "runs").mkdir(parents=True)
  (wd / "runs" / "results.json").write_text("[{")
  with pytest.raises(WorkDirError) as e:
    runner.run_study(make_study(), str(wd), "report")
  assert one_line(e).startswith(f"{wd / 'runs' / 'results.json'} is damaged (")


def test_a_damaged_measurement_cache_is_measured_again(tmp_path, monkeypatch, caplog):
  calls = []

  def measure(run_dir, run_cfg, spec):
    del run_cfg
    calls.append(run_dir)
    return {"value": spec["x"]}
  monkeypatch.setitem(registry.MEASUREMENTS, "fake", measure)
  run = metrics_lib.Run("r", str(tmp_path), {}, {}, [], {"final_step": 10})
  spec = {"kind": "fake", "x": 2}
  assert metrics_lib._measure(run, "m", spec) == {"value": 2} and len(calls) == 1
  assert metrics_lib._measure(run, "m", spec) == {"value": 2} and len(calls) == 1  # cached
  cache = tmp_path / "measurements" / "m.json"
  for damage in ('{"spec": {"kind": "fa', "[]", '{"spec": 1}'):
    cache.write_text(damage)
    assert metrics_lib._measure(run, "m", spec) == {"value": 2}
    assert "is damaged" in caplog.text and "measuring it again" in caplog.text
    assert json.loads(cache.read_text())["values"] == {"value": 2}
  assert len(calls) == 4
  assert [f for f in os.listdir(cache.parent) if f.startswith(".tmp-")] == []


def test_a_damaged_published_file_fails_verify_with_one_line(tmp_path):
  (tmp_path / "study.json").write_text('{"config": ')
  (tmp_path / "claims.json").write_text("[]")
  with pytest.raises(WorkDirError, match="study.json is damaged .*publish the study again"):
    runner.verify_stage(str(tmp_path))
  (tmp_path / "study.json").write_text('{"config": {}}')
  (tmp_path / "data.json.gz").write_bytes(gzip.compress(b'{"format": "bnlab-st')[:-5])
  with pytest.raises(WorkDirError, match="data.json.gz is damaged .*publish the study again"):
    runner.verify_stage(str(tmp_path))


# -- whole or not at all --------------------------------------------------------------------


class Unprintable:
  def __str__(self):
    raise RuntimeError("no text")


def test_a_csv_is_written_whole_or_not_at_all(tmp_path):
  path = str(tmp_path / "cells.csv")
  files.write_csv(path, [{"a": 1, "b": None}, {"a": 2, "c": "x"}])
  before = open(path, newline="").read()
  assert before == "a,b,c\r\n1,,\r\n2,,x\r\n"  # as csv writes it
  with pytest.raises(RuntimeError, match="no text"):
    files.write_csv(path, [{"a": 3}, {"a": Unprintable()}])
  assert open(path, newline="").read() == before and os.listdir(tmp_path) == ["cells.csv"]


def test_a_figure_is_written_whole_or_not_at_all(tmp_path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "final")
  (tmp_path / "final.png").write_bytes(b"the old figure")

  def half_written(fname, **kwargs):
    del kwargs
    with open(fname, "wb") as f:
      f.write(b"\x89PNG half")
    raise OSError(errno.ENOSPC, "No space left on device")
  fig = plt.figure()
  fig.savefig = half_written
  with pytest.raises(WorkDirError, match=f"^writing {path}.png failed .No space left on device"):
    figures.save(fig, path, figures.FigureContext(formats=("png",)))
  assert (tmp_path / "final.png").read_bytes() == b"the old figure"
  assert os.listdir(tmp_path) == ["final.png"]
  fig = plt.figure()
  assert figures.save(fig, path, figures.FigureContext(formats=("png", "svg"))) == [
      f"{path}.png", f"{path}.svg"]
  assert (tmp_path / "final.png").read_bytes()[:4] == b"\x89PNG"
  assert sorted(os.listdir(tmp_path)) == ["final.png", "final.svg"]


def test_publishing_copies_each_file_whole(tmp_path):
  wd, out = tmp_path / "wd", tmp_path / "out"
  (wd / "figures").mkdir(parents=True)
  (wd / "report.md").write_text("# report\n")
  (wd / "figures" / "f.png").write_bytes(b"png")
  (wd / "figures" / ".tmp-abc").write_bytes(b"a killed write's leftover")
  runner.publish(str(wd), str(out))
  assert (out / "report.md").read_text() == "# report\n"
  assert os.listdir(out / "figures") == ["f.png"]


# -- where the report cannot be written -----------------------------------------------------


def test_out_equal_to_the_work_directory_stops_before_anything(tmp_path, monkeypatch):
  monkeypatch.setattr(runner, "run_stage", lambda *a: pytest.fail("trained"))
  wd = str(tmp_path / "wd")
  for out in (wd, wd + "/", os.path.relpath(wd)):
    with pytest.raises(WorkDirError, match="is the work directory, where the report is "
                                           "written anyway; publish into another directory"):
      runner.run_study(make_study(), wd, "all", out=out)
  assert not os.path.exists(wd)


@pytest.mark.parametrize("where", ["wd/figures", "out", "out/figures"])
def test_a_file_where_a_directory_belongs_stops_before_anything(tmp_path, monkeypatch, where):
  monkeypatch.setattr(runner, "run_stage", lambda *a: pytest.fail("trained"))
  (tmp_path / where).parent.mkdir(parents=True, exist_ok=True)
  (tmp_path / where).write_text("x")
  with pytest.raises(WorkDirError) as e:
    runner.run_study(make_study(), str(tmp_path / "wd"), "all", out=str(tmp_path / "out"))
  assert one_line(e) == (f"{tmp_path / where} is a file, where the study writes a directory; "
                         "move it aside, then rerun")


@pytest.fixture
def read_only(tmp_path, monkeypatch):
  """A study directory on a read-only file system (root writes through file modes)."""
  wd = tmp_path / "wd"
  wd.mkdir()
  real_mkstemp, real_makedirs = tempfile.mkstemp, os.makedirs

  def refused(path):
    return str(path).startswith(str(wd))

  def mkstemp(*args, dir=None, **kwargs):  # pylint: disable=redefined-builtin
    if refused(dir):
      raise OSError(errno.EROFS, "Read-only file system", dir)
    return real_mkstemp(*args, dir=dir, **kwargs)

  def makedirs(path, *args, **kwargs):
    if refused(path) and not os.path.isdir(path):
      raise OSError(errno.EROFS, "Read-only file system", path)
    return real_makedirs(path, *args, **kwargs)
  monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
  monkeypatch.setattr(os, "makedirs", makedirs)
  return wd


@pytest.mark.parametrize("stage, failed", [
    ("register", "writing {wd}/study.json failed"),
    ("report", "making {wd}/figures failed"),
])
def test_a_read_only_study_directory_is_one_line(read_only, stage, failed):
  with pytest.raises(WorkDirError) as e:
    runner.run_study(make_study(), str(read_only), stage)
  assert one_line(e) == (failed.format(wd=read_only) + " (Read-only file system); make it "
                         "writable or choose another --workdir")


@pytest.mark.parametrize("where, flags, message", [
    ("wd/figures", [], "wd/figures is a file, where the study writes a directory"),
    ("", ["--out={wd}"], "is the work directory, where the report is written anyway"),
])
def test_the_command_line_says_it_in_one_line(tmp_path, where, flags, message):
  path = tmp_path / "s.py"
  path.write_text("from bnlab import study\nfrom bnlab import sweep\n\n\n"
                  "def get_config(arg=None):\n  s = study.base_config()\n"
                  "  s.cells = ('model.norm',)\n  return s\n\n\n"
                  "def get_sweep(arg=None):\n  return sweep.product("
                  "sweep.axis('model.norm', ['batch', 'none']), sweep.seeds(1))\n")
  wd = tmp_path / "wd"
  wd.mkdir()
  if where:
    (tmp_path / where).write_text("x")
  p = subprocess.run([sys.executable, "-m", "bnlab.study", f"--config={path}",
                      f"--workdir={wd}", "--stage=report"] + [f.format(wd=wd) for f in flags],
                     cwd=ROOT, capture_output=True, text=True, timeout=300)
  lines = [line for line in p.stderr.splitlines() if line.strip()]
  assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr
  assert message in lines[0], lines[0]
