"""Many workers on one sweep or study directory: disjoint groups, claims taken over from dead
workers, groups cut for the workers, and results bit-identical to one process's."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from bnlab import config as config_lib
from bnlab import study
from bnlab import sweep
from bnlab.sweep import claims as claims_lib
from bnlab.sweep import runner as sweep_runner
import run_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two learning rates x two seeds: one vmapped group, cut into solo groups for 4 workers.
SWEEP_FILE = '''
from bnlab import config, sweep

def get_config():
  c = config.base_config()
  c.data.source = "idx"
  c.model.name = "seed1_mlp"
  c.train.batch_size = 32
  c.train.num_steps = 40
  c.train.log_every_steps = 5
  c.train.eval_every_steps = 20
  return c

def get_sweep():
  return sweep.product(sweep.axis("optimizer.learning_rate", [0.1, 0.3]), sweep.seeds(2))
'''


def sweep_module(tmp_path, text=SWEEP_FILE):
  path = tmp_path / "workers_sweep.py"
  path.write_text(text)
  return str(path), sweep.load_config_file(str(path))


def worker(path, workdir, idx_dir, *flags):
  """A `python -m bnlab.sweep` worker process on `workdir`."""
  return subprocess.Popen(
      [sys.executable, "-m", "bnlab.sweep", f"--config={path}", f"--workdir={workdir}",
       f"--config.data.dir={idx_dir}", *flags], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def same_runs(a, b, names):
  """Asserts that members `names` of sweeps `a` and `b` trained bit-identically: their
  records (times aside), summaries' numbers and final train states."""
  for name in names:
    ra, rb = (run_files.read_jsonl(os.path.join(d, name, "metrics.jsonl")) for d in (a, b))
    drop = ("wall_time", "examples_per_sec")
    assert [{k: v for k, v in r.items() if k not in drop} for r in ra] == \
        [{k: v for k, v in r.items() if k not in drop} for r in rb], name
    sa, sb = (json.load(open(os.path.join(d, name, "summary.json"))) for d in (a, b))
    for key in ("test_accuracy", "test_loss", "train_loss", "final_step",
                "full_train_accuracy", "full_train_loss"):
      assert sa.get(key) == sb.get(key), (name, key)
    (step_a, state_a), (step_b, state_b) = (run_files.final_state(os.path.join(d, name))
                                            for d in (a, b))
    assert step_a == step_b
    import jax  # pylint: disable=g-import-not-at-top
    for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
      np.testing.assert_array_equal(x, y)


# -- groups cut for the workers ---------------------------------------------------------

def test_groups_are_cut_for_the_workers_alike_every_time():
  assert sweep.split_for_workers([10, 2], [1, 1], 4) == [3, 1]  # the largest chunks first
  assert sweep.split_for_workers([10, 2], [1, 1], 0) == [1, 1]
  assert sweep.split_for_workers([3], [1], 8) == [3]  # no chunk below one member
  base = config_lib.base_config()
  base.model.name, base.train.num_steps = "seed1_mlp", 10
  members = sweep.resolve_members(base, sweep.product(
      sweep.axis("optimizer.learning_rate", [0.1, 0.3]), sweep.seeds(5)))
  assert [len(g) for g in sweep.group_members(members, max_group_size=10)] == [10]
  cut = sweep.group_members(members, max_group_size=10, num_workers=4)
  assert [len(g) for g in cut] == [2, 3, 2, 3]
  assert [m.name for g in cut for m in g] == [m.name for m in members]  # order kept
  assert [sweep_runner.group_id(g) for g in cut] == [
      sweep_runner.group_id(g) for g in sweep.group_members(members, max_group_size=10,
                                                              num_workers=4)]


# -- claims -----------------------------------------------------------------------------

