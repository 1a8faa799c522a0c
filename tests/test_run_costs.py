"""Where a run's time goes (summary "time"), the checkpoint policy and the compilation cache."""

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest
from absl import logging

from bnlab.engine import backend
from bnlab.engine import timesplit
from bnlab.engine import train
from test_train import tiny_config

TESTS = os.path.dirname(os.path.abspath(__file__))


def test_summary_splits_the_wall_time(idx_dir, tmp_path, caplog):
  c = tiny_config(idx_dir)
  with caplog.at_level(logging.INFO):
    summary = train.train_and_evaluate(c, str(tmp_path / "run"))
  split = summary["time"]
  assert set(split) == {"total", "other", *timesplit.PARTS}
  assert all(v >= 0 for v in split.values())
  assert summary["wall_time"] == split["total"]
  parts = sum(split[k] for k in timesplit.PARTS) + split["other"]
  assert parts == pytest.approx(split["total"], abs=0.02)
  assert split["train"] > 0 and split["evaluate"] > 0 and split["checkpoint"] > 0
  assert any(r.getMessage().startswith("Wall time ") and "compile" in r.getMessage()
             for r in caplog.records)


def test_a_phase_books_its_compilation_apart():
  split = timesplit.TimeSplit()
  fresh = jax.jit(lambda x: jnp.sin(x) * 3.0 + float(time.time_ns() % 997))  # never compiled
  before = timesplit.compile_seconds()
  t0 = time.perf_counter()
  with split.phase("evaluate"):
    fresh(jnp.ones(3)).block_until_ready()
    time.sleep(0.05)
  wall = time.perf_counter() - t0
  compiled = timesplit.compile_seconds() - before
  assert compiled > 0
  assert split.seconds["compile"] == pytest.approx(compiled)
  assert split.seconds["evaluate"] >= 0.05
  assert split.seconds["evaluate"] + split.seconds["compile"] == pytest.approx(wall, abs=0.01)
  with pytest.raises(ValueError, match="phase 'compile'"):
    with split.phase("compile"):
      pass


def _checkpoint_steps(run_dir):
  return sorted(int(n) for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.isdigit())


def test_checkpoints_at_most_once_per_interval_and_always_the_last(idx_dir, tmp_path):
  c = tiny_config(idx_dir)  # 3 epochs of 10 steps, an evaluation each epoch
  c.train.checkpoint_min_interval_secs = 3600.0
  train.train_and_evaluate(c, str(tmp_path / "hourly"))
  # The first offered checkpoint (no earlier one) and the last (forced).
  assert _checkpoint_steps(str(tmp_path / "hourly")) == [10, 30]
  c.train.checkpoint_min_interval_secs = 0.0
  train.train_and_evaluate(c, str(tmp_path / "every"))
  assert _checkpoint_steps(str(tmp_path / "every")) == [10, 20, 30]


def test_checkpoint_steps_override_the_interval(idx_dir, tmp_path):
  c = tiny_config(idx_dir, **{"train.checkpoint_every_steps": 5,
                              "train.checkpoint_min_interval_secs": 3600.0})
  train.train_and_evaluate(c, str(tmp_path / "run"))
  assert _checkpoint_steps(str(tmp_path / "run")) == list(range(5, 31, 5))


PROBE = """
import collections, sys
from jax import monitoring
events = collections.Counter()
monitoring.register_event_listener(lambda event, **_: events.update([event]))
from bnlab import config as config_lib
from bnlab.engine import train
idx, cache, wd = sys.argv[1:4]
c = config_lib.base_config()
c.data.source, c.data.dir, c.data.cache_dir = "idx", idx, cache
c.model.name, c.train.num_steps, c.train.eval_every_steps = "seed1_mlp", 10, 5
train.train_and_evaluate(c, wd)
print({k.rsplit("/", 1)[1]: v for k, v in events.items() if "compilation_cache/cache_" in k})
"""


