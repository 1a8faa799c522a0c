"""The `optimizer` section: any optax optimizer, weight decay and its mask, clipping, your own
transformation; checked against references computed by hand (numpy, float64)."""

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import optax
import pytest

from bnlab import config as config_lib
from bnlab import main as main_lib
from bnlab import sweep
from bnlab.engine import optim
from bnlab.engine import train
from run_files import final_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def opt_config(name="sgd", **keys):
  c = config_lib.base_config()
  c.optimizer.name = name
  for key, value in keys.items():
    if key == "kwargs":
      c.optimizer.kwargs.update(value)
    else:
      c.optimizer[key] = value
  return c


def params_and_grads(seed=0):
  rng = np.random.default_rng(seed)
  params = {"dense": {"kernel": rng.normal(size=(3, 2))},
            "bn": {"scale": 1 + 0.1 * rng.normal(size=2), "bias": 0.1 * rng.normal(size=2)}}
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape), params)
  return params, grads


def one_update(c, params, grads):
  """The first update of `c`'s optimizer (float32), as float64 numpy arrays."""
  config_lib.validate(c)
  tx = optim.make_optimizer(c.optimizer, 100)
  p32 = jax.tree.map(lambda x: np.float32(x), params)
  g32 = jax.tree.map(lambda x: np.float32(x), grads)
  updates, _ = tx.update(g32, tx.init(p32), p32)
  return jax.tree.map(lambda u: np.asarray(u, np.float64), updates)


def test_adamw_with_weight_decay_one_step_by_hand(float32_matmuls):
  lr, wd, b1, b2, eps = 0.1, 0.01, 0.8, 0.95, 1e-8
  c = opt_config("adamw", learning_rate=lr, weight_decay=wd,
                 kwargs={"b1": b1, "b2": b2, "eps": eps})
  params, grads = params_and_grads()
  got = one_update(c, params, grads)

  def adamw(p, g, decay):  # Loshchilov & Hutter's AdamW, step 1, in float64
    m, v = (1 - b1) * g, (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1), v / (1 - b2)
    return -lr * (m_hat / (np.sqrt(v_hat) + eps) + (wd * p if decay else 0))

  np.testing.assert_allclose(got["dense"]["kernel"],
                             adamw(params["dense"]["kernel"], grads["dense"]["kernel"], True),
                             rtol=1e-5)
  for name in ("scale", "bias"):  # 1-D: BN's scale and bias are not decayed (the mask)
    np.testing.assert_allclose(got["bn"][name],
                               adamw(params["bn"][name], grads["bn"][name], False), rtol=1e-5)


@pytest.mark.parametrize("mask", ["kernels", "all"])
def test_decay_of_an_optimizer_without_its_own_is_decoupled_and_masked(mask):
  lr, wd, mu = 0.1, 0.05, 0.9
  params, grads = params_and_grads(1)
  zero = jax.tree.map(np.zeros_like, grads)
  c = opt_config("momentum", learning_rate=lr, momentum=mu, weight_decay=wd,
                 weight_decay_mask=mask)
  # Zero gradients: all that moves a parameter is the decay, -lr * wd * p, and only where
  # the mask says; the BN scale is left exactly as it was under "kernels".
  got = one_update(c, params, zero)
  np.testing.assert_allclose(got["dense"]["kernel"], -lr * wd * params["dense"]["kernel"],
                             rtol=1e-6)
  if mask == "kernels":
    assert not np.any(got["bn"]["scale"]) and not np.any(got["bn"]["bias"])
  else:
    np.testing.assert_allclose(got["bn"]["scale"], -lr * wd * params["bn"]["scale"], rtol=1e-6)
  # Decoupled: the decay does not pass through the momentum buffer (step 1: trace = g).
  got = one_update(c, params, grads)
  np.testing.assert_allclose(got["dense"]["kernel"], -lr * (grads["dense"]["kernel"]
                                                           + wd * params["dense"]["kernel"]),
                             rtol=1e-5)


