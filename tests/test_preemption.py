"""Preemption: SIGTERM and SIGUSR1 stop a run, a group, a sweep or a study at a step boundary
with a checkpoint there, one line naming the command that resumes, and exit status 143 or
138; the resume ends bit-identical. The caller's handlers come back, and TensorBoard keeps
each step once across a resume."""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from bnlab import sweep
from bnlab.engine import loop as loop_lib
from bnlab.engine import train
from bnlab.rundir import checkpoints as checkpoints_lib
from bnlab.rundir import signals
from run_files import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from experiments import kill_soak  # noqa: E402  pylint: disable=g-import-not-at-top

# Long enough (1,500 one-step calls, a few seconds) for a signal to land mid-training;
# a checkpoint interval past the end, so that a checkpoint before the end is the
# preemption's.
LONG = {"train.num_epochs": 150, "train.log_every_steps": 1, "train.eval_every_steps": 50,
        "train.checkpoint_every_steps": 100_000, "optimizer.learning_rate": 0.05}
TOTAL = 1500


def _last_step(path) -> int:
  """The step of the last whole record of a metrics.jsonl (-1: none yet)."""
  try:
    with open(path, "rb") as f:
      lines = f.read().split(b"\n")[:-1]  # the part after the last newline may be torn
  except OSError:
    return -1
  return json.loads(lines[-1])["step"] if lines else -1


def _default_signals():
  """In the child: SIGINT and SIGHUP as a terminal's process has them. A suite started in the
  background (`cmd &`, nohup) passes them on ignored, and bnlab leaves an ignored signal so."""
  for signum in (signal.SIGINT, signal.SIGHUP):
    signal.signal(signum, signal.SIG_DFL)


def signal_mid_training(args, metrics_path, signum, after_step=5, timeout=240):
  """Runs `args`, sends `signum` once `metrics_path` records step `after_step`; returns
  (exit status, stderr, the step recorded when the signal was sent). `metrics_path` may be
  a function giving the path once it is known (None before)."""
  where = metrics_path if callable(metrics_path) else lambda: metrics_path

  def last_step():
    path = where()
    return -1 if path is None else _last_step(path)
  with tempfile.TemporaryFile("w+") as err:  # a pipe could fill up and stall the run
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                         preexec_fn=_default_signals)
    deadline = time.monotonic() + timeout
    try:
      while p.poll() is None and last_step() < after_step:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.005)
      seen = last_step()
      assert p.poll() is None, "the run ended before the signal"
      p.send_signal(signum)
      p.wait(timeout=120)
    finally:
      if p.poll() is None:
        p.kill()
        p.wait()
    err.seek(0)
    return p.returncode, err.read(), seen


def checkpoint_steps(ckpt_dir):
  return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def preempted_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("preempted: ")]


@pytest.fixture(scope="module")
def reference(idx_dir, tmp_path_factory):
  """The LONG run, uninterrupted and in-process."""
  wd = str(tmp_path_factory.mktemp("ref") / "run")
  train.train_and_evaluate(kill_soak.config(idx_dir, LONG), wd)
  return wd


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGUSR1, 138),
                                           (signal.SIGHUP, 129)],
                         ids=["SIGTERM", "SIGUSR1", "SIGHUP"])
def test_signal_mid_training_checkpoints_there_and_resumes_bit_identical(
    idx_dir, reference, tmp_path, signum, status):
  wd = str(tmp_path / "run")
  args = kill_soak.cli_args(wd, idx_dir, LONG)
  rc, err, seen = signal_mid_training(args, os.path.join(wd, "metrics.jsonl"), signum)
  assert rc == status, err[-3000:]
  # One checkpoint, at or after the step recorded when the signal came, before the end:
  # the periodic ones come every 100,000 steps, so only the signal explains it.
  (step,) = checkpoint_steps(os.path.join(wd, "checkpoints"))
  assert seen <= step < TOTAL
  assert checkpoints_lib._verify_checkpoint(  # pylint: disable=protected-access
      os.path.join(wd, "checkpoints", str(step)))
  assert read_jsonl(os.path.join(wd, "metrics.jsonl"))[-1]["step"] == step  # nothing lost
  name = signal.Signals(signum).name
  assert preempted_lines(err) == [
      f"preempted: {name} at step {step}, checkpointed there (nothing lost); "
      f"resume with: {shlex.join(args)}"]
  assert err.strip().splitlines()[-1] == preempted_lines(err)[0]
  assert "Traceback" not in err
  assert not os.path.exists(os.path.join(wd, ".lock"))
  q = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert q.returncode == 0, q.stderr[-3000:]
  assert f"Resumed from step {step} " in q.stderr
  assert kill_soak.differences(kill_soak.snapshot(reference), kill_soak.snapshot(wd)) == []
  assert kill_soak.leftovers(wd) == []


