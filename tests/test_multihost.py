"""Two processes (jax.distributed over localhost, 2 CPU devices each) train like one.

Each test launches `python -m bnlab.main` twice, as process 0 and process 1 of
one run (`--config.distributed.*`), with XLA_FLAGS giving each process two host
CPU devices, so the data-parallel mesh spans 4 devices in 2 processes and the
BN statistics of every step are reduced across processes (JAX's CPU
collectives: gloo over TCP). Children are killed if anything goes wrong.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import tiny_mnist
from run_files import final_state, read_jsonl
from bnlab import config as config_lib
from bnlab.engine import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_TIMEOUT_S = 240  # per launch; a healthy one takes ~25 s on a 2-core CPU

# The tiny run: seed1_mlp with BN before the activations, global batch 32 over
# 256 examples: 8 steps, evaluated and checkpointed at steps 0, 4 and 8, on
# every device there is (one in this process, 2 x 2 in the launched pair).
OVERRIDES = {"data.source": "idx", "model.name": "seed1_mlp", "model.bn_position": "before",
             "optimizer.learning_rate": 0.05, "train.batch_size": 32,
             "train.num_epochs": 1, "train.eval_every_steps": 4, "train.num_devices": 0}


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("idx"))
  tiny_mnist.write_mnist_dir(d, num_train=256, num_test=64)
  return d


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(workdir, idx_dir, tmp_path, extra=({}, {}), kill_1_when_training=False):
  """Runs process 0 and 1 of one run; returns [(returncode, stdout, stderr)] by process.

  With `kill_1_when_training`, process 1 is killed (SIGKILL) once the run's
  first metrics record is written. Tries a second free port if the first was
  taken before the coordinator bound it.
  """
  for attempt in range(2):
    results = _launch_once(workdir, idx_dir, tmp_path / f"try{attempt}", extra,
                           kill_1_when_training)
    if not any(n in err for _, _, err in results for n in PORT_TAKEN):
      return results
  return results


# The coordinator's port was taken between free_port() and process 0 binding it
# (bnlab's check, or jax's own message).
PORT_TAKEN = ("is in use on this host", "Failed to add port to server")
GRACE_S = 30  # after one process failed, how long the other may take to stop by itself


def _launch_once(workdir, idx_dir, logdir, extra, kill_1_when_training):
  logdir.mkdir()
  port = free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  procs, logs = [], []
  try:
    for pid in (0, 1):
      flags = {**OVERRIDES, "data.dir": idx_dir,
               "distributed.coordinator_address": f"localhost:{port}",
               "distributed.num_processes": 2, "distributed.process_id": pid,
               "distributed.initialization_timeout": 60, **extra[pid]}
      out, err = (open(logdir / f"p{pid}.{name}", "w+") for name in ("out", "err"))
      logs.append((out, err))
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "bnlab.main", "--config=configs/seed1_mlp.py",
           f"--workdir={workdir}", *(f"--config.{k}={v}" for k, v in flags.items())],
          cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True))
    deadline, grace = time.monotonic() + LAUNCH_TIMEOUT_S, None
    while any(p.poll() is None for p in procs):
      now = time.monotonic()
      metrics = os.path.join(workdir, "metrics.jsonl")
      if (kill_1_when_training and procs[1].poll() is None and os.path.exists(metrics)
          and os.path.getsize(metrics)):
        os.killpg(procs[1].pid, signal.SIGKILL)
        kill_1_when_training = False
      if any(p.poll() not in (None, 0) for p in procs):  # one failed: the other must follow
        if any(n in (logdir / f"p{i}.err").read_text() for i in (0, 1) for n in PORT_TAKEN):
          break  # the others would wait for the coordinator: retry on another port
        grace = grace or now + GRACE_S
        if now > grace:
          break  # killed below; the caller's assertions show both outputs
      elif now > deadline:
        pytest.fail(f"the processes did not finish in {LAUNCH_TIMEOUT_S} s; their last "
                    f"output:\n{_tails(logs)}")
      time.sleep(0.2)
  finally:
    for p in procs:  # each child in its own session: kill it and anything it started
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  results = []
  for p, (out, err) in zip(procs, logs):
    out.seek(0)
    err.seek(0)
    results.append((p.returncode, out.read(), err.read()))
    out.close()
    err.close()
  return results


def _tails(logs) -> str:
  text = []
  for i, (_, err) in enumerate(logs):
    err.flush()
    err.seek(0)
    text.append(f"--- process {i} stderr ---\n" + err.read()[-3000:])
  return "\n".join(text)


def skip_if_no_cpu_collectives(results) -> None:
  """Skips (quoting JAX) if this jaxlib cannot run collectives across CPU processes."""
  pattern = re.compile(r"(?i)(gloo|mpi|cpu collective|collectives).*(unimplemented|not "
                       r"(supported|implemented|available|built))|(unimplemented|not "
                       r"(supported|implemented|available)).*(gloo|collectives)")
  for rc, _, err in results:
    if rc != 0:
      for line in err.splitlines():
        if pattern.search(line):
          pytest.skip("this jaxlib's CPU backend cannot run collectives across processes "
                      f"(jax_cpu_collectives_implementation); JAX said: {line.strip()[:300]}")


def trained_variables(workdir):
  """Params and batch_stats of the run's newest checkpoint, as numpy."""
  state = final_state(workdir)[1]
  return {"params": state["params"], "batch_stats": state["batch_stats"]}