def test_a_group_is_claimed_once_and_taken_over_from_a_dead_holder(tmp_path):
  lost = []
  with claims_lib.Claims(str(tmp_path), "f", on_lost=lost.append) as a, \
      claims_lib.Claims(str(tmp_path), "f", on_lost=lost.append) as b:
    assert a.claim("g1") and a.claim("g1")  # held: claiming again is a no-op
    assert not b.claim("g1") and b.holder("g1")["token"] == a.token
    assert b.claim("g2")
    a.release("g1")
    assert b.claim("g1")
  assert not lost and os.listdir(tmp_path / "_claims" / "workers") == []
  assert sorted(os.listdir(tmp_path / "_claims")) == ["workers"]  # every claim released

  # A holder on this machine whose process is gone: taken over at once.
  dead = subprocess.Popen(["true"])
  dead.wait()
  claim = {"host": "h", "pid": dead.pid, "pid_start": "1", "machine": claims_lib.machine(),
           "token": "t"}
  (tmp_path / "_claims" / "g3.0").write_text(json.dumps(claim))
  # A holder on another machine: alive while its heartbeat is fresher than the timeout.
  (tmp_path / "_claims" / "g4.0").write_text(json.dumps({**claim, "machine": "elsewhere"}))
  (tmp_path / "_claims" / "g5.0").write_text(json.dumps({**claim, "machine": "elsewhere"}))
  old = time.time() - 1000
  os.utime(tmp_path / "_claims" / "g5.0", (old, old))
  with claims_lib.Claims(str(tmp_path), "f", timeout_s=300) as c:
    assert c.claim("g3") and not c.claim("g4") and c.claim("g5")
    assert sorted(n for n in os.listdir(tmp_path / "_claims") if n.startswith("g")) == [
        "g3.1", "g4.0", "g5.1"]  # the next claim file; the dead one's removed


