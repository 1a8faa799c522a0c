"""ResNet-20 (bnlab.models.resnet): He et al. 2016's CIFAR network, counted and checked by hand.

Shapes and structure are traced (`jax.eval_shape`: nothing compiled); the numeric checks
use small ResNets (fewer, narrower blocks) so the file stays fast on a 2-core CPU.
"""

import os
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
try:  # jax >= 0.9 moved it to the top level
  from jax import enable_x64
except ImportError:
  from jax.experimental import enable_x64

from bnlab import config as config_lib
from bnlab.engine import optim
from bnlab.engine import train
from bnlab.errors import ConfigError
from bnlab.models import networks
from bnlab.models import parts
from bnlab.models import resnet
from run_files import read_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Unoptimized backend codegen: compiles several times faster, same numerics here.
_jit = partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def resnet_cfg(**model):
  c = config_lib.base_config()
  c.model.name = "resnet20"
  c.model.bn_position = "before"
  c.model.kernel_init = "he_normal_fan_out"
  for key, value in model.items():
    if key in ("shortcut", "zero_init_last_scale"):
      c.model.resnet[key] = value
    else:
      c.model[key] = value
  return c


def shapes(cfg, images_shape=(2, 32, 32, 3), mutable=False, num_classes=10):
  """The model and its variables' shapes; `num_classes`: the data's, in a run."""
  model = networks.build_model(cfg.model, num_classes=num_classes)
  images = jax.ShapeDtypeStruct(images_shape, jnp.uint8)
  extra = {"mutable": True} if mutable else {}  # True: intermediates too
  return model, jax.eval_shape(lambda x: model.init(
      networks.init_rngs(jax.random.key(0)), x, train=False, **extra), images)


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def hand_count(in_channels, shortcut, widths=(16, 32, 64), n=3, classes=10, norm=True):
  """The paper's architecture counted layer by layer: 3x3 convs (a bias only without a
  norm), a norm's scale and shift per channel, shortcut B's 1x1 projection + norm where
  the channels change, and the dense layer to the classes."""
  def conv(k, cin, cout):
    return k * k * cin * cout + (0 if norm else cout)

  def bn(c):
    return 2 * c if norm else 0

  total, cin = conv(3, in_channels, widths[0]) + bn(widths[0]), widths[0]
  for width in widths:
    for _ in range(n):
      total += conv(3, cin, width) + bn(width) + conv(3, width, width) + bn(width)
      if shortcut == "B" and cin != width:
        total += conv(1, cin, width) + bn(width)
      cin = width
  return total + widths[-1] * classes + classes


@pytest.mark.parametrize("shortcut,channels,expected", [
    ("A", 3, 269_722), ("B", 3, 272_474), ("A", 1, 269_434), ("B", 1, 272_186)])
def test_parameter_count_is_the_hand_counted_one(shortcut, channels, expected):
  assert hand_count(channels, shortcut) == expected  # 0.27M, the paper's table 6
  _, variables = shapes(resnet_cfg(shortcut=shortcut), (2, 32, 32, channels))
  assert count(variables["params"]) == expected