SWEEP_FILE = '''
from bnlab import config, sweep

def get_config():
  c = config.base_config()
  c.data.source = "idx"
  c.model.name = "seed1_mlp"
  c.model.norm = "batch"
  c.model.bn_position = "before"
  c.train.batch_size = 32
  c.train.num_epochs = {epochs}
  c.train.log_every_steps = 1
  c.train.eval_every_steps = 50
  c.train.checkpoint_every_steps = 100_000
  return c

def get_sweep():
  return sweep.axis("optimizer.learning_rate", {rates})
'''


def _sweep_file(tmp_path, epochs, rates):
  path = tmp_path / "sweep_file.py"
  path.write_text(SWEEP_FILE.format(epochs=epochs, rates=rates))
  return str(path)


def _sweep_args(path, wd, idx_dir, *extra):
  return [sys.executable, "-m", "bnlab.sweep", f"--config={path}", f"--workdir={wd}",
          f"--config.data.dir={idx_dir}", *extra]


def test_sigterm_stops_a_grouped_run_at_a_checkpoint_and_it_resumes_bit_identical(
    idx_dir, tmp_path):
  path = _sweep_file(tmp_path, 60, [0.1, 0.05])
  wd = tmp_path / "sw"
  args = _sweep_args(path, wd, idx_dir)  # grouped: both members vmapped in one program
  rc, err, seen = signal_mid_training(args, wd / "learning_rate=0.1" / "metrics.jsonl",
                                      signal.SIGTERM)
  assert rc == 143, err[-3000:]
  (group,) = os.listdir(wd / "_groups")
  (step,) = checkpoint_steps(wd / "_groups" / group / "checkpoints")
  assert seen <= step < 600
  for member in ("learning_rate=0.1", "learning_rate=0.05"):
    assert read_jsonl(wd / member / "metrics.jsonl")[-1]["step"] == step
    assert not (wd / member / "summary.json").exists()
  assert preempted_lines(err) == [
      f"preempted: SIGTERM at step {step}, checkpointed there (nothing lost); "
      f"resume with: {shlex.join(args)}"]
  q = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert q.returncode == 0, q.stderr[-3000:]
  assert json.loads(q.stdout.strip().splitlines()[-1])["done"] == 2
  assert f"Resumed from step {step} " in q.stderr
  # The same sweep uninterrupted, in-process.
  module = sweep.load_config_file(path)
  base = module.get_config()
  base.data.dir = idx_dir
  straight = str(tmp_path / "straight")
  sweep.run_sweep(base, module.get_sweep(), straight)
  for member in ("learning_rate=0.1", "learning_rate=0.05"):
    assert kill_soak.differences(kill_soak.snapshot(os.path.join(straight, member)),
                                 kill_soak.snapshot(str(wd / member))) == [], member
    assert kill_soak.leftovers(str(wd / member)) == []