def _probe(idx_dir, cache, wd, jax_cache_dir=None):
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE",
                                                                   "JAX_PERSISTENT_CACHE"))}
  if jax_cache_dir:  # the user's own cache directory
    env["JAX_COMPILATION_CACHE_DIR"] = jax_cache_dir
  out = subprocess.run([sys.executable, "-c", PROBE, idx_dir, cache, wd], env=env, check=True,
                       capture_output=True, text=True, cwd=TESTS).stdout
  return eval(out.strip().splitlines()[-1])  # pylint: disable=eval-used


def test_a_second_process_reads_every_program_from_the_cache(idx_dir, tmp_path):
  cache = str(tmp_path / "cache")
  first = _probe(idx_dir, cache, str(tmp_path / "a"))
  assert first.get("cache_misses", 0) > 0 and not first.get("cache_hits")
  assert os.listdir(os.path.join(cache, "jax"))
  second = _probe(idx_dir, cache, str(tmp_path / "b"))
  assert second == {"cache_hits": first["cache_misses"]}


def test_a_cache_directory_of_the_users_also_gets_every_program(idx_dir, tmp_path):
  own = str(tmp_path / "own")
  first = _probe(idx_dir, str(tmp_path / "cache"), str(tmp_path / "a"), jax_cache_dir=own)
  assert first.get("cache_misses", 0) > 0
  assert not os.path.exists(tmp_path / "cache" / "jax")  # the user's directory is kept
  second = _probe(idx_dir, str(tmp_path / "cache"), str(tmp_path / "b"), jax_cache_dir=own)
  assert second == {"cache_hits": first["cache_misses"]}


def test_a_cache_directory_set_before_is_kept(tmp_path):
  current = jax.config.jax_compilation_cache_dir
  assert current  # conftest set one
  assert backend.enable_compilation_cache(str(tmp_path / "other")) == current
  assert jax.config.jax_compilation_cache_dir == current
  assert not os.path.exists(tmp_path / "other")


def test_calls_have_one_length_when_the_intervals_share_a_divisor():
  from bnlab import config as config_lib
  from bnlab.engine import schedule
  c = config_lib.base_config()
  c.train.batch_size, c.train.num_steps, c.train.eval_every_steps = 60, 10_000, 2_500
  plan = schedule.make_schedule_plan(c, 60_000)  # epochs of 1,000 steps
  lengths, step = set(), 0
  while step < plan.total_steps:
    end = plan.next_boundary(step)
    lengths.add(end - step)
    step = end
  assert lengths == {500}
  # A divisor under a quarter epoch: epoch-long calls, as before.
  c.train.batch_size, c.train.eval_every_steps = 128, 500  # epochs of 468 steps
  assert schedule.make_schedule_plan(c, 60_000).steps_per_call == 468
  c.train.steps_per_call = 100  # the user's choice wins
  assert schedule.make_schedule_plan(c, 60_000).steps_per_call == 100


def test_a_groups_evaluations_compile_once_however_many_there_are(idx_dir, tmp_path):
  """Population, batch-statistics and analysis evaluations of members reuse their programs."""
  from jax import monitoring
  from bnlab import sweep
  from test_sweep import tiny_base
  lowered = []

  def on_duration(event, duration, **_):
    del duration
    if event.endswith("jaxpr_to_mlir_module_duration"):
      lowered.append(event)

  def lowerings(num_epochs: int) -> int:
    base = tiny_base(idx_dir)
    base.model.norm = "batch"
    base.train.num_epochs, base.train.eval_every_epochs = num_epochs, 1
    base.train.eval_statistics = ("running", "population", "batch")
    base.train.population_examples = 64
    base.analysis.layers = ("preact_0",)
    cfgs = [sweep.apply_overrides(base, {"seed": s}) for s in (0, 1)]
    jax.clear_caches()
    before = len(lowered)
    d = tmp_path / f"epochs{num_epochs}"
    train.train_group(cfgs, [str(d / "a"), str(d / "b")], str(d / "g"))
    return len(lowered) - before

  monitoring.register_event_duration_secs_listener(on_duration)
  try:
    assert lowerings(2) == lowerings(5)
  finally:  # the rest of this process's tests do not feed it
    monitoring.unregister_event_duration_listener(on_duration)