def test_parameter_count_without_norm_and_with_100_classes():
  _, variables = shapes(resnet_cfg(norm="none"), num_classes=100)
  assert count(variables["params"]) == hand_count(3, "A", classes=100, norm=False)
  assert "batch_stats" not in variables
  _, variables = shapes(resnet_cfg(norm="none", shortcut="B"))
  assert count(variables["params"]) == hand_count(3, "B", norm=False)


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_twenty_weighted_layers_with_strides_and_no_bias_before_bn(shortcut):
  _, variables = shapes(resnet_cfg(shortcut=shortcut), (2, 28, 28), mutable=True)
  params = jax.tree.map(lambda a: a.shape, variables["params"])
  assert sorted(params) == sorted(
      ["stem", "logits"] + [f"block_{s}_{b}" for s in range(3) for b in range(3)])
  kernels = [("stem", "Conv_0")] + [(f"block_{s}_{b}", f"Conv_{c}")
                                    for s in range(3) for b in range(3) for c in range(2)]
  assert len(kernels) + 1 == 20  # 19 3x3 convs and the dense layer: 6n+2, n=3
  cin = 1
  for (block, conv), width in zip(kernels, [16] * 7 + [32] * 6 + [64] * 6):
    assert params[block][conv] == {"kernel": (3, 3, cin, width)}, (block, conv)  # no bias
    assert params[block][f"BatchNorm_{conv[-1]}"] == {"scale": (width,), "bias": (width,)}
    cin = width
  assert params["logits"] == {"kernel": (64, 10), "bias": (10,)}
  projections = {b for b in params if "Conv_2" in params[b]}
  assert projections == ({"block_1_0", "block_2_0"} if shortcut == "B" else set())
  if shortcut == "B":
    assert params["block_1_0"]["Conv_2"] == {"kernel": (1, 1, 16, 32)}
    assert params["block_2_0"]["Conv_2"] == {"kernel": (1, 1, 32, 64)}
  # Stride 2 at the first block of stages 2 and 3: 28x28 -> 14x14 -> 7x7.
  inter = variables["intermediates"]
  assert inter["stem"]["preact_0"][0].shape == (2, 28, 28, 16)
  assert inter["block_0_2"]["preact_6"][0].shape == (2, 28, 28, 16)
  assert inter["block_1_0"]["preact_7"][0].shape == (2, 14, 14, 32)
  assert inter["block_2_2"]["preact_18"][0].shape == (2, 7, 7, 64)
  assert set(variables["batch_stats"]) == set(params) - {"logits"}
  assert networks.sown_names(networks.build_model(resnet_cfg().model)) == tuple(sorted(
      [f"preact_{i}" for i in range(19)] + [f"xhat_{i}" for i in range(19)]))


@pytest.mark.parametrize("images_shape", [(3, 28, 28), (3, 28, 28, 1), (3, 32, 32, 3),
                                          (3, 17, 23, 3)])
def test_output_shape_for_grey_and_colour_inputs(images_shape):
  model, variables = shapes(resnet_cfg(), images_shape, num_classes=100)
  images = jax.ShapeDtypeStruct(images_shape, jnp.uint8)
  for train_mode in (False, True):
    out = jax.eval_shape(lambda v, x, t=train_mode: model.apply(
        v, x, train=t, mutable=["batch_stats"])[0], variables, images)
    assert out.shape == (3, 100) and out.dtype == jnp.float32


def test_batch_stats_with_batch_norm_only():
  """Every norm builds (traced) in a one-block-per-stage ResNet; BN's statistics collection
  exists exactly with a batch-statistics norm, and no conv has a bias where a norm follows."""
  for norm in networks.NORMS:
    model = resnet.ResNet(blocks_per_stage=1, norm=networks.NormSpec(norm))
    x = jax.ShapeDtypeStruct((16, 12, 12, 3), jnp.uint8)
    v = jax.eval_shape(lambda x: model.init(networks.init_rngs(jax.random.key(0)), x), x)
    assert ("batch_stats" in v) == (norm in networks.BATCH_STAT_NORMS), norm
    assert ("bias" in v["params"]["stem"]["Conv_0"]) == (norm == "none"), norm
    out = jax.eval_shape(lambda v, x: model.apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"noise": jax.random.key(1)})[0], v, x)
    assert out.shape == (16, 10), norm
  _, v = shapes(resnet_cfg(norm="batch"))
  assert count(v["batch_stats"]) == 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)  # mean, var per BN
  _, v = shapes(resnet_cfg(norm="none"))
  assert "batch_stats" not in v
  cfg = resnet_cfg(shortcut="B")
  cfg.model.bn.bias_before = True  # the redundant bias kept before every norm
  _, v = shapes(cfg)
  biases = 16 + 6 * 16 + 6 * 32 + 6 * 64 + 32 + 64  # stem, block convs, projections
  assert count(v["params"]) == hand_count(3, "B") + biases