def test_clipping_by_global_norm_by_hand():
  lr, clip = 0.5, 0.3
  params, grads = params_and_grads(2)
  norm = np.sqrt(sum(np.sum(g * g) for g in jax.tree.leaves(grads)))
  assert norm > clip
  got = one_update(opt_config("sgd", learning_rate=lr, clip_global_norm=clip), params, grads)
  want = jax.tree.map(lambda g: -lr * g * clip / norm, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), got, want)
  small = jax.tree.map(lambda g: g * 0.1 * clip / norm, grads)  # under the bound: untouched
  got = one_update(opt_config("sgd", learning_rate=lr, clip_global_norm=clip), params, small)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, -lr * b, rtol=1e-5), got, small)


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
def test_the_default_path_is_the_transformation_bnlab_always_built(name):
  """Without the new keys, the state (what checkpoints hold) and the updates are those of
  bnlab's optimizer before them, bit for bit: old runs resume bit-identically."""
  c = opt_config(name, learning_rate=0.1)

  def before(learning_rate, **overrides):  # bnlab.engine.optim.make_optimizer's build, before
    if name == "sgd":
      return optax.sgd(learning_rate)
    if name == "momentum":
      return optax.sgd(learning_rate, momentum=overrides.get("momentum", 0.9), nesterov=False)
    return optax.adam(learning_rate)

  old = optax.inject_hyperparams(before)(learning_rate=0.1)
  new = optim.make_optimizer(c.optimizer, 100)
  params, grads = params_and_grads(3)
  p32 = jax.tree.map(np.float32, params)
  g32 = jax.tree.map(np.float32, grads)
  s_old, s_new = old.init(p32), new.init(p32)
  assert jax.tree.structure(s_old) == jax.tree.structure(s_new)
  for _ in range(2):
    (u_old, s_old), (u_new, s_new) = old.update(g32, s_old, p32), new.update(g32, s_new, p32)
    jax.tree.map(np.testing.assert_array_equal, (u_old, s_old), (u_new, s_new))


@pytest.mark.parametrize("name,kwargs", [("lamb", {}), ("lion", {"b1": 0.95}),
                                         ("rmsprop", {"decay": 0.95}), ("nadam", {}),
                                         ("adafactor", {})])
def test_any_optax_optimizer_by_name_matches_optax_itself(name, kwargs):
  params, grads = params_and_grads(4)
  c = opt_config(name, learning_rate=0.01, kwargs=kwargs)
  got = one_update(c, params, grads)
  fn = getattr(optax, name)
  own = {"weight_decay": 0.0} if name in ("lamb", "lion") else {}
  own = {"weight_decay_rate": 0.0} if name == "adafactor" else own
  tx = fn(0.01, **kwargs, **own)
  p32 = jax.tree.map(np.float32, params)
  want, _ = tx.update(jax.tree.map(np.float32, grads), tx.init(p32), p32)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)


@pytest.mark.parametrize("keys,needle", [
    ({"name": "adamw", "kwargs": {"bogus": 1}},
     "config.optimizer.kwargs has ['bogus'], which optax.adamw does not take; it takes ['b1', "),
    ({"name": "adamw", "kwargs": {"weight_decay": 0.1}},
     "config.optimizer.kwargs.weight_decay is set by config.optimizer.weight_decay"),
    ({"name": "sgd", "kwargs": {"learning_rate": 0.1}},
     "config.optimizer.kwargs.learning_rate is set by config.optimizer.learning_rate"),
    ({"name": "momentum", "kwargs": {"nesterov": True}},
     "config.optimizer.kwargs.nesterov is set by config.optimizer.nesterov"),
    ({"name": "adamx"}, "config.optimizer.name='adamx' is invalid (did you mean 'adamax'?)"),
    ({"name": "softmax_cross_entropy"}, "an optax optimizer's name"),
    ({"name": "lbfgs"}, "an optimizer that needs the loss, such as lbfgs, is not supported"),
    ({"name": "adamw", "kwargs": {"b1": "high"}}, "config.optimizer.name='adamw' is unusable"),
    ({"name": "adamw", "weight_decay": -1.0}, "config.optimizer.weight_decay=-1.0 is invalid"),
    ({"name": "adamw", "weight_decay_mask": "bn"}, "config.optimizer.weight_decay_mask='bn'"),
    ({"name": "sgd", "clip_global_norm": -1.0}, "config.optimizer.clip_global_norm=-1.0"),
    ({"name": "no_such_module_xyz:make"}, "cannot be imported"),
    ({"name": "optax:"}, "expected 'package.module:function'"),
])
def test_a_bad_optimizer_is_one_config_error_naming_the_key(keys, needle):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(opt_config(**keys))
  assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