def test_a_worker_that_lost_its_claim_or_the_directory_stops(tmp_path):
  with claims_lib.Claims(str(tmp_path), "f", on_lost=lambda m: None) as a:
    assert a.claim("g")
    (tmp_path / "_claims" / "g.1").write_text("{}")  # taken over by another worker
    with pytest.raises(claims_lib.Lost, match="claim on group g was taken over"):
      a.check()
    os.remove(tmp_path / "_claims" / "g.1")
    os.remove(tmp_path / "_claims" / "g.0")
    with pytest.raises(claims_lib.Lost, match="was taken over or removed"):
      a.check()
    a.held.clear()
  # The work directory not shared (here: its claims removed under a running worker): one
  # line, exit status 2, from the heartbeat thread.
  script = ("import os, shutil, sys, time\nfrom bnlab.sweep import claims\n"
            "with claims.Claims(sys.argv[1], 'f', heartbeat_s=0.2) as c:\n"
            "  c.claim('g')\n  shutil.rmtree(os.path.join(sys.argv[1], '_claims'))\n"
            "  time.sleep(30)\n")
  p = subprocess.run([sys.executable, "-c", script, str(tmp_path / "w")], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
  assert p.returncode == 2 and len(errors) == 1, p.stderr
  assert "claims directory" in errors[0] and "vanished" in errors[0]
  assert "every worker shares" in errors[0]


def test_a_worker_of_another_config_is_one_line(tmp_path, idx_dir):
  path, _ = sweep_module(tmp_path)
  wd = tmp_path / "wd"
  (wd / "_claims" / "workers").mkdir(parents=True)
  live = {"host": "h", "pid": os.getpid(), "pid_start": claims_lib._process_start(os.getpid()),
          "machine": claims_lib.machine(), "token": "t", "fingerprint": "0" * 64,
          "argv": ["bnlab.sweep", "--config=other.py"]}
  (wd / "_claims" / "workers" / "other.json").write_text(json.dumps(live))
  p = worker(path, str(wd), idx_dir, "--num_workers=4")
  _, err = p.communicate(timeout=300)
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
  assert f"worker process {os.getpid()} on host h (bnlab.sweep --config=other.py)" in errors[0]
  assert "with another config, grouping or bnlab version" in errors[0]
  assert not [n for n in os.listdir(wd) if "learning_rate" in n]  # nothing trained


# -- end to end -------------------------------------------------------------------------

def test_two_workers_take_disjoint_groups_and_match_one_process(tmp_path, idx_dir):
  path, module = sweep_module(tmp_path)
  base = module.get_config()
  base.data.dir = idx_dir
  one = str(tmp_path / "one")
  rows = sweep.run_sweep(base, module.get_sweep(), one, num_workers=4)
  assert [r["status"] for r in rows] == ["done"] * 4
  two = str(tmp_path / "two")
  procs = [worker(path, two, idx_dir, "--num_workers=4") for _ in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  started = [line for _, err in outs for line in err.splitlines()
             if "Sweep group" in line and "steps left" in line]
  assert len(started) == 4, started  # each group trained once, by one of the two
  names = [r["name"] for r in rows]
  same_runs(one, two, names)
  drop = ("wall_time",)
  assert [{k: v for k, v in r.items() if k not in drop} for r in sweep.load_results(two)] == \
      [{k: v for k, v in r.items() if k not in drop} for r in rows]
  assert sorted(os.listdir(os.path.join(two, "_claims"))) == ["workers"]


def checkpoint_steps(groups: str) -> list[int]:
  """The checkpoint steps under a sweep's `_groups`, read while a worker writes them (a group's
  directory comes before its checkpoints directory)."""
  steps = []
  for d in (os.listdir(groups) if os.path.isdir(groups) else []):
    try:
      steps += [int(n) for n in os.listdir(os.path.join(groups, d, "checkpoints")) if n.isdigit()]
    except FileNotFoundError:
      continue
  return steps


def test_a_group_of_a_killed_worker_is_resumed_by_another_bit_identical(tmp_path, idx_dir):
  text = SWEEP_FILE.replace("c.train.num_steps = 40", "c.train.num_steps = 3000\n"
                            "  c.train.checkpoint_every_steps = 100").replace(
                                "[0.1, 0.3]", "[0.1]")
  path, module = sweep_module(tmp_path, text)
  base = module.get_config()
  base.data.dir = idx_dir
  one = str(tmp_path / "one")
  rows = sweep.run_sweep(base, module.get_sweep(), one)  # one group of two members
  killed = str(tmp_path / "killed")
  p = worker(path, killed, idx_dir)
  groups = os.path.join(killed, "_groups")
  deadline = time.time() + 300
  while time.time() < deadline and p.poll() is None:
    steps = checkpoint_steps(groups)
    if steps and max(steps) >= 200:
      break
    time.sleep(0.05)
  p.send_signal(signal.SIGKILL)
  p.communicate()
  assert p.returncode == -signal.SIGKILL, "the worker ended before it could be killed"
  assert steps and max(steps) >= 200  # killed mid-group, with checkpoints to resume from
  claimed = [n for n in os.listdir(os.path.join(killed, "_claims")) if n != "workers"]
  assert len(claimed) == 1  # left by the killed worker, which held the group
  again = sweep.run_sweep(base, module.get_sweep(), killed)  # takes the claim over, resumes
  assert [r["status"] for r in again] == ["done"] * 2
  same_runs(one, killed, [r["name"] for r in rows])


def test_a_study_run_by_two_workers_reports_what_one_process_does(tmp_path, idx_dir):
  path = os.path.join("configs", "studies", "seed_comparison.py")
  cfg = sweep.load_config_file(os.path.join(ROOT, path)).get_config("runlocal")
  cfg.data.source, cfg.data.dir = "idx", idx_dir
  one = str(tmp_path / "one")
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    study.run_study(study.Study.from_file(path, "runlocal", cfg), one, "all")
  finally:
    os.chdir(cwd)
  two = str(tmp_path / "two")
  cmd = [sys.executable, "-m", "bnlab.study", f"--workdir={two}", f"--config={path}:runlocal",
         "--config.data.source=idx", f"--config.data.dir={idx_dir}", "--num_workers=2"]
  procs = [subprocess.Popen(cmd + ["--stage=all"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  drop = ("wall_time",)
  rows = [json.load(open(os.path.join(d, "results.json")))["rows"] for d in (one, two)]
  assert [{k: v for k, v in r.items() if k not in drop} for r in rows[0]] == \
      [{k: v for k, v in r.items() if k not in drop} for r in rows[1]]
  assert json.load(open(os.path.join(one, "claims.json"))) == \
      json.load(open(os.path.join(two, "claims.json")))
  stages = json.load(open(os.path.join(two, "stages.json")))
  assert len(stages) == 2 and not any(s["interrupted"] for s in stages)  # one per worker
  # Each run counted by the worker that trained it, not by both.
  assert sum(s["trained"] for s in stages) == len(rows[1])


def test_a_study_worker_of_another_config_registers_nothing(tmp_path, idx_dir):
  path = os.path.join("configs", "studies", "seed_comparison.py")
  cfg = sweep.load_config_file(os.path.join(ROOT, path)).get_config("runlocal")
  cfg.data.source, cfg.data.dir = "idx", idx_dir
  wd = tmp_path / "study"
  (wd / "runs" / "_claims" / "workers").mkdir(parents=True)
  live = {"host": "h", "pid": os.getpid(), "pid_start": claims_lib._process_start(os.getpid()),
          "machine": claims_lib.machine(), "token": "t", "fingerprint": "0" * 64}
  (wd / "runs" / "_claims" / "workers" / "other.json").write_text(json.dumps(live))
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    with pytest.raises(config_lib.ConfigError, match="with another config, grouping"):
      study.run_study(study.Study.from_file(path, "runlocal", cfg), str(wd), "run")
  finally:
    os.chdir(cwd)
  assert not (wd / "registration.json").exists()  # refused before it could amend it


RACE = """
import json, os, sys, time
from bnlab.sweep import claims

def barrier(name, n):  # every racer waits here for the others
  open(os.path.join(sys.argv[2], f"{name}-{os.getpid()}"), "w").close()
  while sum(f.startswith(name) for f in os.listdir(sys.argv[2])) < n:
    time.sleep(0.001)

with claims.Claims(sys.argv[1], "f") as c:
  barrier("ready", int(sys.argv[3]))
  won = [g for g in ("a", "b", "c", "d", "e") if c.claim(g)]
  barrier("tried", int(sys.argv[3]))  # claims held until every racer has tried
print(json.dumps(won))
"""


def test_racing_workers_claim_each_group_exactly_once(tmp_path):
  n = 4
  (tmp_path / "sync").mkdir()
  procs = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path / "wd"),
                             str(tmp_path / "sync"), str(n)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True) for _ in range(n)]
  won = [json.loads(p.communicate(timeout=300)[0]) for p in procs]
  assert sorted(g for w in won for g in w) == ["a", "b", "c", "d", "e"], won


def test_a_failed_group_is_left_to_reruns_not_to_the_workers_running_then(tmp_path, idx_dir):
  path, module = sweep_module(tmp_path, SWEEP_FILE.replace("[0.1, 0.3]", "[0.1]"))
  base = module.get_config()
  base.data.dir = str(tmp_path / "no_data")  # every member fails when its data loads
  wd = str(tmp_path / "wd")
  sweep.make_sweep_dir(wd)
  fingerprint = sweep_runner.worker_fingerprint(sweep.plan(base, module.get_sweep())[1])
  with claims_lib.Claims(wd, fingerprint) as running:  # a worker started before the failure
    time.sleep(0.05)
    rows = sweep.run_sweep(base, module.get_sweep(), wd)
    assert [r["status"] for r in rows] == ["failed"] * 2
    (gid,) = [n[:-len(".failed")] for n in os.listdir(os.path.join(wd, "_claims"))
              if n.endswith(".failed")]
    failed = running.failed_since_start(gid)
    assert sorted(failed) == [r["name"] for r in rows] and "no_data" in rows[0]["error"]
  shutil.copytree(idx_dir, base.data.dir)  # fixed: a rerun tries again; success clears it
  rows = sweep.run_sweep(base, module.get_sweep(), wd)
  assert [r["status"] for r in rows] == ["done"] * 2
  assert not os.path.exists(os.path.join(wd, "_claims", f"{gid}.failed"))
