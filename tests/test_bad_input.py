"""The catalogue of bad input: each case ends with one line naming the problem and the fix.

One table, one test: every case sets something up, runs `bnlab.main` (in-process
through `bnlab.main.execute`, or end to end through `python -m bnlab.main`),
and checks: exit status 2, exactly one `error:` line holding the problem and
the fix, no traceback, and every file already in the work directory unchanged
(metrics.jsonl may only grow). The study command line's bad file or work
directory is checked the same way at the end.
"""

import builtins
import errno
import gzip
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bnlab.engine import steps as steps_lib
from bnlab.engine import state as state_lib
from bnlab.engine import optim as optim_lib
from bnlab import config as config_lib
from bnlab import data as data_lib
from bnlab import main as main_lib
from bnlab.rundir import files as files_lib
from bnlab.rundir import records as records_lib
from bnlab.rundir import workdir as workdir_lib
from run_files import files
import tiny_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IDX = {"train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
       "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}


def tiny_config(idx_dir):
  c = config_lib.base_config()
  c.data.source, c.data.dir = "idx", idx_dir
  c.model.name, c.model.norm, c.model.bn_position = "seed1_mlp", "batch", "before"
  c.optimizer.learning_rate = 0.1
  c.train.num_epochs = 1
  c.train.log_every_steps = 2
  c.train.checkpoint_every_steps = 2
  c.train.keep_checkpoints = 10
  return c


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """A clean tiny IDX dir and one finished run (10 steps, checkpoints every 2)."""
  root = tmp_path_factory.mktemp("catalogue")
  idx = str(root / "idx")
  tiny_mnist.write_mnist_dir(idx, num_train=320, num_test=100)
  run = str(root / "finished")
  from bnlab.engine import train
  train.train_and_evaluate(tiny_config(idx), run)
  return {"idx": idx, "finished": run, "root": root}


@pytest.fixture(scope="module")
def holder(env):
  """A live process holding the lock of a work directory (a real bnlab WorkDir)."""
  wd = str(env["root"] / "held")
  code = ("import sys, time\nfrom bnlab import config\nfrom bnlab.rundir import workdir\n"
          "w = workdir.WorkDir(sys.argv[1], config.base_config())\n"
          "print('locked', flush=True)\ntime.sleep(300)\n")
  p = subprocess.Popen([sys.executable, "-c", code, wd], cwd=ROOT, stdout=subprocess.PIPE,
                       text=True)
  assert p.stdout.readline().strip() == "locked"
  yield wd, p.pid
  p.kill()
  p.wait()


class Case:
  """What a setup function gets: the config to change, CLI args, the work dir."""

  def __init__(self, env, tmp_path, monkeypatch, holder_fn):
    self.env, self.tmp, self.monkeypatch = env, tmp_path, monkeypatch
    self.cfg = tiny_config(env["idx"])
    self.wd = str(tmp_path / "wd")
    self.args = []
    self._holder = holder_fn

  # work directories
  def copy_finished(self, interrupted_at=None):
    """The finished run; with `interrupted_at`, as a kill at that step leaves it."""
    shutil.copytree(self.env["finished"], self.wd)
    if interrupted_at is not None:
      os.remove(os.path.join(self.wd, "summary.json"))
      ck = os.path.join(self.wd, "checkpoints")
      for name in os.listdir(ck):
        if name.isdigit() and int(name) > interrupted_at:
          shutil.rmtree(os.path.join(ck, name))
      path = os.path.join(self.wd, "metrics.jsonl")
      records = [json.loads(x) for x in open(path)]
      with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records if r["step"] <= interrupted_at)

  def held(self):
    self.wd, pid = self._holder()
    return pid

  # data
  def idx_copy(self):
    d = str(self.tmp / "idx")
    shutil.copytree(self.env["idx"], d)
    self.cfg.data.dir = d
    self.args.append(f"--config.data.dir={d}")
    return d

  def rewrite(self, name, fn):
    """Replaces IDX file `name` of a copied data dir by fn(raw bytes)."""
    path = os.path.join(self.idx_copy(), IDX[name])
    with gzip.open(path) as f:
      raw = f.read()
    with gzip.open(path, "wb") as f:
      f.write(fn(raw))
    return path

  def write_array(self, name, array):
    d = self.idx_copy()
    os.remove(os.path.join(d, IDX[name]))
    tiny_mnist.write_idx(os.path.join(d, IDX[name][:-3]), array)

  def cache(self, corrupt):
    """An embedded-source cache of tiny arrays, then `corrupt(cache_path)`."""
    arrays = dict(zip(data_lib.ARRAY_NAMES, tiny_mnist.make_arrays(64, 32)))
    root = str(self.tmp / "cache")
    path = os.path.join(root, data_lib.CACHE_SUBDIR)
    data_lib.write_cache(path, arrays, data_lib.MNIST_PINS)
    corrupt(path)
    self.cfg.data.source, self.cfg.data.dir, self.cfg.data.cache_dir = "embedded", "", root

  def config_file(self, text):
    path = self.tmp / "cfg.py"
    path.write_text(text)
    self.args = [a for a in self.args if not a.startswith("--config=")]
    self.args.insert(0, f"--config={path}")

  # injected faults
  def fail(self, owner, name, exc, when=lambda *a, **k: True):
    real = getattr(owner, name, None) or getattr(builtins, name)

    def wrapper(*args, **kwargs):
      if when(*args, **kwargs):
        raise exc
      return real(*args, **kwargs)
    self.monkeypatch.setattr(owner, name, wrapper, raising=False)