USER_OPTIMIZERS = textwrap.dedent('''
    import optax

    def adam_direction(opt):  # a direction: bnlab scales it by -learning_rate (its schedule)
      return optax.scale_by_adam(b1=opt.kwargs.get("b1", 0.9))

    def whole(opt, learning_rate):  # takes the learning rate: the whole update is its own
      return optax.sgd(learning_rate, momentum=opt.kwargs.mom)

    def not_a_transformation(opt):
      return 3

    def raises(opt):
      return opt.kwargs.missing

    NOT_CALLABLE = 3
''')


@pytest.fixture
def user_optimizers(tmp_path, monkeypatch):
  (tmp_path / "bnlab_test_optimizers.py").write_text(USER_OPTIMIZERS)
  monkeypatch.syspath_prepend(str(tmp_path))
  yield "bnlab_test_optimizers"
  sys.modules.pop("bnlab_test_optimizers", None)


def test_a_users_transformation_by_name(user_optimizers):
  params, grads = params_and_grads(5)
  m = user_optimizers
  got = one_update(opt_config(f"{m}:adam_direction", learning_rate=0.01,
                              kwargs={"b1": 0.5}), params, grads)
  tx = optax.adam(0.01, b1=0.5)
  p32 = jax.tree.map(np.float32, params)
  want, _ = tx.update(jax.tree.map(np.float32, grads), tx.init(p32), p32)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
  # Its kwargs are free-form (its own), and it gets bnlab's learning rate when it asks.
  got = one_update(opt_config(f"{m}:whole", learning_rate=0.2, kwargs={"mom": 0.5}),
                   params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, -0.2 * b, rtol=1e-6), got, grads)


@pytest.mark.parametrize("target,needle", [
    ("not_a_transformation", "returned int, not an optax.GradientTransformation"),
    ("raises", "(config.optimizer) raised AttributeError"),
    ("NOT_CALLABLE", "is a int, not a function"),
    ("nope", "has no 'nope'"),
])
def test_a_bad_user_transformation_is_one_line(user_optimizers, target, needle):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(opt_config(f"{user_optimizers}:{target}"))
  message = str(e.value)
  assert message.startswith(f"config.optimizer.name='{user_optimizers}:{target}'"), message
  assert needle in message and "\n" not in message, message


def test_kwargs_from_the_command_line_and_a_sweep():
  argv = ["prog", "--config=x.py", "--config.optimizer.kwargs.b2=0.95",
          "--config.optimizer.kwargs.nesterov=true", "--config.model.options.width=16",
          "--config.optimizer.name=adamw"]
  rest, free = main_lib.split_free_form(argv)
  assert rest == ["prog", "--config=x.py", "--config.optimizer.name=adamw"]
  c = config_lib.base_config()
  c.lock()
  main_lib.set_free_form(c, free)
  assert c.optimizer.kwargs.to_dict() == {"b2": 0.95, "nesterov": True}
  assert c.model.options.width == 16
  members = sweep.product(sweep.axis("optimizer.kwargs.b2", [0.99, 0.95]))
  cfgs = sweep.resolve_members(opt_config("adamw"), members)
  assert [m.cfg.optimizer.kwargs.b2 for m in cfgs] == [0.99, 0.95]
  with pytest.raises(config_lib.ConfigError, match="not a key"):
    sweep.apply_overrides(opt_config(), {"optimizer.kwarg.b2": 0.9})


