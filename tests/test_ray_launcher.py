"""--launcher=ray: a sweep's groups as tasks on a real local Ray cluster (head and worker
processes on 127.0.0.1), a worker killed mid-task retried from its checkpoints, results
bit-identical to one process's; an unreachable cluster is one line."""

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
  text = SWEEP_FILE.replace("c.train.num_steps = 40", "c.train.num_steps = 1200\n"
                            "  c.train.checkpoint_every_steps = 100").replace(
                                "[0.1, 0.3]", "[0.1]")
  path, module = sweep_module(tmp_path, text)
  base = module.get_config()
  base.data.dir = idx_dir
  one = str(tmp_path / "one")
  rows = sweep.run_sweep(base, module.get_sweep(), one, num_workers=2)  # two solo groups
  on_ray = str(tmp_path / "ray")
  p = worker(path, on_ray, idx_dir, "--num_workers=2", "--launcher=ray")
  claims = os.path.join(on_ray, "_claims")
  killed, deadline = None, time.time() + 240
  while killed is None and time.time() < deadline and p.poll() is None:
    for name in (os.listdir(claims) if os.path.isdir(claims) else []):
      member = [r["name"] for r in rows]
      steps = [int(n) for m in member if os.path.isdir(os.path.join(on_ray, m, "checkpoints"))
               for n in os.listdir(os.path.join(on_ray, m, "checkpoints")) if n.isdigit()]
      if name.endswith(".0") and steps and max(steps) >= 200:
        import json  # pylint: disable=g-import-not-at-top
        try:
          pid = json.load(open(os.path.join(claims, name)))["pid"]
        except (OSError, ValueError):
          continue
        os.kill(pid, signal.SIGKILL)  # the Ray worker process training that group
        killed = pid
        break
    time.sleep(0.05)
  out, err = p.communicate(timeout=300)
  assert killed is not None, "no Ray worker was seen training a group to kill"
  assert p.returncode == 0, err[-3000:]
  lines = [line for line in err.splitlines() if "Ray: group" in line]
  assert len(lines) == 2 and all("done in" in line for line in lines), lines  # retried
  assert '"done": 2' in out
  assert "Taking over group" in err  # the retried task, streamed back from its worker
  same_runs(one, on_ray, [r["name"] for r in rows])
