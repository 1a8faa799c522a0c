"""Your own Flax model through the engine: `model.name="module:target"`, solo, resumed, grouped."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from bnlab import config as config_lib
from bnlab import sweep
from bnlab.engine import train
from run_files import final_state, read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A module outside the package: a linen factory reading its own settings from
# config.model.options, a linen class, an NNX class, and things that are no model.
USER_MODULE = textwrap.dedent('''
    import math

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    import bnlab


    class Record(nn.Module):
      """Sows its input as `hidden`, where analysis.layers finds it."""

      @nn.compact
      def __call__(self, x):
        self.sow("intermediates", "hidden", x)
        return x


    class TinyNet(nn.Module):
      width: int = 16
      dtype: object = None

      @nn.compact
      def __call__(self, x, train: bool):
        x = x.reshape(x.shape[0], -1).astype(self.dtype or jnp.float32) / 255.0
        x = nn.Dense(self.width, use_bias=False, dtype=self.dtype)(x)
        x = bnlab.BatchNorm(use_running_average=not train, dtype=self.dtype)(x)
        x = nn.relu(Record()(x))
        return nn.Dense(10, dtype=self.dtype)(x).astype(jnp.float32)


    def make_model(cfg, dtype=None):
      return TinyNet(width=cfg.options.width, dtype=dtype)


    def make_default():
      return TinyNet()


    class ListNet(nn.Module):
      """A list attribute: Flax cannot hash this module."""
      widths: list

      @nn.compact
      def __call__(self, x, train: bool):
        x = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
        for w in self.widths:
          x = nn.relu(bnlab.BatchNorm(use_running_average=not train)(nn.Dense(w)(x)))
        return nn.Dense(10)(x)


    def make_list_net():
      return ListNet([16])


    class TinyNNX(nnx.Module):
      def __init__(self, *, rngs):
        self.hidden = nnx.Linear(784, 16, use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(16, rngs=rngs)
        self.out = nnx.Linear(16, 10, rngs=rngs)

      def __call__(self, x, train: bool):
        x = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
        x = nnx.relu(self.bn(self.hidden(x), use_running_average=not train))
        return self.out(x)


    def make_nnx_instance():
      return TinyNNX(rngs=nnx.Rngs(0))


    class NoTrain(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


    def make_no_train():
      return NoTrain()


    class Logits(nn.Module):
      """Returns `shape` logits (per example) of `dtype`, reading RNG `stream` in train mode."""
      shape: tuple = (10,)
      dtype: object = jnp.float32
      stream: str = ""

      @nn.compact
      def __call__(self, x, train: bool):
        h = nn.Dense(math.prod(self.shape))(x.reshape(x.shape[0], -1) / 255.0)
        if train and self.stream:
          h = h + jax.random.uniform(self.make_rng(self.stream), (), h.dtype)
        return h.reshape((x.shape[0],) + self.shape).astype(self.dtype)


    def make_five_classes():
      return Logits(shape=(5,))


    def make_extra_axis():
      return Logits(shape=(1, 10))


    def make_int_logits():
      return Logits(dtype=jnp.int32)


    def make_own_stream():
      return Logits(stream="mystream")


    def make_dropout_stream():
      return Logits(stream="dropout")


    def make_nothing():
      return 3


    def make_broken(cfg):
      return cfg.options.missing_key


    NOT_CALLABLE = 3


    # Right for the 2 images the check once traced, wrong as a run uses them.
    class FixedBatch(nn.Module):
      """Flattens to a hard-coded batch size (a reshape that only fits `batch`)."""
      batch: int = 2

      @nn.compact
      def __call__(self, x, train: bool):
        return nn.Dense(10)(x.reshape(self.batch, 784) / 255.0)


    def make_two_images_only():
      return FixedBatch(batch=2)


    def make_train_batch_only():  # user_config's train.batch_size, not the evaluations'
      return FixedBatch(batch=32)


    class TwoRows(nn.Module):
      """Always returns 2 rows of logits, whatever the batch."""

      @nn.compact
      def __call__(self, x, train: bool):
        return nn.Dense(10)(x.reshape(2, -1) / 255.0)


    class EvalBroken(nn.Module):
      """Initializes and trains, but its inference path raises."""

      @nn.compact
      def __call__(self, x, train: bool):
        h = nn.Dense(10)(x.reshape(x.shape[0], -1) / 255.0)
        if not train and not self.is_initializing():
          raise NotImplementedError("the inference path is not written yet")
        return h


    class HostLogits(nn.Module):
      """Its logits pass through a host callback, which has no gradient rule."""

      @nn.compact
      def __call__(self, x, train: bool):
        h = nn.Dense(10)(x.reshape(x.shape[0], -1) / 255.0)
        return jax.pure_callback(np.tanh, jax.ShapeDtypeStruct(h.shape, h.dtype), h)


    class TooBig(nn.Module):
      """Stands for a model too large at the real batch size: raises XLA's words at init."""

      @nn.compact
      def __call__(self, x, train: bool):
        if self.is_initializing() and x.shape[0] > 2:
          raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                             "81.00GiB.")
        return nn.Dense(10)(x.reshape(x.shape[0], -1) / 255.0)
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  """The module above as `bnlab_test_user_models`, importable from a fresh directory."""
  d = tmp_path / "user_code"
  d.mkdir()
  (d / "bnlab_test_user_models.py").write_text(USER_MODULE)
  monkeypatch.syspath_prepend(str(d))
  yield "bnlab_test_user_models"
  sys.modules.pop("bnlab_test_user_models", None)