def test_sigterm_stops_a_sweep_after_checkpointing_its_member_and_a_rerun_trains_the_rest(
    idx_dir, tmp_path):
  path = _sweep_file(tmp_path, 60, [0.1, 0.05, 0.02])
  wd = tmp_path / "sw"
  args = _sweep_args(path, wd, idx_dir, "--nogrouped")
  first, second, third = (wd / f"learning_rate={r}" for r in (0.1, 0.05, 0.02))
  rc, err, seen = signal_mid_training(args, second / "metrics.jsonl", signal.SIGTERM)
  assert rc == 143, err[-3000:]
  (step,) = checkpoint_steps(second / "checkpoints")
  assert seen <= step < 600
  assert (first / "summary.json").exists() and not (second / "summary.json").exists()
  assert not third.exists()  # the sweep stopped: the next member never started
  assert len(preempted_lines(err)) == 1
  done_stamp = os.path.getmtime(first / "summary.json")
  q = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert q.returncode == 0, q.stderr[-3000:]
  assert json.loads(q.stdout.strip().splitlines()[-1])["done"] == 3
  assert os.path.getmtime(first / "summary.json") == done_stamp  # not rerun
  assert f"Resumed from step {step} in {second}" in q.stderr
  # The preempted member ends as its uninterrupted solo run.
  base = sweep.load_config_file(path).get_config()
  base.data.dir = idx_dir
  solo = str(tmp_path / "solo")
  train.train_and_evaluate(sweep.apply_overrides(base, {"optimizer.learning_rate": 0.05}),
                           solo)
  assert kill_soak.differences(kill_soak.snapshot(solo), kill_soak.snapshot(str(second))) == []
  assert kill_soak.leftovers(str(second)) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_a_study_and_records_its_stage_interrupted(idx_dir, tmp_path, signum):
  wd = tmp_path / "study"
  args = [sys.executable, "-m", "bnlab.study", "--stage=run", f"--workdir={wd}",
          "--config=configs/studies/seed_comparison.py:runlocal",
          "--config.data.source=idx", f"--config.data.dir={idx_dir}",
          "--config.run.overrides.train.num_steps=5000",
          "--config.run.overrides.train.log_every_steps=1"]

  def member_metrics():  # the member in training, once it has records
    runs = wd / "runs"
    found = [runs / n / "metrics.jsonl" for n in (os.listdir(runs) if runs.is_dir()
                                                   else []) if not n.startswith((".", "_"))]
    return next((m for m in found if m.exists()), None)
  rc, stderr, _ = signal_mid_training(args, member_metrics, signum, after_step=2)
  metrics = member_metrics()
  if signum == signal.SIGTERM:
    assert rc == 143, stderr[-3000:]
    (line,) = preempted_lines(stderr)
    assert line.startswith("preempted: SIGTERM at step ") and line.endswith(
        f"; resume with: {shlex.join(args)}")
  else:  # Ctrl-C: the study's own line, status 130
    assert rc == 130, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith(
        "interrupted: rerun the same command to resume"), stderr[-3000:]
  assert "Traceback" not in stderr
  stages = json.load(open(wd / "stages.json"))
  assert stages[-1]["interrupted"] is True and stages[-1]["trained"] == 0
  steps = checkpoint_steps(metrics.parent / "checkpoints")
  assert signum == signal.SIGINT or (len(steps) == 1 and 2 <= steps[0] < 5000)


