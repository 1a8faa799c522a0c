"""The command line: a run through `python -m bnlab.main`, and bad input."""

import json
import os
import subprocess
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, cwd=ROOT):
  return subprocess.run([sys.executable, "-m", "bnlab.main", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def test_cli_run_writes_outputs_and_prints_summary(idx_dir, tmp_path):
  wd = tmp_path / "run"
  p = run_main("--config=configs/seed1_cnn.py", f"--workdir={wd}", "--config.data.source=idx",
               f"--config.data.dir={idx_dir}", "--config.train.num_epochs=1",
               "--config.optimizer.learning_rate=0.05")
  assert p.returncode == 0, p.stderr
  summary = json.loads(p.stdout.strip().splitlines()[-1])
  assert summary["final_step"] == 10 and summary["diverged"] is False
  assert "ETA" in p.stderr  # progress line
  cfg = json.load(open(wd / "config.json"))
  assert cfg["optimizer"]["learning_rate"] == 0.05 and cfg["model"]["name"] == "seed1_cnn"
  assert (wd / "summary.json").exists() and (wd / "metrics.jsonl").exists()
  assert not (wd / ".lock").exists()


BAD_INPUTS = [
    (["--config.optimizer.learning_rate=-0.1"], "config.optimizer.learning_rate"),
    (["--config.train.batch_size=0"], "config.train.batch_size"),
    (["--config.model.name=resnet"], "config.model.name"),
    (["--config.train.batch_size=100000"], "config.train.batch_size"),
    (["--config.optimizer.nonsense=1"], "--config.optimizer.nonsense"),
    (["--config.optimizer.learning_rate=fast"], "--config.optimizer.learning_rate"),
    (["--config.data.source=mnist"], "config.data.source"),
    (["--config.optimizer.name=rmsprp"], "config.optimizer.name"),
    (["--config.optimizer.name=adamw", "--config.optimizer.kwargs.bogus=1"],
     "config.optimizer.kwargs has ['bogus']"),
    (["--config.model.bn.momentum=1.5"], "config.model.bn.momentum"),
    (["--config.train.loop=while"], "config.train.loop"),
    (["--config.data.num_train=5000"], "config.data.num_train"),
    (["--config.optimizer.schedule=piecewise", "--config.optimizer.decay_boundaries=(5,3)"],
     "config.optimizer.decay_boundaries=(5, 3) is invalid"),
]


@pytest.mark.parametrize("extra,needle", BAD_INPUTS, ids=[b[1] + ":" + b[0][0] for b in BAD_INPUTS])
def test_bad_input_fails_with_one_line_naming_the_key(idx_dir, tmp_path, extra, needle):
  wd = tmp_path / "bad"
  p = run_main("--config=configs/seed1_mlp.py", f"--workdir={wd}", "--config.data.source=idx",
               f"--config.data.dir={idx_dir}", *extra)
  assert p.returncode != 0
  assert needle in p.stderr
  assert "Traceback" not in p.stderr
  assert not (wd / "checkpoints").exists() or not os.listdir(wd / "checkpoints")


def test_missing_config_file(tmp_path):
  p = run_main("--config=configs/no_such_file.py", f"--workdir={tmp_path}")
  assert p.returncode != 0 and "no_such_file.py" in p.stderr and "Traceback" not in p.stderr


def test_changed_config_on_existing_workdir_is_refused(idx_dir, tmp_path):
  wd = tmp_path / "run"
  common = ["--config=configs/seed1_mlp.py", f"--workdir={wd}", "--config.data.source=idx",
            f"--config.data.dir={idx_dir}", "--config.train.num_epochs=1"]
  assert run_main(*common).returncode == 0
  before = (wd / "metrics.jsonl").read_text()
  p = run_main(*common, "--config.optimizer.learning_rate=0.5")
  assert p.returncode != 0 and "optimizer.learning_rate" in p.stderr
  assert (wd / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("flag,suggested", [
    ("--config.model.nrom=batch", "--config.model.norm"),
    ("--config.modle.norm=batch", "--config.model.norm"),
    ("--config.model.bn.momentm=0.5", "--config.model.bn.momentum"),
])
def test_misspelled_key_is_one_clean_line_with_the_closest_key(tmp_path, flag, suggested):
  p = run_main("--config=configs/seed1_mlp.py", f"--workdir={tmp_path / 'run'}", flag)
  assert p.returncode == 2
  assert p.stderr.strip().splitlines() == [
      f"error: {flag.split('=')[0]} names no key of the config; check its spelling: did you "
      f"mean {suggested}? "
      "(keys and defaults: bnlab/config.py)"]


def read_events(directory):
  """Every event of the TensorBoard event files in `directory` (TFRecord framing)."""
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  events = []
  for name in sorted(os.listdir(directory)):
    with open(os.path.join(directory, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[pos + 12:pos + 12 + length])
      events.append(event)
      pos += 12 + length + 4
  return events


def test_tensorboard_tags_learning_rate_hparams_and_timed_rates(idx_dir, tmp_path):
  wd = tmp_path / "run"
  p = run_main("--config=configs/seed1_mlp.py", f"--workdir={wd}", "--config.data.source=idx",
               f"--config.data.dir={idx_dir}", "--config.train.num_epochs=3",
               "--config.optimizer.learning_rate=0.05")
  assert p.returncode == 0, p.stderr
  events = read_events(wd / "tensorboard")
  scalars = {}
  for e in events:
    for v in e.summary.value:
      if v.HasField("simple_value"):
        scalars.setdefault(v.tag, {})[e.step] = v.simple_value
  assert {"train/loss", "train/accuracy", "test/loss", "test/accuracy",
          "train/learning_rate", "progress/epoch"} <= set(scalars)
  assert not any("_" in tag.split("/")[0] for tag in scalars)  # namespaced, no train_loss
  assert scalars["train/learning_rate"] == pytest.approx({10: 0.05, 20: 0.05, 30: 0.05})
  assert sorted(scalars["test/accuracy"]) == [0, 10, 20, 30]
  plugins = [v.metadata.plugin_data.plugin_name for e in events for v in e.summary.value
             if v.metadata.plugin_data.plugin_name]
  assert plugins.count("hparams") == 3  # experiment, session start and end: once per run
  hp = next(v.metadata.plugin_data.content for e in events for v in e.summary.value
            if v.metadata.plugin_data.plugin_name == "hparams" and b"learning_rate" in
            v.metadata.plugin_data.content and b"seed1_mlp" in v.metadata.plugin_data.content)
  assert b"optimizer.learning_rate" in hp and b"model.name" in hp
  # The rate of each interval counts only its train calls that compiled nothing: the
  # first epoch's one call compiled, the next ones did not.
  records = [json.loads(line) for line in open(wd / "metrics.jsonl")]
  rates = {r["step"]: r.get("examples_per_sec") for r in records if r["step"]}
  assert rates[10] is None and rates[20] > 0 and rates[30] > 0
  assert [r["learning_rate"] for r in records if r["step"]] == [0.05] * 3
  # A rerun that resumes writes no second set of hyperparameters.
  (wd / "summary.json").unlink()
  assert run_main("--config=configs/seed1_mlp.py", f"--workdir={wd}", "--config.data.source=idx",
                  f"--config.data.dir={idx_dir}", "--config.train.num_epochs=3",
                  "--config.optimizer.learning_rate=0.05").returncode == 0
  plugins = [v.metadata.plugin_data.plugin_name for e in read_events(wd / "tensorboard")
             for v in e.summary.value if v.metadata.plugin_data.plugin_name]
  assert plugins.count("hparams") == 3