def user_config(idx_dir, name, **train_overrides):
  c = config_lib.base_config()
  c.data.source, c.data.dir = "idx", idx_dir
  c.model.name = name
  c.model.options.width = 16
  c.optimizer.learning_rate = 0.1
  c.train.batch_size = 32
  c.train.num_epochs = 2
  c.train.log_every_steps = 5
  c.train.keep_checkpoints = 10
  c.train.checkpoint_min_interval_secs = 0  # a checkpoint at every evaluation
  for key, value in train_overrides.items():
    c.train[key] = value
  return c


def test_user_model_trains_and_resumes_bit_identical(idx_dir, tmp_path, user_module):
  cfg = user_config(idx_dir, f"{user_module}:make_model")
  cfg.analysis.layers = ("hidden",)
  cfg.analysis.units = (0, 1)
  full = str(tmp_path / "full")
  summary = train.train_and_evaluate(cfg, full)
  assert summary["final_step"] == 20 and summary["test_accuracy"] > 0.5
  assert json.load(open(os.path.join(full, "config.json")))["model"]["options"] == {"width": 16}
  records = read_jsonl(os.path.join(full, "metrics.jsonl"))
  assert len(records[-1]["hidden/percentiles"]) == 2
  step, state = final_state(full)
  assert state["params"]["Dense_0"]["kernel"].shape == (784, 16)
  assert set(state["batch_stats"]["BatchNorm_0"]) == {"mean", "var"}

  # Killed after its first epoch: the rerun resumes from step 10 and ends the same.
  part = str(tmp_path / "part")
  shutil.copytree(full, part)
  os.remove(os.path.join(part, "summary.json"))
  shutil.rmtree(os.path.join(part, "checkpoints", "20"))
  resumed = train.train_and_evaluate(cfg, part)
  assert resumed["test_accuracy"] == summary["test_accuracy"]
  _, again = final_state(part)
  jax.tree.map(np.testing.assert_array_equal, state, again)


def test_a_linen_class_and_an_nnx_class_train(idx_dir, tmp_path, user_module):
  for target in ("TinyNet", "make_default", "TinyNNX", "make_list_net"):
    cfg = user_config(idx_dir, f"{user_module}:{target}", num_epochs=1)
    summary = train.train_and_evaluate(cfg, str(tmp_path / target))
    assert summary["final_step"] == 10 and summary["test_accuracy"] > 0.3, target
  _, state = final_state(str(tmp_path / "TinyNNX"))
  mean = np.asarray(state["batch_stats"]["bn"]["mean"])
  assert mean.shape == (16,) and np.any(mean != 0)  # the NNX BN's statistics were updated