def _set(**kv):
  def setup(c):
    for key, value in kv.items():
      *path, last = key.split("__")
      node = c.cfg
      for p in path:
        node = node[p]
      node[last] = value
  return setup


def _raw_config(change):
  """A config built from a plain dict (no type locking), `change` applied to the dict."""
  def setup(c):
    d = c.cfg.to_dict()
    change(d)
    c.cfg = ml_collections.ConfigDict(d)
  return setup


def _corrupt_all_checkpoints(c):
  c.copy_finished(interrupted_at=4)
  ck = os.path.join(c.wd, "checkpoints")
  for step in os.listdir(ck):
    for dirpath, _, files in os.walk(os.path.join(ck, step)):
      for name in files:
        with open(os.path.join(dirpath, name), "r+b") as f:
          f.truncate(max(os.path.getsize(f.name) // 3, 0))


def _foreign_checkpoint(c):
  """Checkpoints of another model (wider layers) under this run's config."""
  import jax
  from bnlab.models import networks as models
  c.copy_finished(interrupted_at=0)
  ck = os.path.join(c.wd, "checkpoints")
  for name in os.listdir(ck):
    shutil.rmtree(os.path.join(ck, name))
  other = c.cfg.copy_and_resolve_references()
  other.model.widths = (64, 64)
  tx = optim_lib.make_optimizer(other.optimizer, 10)
  state = state_lib.create_train_state(models.build_model(other.model), tx, jax.random.key(0), 32)
  import flax
  mngr = ocp.CheckpointManager(ck)
  mngr.save(4, args=ocp.args.StandardSave(flax.serialization.to_state_dict(
      {"state": state, "sums": steps_lib.metric_sums_zero()})))
  mngr.wait_until_finished()
  mngr.close()


def _labels_past_9(raw):
  b = bytearray(raw)
  b[8] = 10
  return bytes(b)


def _records_of_run_on_copy(c):
  """The run killed at step 4, as if trained on a copy of its data (c.idx_copy()): its data
  directory renamed in config.json, data.json and every checkpoint's copy of them."""
  c.copy_finished(interrupted_at=4)
  old, new = c.env["idx"], c.idx_copy()
  paths = [os.path.join(c.wd, "config.json"), os.path.join(c.wd, "data.json")] + [
      os.path.join(c.wd, "checkpoints", n, "bnlab_checksums.json")
      for n in os.listdir(os.path.join(c.wd, "checkpoints")) if n.isdigit()]
  for path in paths:
    text = open(path).read()
    open(path, "w").write(text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1]))


def _change_labels(raw):
  return raw[:8] + bytes((b + 1) % 10 for b in raw[8:])


def _data_changed(c):
  """An interrupted run whose data files were replaced since (same sizes, other labels)."""
  _records_of_run_on_copy(c)
  path = os.path.join(c.cfg.data.dir, IDX["train_labels"])
  with gzip.open(path) as f:
    raw = f.read()
  with gzip.open(path, "wb") as f:
    f.write(_change_labels(raw))


def _data_changed_and_data_json_edited(c):
  """As `_data_changed`, with data.json edited to name the new data (it must not count)."""
  from bnlab.engine import train
  _data_changed(c)
  with open(os.path.join(c.wd, "data.json"), "w") as f:
    json.dump(train.data_identity(train.load_data(c.cfg)), f)


def _edit_config_json(change, lr=None):
  """A run killed at step 4 whose config.json was edited by `change` (and the rerun at `lr`)."""
  def setup(c):
    c.copy_finished(interrupted_at=4)
    path = os.path.join(c.wd, "config.json")
    cfg = json.load(open(path))
    change(cfg)
    open(path, "w").write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if lr is not None:
      c.cfg.optimizer.learning_rate = lr
  return setup


def _edit_data_json(c):
  """A run killed at step 4 whose data.json was edited; its data is unchanged."""
  c.copy_finished(interrupted_at=4)
  path = os.path.join(c.wd, "data.json")
  identity = json.load(open(path))
  identity["sha256"] = "0" * 64
  open(path, "w").write(json.dumps(identity))


def _config_json_deleted(c):
  c.copy_finished(interrupted_at=4)
  os.remove(os.path.join(c.wd, "config.json"))
  c.cfg.optimizer.learning_rate = 0.5


def _data_dir_is_a_file(c):
  path = str(c.tmp / "mnist.gz")
  open(path, "w").write("x")
  c.cfg.data.dir = path


def _lock_is_dir(c):
  os.makedirs(os.path.join(c.wd, ".lock"))