def test_validating_starts_no_jax_backend():
  """Validation runs before `backend.configure_run` sets XLA's flags: it traces the
  optimizer (jax.eval_shape) without starting JAX's backend."""
  code = ("from bnlab import config\n"
          "from bnlab.engine import backend\n"
          "c = config.base_config()\n"
          "c.optimizer.name, c.optimizer.weight_decay = 'adamw', 0.1\n"
          "c.optimizer.clip_global_norm = 1.0\n"
          "config.validate(c)\n"
          "print(backend.backend_started())\n")
  p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                     timeout=120)
  assert p.stdout.split() == ["False"], p.stdout + p.stderr[-2000:]


def test_adamw_with_decay_and_clipping_trains_and_resumes_bit_identical(idx_dir, tmp_path):
  c = config_lib.base_config()
  c.data.source, c.data.dir = "idx", idx_dir
  c.model.name = "seed1_mlp"
  c.optimizer.name, c.optimizer.learning_rate = "adamw", 0.01
  c.optimizer.weight_decay, c.optimizer.clip_global_norm = 0.1, 1.0
  c.optimizer.kwargs.b2 = 0.99
  c.train.batch_size, c.train.num_epochs, c.train.final_train_eval = 32, 2, False
  c.train.keep_checkpoints, c.train.checkpoint_min_interval_secs = 10, 0
  full = str(tmp_path / "full")
  summary = train.train_and_evaluate(c, full)
  assert summary["final_step"] == 20 and summary["test_accuracy"] > 0.3
  part = str(tmp_path / "part")
  shutil.copytree(full, part)
  os.remove(os.path.join(part, "summary.json"))
  shutil.rmtree(os.path.join(part, "checkpoints", "20"))
  assert train.train_and_evaluate(c, part)["test_accuracy"] == summary["test_accuracy"]
  jax.tree.map(np.testing.assert_array_equal, final_state(full)[1], final_state(part)[1])


def test_grouped_members_each_decay_with_their_own_learning_rate(idx_dir, tmp_path):
  """Members of a group share one optimizer, each its learning rate in its state: the decay
  (-lr * wd * p) and the momentum override use the member's own, as a solo run does."""
  c = config_lib.base_config()
  c.data.source, c.data.dir = "idx", idx_dir
  c.model.name = "seed1_mlp"
  c.optimizer.name, c.optimizer.weight_decay, c.optimizer.clip_global_norm = "momentum", 0.1, 2.0
  c.train.batch_size, c.train.num_epochs, c.train.final_train_eval = 32, 1, False
  members = sweep.product(sweep.axis("optimizer.learning_rate", [0.05, 0.2]),
                          sweep.axis("optimizer.momentum", [0.5, 0.9]))
  assert [len(g) for g in sweep.group_members(sweep.resolve_members(c, members))] == [4]
  rows = sweep.run_sweep(c, members, str(tmp_path / "sw"))
  assert [r["status"] for r in rows] == ["done"] * 4
  solo = str(tmp_path / "solo")
  train.train_and_evaluate(sweep.apply_overrides(c, members[3]), solo)
  grouped = os.path.join(str(tmp_path / "sw"), rows[3]["name"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               final_state(grouped)[1]["params"], final_state(solo)[1]["params"])


def test_piecewise_schedule_by_hand():
  """He et al.'s ResNet recipe: lr 0.1, / 10 at 32k and again at 48k (`configs/resnet20.py`);
  the command line's tuple is checked in tests/test_main.py."""
  c = config_lib.base_config()
  c.optimizer.learning_rate, c.optimizer.schedule = 0.1, "piecewise"
  c.optimizer.decay_boundaries, c.optimizer.decay_factor = (32_000, 48_000), 0.1
  config_lib.validate(c)
  lr = optim.learning_rate_schedule(c.optimizer, 64_000)
  expected = {0: 0.1, 31_999: 0.1, 32_000: 0.01, 47_999: 0.01, 48_000: 0.001, 63_999: 0.001}
  for step, value in expected.items():
    assert float(lr(step)) == pytest.approx(value, rel=1e-6), step