@pytest.mark.parametrize("target,needle", [
    ("no_such_module_xyz:make", "cannot be imported"),
    ("{m}:no_such_factory", "has no 'no_such_factory'"),
    ("{m}:NOT_CALLABLE", "not a function or Module class"),
    ("{m}:make_nothing", "returned an object of type int, not a flax.linen Module"),
    ("{m}:make_no_train", "takes no `train` argument"),
    ("{m}:make_broken", "raised AttributeError"),
    ("{m}:make_nnx_instance", "flax.nnx.bridge.to_linen(TinyNNX"),
    ("{m}:", "expected 'package.module:target'"),
    ("{m}:make_five_classes", "returns float32[32, 5] in train mode at batch 32 "
                              "(train.batch_size); return float logits of shape (batch, 10)"),
    ("{m}:make_extra_axis", "returns float32[32, 1, 10]"),
    ("{m}:make_int_logits", "returns int32[32, 10]"),
    ("{m}:make_own_stream", "fails in train mode (train=True) at batch 32 (train.batch_size) "
                            "(InvalidRngError"),
    # What a run does with the model, traced at its own batch sizes (nothing computed):
    ("{m}:make_two_images_only", "FixedBatch fails to initialize (model.init, "
                                 "train=False) at batch 32 (train.batch_size) (TypeError: "
                                 "cannot reshape"),
    ("{m}:TwoRows", "TwoRows returns float32[2, 10] in train mode at batch 32"),
    ("{m}:make_train_batch_only", "FixedBatch fails in eval mode (train=False) at batch 2000 "
                                  "(train.eval_batch_size"),
    ("{m}:EvalBroken", "EvalBroken fails in eval mode (train=False) at batch 2000 "
                       "(train.eval_batch_size, at most the examples evaluated) "
                       "(NotImplementedError: the inference path is not written yet)"),
    ("{m}:HostLogits", "HostLogits is not differentiable: jax.grad of the loss fails in "
                       "train mode at batch 32 (train.batch_size) (ValueError: Pure "
                       "callbacks do not support JVP"),
    ("{m}:TooBig", "TooBig runs out of memory (model.init, train=False) at batch 32 "
                   "(train.batch_size) (RuntimeError: RESOURCE_EXHAUSTED: Out of memory "
                   "while trying to allocate 81.00GiB.); lower train.batch_size (now 32) or "
                   "train.eval_batch_size; in a sweep, also --max_group_size"),
])
def test_a_bad_user_model_is_one_config_error_naming_the_key(idx_dir, user_module, target,
                                                             needle):
  cfg = user_config(idx_dir, target.format(m=user_module))
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(cfg)
  message = str(e.value)
  assert message.startswith("config.model.name=") and needle in message, message
  assert "\n" not in message


def test_a_user_model_reading_the_dropout_stream_is_accepted(idx_dir, user_module):
  config_lib.validate(user_config(idx_dir, f"{user_module}:make_dropout_stream"))


def test_half_precision_needs_a_factory_taking_dtype(idx_dir, user_module):
  cfg = user_config(idx_dir, f"{user_module}:make_default", half_precision=True)
  with pytest.raises(config_lib.ConfigError, match="config.train.half_precision=True .*dtype"):
    config_lib.validate(cfg)
  cfg.model.name = f"{user_module}:make_model"
  config_lib.validate(cfg)


def test_an_analysis_layer_the_user_model_does_not_sow_is_refused(idx_dir, tmp_path,
                                                                  user_module):
  cfg = user_config(idx_dir, f"{user_module}:make_model", num_epochs=1)
  cfg.analysis.layers = ("preact_0",)
  with pytest.raises(config_lib.ConfigError, match="sows \\['hidden'\\]"):
    train.train_and_evaluate(cfg, str(tmp_path / "run"))