def _ckpt_is_file(c):
  os.makedirs(c.wd)
  open(os.path.join(c.wd, "checkpoints"), "w").write("not a directory")


def _gzip_body_damaged(c):
  """A gzip header, then a deflate stream with flipped bytes (not merely cut short)."""
  path = os.path.join(c.idx_copy(), IDX["train_images"])
  raw = bytearray(open(path, "rb").read())
  for i in range(20, 60):
    raw[i] ^= 0xFF
  open(path, "wb").write(bytes(raw))


def _idx_file_is_a_directory(c):
  path = os.path.join(c.idx_copy(), IDX["train_labels"])
  os.remove(path)
  os.makedirs(path)


def _workdir_file(name, how, interrupted_at=4):
  """A work directory (killed at `interrupted_at`, or finished with None) whose `name` is
  damaged (garbage), a directory, missing, or a symbolic link to a copy outside it."""
  def setup(c):
    c.copy_finished(interrupted_at)
    path = os.path.join(c.wd, name)
    if how in ("directory", "damaged", "missing") and os.path.lexists(path):
      shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    if how == "directory":
      os.makedirs(path)
    elif how == "damaged":
      open(path, "w").write("\0garbage{")
    elif how == "symlink":
      target = str(c.tmp / ("outside-" + name.lstrip(".")))
      if os.path.lexists(path):
        shutil.move(path, target)
      else:
        open(target, "w").close()
      os.symlink(target, path)
  return setup


def _metrics_cut_short(c):
  """A run killed at step 4 whose metrics.jsonl lost its last record."""
  c.copy_finished(4)
  path = os.path.join(c.wd, "metrics.jsonl")
  lines = open(path).read().splitlines()
  open(path, "w").write("\n".join(lines[:-1]) + "\n")


def _damaged_first_record(c):
  """A run killed at step 4 whose first record is garbage (the records after it intact)."""
  c.copy_finished(4)
  path = os.path.join(c.wd, "metrics.jsonl")
  lines = open(path).read().splitlines()
  open(path, "w").write("\n".join(["\0garbage{"] + lines[1:]) + "\n")


ENOSPC = OSError(errno.ENOSPC, "No space left on device")

# Users' models, each wrong only where a check on 2 images does not look.
USER_MODELS = """
import flax.linen as nn
import jax
import numpy as np


class Net(nn.Module):
  fixed_batch: int = 0  # a hard-coded batch size
  eval_raises: bool = False
  host_logits: bool = False  # a callback without a gradient
  init_oom: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    if self.init_oom and self.is_initializing() and x.shape[0] > 2:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.00GiB.")
    if self.eval_raises and not train and not self.is_initializing():
      raise NotImplementedError("no inference path")
    h = nn.Dense(10)(x.reshape(self.fixed_batch or x.shape[0], 784) / 255.0)
    if self.host_logits:
      h = jax.pure_callback(np.tanh, jax.ShapeDtypeStruct(h.shape, h.dtype), h)
    return h
"""


def _user_model(**fields):
  """The config's model: `Net` of USER_MODELS with `fields`, importable from a temporary dir."""
  def setup(c):
    d = c.tmp / "user_code"
    d.mkdir(exist_ok=True)
    (d / "bnlab_catalogue_models.py").write_text(
        USER_MODELS + "\n\ndef make():\n  return Net(" +
        ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")\n")
    c.monkeypatch.syspath_prepend(str(d))
    c.monkeypatch.delitem(sys.modules, "bnlab_catalogue_models", raising=False)
    c.cfg.model.name = "bnlab_catalogue_models:make"
  return setup


