"""NNX models in the engine: the dropout and noise streams, idiomatic .train()/.eval() models,
and `bnlab.nnx` as a module."""

import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnlab
from bnlab import config as config_lib
from bnlab.engine import train
from bnlab.models import networks as models
from run_files import final_state

NNX_MODULE = textwrap.dedent('''
    import jax.numpy as jnp
    from flax import nnx

    import bnlab


    class DropoutNet(nnx.Module):
      """Reads both streams: nnx.Dropout ('dropout') and bnlab's NoisyBatchNorm ('noise')."""

      def __init__(self, *, rngs):
        self.hidden = nnx.Linear(784, 32, use_bias=False, rngs=rngs)
        self.bn = bnlab.nnx.NoisyBatchNorm(32, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(32, 10, rngs=rngs)

      def __call__(self, x, train: bool):
        x = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
        x = nnx.relu(self.bn(self.hidden(x), use_running_average=not train))
        return self.out(self.drop(x, deterministic=not train))


    class Idiomatic(nnx.Module):
      """No `train` argument: its mode is set with .train() / .eval()."""

      def __init__(self, *, rngs):
        self.hidden = nnx.Linear(784, 32, use_bias=False, rngs=rngs)
        self.bn = bnlab.nnx.BatchNorm(32, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.out = nnx.Linear(32, 10, rngs=rngs)

      def __call__(self, x):
        x = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
        return self.out(self.drop(nnx.relu(self.bn(self.hidden(x)))))


    def make_idiomatic():
      return nnx.bridge.to_linen(Idiomatic)
''')


@pytest.fixture
def nnx_module(tmp_path, monkeypatch):
  (tmp_path / "bnlab_test_nnx_models.py").write_text(NNX_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  yield "bnlab_test_nnx_models"
  sys.modules.pop("bnlab_test_nnx_models", None)


def nnx_config(idx_dir, name, seed=0):
  c = config_lib.base_config()
  c.seed = seed
  c.data.source, c.data.dir = "idx", idx_dir
  c.model.name = name
  c.optimizer.learning_rate = 0.1
  c.train.batch_size, c.train.num_epochs = 32, 1
  c.train.final_train_eval = False
  return c


def images(n=16):
  return jax.random.randint(jax.random.key(1), (n, 28, 28), 0, 256).astype(jnp.uint8)


@pytest.mark.parametrize("target", ["DropoutNet", "Idiomatic", "make_idiomatic"])
def test_dropout_per_step_from_the_seed_and_off_in_eval_mode(nnx_module, target):
  cfg = nnx_config("", f"{nnx_module}:{target}").model
  model = models.build_model(cfg)
  x = images()
  variables = model.init(models.init_rngs(jax.random.key(0)), x, train=False)
  again = model.init(models.init_rngs(jax.random.key(0)), x, train=False)
  jax.tree.map(np.testing.assert_array_equal, variables, again)  # per seed

  def train_mode(step, seed=0):
    rngs = models.train_rngs(jax.random.key_data(jax.random.key(seed)), jnp.int32(step))
    return model.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)[0]

  np.testing.assert_array_equal(train_mode(3), train_mode(3))  # a step's keys: reproducible
  assert np.any(train_mode(3) != train_mode(4))  # each step its own dropout mask
  assert np.any(train_mode(3) != train_mode(3, seed=1))  # and each seed
  # Eval mode: no dropout (nor noise), whatever keys are around.
  rngs = models.train_rngs(jax.random.key_data(jax.random.key(0)), jnp.int32(3))
  plain = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(plain, model.apply(variables, x, train=False, rngs=rngs))
  if target != "DropoutNet":  # eval mode is the network without dropout, by hand
    p, s = variables["params"], variables["batch_stats"]["bn"]
    h = x.reshape(len(x), -1).astype(jnp.float32) / 255.0 @ p["hidden"]["kernel"]
    h = (h - s["mean"]) / jnp.sqrt(s["var"] + 1e-5) * p["bn"]["scale"] + p["bn"]["bias"]
    want = jax.nn.relu(h) @ p["out"]["kernel"] + p["out"]["bias"]
    np.testing.assert_allclose(plain, want, rtol=1e-5, atol=1e-5)


def test_an_nnx_model_with_dropout_and_noisy_bn_trains_reproducibly(idx_dir, tmp_path,
                                                                    nnx_module):
  cfg = nnx_config(idx_dir, f"{nnx_module}:DropoutNet")
  config_lib.validate(cfg)  # the model check traces init and a train step with the streams
  first = train.train_and_evaluate(cfg, str(tmp_path / "a"))
  assert first["final_step"] == 10 and first["test_accuracy"] > 0.3
  second = train.train_and_evaluate(cfg, str(tmp_path / "b"))
  assert second["test_accuracy"] == first["test_accuracy"]
  jax.tree.map(np.testing.assert_array_equal, final_state(str(tmp_path / "a"))[1],
               final_state(str(tmp_path / "b"))[1])


@pytest.mark.parametrize("target", ["Idiomatic", "make_idiomatic"])
def test_an_idiomatic_nnx_model_trains(idx_dir, tmp_path, nnx_module, target):
  cfg = nnx_config(idx_dir, f"{nnx_module}:{target}")
  config_lib.validate(cfg)
  summary = train.train_and_evaluate(cfg, str(tmp_path / target))
  assert summary["final_step"] == 10 and summary["test_accuracy"] > 0.3
  _, state = final_state(str(tmp_path / target))
  assert np.any(np.asarray(state["batch_stats"]["bn"]["mean"]) != 0)  # train mode ran


def test_init_streams_leave_the_parameters_of_every_model_as_before():
  """`init_rngs` adds streams, and `params` stays the init key: the built-in (linen) models,
  and any model not reading the new streams, start from the same parameters as before."""
  cfg = config_lib.base_config().model
  cfg.name = "seed1_mlp"
  model = models.build_model(cfg)
  key = jax.random.key(7)
  before = model.init(key, images(2), train=False)
  jax.tree.map(np.testing.assert_array_equal, before,
               model.init(models.init_rngs(key), images(2), train=False))


def test_bnlab_nnx_is_a_module():
  from bnlab.nnx import BatchNorm, NoisyBatchNorm  # pylint: disable=g-import-not-at-top
  import bnlab.nnx as bnlab_nnx  # pylint: disable=g-import-not-at-top
  from bnlab.layers import nnx as layers_nnx  # pylint: disable=g-import-not-at-top
  assert bnlab.nnx is bnlab_nnx and bnlab_nnx.__name__ == "bnlab.nnx"
  assert BatchNorm is bnlab.nnx.BatchNorm is layers_nnx.BatchNorm
  assert NoisyBatchNorm is layers_nnx.NoisyBatchNorm
  for name in dir(layers_nnx):  # whatever the layers module defines, reached here too
    if not name.startswith("__"):
      assert getattr(bnlab_nnx, name) is getattr(layers_nnx, name)
  with pytest.raises(AttributeError, match="bnlab.nnx"):
    bnlab_nnx.NoSuchLayer  # pylint: disable=pointless-statement