def test_user_models_group_in_a_sweep(idx_dir, tmp_path, user_module):
  base = user_config(idx_dir, f"{user_module}:make_model", num_epochs=1)
  members = sweep.product(sweep.axis("optimizer.learning_rate", [0.05, 0.1]), sweep.seeds(2))
  resolved = sweep.resolve_members(base, members)
  groups = sweep.group_members(resolved)
  assert [len(g) for g in groups] == [4]  # seeds and constant learning rates group
  rows = sweep.run_sweep(base, members, str(tmp_path / "sw"))
  assert [r["status"] for r in rows] == ["done"] * 4
  assert os.listdir(tmp_path / "sw" / "_groups")
  solo = train.train_and_evaluate(
      sweep.apply_overrides(base, members[3]), str(tmp_path / "solo"))
  assert rows[3]["test_accuracy"] == pytest.approx(solo["test_accuracy"], abs=0.02)


def test_cli_trains_a_model_from_the_working_directory(idx_dir, tmp_path):
  code = tmp_path / "project"
  code.mkdir()
  (code / "my_models.py").write_text(USER_MODULE)
  args = [sys.executable, "-m", "bnlab.main", f"--config={ROOT}/configs/seed1_mlp.py",
          f"--workdir={tmp_path / 'run'}", "--config.data.source=idx",
          f"--config.data.dir={idx_dir}", "--config.train.num_epochs=1",
          "--config.model.name=my_models:make_default"]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  p = subprocess.run(args, cwd=code, capture_output=True, text=True, timeout=300, env=env)
  assert p.returncode == 0, p.stderr[-2000:]
  assert json.loads(p.stdout.strip().splitlines()[-1])["final_step"] == 10
  p = subprocess.run(args[:-1] + ["--config.model.name=my_models:nope"], cwd=code,
                     capture_output=True, text=True, timeout=300, env=env)
  assert p.returncode == 2 and p.stderr.count("\n") == 1
  assert p.stderr.startswith("error: config.model.name='my_models:nope' is unusable")


def test_a_sweep_member_whose_model_fails_is_recorded_failed_and_the_others_train(
    idx_dir, tmp_path, user_module):
  # Before, a model wrong at the real batch size crashed the plan (and --dry_run) with a
  # traceback while sizing its group, and an eval-mode bug was "to train" in the dry run.
  base = user_config(idx_dir, f"{user_module}:make_model", num_epochs=1)
  nets = [sweep.Variant(label, {"model.name": f"{user_module}:{target}"})
          for label, target in (("tiny", "make_model"), ("two", "make_two_images_only"),
                                ("eval", "EvalBroken"))]
  overrides = sweep.product(sweep.axis("net", nets), sweep.seeds(2))
  wd = str(tmp_path / "sw")
  members, groups = sweep.plan(base, overrides)
  assert [len(g) for g in groups] == [2, 1, 1, 1, 1]  # the failing members alone, unsized
  table, listing = sweep.dry_run_listing(members, groups, wd)
  assert [e["status"] for e in listing["list"]] == ["to train"] * 2 + ["failed"] * 4
  assert listing["to_train"] == 2 and listing["failed"] == 4
  assert "FixedBatch fails to initialize" in listing["list"][2]["error"]
  assert "EvalBroken fails in eval mode" in table.splitlines()[5]

  rows = sweep.run_sweep(base, overrides, wd)
  assert [r["status"] for r in rows] == ["done"] * 2 + ["failed"] * 4
  assert rows[0]["test_accuracy"] > 0.3
  for row, entry in zip(rows[2:], listing["list"][2:]):
    assert row["error"] == entry["error"]  # the dry run said what the sweep recorded
    assert row["error"].startswith(f"UnusableModelError: config.model.name='{user_module}:")
    assert "\n" not in row["error"] and not os.path.exists(os.path.join(wd, row["name"]))
  assert "EvalBroken fails in eval mode (train=False)" in rows[4]["error"]
  again = sweep.dry_run_listing(*sweep.plan(base, overrides), wd)[1]
  assert [e["status"] for e in again["list"]] == [r["status"] for r in rows]