@pytest.fixture(scope="module")
def reference(idx_dir, tmp_path_factory):
  """The same run in this process (one device, unless XLA_FLAGS says more): (dir, summary)."""
  cfg = config_lib.base_config()
  for key, value in {**OVERRIDES, "data.dir": idx_dir}.items():
    section, name = key.split(".")
    cfg[section][name] = value
  wd = str(tmp_path_factory.mktemp("one") / "run")
  if jax.default_backend() == "cpu":
    summary = train.train_and_evaluate(cfg, wd)
  else:  # the launched processes run on the CPU: so does their reference
    flags = {**OVERRIDES, "data.dir": idx_dir}
    subprocess.run([sys.executable, "-m", "bnlab.main", "--config=configs/seed1_mlp.py",
                    f"--workdir={wd}", *(f"--config.{k}={v}" for k, v in flags.items())],
                   cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True,
                   capture_output=True, timeout=LAUNCH_TIMEOUT_S)
    with open(os.path.join(wd, "summary.json")) as f:
      summary = json.load(f)
  assert summary["num_processes"] == 1
  return wd, summary


def assert_same_state(got_dir, ref_dir):
  ref, got = trained_variables(ref_dir), trained_variables(got_dir)
  names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(ref)]
  assert any("batch_stats" in n and "var" in n for n in names), names
  for name, a, b in zip(names, jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=2e-5, atol=1e-6, err_msg=name)


def test_two_processes_train_like_one_and_only_process_0_writes(idx_dir, tmp_path, reference):
  wd = tmp_path / "two"
  results = launch(wd, idx_dir, tmp_path)
  skip_if_no_cpu_collectives(results)
  for i, (rc, _, err) in enumerate(results):
    assert rc == 0, f"process {i} failed:\n{err[-3000:]}"
  summaries = [json.loads(out.strip().splitlines()[-1]) for _, out, _ in results]
  assert summaries[0]["final_step"] == summaries[1]["final_step"] == 8
  assert summaries[0]["test_accuracy"] == summaries[1]["test_accuracy"]
  saved = json.loads((wd / "summary.json").read_text())
  assert saved["num_processes"] == 2 and saved["num_devices"] == 4, saved

  # One process wrote the records: one metrics file, each record once, one
  # TensorBoard events file, no lock left behind.
  records = read_jsonl(wd / "metrics.jsonl")
  assert [r["step"] for r in records] == [0, 4, 8]
  assert len(os.listdir(wd / "tensorboard")) == 1
  assert not (wd / ".lock").exists()
  assert sorted(p.name for p in wd.iterdir()) == [
      "checkpoints", "config.json", "data.json", "metrics.jsonl", "summary.json", "tensorboard"]

  # The same run in one process on one device: same global batches, same numbers.
  ref_dir, one = reference
  assert_same_state(str(wd), ref_dir)
  assert abs(one["test_accuracy"] - saved["test_accuracy"]) <= 1 / 64
  assert abs(one["train_loss"] - saved["train_loss"]) <= 1e-4


