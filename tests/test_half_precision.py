"""train.half_precision: bfloat16 computation, float32 parameters and BN statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bnlab import config as config_lib
from bnlab.models import networks as models
from bnlab.engine import train
from run_files import final_state


def half_config(idx_dir, name="seed1_mlp", norm="batch"):
  c = config_lib.base_config()
  c.data.source, c.data.dir = "idx", idx_dir
  c.model.name, c.model.norm, c.model.bn_position = name, norm, "before"
  c.optimizer.learning_rate = 0.1
  c.train.batch_size = 32
  c.train.num_epochs = 2
  c.train.half_precision = True
  return c


def test_a_half_precision_run_trains_with_float32_state(idx_dir, tmp_path):
  cfg = half_config(idx_dir)
  summary = train.train_and_evaluate(cfg, str(tmp_path / "half"))
  assert summary["final_step"] == 20 and not summary["diverged"]
  assert summary["test_accuracy"] > 0.5  # chance is 0.1
  _, state = final_state(str(tmp_path / "half"))
  for tree in (state["params"], state["batch_stats"], state["opt_state"]):
    for leaf in jax.tree.leaves(tree):
      assert np.asarray(leaf).dtype in (np.float32, np.int32), leaf.dtype
  assert jax.tree.leaves(state["batch_stats"])


@pytest.mark.parametrize("name,norm", [
    ("seed1_mlp", "batch"), ("seed1_cnn", "batch"), ("seed_cnn", "batch"),
    ("seed1_mlp", "flax_batch"), ("seed1_mlp", "renorm"), ("seed1_mlp", "layer"),
    ("seed1_cnn", "group")])
def test_activations_are_bfloat16_and_statistics_float32(idx_dir, name, norm):
  cfg = half_config(idx_dir, name, norm)
  config_lib.validate(cfg)
  model = models.build_model(cfg.model, dtype=models.compute_dtype(True))
  images = jnp.asarray(np.random.RandomState(0).randint(0, 256, (8, 28, 28)), jnp.uint8)
  variables = model.init(jax.random.key(0), images, train=False)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables["params"]))
  logits, state = model.apply(variables, images, train=True,
                              mutable=["batch_stats", "intermediates"],
                              capture_intermediates=True, rngs={"noise": jax.random.key(1)})
  assert logits.dtype == jnp.float32  # the loss is computed in float32
  stats = jax.tree.leaves(state.get("batch_stats", {}))
  # float32 statistics (renorm's update counter is an int32)
  assert all(x.dtype in (jnp.float32, jnp.int32) for x in stats)
  assert any(x.dtype == jnp.float32 for x in stats) == bool(stats)
  assert bool(stats) == (norm != "layer" and norm != "group")
  preacts = [v[0] for block in state["intermediates"].values() if isinstance(block, dict)
             for k, v in block.items() if k.startswith("preact_")]
  assert preacts and all(p.dtype == jnp.bfloat16 for p in preacts)
  # Every layer's output in the computation dtype.
  for path, leaf in jax.tree_util.tree_flatten_with_path(state["intermediates"])[0]:
    keys = [getattr(k, "key", None) for k in path]
    if "__call__" in keys and keys[0] != "__call__":
      assert leaf.dtype == jnp.bfloat16, (keys, leaf.dtype)


def test_full_precision_is_unchanged_by_default(idx_dir):
  cfg = half_config(idx_dir)
  cfg.train.half_precision = False
  model = models.build_model(cfg.model, dtype=models.compute_dtype(False))
  images = jnp.zeros((4, 28, 28), jnp.uint8)
  variables = model.init(jax.random.key(0), images, train=False)
  _, state = model.apply(variables, images, train=False, capture_intermediates=True,
                         mutable=["intermediates"])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["intermediates"]))