def test_sigterm_to_one_process_stops_every_process_of_a_run_at_one_step(tmp_path):
  # jax.distributed's own preemption notifier takes SIGTERM and lets the process run on
  # (until SIGKILL); bnlab's handlers replace it, and the processes agree where to stop.
  import test_multihost as mh  # pylint: disable=g-import-not-at-top
  import tiny_mnist  # pylint: disable=g-import-not-at-top
  from run_files import final_state  # pylint: disable=g-import-not-at-top
  idx = str(tmp_path / "idx")
  tiny_mnist.write_mnist_dir(idx, num_train=256, num_test=64)
  overrides = {**mh.OVERRIDES, "data.dir": idx, "train.num_epochs": 15,
               "train.log_every_steps": 1, "train.eval_every_steps": 50,
               "train.checkpoint_every_steps": 100_000}

  def launch(wd, signal_to=None):
    port = mh.free_port()
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu")
    procs, errs = [], []
    try:
      for pid in (0, 1):
        flags = {**overrides, "distributed.coordinator_address": f"localhost:{port}",
                 "distributed.num_processes": 2, "distributed.process_id": pid,
                 "distributed.initialization_timeout": 60}
        errs.append(tempfile.TemporaryFile("w+"))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bnlab.main", "--config=configs/seed1_mlp.py",
             f"--workdir={wd}", *(f"--config.{k}={v}" for k, v in flags.items())],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=errs[-1]))
      deadline = time.monotonic() + mh.LAUNCH_TIMEOUT_S
      while signal_to is not None and _last_step(os.path.join(wd, "metrics.jsonl")) < 5:
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
        time.sleep(0.01)
      if signal_to is not None:
        procs[signal_to].send_signal(signal.SIGTERM)
      for p in procs:
        p.wait(timeout=mh.LAUNCH_TIMEOUT_S)
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    out = []
    for p, err in zip(procs, errs):
      err.seek(0)
      out.append((p.returncode, err.read()))
      err.close()
    return out

  wd = str(tmp_path / "run")
  results = launch(wd, signal_to=1)
  mh.skip_if_no_cpu_collectives([(rc, "", err) for rc, err in results])
  assert [rc for rc, _ in results] == [143, 143], results[1][1][-3000:]
  (step,) = checkpoint_steps(os.path.join(wd, "checkpoints"))
  assert 5 <= step < 120
  for _, err in results:
    (line,) = preempted_lines(err)
    assert line.startswith(f"preempted: SIGTERM at step {step}, checkpointed there")
  assert [rc for rc, _ in launch(wd)] == [0, 0]
  ref = str(tmp_path / "ref")
  assert [rc for rc, _ in launch(ref)] == [0, 0]
  (ref_step, a), (got_step, b) = final_state(ref), final_state(wd)
  assert ref_step == got_step == 120
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.array_equal(x, y)
  volatile = ("wall_time", "examples_per_sec")
  strip = lambda path: [{k: v for k, v in r.items() if k not in volatile}
                        for r in read_jsonl(path)]
  assert strip(os.path.join(ref, "metrics.jsonl")) == strip(os.path.join(wd, "metrics.jsonl"))


# -- in-process: the caller's handlers, a second signal during the checkpoint ----------

SHORT = {"train.num_epochs": 4, "train.log_every_steps": 1, "train.eval_every_steps": 10,
         "train.checkpoint_every_steps": 100_000, "optimizer.learning_rate": 0.05}


def test_handlers_are_the_callers_again_and_a_second_signal_cannot_cut_the_checkpoint(
    idx_dir, tmp_path, monkeypatch):
  ref = str(tmp_path / "ref")
  train.train_and_evaluate(kill_soak.config(idx_dir, SHORT), ref)
  received = []

  def mine(signum, frame):  # a program's own handler, which bnlab must leave as it was
    received.append(signum)
  previous = {s: signal.signal(s, mine) for s in (signal.SIGTERM, signal.SIGUSR1)}
  try:
    real_log, real_save = loop_lib.Loop._log, checkpoints_lib.ocp.CheckpointManager.save

    def log_then_signal(self, step, *args, **kwargs):  # SIGTERM as step 7 is logged
      real_log(self, step, *args, **kwargs)
      if step == 7:
        os.kill(os.getpid(), signal.SIGTERM)

    def save_signalled(self, *args, **kwargs):  # a second signal mid-write, and a third
      os.kill(os.getpid(), signal.SIGTERM)
      out = real_save(self, *args, **kwargs)
      os.kill(os.getpid(), signal.SIGUSR1)
      return out
    monkeypatch.setattr(loop_lib.Loop, "_log", log_then_signal)
    monkeypatch.setattr(checkpoints_lib.ocp.CheckpointManager, "save", save_signalled)
    wd = str(tmp_path / "run")
    with pytest.raises(signals.Preempted, match="SIGTERM at step 7, checkpointed there") as e:
      train.train_and_evaluate(kill_soak.config(idx_dir, SHORT), wd)
    assert e.value.step == 7 and e.value.exit_status == 143
    assert checkpoint_steps(os.path.join(wd, "checkpoints")) == [7]
    assert checkpoints_lib._verify_checkpoint(  # pylint: disable=protected-access
        os.path.join(wd, "checkpoints", "7"))
    assert received == []  # bnlab's while it ran ...
    assert all(signal.getsignal(s) is mine for s in previous)  # ... the program's after
    monkeypatch.undo()
    summary = train.train_and_evaluate(kill_soak.config(idx_dir, SHORT), wd)  # resumes
    assert summary["final_step"] == 40
    assert all(signal.getsignal(s) is mine for s in previous)
    assert kill_soak.differences(kill_soak.snapshot(ref), kill_soak.snapshot(wd)) == []
    os.kill(os.getpid(), signal.SIGUSR1)  # the program's handler works as before
    assert received == [signal.SIGUSR1]
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def test_a_signal_after_the_last_step_stops_a_sweep_before_its_next_run(idx_dir, tmp_path,
                                                                        monkeypatch):
  # A signal that comes while a run finishes (final evaluation, summary) lets it finish,
  # then stops the caller before more work.
  previous = {s: signal.signal(s, lambda *_: None) for s in signals.STOP_SIGNALS}
  try:
    real = train._write_summary  # pylint: disable=protected-access

    def summary_then_signal(*args, **kwargs):
      real(*args, **kwargs)
      os.kill(os.getpid(), signal.SIGUSR1)
    monkeypatch.setattr(train, "_write_summary", summary_then_signal)
    path = _sweep_file(tmp_path, 1, [0.1, 0.05])
    base = sweep.load_config_file(path).get_config()
    base.data.dir = idx_dir
    wd = tmp_path / "sw"
    with pytest.raises(signals.Preempted) as e:
      sweep.run_sweep(base, sweep.load_config_file(path).get_sweep(), str(wd), grouped=False)
    assert e.value.step is None and e.value.exit_status == 138
    assert (wd / "learning_rate=0.1" / "summary.json").exists()
    assert not (wd / "learning_rate=0.05").exists()
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