def test_one_process_run_resumes_in_two_processes(idx_dir, tmp_path, reference):
  """A checkpoint written by one process (1 device) resumes on 2 processes x 2 devices."""
  ref_dir, one = reference
  wd = tmp_path / "resumed"
  shutil.copytree(ref_dir, wd)
  os.remove(wd / "summary.json")
  shutil.rmtree(wd / "checkpoints" / "8")  # as if stopped after step 4's checkpoint
  results = launch(wd, idx_dir, tmp_path)
  skip_if_no_cpu_collectives(results)
  for i, (rc, _, err) in enumerate(results):
    assert rc == 0, f"process {i} failed:\n{err[-3000:]}"
    assert "Resumed from step 4" in err
  records = read_jsonl(wd / "metrics.jsonl")
  assert [r["step"] for r in records] == [0, 4, 8]
  assert json.loads((wd / "summary.json").read_text())["num_processes"] == 2
  assert_same_state(str(wd), ref_dir)


def test_processes_with_different_configs_both_stop_with_one_line(idx_dir, tmp_path):
  """A process that disagrees stops every process (no one waits in a collective)."""
  wd = tmp_path / "mismatch"
  start = time.monotonic()
  results = launch(wd, idx_dir, tmp_path,
                   extra=({}, {"optimizer.learning_rate": 0.5}))
  skip_if_no_cpu_collectives(results)
  for i, (rc, _, err) in enumerate(results):
    assert rc == 2, f"process {i} exited {rc}:\n{err[-3000:]}"
    error = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "Traceback" not in err, err[-3000:]
    assert "process(es) [1] of 2 have another config than process 0" in error[0], error
  assert time.monotonic() - start < 60
  assert not wd.exists()  # checked before anything is written


def test_a_killed_process_stops_the_other_within_the_heartbeat_timeout(idx_dir, tmp_path):
  """Process 1 dies mid-run: process 0 is stopped by JAX's heartbeat check, not left waiting."""
  long_run = {"train.num_epochs": 5000, "train.eval_every_steps": 10_000,
              "distributed.heartbeat_timeout": 5}
  results = launch(tmp_path / "killed", idx_dir, tmp_path, extra=(long_run, long_run),
                   kill_1_when_training=True)
  skip_if_no_cpu_collectives(results)
  assert results[1][0] == -signal.SIGKILL
  # Process 0 ended by itself within launch's 30 s grace (with the default
  # heartbeat_timeout of 100 s it would still be waiting and get SIGKILL).
  rc, _, err = results[0]
  assert rc not in (0, -signal.SIGKILL), f"process 0 exited {rc}:\n{err[-3000:]}"
  assert "heartbeat" in err, err[-3000:]


# -- a missing coordinator ends in one line -----------------------------------------

def _args(idx, wd):
  """A one-process run of the tiny MLP; it stops at the coordinator, before training."""
  return ["--config=configs/seed1_mlp.py", f"--workdir={wd}", "--config.data.source=idx",
          f"--config.data.dir={idx}"]


@pytest.mark.parametrize("address", ["localhost:{port}", "127.0.0.1:{port}"])
def test_missing_coordinator_is_one_line(tmp_path, address):
  idx = str(tmp_path / "idx")
  tiny_mnist.write_mnist_dir(idx, num_train=320, num_test=100)
  address = address.format(port=free_port())
  start = time.monotonic()
  p = subprocess.run(
      [sys.executable, "-m", "bnlab.main", *_args(idx, tmp_path / "wd"),
       "--config.train.num_devices=0", f"--config.distributed.coordinator_address={address}",
       "--config.distributed.num_processes=2", "--config.distributed.process_id=1",
       "--config.distributed.initialization_timeout=3"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2, p.stderr[-3000:]
  lines = [x for x in p.stderr.splitlines() if not x.startswith("I")]
  assert len(lines) == 1, p.stderr[-3000:]
  assert lines[0].startswith(f"error: the coordinator at config.distributed.coordinator_address="
                             f"'{address}' did not answer within 3 s"), lines[0]
  assert "start process 0" in lines[0], lines[0]
  assert time.monotonic() - start < 120


def test_unresolvable_coordinator_host_is_one_line(tmp_path):
  idx = str(tmp_path / "idx")
  tiny_mnist.write_mnist_dir(idx, num_train=320, num_test=100)
  p = subprocess.run(
      [sys.executable, "-m", "bnlab.main", *_args(idx, tmp_path / "wd"),
       "--config.train.num_devices=0",
       "--config.distributed.coordinator_address=no-such-host.invalid:12345",
       "--config.distributed.num_processes=2", "--config.distributed.process_id=1",
       "--config.distributed.initialization_timeout=3"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert p.returncode == 2, p.stderr[-3000:]
  lines = [x for x in p.stderr.splitlines() if not x.startswith("I")]
  assert len(lines) == 1 and "cannot be resolved" in lines[0], p.stderr[-3000:]