def first_step_raises(monkeypatch, error):
  """Every run's first train step raises `error`, as XLA on a device would."""
  from bnlab.engine import calls as calls_lib  # pylint: disable=g-import-not-at-top

  def fail(*args, **kwargs):
    raise error
  monkeypatch.setattr(calls_lib.StepCalls, "train", fail)


def test_running_out_of_device_memory_is_one_line_naming_what_to_lower(
    idx_dir, tmp_path, user_module, monkeypatch):
  first_step_raises(monkeypatch, jax.errors.JaxRuntimeError(
      "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81.00GiB."))
  cfg = user_config(idx_dir, f"{user_module}:make_model", num_epochs=1)
  run = str(tmp_path / "run")
  with pytest.raises(config_lib.UnusableModelError) as e:
    train.train_and_evaluate(cfg, run)
  assert str(e.value) == (
      f"config.model.name='{user_module}:make_model' ran out of device memory at batch 32 "
      "(JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
      "81.00GiB.); lower train.batch_size (now 32) or train.eval_batch_size; in a sweep, "
      "also --max_group_size")
  cfgs = [sweep.apply_overrides(cfg, {"seed": s}) for s in (0, 1)]
  with pytest.raises(config_lib.UnusableModelError,
                     match="training 2 members at batch 32 .* or the sweep's --max_group_size"):
    train.train_group(cfgs, [str(tmp_path / f"m{s}") for s in (0, 1)], str(tmp_path / "g"))
  monkeypatch.undo()
  cfg.train.batch_size = 16  # it failed before its first checkpoint: the directory accepts it
  assert train.train_and_evaluate(cfg, run)["final_step"] == 20


def test_an_operation_without_a_deterministic_gpu_kernel_is_one_line_naming_the_fix(
    idx_dir, tmp_path, user_module, monkeypatch):
  # XLA's own words (flax.linen.max_pool's gradient under --xla_gpu_deterministic_ops).
  first_step_raises(monkeypatch, jax.errors.JaxRuntimeError(
      "UNIMPLEMENTED: HLO instruction select-and-scatter.401.0 does not have a deterministic "
      "implementation, but run-to-run determinism is required by --xla_gpu_deterministic_ops."))
  cfg = user_config(idx_dir, f"{user_module}:make_model", num_epochs=1)
  run = str(tmp_path / "run")
  with pytest.raises(config_lib.UnusableModelError) as e:
    train.train_and_evaluate(cfg, run)
  message = str(e.value)
  assert message.startswith(f"config.model.name='{user_module}:make_model' uses an operation "
                            "XLA cannot run deterministically on this device (JaxRuntimeError: "
                            "UNIMPLEMENTED: HLO instruction select-and-scatter")
  assert message.endswith("set config.train.deterministic=False (runs then repeat only to "
                          "float rounding), or replace it: for flax.linen.max_pool, "
                          "bnlab.models.conv.max_pool")
  assert "\n" not in message
  monkeypatch.undo()
  cfg.train.deterministic = False  # it failed before its first checkpoint
  assert train.train_and_evaluate(cfg, run)["final_step"] == 10


def test_cli_refuses_a_model_that_fails_at_the_real_batch_size_in_one_line(idx_dir, tmp_path):
  code = tmp_path / "project"
  code.mkdir()
  (code / "my_models.py").write_text(USER_MODULE)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
  p = subprocess.run(
      [sys.executable, "-m", "bnlab.main", f"--config={ROOT}/configs/seed1_mlp.py",
       f"--workdir={tmp_path / 'run'}", "--config.data.source=idx",
       f"--config.data.dir={idx_dir}", "--config.train.num_epochs=1",
       "--config.model.name=my_models:make_two_images_only"],
      cwd=code, capture_output=True, text=True, timeout=300, env=env)
  assert p.returncode == 2 and p.stderr.count("\n") == 1 and "Traceback" not in p.stderr
  assert p.stderr.startswith(
      "error: config.model.name='my_models:make_two_images_only' is unusable: FixedBatch fails "
      "to initialize (model.init, train=False) at batch 32 (train.batch_size)"), p.stderr