# -- TensorBoard ----------------------------------------------------------------------

def tensorboard_scalars(directory):
  """{tag: [(step, value), ...]} as TensorBoard loads the event files of `directory`.

  TensorBoard reads the files in name order; an event with a SessionLog START
  (what a writer opened with purge_step writes first) discards the events of
  that step and later read before it (EventAccumulator's purge of orphaned data).
  """
  event_pb2 = pytest.importorskip(
      "tensorboardX.proto.event_pb2", reason="reading event files needs tensorboardX")
  from test_main import read_events  # pylint: disable=g-import-not-at-top
  scalars = {}
  for event in read_events(directory):  # in file-name order, as TensorBoard reads them
    if event.HasField("session_log") and event.session_log.status == \
        event_pb2.SessionLog.START:
      scalars = {tag: [(s, v) for s, v in points if s < event.step]
                 for tag, points in scalars.items()}
    for v in event.summary.value:
      if v.HasField("simple_value"):
        scalars.setdefault(v.tag, []).append((event.step, v.simple_value))
  return scalars


def test_tensorboard_has_each_step_once_after_a_resume(idx_dir, tmp_path):
  overrides = {"train.num_epochs": 3, "train.log_every_steps": 1, "train.eval_every_steps": 5,
               "train.checkpoint_every_steps": 10, "train.keep_checkpoints": 5,
               "optimizer.learning_rate": 0.05}
  wd = str(tmp_path / "run")
  cfg = kill_soak.config(idx_dir, overrides)
  train.train_and_evaluate(cfg, wd)
  # As a kill after step 30's records but before its checkpoint leaves it: records and
  # events to step 30, checkpoints to step 10.
  os.remove(os.path.join(wd, "summary.json"))
  for step in (20, 30):
    shutil.rmtree(os.path.join(wd, "checkpoints", str(step)))
  train.train_and_evaluate(cfg, wd)
  assert len(os.listdir(os.path.join(wd, "tensorboard"))) == 2  # the first file kept
  records = read_jsonl(os.path.join(wd, "metrics.jsonl"))
  assert [r["step"] for r in records] == list(range(31))  # step 0: eval_at_start
  scalars = tensorboard_scalars(os.path.join(wd, "tensorboard"))
  for tag, key in (("train/loss", "train_loss"), ("test/accuracy", "test_accuracy")):
    want = [(r["step"], pytest.approx(r[key])) for r in records if key in r]
    assert scalars[tag] == want, tag  # each step once, the resumed run's value