def _small(norm="batch", **kw):
  return resnet.ResNet(stage_widths=(4, 8), blocks_per_stage=1,
                       norm=networks.NormSpec(norm), conv_implementation="xla", **kw)


def test_train_and_eval_modes_differ_with_bn_only():
  x = jax.random.randint(jax.random.key(1), (8, 12, 12, 3), 0, 256).astype(jnp.uint8)
  for norm in ("batch", "none"):
    model = _small(norm)

    @_jit
    def both(x, model=model):
      v = model.init(jax.random.key(0), x)
      train_out, updates = model.apply(v, x, train=True, mutable=["batch_stats"])
      return v, train_out, model.apply(v, x, train=False), updates

    v, train_out, eval_out, updates = both(x)
    if norm == "batch":
      assert float(jnp.max(jnp.abs(train_out - eval_out))) > 1e-2
      moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                           updates["batch_stats"], v["batch_stats"])
      assert min(jax.tree.leaves(moved)) > 0  # every running statistic updated
    else:
      np.testing.assert_array_equal(train_out, eval_out)
      assert not updates


def test_he_fan_out_init_and_zero_init_of_the_last_scale():
  init = parts.kernel_initializer("he_normal_fan_out")
  kernel = np.asarray(init(jax.random.key(0), (3, 3, 64, 64)))  # stage 3's 3x3 conv
  expected_std = np.sqrt(2.0 / (3 * 3 * 64))  # kaiming normal, fan_out = 3*3*64
  assert abs(kernel.std() / expected_std - 1) < 0.03 and abs(kernel.mean()) < 0.002
  assert np.abs(kernel).max() > 3.5 * expected_std  # untruncated
  model = _small(zero_init_last_scale=True, kernel_init="he_normal_fan_out")
  params = _jit(model.init)(jax.random.key(0), jnp.zeros((2, 8, 8, 3), jnp.uint8))["params"]
  conv = np.asarray(params["block_1_0"]["Conv_1"]["kernel"])  # 3x3, 8 -> 8: fan_out 72
  assert abs(conv.std() / np.sqrt(2.0 / 72) - 1) < 0.15  # the model's convs use it
  for block in ("block_0_0", "block_1_0"):
    np.testing.assert_array_equal(params[block]["BatchNorm_1"]["scale"], 0)
    np.testing.assert_array_equal(params[block]["BatchNorm_0"]["scale"], 1)
  np.testing.assert_array_equal(params["stem"]["BatchNorm_0"]["scale"], 1)
  assert resnet.ResNet().zero_init_last_scale is False  # off by default, as in the paper


