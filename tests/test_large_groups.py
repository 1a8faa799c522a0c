"""Groups larger than the device's memory: chunks by memory or `max_group_size`, resumable."""

import json
import os

import jax
import pytest

from bnlab import config as config_lib
from bnlab.engine import members as members_lib
from bnlab import sweep
from bnlab.sweep import runner as sweep_runner
from test_sweep import tiny_base


def test_chunks_are_the_fewest_near_equal_ones_in_order():
  assert members_lib.chunks(list(range(5)), 2) == [[0], [1, 2], [3, 4]]
  assert members_lib.chunks(list(range(6)), 3) == [[0, 1, 2], [3, 4, 5]]
  assert members_lib.chunks(list(range(4)), 10) == [[0, 1, 2, 3]]
  assert members_lib.chunks(list(range(240)), 100) == [
      list(range(80)), list(range(80, 160)), list(range(160, 240))]


def paper_cfg():
  c = config_lib.base_config()
  c.model.name, c.model.norm, c.train.batch_size = "paper_mlp", "batch", 60
  return c


def test_member_bytes_is_what_a_member_adds_to_the_compiled_step():
  cfg = paper_cfg()
  per_member = members_lib.member_bytes(cfg)
  # Parameters, their new values and gradients (~0.4 MB each) and a shuffle of 60,000.
  assert 0.8e6 < per_member < 4e6
  shared = (60_000 + 10_000) * (28 * 28 + 4)
  assert members_lib.group_capacity(cfg, budget=shared + 10 * per_member) == 10
  assert members_lib.group_capacity(cfg, budget=shared) == 1  # one member runs anyway
  assert members_lib.memory_budget() > 0


@pytest.mark.parametrize("model,batch", [("paper_mlp", 60), ("seed_cnn", 32)])
def test_member_bytes_bound_is_above_the_compiled_estimate(model, batch):
  cfg = paper_cfg()
  cfg.model.name, cfg.train.batch_size = model, batch
  compiled, bound = members_lib.member_bytes(cfg), members_lib.member_bytes_bound(cfg)
  assert compiled < bound < 20 * compiled


def test_capacity_skips_the_compiled_estimate_when_the_bound_fits(monkeypatch):
  cfg = paper_cfg()
  shared = (60_000 + 10_000) * (28 * 28 + 4)
  bound = members_lib.member_bytes_bound(cfg)

  def compiled(_):
    raise AssertionError("compiled the estimate")

  with monkeypatch.context() as m:
    m.setattr(members_lib, "member_bytes", compiled)
    assert members_lib.group_capacity(cfg, budget=shared + 24 * bound, wanted=24) == 24
  # The bound does not fit 24: the compiled estimate decides.
  budget = shared + 24 * members_lib.member_bytes(cfg)
  assert members_lib.group_capacity(cfg, budget=budget, wanted=24) == 24
  assert members_lib.group_capacity(cfg, budget=budget, wanted=48) == 24


def test_groups_larger_than_memory_train_in_chunks(monkeypatch):
  members = sweep.resolve_members(paper_cfg(), sweep.product(
      sweep.axis("optimizer.learning_rate", [0.1, 0.2, 0.5]),
      sweep.axis("model.bn.momentum", [0.9, 0.99]), sweep.seeds(4)))
  assert [len(g) for g in sweep.group_members(members)] == [24]
  assert [len(g) for g in sweep.group_members(members, max_group_size=10)] == [8, 8, 8]
  # A device whose memory holds 7 members.
  shared = (60_000 + 10_000) * (28 * 28 + 4)
  budget = shared + 7 * members_lib.member_bytes(members[0].cfg)
  monkeypatch.setattr(members_lib, "memory_budget", lambda device=None: budget)
  groups = sweep.group_members(members)
  assert [len(g) for g in groups] == [6, 6, 6, 6]
  assert [m.name for g in groups for m in g] == [m.name for m in members]  # sweep order
  # The same chunks (directories) every time.
  assert [sweep_runner.group_id(g) for g in groups] == [
      sweep_runner.group_id(g) for g in sweep.group_members(members)]


USER_MODELS = """
import flax.linen as nn


class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(4, (3, 3))(x.reshape(x.shape[0], 28, 28, 1) / 255.0)
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


class TinyMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Dense(10)(nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1) / 255.0)))
"""


def test_a_user_cnn_is_recognized_by_its_kernels(tmp_path, monkeypatch):
  (tmp_path / "large_groups_models.py").write_text(USER_MODELS)
  monkeypatch.syspath_prepend(str(tmp_path))
  c = config_lib.base_config()
  c.model.name = "large_groups_models:SmallCNN"
  assert not members_lib.grouping_helps(c, "cpu") and members_lib.grouping_helps(c, "gpu")
  c.model.name = "large_groups_models:TinyMLP"
  assert members_lib.grouping_helps(c, "cpu")
  c.model.name = "seed1_cnn"
  assert not members_lib.grouping_helps(c, "cpu") and members_lib.grouping_helps(c, "gpu")


def test_chunked_sweep_equals_one_group_and_resumes(idx_dir, tmp_path):
  base = tiny_base(idx_dir)
  base.train.num_epochs = 1
  spec = sweep.product(sweep.axis("optimizer.learning_rate", [0.05, 0.1, 0.2]), sweep.seeds(1))
  one, chunked = str(tmp_path / "one"), str(tmp_path / "chunked")
  with jax.default_matmul_precision("highest"):
    rows = sweep.run_sweep(base, spec, one)
    rows2 = sweep.run_sweep(base, spec, chunked, max_group_size=2)
  assert len(os.listdir(os.path.join(one, "_groups"))) == 1
  assert len(os.listdir(os.path.join(chunked, "_groups"))) == 1  # a chunk of 1 runs solo
  for a, b in zip(rows, rows2):
    assert a["status"] == b["status"] == "done"
    for key in ("test_loss", "train_loss", "test_accuracy"):
      assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6)
  sizes = [json.load(open(os.path.join(chunked, r["name"], "summary.json"))).get("group_size", 1)
           for r in rows2]
  assert sizes == [1, 2, 2]  # chunks [lr 0.05], [lr 0.1, lr 0.2]
  # A rerun with the same chunks finds every member done.
  stamps = [os.path.getmtime(os.path.join(chunked, r["name"], "summary.json")) for r in rows2]
  again = sweep.run_sweep(base, spec, chunked, max_group_size=2)
  assert [r["status"] for r in again] == ["done"] * 3
  assert stamps == [os.path.getmtime(os.path.join(chunked, r["name"], "summary.json"))
                    for r in rows2]
