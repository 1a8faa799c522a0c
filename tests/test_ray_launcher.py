"""--launcher=ray: a sweep's groups as tasks on a real local Ray cluster (head and worker
processes on 127.0.0.1), a worker killed mid-task retried from its checkpoints, results
bit-identical to one process's; an unreachable cluster is one line."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bnlab import sweep
from bnlab.sweep import ray_launcher
from test_workers import SWEEP_FILE, same_runs, sweep_module, worker

pytest.importorskip("ray", reason="Ray is not installed (pip install 'bnlab[ray]')")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_an_unreachable_ray_address_is_one_line(tmp_path, idx_dir):
  with pytest.raises(ray_launcher.RayError, match="is not HOST:PORT"):
    ray_launcher.connect("head-node")
  path, _ = sweep_module(tmp_path)
  p = worker(path, str(tmp_path / "wd"), idx_dir, "--launcher=ray",
             "--ray_address=127.0.0.1:1")
  _, err = p.communicate(timeout=300)
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
  assert "no Ray cluster answers at --ray_address=127.0.0.1:1" in errors[0]
  assert "ray start --head" in errors[0]


def test_ray_tasks_match_one_process_and_survive_a_killed_worker(tmp_path, idx_dir):
  text = SWEEP_FILE.replace("c.train.num_steps = 40", "c.train.num_steps = 1000\n"
                            "  c.train.checkpoint_every_steps = 100").replace(
                                "[0.1, 0.3]", "[0.1]").replace("seeds(2)", "seeds(1)")
  path, module = sweep_module(tmp_path, text)
  base = module.get_config()
  base.data.dir = idx_dir
  one = str(tmp_path / "one")
  rows = sweep.run_sweep(base, module.get_sweep(), one)  # one group, one task
  on_ray = str(tmp_path / "ray")
  p = worker(path, on_ray, idx_dir, "--launcher=ray")
  claims = os.path.join(on_ray, "_claims")
  ckpts = os.path.join(on_ray, rows[0]["name"], "checkpoints")
  killed, deadline = None, time.time() + 240
  while killed is None and time.time() < deadline and p.poll() is None:
    steps = [int(n) for n in (os.listdir(ckpts) if os.path.isdir(ckpts) else []) if n.isdigit()]
    held = [n for n in (os.listdir(claims) if os.path.isdir(claims) else []) if n.endswith(".0")]
    if held and steps and max(steps) >= 200:
      try:
        killed = json.load(open(os.path.join(claims, held[0])))["pid"]
      except (OSError, ValueError):
        continue
      os.kill(killed, signal.SIGKILL)  # the Ray worker process training the group
    time.sleep(0.05)
  out, err = p.communicate(timeout=300)
  assert killed is not None, "no Ray worker was seen training a group to kill"
  assert p.returncode == 0, err[-3000:]
  lines = [line for line in err.splitlines() if "Ray: group" in line]
  assert len(lines) == 1 and "done in" in lines[0], lines  # the task, retried, done
  assert '"done": 1' in out
  assert "Taking over group" in err  # the retried task, streamed back from its worker
  same_runs(one, on_ray, [r["name"] for r in rows])


def test_a_ray_task_records_its_groups_failure_for_the_other_workers(tmp_path):
  # train_task is what each Ray worker runs; called here in-process (no cluster needed).
  from bnlab.sweep import claims as claims_lib
  from bnlab.sweep import runner as sweep_runner
  path, module = sweep_module(tmp_path, SWEEP_FILE.replace("[0.1, 0.3]", "[0.1]"))
  base = module.get_config()
  base.data.dir = str(tmp_path / "no_data")  # every member fails when its data loads
  wd = str(tmp_path / "wd")
  sweep.make_sweep_dir(wd)
  _, groups = sweep.plan(base, module.get_sweep())
  fingerprint = sweep_runner.worker_fingerprint(groups)
  with claims_lib.Claims(wd, fingerprint) as running:  # a worker started before the task
    time.sleep(0.05)
    result = ray_launcher.train_task(wd, groups[0], fingerprint)
    assert sorted(result["errors"]) == [m.name for m in groups[0]]
    failed = running.failed_since_start(sweep_runner.group_id(groups[0]))
    assert failed == result["errors"] and "no_data" in next(iter(failed.values()))