def _numpy_shortcut_a(x, features, stride):
  """Loop by loop: output pixel (i, j) is input pixel (stride*i, stride*j); channels beyond
  the input's are zeros."""
  n, h, w, c = x.shape
  oh, ow = -(-h // stride), -(-w // stride)
  out = np.zeros((n, oh, ow, features), x.dtype)
  for i in range(oh):
    for j in range(ow):
      out[:, i, j, :c] = x[:, stride * i, stride * j, :]
  return out


@pytest.mark.parametrize("shape,features", [((2, 7, 7, 3), 8), ((2, 8, 6, 16), 32)])
def test_shortcut_a_subsamples_and_zero_pads_channels(shape, features):
  with enable_x64():
    x = np.random.default_rng(0).standard_normal(shape)
    got = np.asarray(resnet.shortcut_a(jnp.asarray(x), features, 2))
    assert got.dtype == np.float64
    np.testing.assert_array_equal(got, _numpy_shortcut_a(x, features, 2))


def test_block_adds_shortcut_a_on_the_strided_convs_grid():
  """A stride-2 block without norm whose convs pass their input through (centre tap =
  identity) computes relu(relu(s) + s), s = the numpy shortcut of x: shortcut and the
  residual branch line up pixel for pixel and channel for channel (float64)."""
  cin, features = 3, 8
  block = resnet.BasicBlock(norm=networks.NormSpec("none"), kernel_init=jax.nn.initializers.zeros,
                            bias_before_norm=False, conv_implementation="xla", dtype=None,
                            features=features, stride=2)
  with enable_x64():
    x = np.random.default_rng(1).standard_normal((2, 7, 9, cin))
    k0 = np.zeros((3, 3, cin, features))
    k0[1, 1] = np.eye(cin, features)
    k1 = np.zeros((3, 3, features, features))
    k1[1, 1] = np.eye(features)
    params = {"Conv_0": {"kernel": jnp.asarray(k0), "bias": jnp.zeros(features)},
              "Conv_1": {"kernel": jnp.asarray(k1), "bias": jnp.zeros(features)}}
    got = np.asarray(block.apply({"params": params}, jnp.asarray(x), True))
    s = _numpy_shortcut_a(x, features, 2)
    np.testing.assert_allclose(got, np.maximum(np.maximum(s, 0) + s, 0), rtol=0, atol=1e-15)
    # Zeroed convs: the block is its shortcut, then the activation.
    zero = jax.tree.map(jnp.zeros_like, params)
    np.testing.assert_array_equal(
        np.asarray(block.apply({"params": zero}, jnp.asarray(x), True)), np.maximum(s, 0))


def test_config_checks():
  config_lib.validate(resnet_cfg())
  with pytest.raises(ConfigError, match="model.bn_position"):
    config_lib.validate(resnet_cfg(bn_position="after"))
  with pytest.raises(ConfigError, match="model.resnet.shortcut"):
    config_lib.validate(resnet_cfg(shortcut="C"))
  with pytest.raises(ConfigError, match="model.widths"):
    config_lib.validate(resnet_cfg(widths=(32, 16, 64)))
  config_lib.validate(resnet_cfg(widths=(32, 16, 64), shortcut="B"))
  with pytest.raises(ConfigError, match="model.widths"):
    config_lib.validate(resnet_cfg(widths=(16, 32)))
  with pytest.raises(ConfigError, match="model.bn.num_groups"):
    cfg = resnet_cfg(norm="group")
    cfg.model.bn.num_groups = 3
    config_lib.validate(cfg)


def test_config_file_is_the_papers_recipe():
  sys.path.insert(0, os.path.join(ROOT, "configs"))
  try:
    import resnet20 as config_file  # pylint: disable=import-outside-toplevel
  finally:
    sys.path.pop(0)
  c = config_file.get_config()
  config_lib.validate(c)
  assert (c.model.name, c.model.norm, c.model.resnet.shortcut) == ("resnet20", "batch", "A")
  assert (c.optimizer.name, c.optimizer.momentum, c.optimizer.learning_rate) == (
      "momentum", 0.9, 0.1)
  assert c.train.batch_size == 128 and c.train.num_steps == 64_000
  lr = optim.learning_rate_schedule(c.optimizer, c.train.num_steps)  # / 10 at 32k and 48k
  assert [round(float(lr(s)), 6) for s in (0, 32_000, 48_000)] == [0.1, 0.01, 0.001]
  assert c.optimizer.weight_decay_mask == "kernels" and c.optimizer.weight_decay > 0
  assert config_file.get_config("nobn").model.norm == "none"


def test_a_few_steps_reduce_the_loss(idx_dir, tmp_path):
  c = resnet_cfg(widths=(8, 16, 16), conv_implementation="xla")
  c.data.source, c.data.dir = "idx", idx_dir
  c.optimizer.name, c.optimizer.learning_rate = "momentum", 0.05
  c.optimizer.weight_decay = 1e-4
  c.train.batch_size = 32
  c.train.num_steps = 30
  c.train.log_every_steps = 10
  c.train.eval_every_steps = 30
  c.train.eval_at_start = False
  c.train.final_train_eval = False
  wd = str(tmp_path / "run")
  summary = train.train_and_evaluate(c, wd)
  losses = [r["train_loss"] for r in read_jsonl(os.path.join(wd, "metrics.jsonl"))
            if "train_loss" in r]
  assert len(losses) == 3 and losses[-1] < 0.7 * losses[0], losses
  assert summary["diverged"] is False