def _out_of_device_memory(c):
  from bnlab.engine import calls as calls_lib
  c.fail(calls_lib.StepCalls, "train", __import__("jax").errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.00GiB."))

# (id, via, setup, problem, fix)
CASES = [
    # -- config values --------------------------------------------------------------
    ("lr_negative", "api", _set(optimizer__learning_rate=-0.1), "config.optimizer.learning_rate", "--config.optimizer.learning_rate="),
    ("lr_zero", "api", _set(optimizer__learning_rate=0.0), "config.optimizer.learning_rate", "--config.optimizer.learning_rate="),
    ("lr_nan", "api", _set(optimizer__learning_rate=float("nan")), "config.optimizer.learning_rate", "--config.optimizer.learning_rate="),
    ("batch_zero", "api", _set(train__batch_size=0), "config.train.batch_size", "--config.train.batch_size="),
    ("batch_too_big", "api", _set(train__batch_size=1000), "config.train.batch_size=1000", "raise data.num_train"),
    ("model_unknown", "api", _set(model__name="resnet"), "config.model.name", "--config.model.name="),
    ("norm_unknown", "api", _set(model__norm="whiten"), "config.model.norm", "--config.model.norm="),
    ("source_unknown", "api", _set(data__source="mnist"), "config.data.source", "--config.data.source="),
    ("optimizer_unknown", "api", _set(optimizer__name="rmsprp"), "config.optimizer.name", "--config.optimizer.name="),
    ("bn_momentum_1.5", "api", _set(model__bn__momentum=1.5), "config.model.bn.momentum", "--config.model.bn.momentum="),
    ("bn_epsilon_zero", "api", _set(model__bn__epsilon=0.0), "config.model.bn.epsilon", "--config.model.bn.epsilon="),
    ("loop_unknown", "api", _set(train__loop="while"), "config.train.loop", "--config.train.loop="),
    ("seed_negative", "api", _set(seed=-1), "config.seed", "--config.seed="),
    ("widths_negative", "api", _set(model__widths=(16, -1)), "config.model.widths", "--config.model.widths="),
    ("widths_count_cnn", "api", _set(model__name="seed1_cnn", model__widths=(8, 8, 8)), "config.model.widths", "2 entries"),
    ("no_steps", "api", _set(train__num_epochs=0, train__num_steps=0), "config.train.num_epochs", "num_steps > 0"),
    ("step_schedule_no_decay", "api", _set(optimizer__schedule="step"), "config.optimizer.decay_every_steps", "--config.optimizer.decay_every_steps="),
    ("no_eval_interval", "api", _set(train__eval_every_epochs=0), "config.train.eval_every_epochs", "eval_every_steps"),
    ("keep_zero_checkpoints", "api", _set(train__keep_checkpoints=0), "config.train.keep_checkpoints", "--config.train.keep_checkpoints="),
    ("unroll_zero", "api", _set(train__unroll=0), "config.train.unroll", "--config.train.unroll="),
    ("eval_batch_zero", "api", _set(train__eval_batch_size=0), "config.train.eval_batch_size", "--config.train.eval_batch_size="),
    ("analysis_layer_unknown", "api", _set(analysis__layers=("nope",)), "config.analysis.layers", "--config.analysis.layers="),
    ("percentile_150", "api", _set(analysis__percentiles=(150.0,)), "config.analysis.percentiles", "--config.analysis.percentiles="),
    ("decay_factor_negative", "api", _set(optimizer__decay_factor=-0.5), "config.optimizer.decay_factor=-0.5", "--config.optimizer.decay_factor="),
    ("piecewise_no_boundaries", "api", _set(optimizer__schedule="piecewise"), "config.optimizer.decay_boundaries=()", "--config.optimizer.decay_boundaries="),
    ("piecewise_unordered", "api", _set(optimizer__schedule="piecewise", optimizer__decay_boundaries=(48000, 32000)), "config.optimizer.decay_boundaries=(48000, 32000)", "increasing integer steps"),
    ("decay_every_negative", "api", _set(optimizer__decay_every_steps=-1), "config.optimizer.decay_every_steps=-1", "--config.optimizer.decay_every_steps="),
    ("num_steps_negative", "api", _set(train__num_steps=-5), "config.train.num_steps=-5", "--config.train.num_steps="),
    ("seed_too_large", "api", _set(seed=2**70), "config.seed=1180591620717411303424", "--config.seed="),
    ("count_too_large", "api", _set(train__num_steps=2**40), "config.train.num_steps=1099511627776", "--config.train.num_steps="),
    ("analysis_unit_past_layer", "api", _set(analysis__layers=("preact_0",), analysis__units=(0, 16)), "[16] lie past the 16 units of preact_0", "--config.analysis.units="),
    ("idx_without_dir", "api", _set(data__dir=""), "config.data.dir", "--config.data.dir="),
    ("num_train_too_many", "api", _set(data__num_train=5000), "config.data.num_train=5000", "lower it"),
    ("num_test_too_many", "api", _set(data__num_test=5000), "config.data.num_test=5000", "lower it"),
    # -- config keys and types --------------------------------------------------------
    ("unknown_key", "api", lambda c: c.cfg.train.__setattr__("nonsense", 1), "config.train.nonsense is not a known key", "known keys here"),
    ("missing_section", "api", lambda c: setattr(c, "cfg", ml_collections.ConfigDict({"seed": 0})), "is missing", "base_config()"),
    ("lr_is_string", "api", _raw_config(lambda d: d["optimizer"].update(learning_rate="0.1")), "config.optimizer.learning_rate='0.1'", "--config.optimizer.learning_rate="),
    ("batch_is_float", "api", _raw_config(lambda d: d["train"].update(batch_size=32.0)), "config.train.batch_size=32.0", "--config.train.batch_size="),
    ("momentum_is_string", "api", _raw_config(lambda d: d["optimizer"].update(momentum="0.9")), "config.optimizer.momentum='0.9'", "--config.optimizer.momentum="),
    ("lr_is_inf", "api", _raw_config(lambda d: d["optimizer"].update(learning_rate=float("inf"))), "config.optimizer.learning_rate=inf", "a finite number"),
    ("flag_is_int", "api", _raw_config(lambda d: d["train"].update(final_train_eval=1)), "config.train.final_train_eval=1", "True or False"),
    # -- your own model: traced at the run's batch sizes before any step compiles ------
    ("user_model_fixed_batch", "api", _user_model(fixed_batch=2), "fails to initialize (model.init, train=False) at batch 32 (train.batch_size)", "initialized on (batch, 28, 28) uint8 images"),
    ("user_model_eval_mode_raises", "api", _user_model(eval_raises=True), "fails in eval mode (train=False) at batch 2000 (train.eval_batch_size", "evaluations apply it with train=False"),
    ("user_model_not_differentiable", "api", _user_model(host_logits=True), "is not differentiable: jax.grad of the loss fails", "jax.custom_jvp"),
    ("user_model_out_of_memory", "api", _user_model(init_oom=True), "runs out of memory (model.init, train=False) at batch 32", "lower train.batch_size (now 32)"),
    ("out_of_device_memory", "api", _out_of_device_memory, "config.model.name='seed1_mlp' ran out of device memory at batch 32", "lower train.batch_size (now 32)"),
    # -- flags and config files (end to end) -----------------------------------------
    ("cli_unknown_key", "cli", lambda c: c.args.append("--config.optimizer.nonsense=1"), "--config.optimizer.nonsense names no key", "check its spelling"),
    ("cli_bad_type", "cli", lambda c: c.args.append("--config.train.batch_size=big"), "--config.train.batch_size", "big"),
    ("cli_unknown_flag", "cli", lambda c: c.args.append("--nonsense=1"), "Unknown command line flag 'nonsense'", "--helpfull"),
    ("cli_positional_arg", "cli", lambda c: c.args.append("extra"), "unexpected arguments ['extra']", "--flag=value"),
    ("cli_missing_config_file", "cli", lambda c: c.args.__setitem__(0, "--config=configs/no_such.py"), "no_such.py", "check the path"),
    ("cli_config_syntax_error", "cli", lambda c: c.config_file("def get_config(:\n"), "syntax error at line 1", "fix the file"),
    ("cli_config_raises_on_import", "cli", lambda c: c.config_file("raise RuntimeError('no GPU here')\n"), "raised RuntimeError when loaded (no GPU here)", "fix the file"),
    ("cli_get_config_returns_none", "cli", lambda c: c.config_file("def get_config():\n  pass\n"), "get_config() returned None", "return the config"),
    ("cli_config_without_get_config", "cli", lambda c: c.config_file("X = 1\n"), "defines no get_config()", "add one"),
    # -- data -------------------------------------------------------------------------
    ("idx_wrong_magic", "api", lambda c: c.rewrite("train_images", lambda r: b"\0\0\x08\x04" + r[4:]), "bad magic 0x00000804", "replace"),
    ("idx_truncated", "api", lambda c: c.rewrite("train_images", lambda r: r[:len(r) // 2]), "is truncated", "replace"),
    ("idx_empty_file", "api", lambda c: c.rewrite("test_labels", lambda r: b""), "too short (0 bytes)", "replace"),
    ("idx_trailing_bytes", "api", lambda c: c.rewrite("test_labels", lambda r: r + b"xyz"), "3 trailing bytes", "replace"),
    ("idx_label_out_of_range", "api", lambda c: c.rewrite("train_labels", _labels_past_9), "label 10, expected labels in [0, 9]", "replace them"),
    ("idx_count_mismatch", "api", lambda c: c.write_array("test_labels", np.zeros(99, np.uint8)), "100 images but 99 labels", "replace them"),
    ("idx_image_size", "api", lambda c: c.write_array("test_images", np.zeros((100, 27, 27), np.uint8)), "27x27 images", "replace"),
    ("idx_truncated_gzip", "api", lambda c: open(os.path.join(c.idx_copy(), IDX["train_labels"]), "r+b").truncate(30), "cannot read", "replace"),
    ("idx_missing_file", "api", lambda c: os.remove(os.path.join(c.idx_copy(), IDX["test_images"])), "no t10k-images-idx3-ubyte file", "put the four MNIST IDX files"),
    ("idx_dir_is_a_file", "api", _data_dir_is_a_file, "mnist.gz is a file, not a directory", "--config.data.dir="),
    ("idx_missing_dir", "api", _set(data__dir="/nonexistent/mnist"), "/nonexistent/mnist does not exist", "--config.data.dir="),
    ("idx_gzip_body_damaged", "api", _gzip_body_damaged, "cannot read", "replace"),
    ("idx_not_gzip_despite_name", "api", lambda c: open(os.path.join(c.idx_copy(), IDX["test_labels"]), "wb").write(b"plain text, not gzip"), "bad magic", "replace"),
    ("idx_file_is_a_directory", "api", _idx_file_is_a_directory, "train-labels-idx1-ubyte.gz is a directory, not an IDX file", "replace it"),
    ("cache_corrupt_array", "api", lambda c: c.cache(lambda p: open(os.path.join(p, "train_images.npy"), "wb").write(b"garbage")), "cannot read", "and rerun"),
    ("cache_corrupt_manifest", "api", lambda c: c.cache(lambda p: open(os.path.join(p, "manifest.json"), "w").write("{")), "unreadable", "and rerun"),
    ("cache_foreign_arrays", "api", lambda c: c.cache(lambda p: None), "sha256", "and rerun"),
    # -- work directory ---------------------------------------------------------------
    ("workdir_is_a_file", "api", lambda c: open(c.wd, "w").write("x"), "is not writable", "choose another --workdir"),
    ("workdir_under_a_file", "api", lambda c: (open(c.wd, "w").write("x"), setattr(c, "wd", c.wd + "/run")), "is not writable", "choose another --workdir"),
    ("workdir_permission_denied", "api", lambda c: c.fail(workdir_lib, "open", PermissionError(errno.EACCES, "Permission denied"), lambda p, *a, **k: ".write-probe" in str(p)), "Permission denied", "choose another --workdir"),
    ("workdir_in_use", "api", lambda c: c.held(), "is in use by process", "wait for it to finish"),
    ("cli_workdir_in_use", "cli", lambda c: c.held(), "is in use by process", "wait for it to finish"),
    ("changed_config", "api", lambda c: (c.copy_finished(), _set(optimizer__learning_rate=0.5)(c)), "optimizer.learning_rate: 0.1 -> 0.5", "use a new --workdir"),
    ("workdir_empty", "api", lambda c: setattr(c, "wd", ""), "the work directory is empty", "--workdir=DIR"),
    ("config_json_deleted", "api", _config_json_deleted, "optimizer.learning_rate: 0.1 -> 0.5", "use a new --workdir"),
    ("data_changed_on_resume", "api", _data_changed, "differs from the data the run", "use a new --workdir"),
    # config.json and data.json as a user edits them: the checkpoints' copies count
    ("config_json_edited_to_new_lr", "api", _edit_config_json(lambda d: d["optimizer"].update(learning_rate=0.5), lr=0.5), "optimizer.learning_rate: 0.1 -> 0.5); " , "config.json was edited (optimizer.learning_rate: 0.1 -> 0.5), but the config the run's checkpoints carry is the one it trained with; use a new --workdir"),
    ("config_json_section_deleted", "api", _edit_config_json(lambda d: d.pop("optimizer"), lr=0.5), "optimizer.learning_rate: 0.1 -> 0.5", "config.json lacks optimizer.*, but the config the run's checkpoints carry is the one it trained with; use a new --workdir"),
    ("corrupt_config_json_other_config", "api", lambda c: (c.copy_finished(4), open(os.path.join(c.wd, "config.json"), "w").write("{\"seed\": "), _set(optimizer__learning_rate=0.5)(c)), "optimizer.learning_rate: 0.1 -> 0.5)", "config.json is unreadable"),
    ("data_json_edited_to_changed_data", "api", _data_changed_and_data_json_edited, "differs from the data the run", "data.json was edited (sha256: "),
    ("corrupt_summary_json", "api", lambda c: (c.copy_finished(), open(os.path.join(c.wd, "summary.json"), "w").write("[1, 2")), "summary.json is unreadable", "delete it and rerun"),
    ("summary_json_without_final_step", "api", lambda c: (c.copy_finished(), open(os.path.join(c.wd, "summary.json"), "w").write("{}")), "summary.json is unreadable (its final_step is None, not a step)", "delete it and rerun"),
    ("lock_is_a_directory", "api", _lock_is_dir, ".lock failed", "rerun"),
    ("checkpoints_is_a_file", "api", _ckpt_is_file, "checkpoints is not a directory", "move it aside"),
    ("all_checkpoints_corrupt", "api", _corrupt_all_checkpoints, "no checkpoint in", "move that directory aside"),
    ("foreign_checkpoint", "api", _foreign_checkpoint, "from another model", "use a new --workdir"),
    # every file of a work directory: damaged, a directory, missing or a symbolic link
    # (the cases that are handled, not refused, are in HANDLED below)
    ("wd_config_json_directory", "api", _workdir_file("config.json", "directory"), "config.json is unreadable", "use a new --workdir"),
    ("wd_config_json_symlink", "api", _workdir_file("config.json", "symlink"), "config.json is a symbolic link", "remove the link"),
    ("wd_metrics_jsonl_directory", "api", _workdir_file("metrics.jsonl", "directory"), "metrics.jsonl failed (Is a directory)", "move it aside"),
    ("wd_metrics_jsonl_symlink", "api", _workdir_file("metrics.jsonl", "symlink"), "metrics.jsonl is a symbolic link", "remove the link"),
    ("wd_metrics_jsonl_missing", "api", _workdir_file("metrics.jsonl", "missing"), "metrics.jsonl holds no records, but the run resumes from its checkpoint at step 4", "aside to retrain from step 0"),
    ("wd_metrics_jsonl_cut_short", "api", _metrics_cut_short, "metrics.jsonl holds records up to step 2, but the run resumes from its checkpoint at step 4", "Put the records back"),
    ("wd_summary_json_damaged", "api", _workdir_file("summary.json", "damaged", None), "summary.json is unreadable", "delete it and rerun"),
    ("wd_summary_json_directory", "api", _workdir_file("summary.json", "directory", None), "summary.json is unreadable", "delete it and rerun"),
    ("wd_summary_json_symlink", "api", _workdir_file("summary.json", "symlink", None), "summary.json is a symbolic link", "remove the link"),
    ("wd_data_json_symlink", "api", _workdir_file("data.json", "symlink"), "data.json is a symbolic link", "remove the link"),
    ("wd_lock_symlink", "api", _workdir_file(".lock", "symlink"), ".lock is a symbolic link", "remove the link"),
    ("wd_checkpoints_symlink", "api", _workdir_file("checkpoints", "symlink"), "checkpoints is a symbolic link", "remove the link"),
    ("wd_tensorboard_file", "api", _workdir_file("tensorboard", "damaged"), "tensorboard failed (Not a directory)", "move it aside"),
    ("wd_tensorboard_symlink", "api", _workdir_file("tensorboard", "symlink"), "tensorboard is a symbolic link", "remove the link"),
    ("disk_full_saving_checkpoint", "api", lambda c: (c.copy_finished(4), c.fail(ocp.CheckpointManager, "save", ENOSPC)), "saving checkpoint 6", "free space on that disk"),
    ("disk_full_async_checkpoint", "api", lambda c: (c.copy_finished(4), c.fail(ocp.CheckpointManager, "wait_until_finished", ValueError("RESOURCE_EXHAUSTED: write failed: No space left on device"))), "saving a checkpoint", "free space on that disk"),
    ("disk_full_metrics", "api", lambda c: (c.copy_finished(4), c.fail(records_lib, "open", ENOSPC, lambda p, *a, **k: str(p).endswith("metrics.jsonl") and a[:1] == ("a",))), "appending to", "free space on that disk"),
    ("disk_full_summary", "api", lambda c: (c.copy_finished(8), c.fail(files_lib.os, "replace", ENOSPC, lambda s, d, *a, **k: str(d).endswith("summary.json"))), "summary.json failed (No space left on device)", "free space on that disk"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(env, holder, tmp_path, monkeypatch, capsys, case):
  name, via, setup, problem, fix = case
  c = Case(env, tmp_path, monkeypatch, lambda: holder)
  c.args = ["--config=configs/seed1_mlp.py", "--config.data.source=idx",
            f"--config.data.dir={env['idx']}", "--config.train.num_epochs=1"]
  setup(c)
  before = files(c.wd) if os.path.isdir(c.wd) else None
  if via == "cli":
    p = subprocess.run([sys.executable, "-m", "bnlab.main", f"--workdir={c.wd}", *c.args],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    rc, err = p.returncode, p.stderr
  else:
    with pytest.raises(SystemExit) as exit_info:
      main_lib.execute(c.cfg, c.wd)
    monkeypatch.undo()
    rc, err = exit_info.value.code, capsys.readouterr().err
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  assert rc == 2, err
  assert len(errors) == 1, err
  assert "Traceback" not in err
  assert problem in errors[0], errors[0]
  assert fix in errors[0], errors[0]
  if before is not None:
    after = files(c.wd)
    for path, content in before.items():
      if path == ".lock" and c.wd != holder[0]:
        continue
      assert path in after, f"{path} was removed"
      if path == "metrics.jsonl":
        assert after[path].startswith(content), "metrics.jsonl was rewritten"
      else:
        assert after[path] == content, f"{path} was changed"


# Work directory files whose damage a rerun handles (exit status 0, the run finishes):
# (id, setup, what happens, check(work dir) -> bool)
HANDLED = [
    ("wd_config_json_missing", _workdir_file("config.json", "missing"), "restored from the newest checkpoint's copy", lambda wd: json.load(open(os.path.join(wd, "config.json")))["optimizer"]["learning_rate"] == 0.1),
    ("wd_metrics_jsonl_damaged", _damaged_first_record, "the damaged line is moved aside, not dropped", lambda wd: any(n.startswith("metrics.jsonl.damaged-") for n in os.listdir(wd))),
    ("wd_summary_json_missing", _workdir_file("summary.json", "missing", None), "the final evaluation is redone from the last checkpoint", lambda wd: os.path.isfile(os.path.join(wd, "summary.json"))),
    ("corrupt_config_json", lambda c: (c.copy_finished(4), open(os.path.join(c.wd, "config.json"), "w").write("{\"seed\": ")), "restored from the checkpoints' copy, the damaged file kept aside", lambda wd: json.load(open(os.path.join(wd, "config.json")))["seed"] == 0 and _aside(wd, "config.json.damaged-") == '{"seed": '),
    ("config_json_edited_same_command", _edit_config_json(lambda d: d["optimizer"].update(learning_rate=0.5)), "restored from the checkpoints' copy, the edited file kept aside", lambda wd: json.load(open(os.path.join(wd, "config.json")))["optimizer"]["learning_rate"] == 0.1 and '"learning_rate": 0.5' in _aside(wd, "config.json.edited-")),
    ("config_json_section_deleted_same_command", _edit_config_json(lambda d: d.pop("optimizer")), "restored from the checkpoints' copy", lambda wd: json.load(open(os.path.join(wd, "config.json")))["optimizer"]["learning_rate"] == 0.1),
    ("data_json_edited_same_data", _edit_data_json, "restored from the checkpoints' copy, the edited file kept aside", lambda wd: json.load(open(os.path.join(wd, "data.json")))["sha256"] != "0" * 64 and "0" * 64 in _aside(wd, "data.json.edited-")),
    ("wd_data_json_damaged", _workdir_file("data.json", "damaged"), "restored from the newest checkpoint's copy of the data identity", lambda wd: "sha256" in json.load(open(os.path.join(wd, "data.json")))),
    ("wd_data_json_directory", _workdir_file("data.json", "directory"), "the newest checkpoint's copy of the data identity is compared", lambda wd: True),
    ("wd_data_json_missing", _workdir_file("data.json", "missing"), "restored from the newest checkpoint's copy", lambda wd: "sha256" in json.load(open(os.path.join(wd, "data.json")))),
    ("wd_lock_damaged", _workdir_file(".lock", "damaged"), "a lock no process holds is taken over", lambda wd: not os.path.lexists(os.path.join(wd, ".lock"))),
    ("wd_checkpoints_missing", _workdir_file("checkpoints", "missing"), "trains again from step 0 (the same records: the run is deterministic)", lambda wd: os.path.isdir(os.path.join(wd, "checkpoints", "10"))),
    ("wd_checkpoints_empty_directory", _workdir_file("checkpoints", "directory"), "trains again from step 0", lambda wd: os.path.isdir(os.path.join(wd, "checkpoints", "10"))),
    ("wd_tensorboard_missing", _workdir_file("tensorboard", "missing"), "written again from the resumed step on", lambda wd: os.listdir(os.path.join(wd, "tensorboard"))),
    ("wd_tensorboard_empty_directory", _workdir_file("tensorboard", "directory"), "written again from the resumed step on", lambda wd: os.listdir(os.path.join(wd, "tensorboard"))),
]


def _aside(wd, prefix):
  """The text of the one file named `prefix`<time> in `wd` (a file bnlab kept aside)."""
  (name,) = [n for n in os.listdir(wd) if n.startswith(prefix)]
  return open(os.path.join(wd, name)).read()


@pytest.mark.parametrize("case", HANDLED, ids=[c[0] for c in HANDLED])
def test_handled_workdir_damage(env, tmp_path, monkeypatch, capsys, case):
  name, setup, what, check = case
  c = Case(env, tmp_path, monkeypatch, None)
  setup(c)
  summary = main_lib.execute(c.cfg, c.wd)
  err = capsys.readouterr().err
  assert "error:" not in err and "Traceback" not in err, err
  assert summary["final_step"] == 10, summary
  assert check(c.wd), what


@pytest.mark.parametrize("module", ["bnlab.main", "bnlab.sweep", "bnlab.study"])
@pytest.mark.parametrize("config", ["configs/no_such.py", "configs", ""])
def test_entry_point_bad_config_path(tmp_path, module, config):
  p = subprocess.run([sys.executable, "-m", module, f"--config={config}",
                      f"--workdir={tmp_path / 'wd'}"], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  lines = [x for x in p.stderr.splitlines() if x.strip()]
  assert p.returncode == 2, p.stderr
  start = (f"error: config file {config!r} does not exist (looked in" if config.endswith(".py")
           else f"error: --config={config!r}")  # a missing file: where it was looked for
  assert len(lines) == 1 and lines[0].startswith(start), p.stderr
  assert lines[0].endswith("check the path"), lines[0]
  assert not os.path.exists(tmp_path / "wd")


def test_catalogue_size():
  assert len({c[0] for c in CASES}) == len(CASES) >= 40


def test_verbosity_shows_the_traceback(env, tmp_path):
  p = subprocess.run([sys.executable, "-m", "bnlab.main", "--config=configs/seed1_mlp.py",
                      f"--workdir={tmp_path / 'wd'}", "--config.train.batch_size=0",
                      "--verbosity=1"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert p.returncode != 0 and "Traceback" in p.stderr and "config.train.batch_size" in p.stderr


@pytest.mark.parametrize("sweep_body, workdir, message", [
    ("raise ValueError('no members today')", "wd",
     "failed to load (ValueError: no members today); fix the file"),
    ("return [{}]", "FILE", "is a file, not a directory; choose another --workdir"),
])
def test_study_cli_bad_file_or_workdir_is_one_error_line(tmp_path, sweep_body, workdir, message):
  path = tmp_path / "study_cfg.py"
  path.write_text("from bnlab import study\n\ndef get_config(arg=None):\n"
                  f"  return study.base_config()\n\ndef get_sweep(arg=None):\n  {sweep_body}\n")
  workdir = tmp_path / workdir
  if workdir.name == "FILE":
    workdir.write_text("x")
  p = subprocess.run([sys.executable, "-m", "bnlab.study", f"--config={path}",
                      f"--workdir={workdir}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
  assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
  assert len(errors) == 1 and message in errors[0], p.stderr