"""Deterministic mode (bnlab.engine.backend) and run provenance (bnlab.engine.provenance)."""

import json
import os
import re
import subprocess
import sys

import jax
import ml_collections
import pytest

from bnlab.engine import backend
from bnlab import config as config_lib
from bnlab.engine import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ON_GPU = jax.default_backend() in ("gpu", "cuda", "rocm")

# Runs in a fresh interpreter: what bnlab.engine.backend.configure leaves in XLA_FLAGS
# before JAX starts, and whether the backend then starts and computes.
PROBE = """
import json, os, sys
from bnlab.engine import backend
if sys.argv[1] == "gpu":
  backend.gpu_backend_possible = lambda: True
backend.configure(sys.argv[2] == "on")
flags = os.environ.get("XLA_FLAGS", "")
import jax, jax.numpy as jnp
value = float(jax.jit(lambda x: jnp.sum(x * x))(jnp.arange(4.0)))
print(json.dumps({"flags": flags, "value": value, "backend": jax.default_backend(),
                  "started": backend.backend_started()}))
"""


def _probe(kind: str, mode: str, xla_flags: str | None = None) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  env.pop("XLA_FLAGS", None)
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  out = subprocess.run([sys.executable, "-c", PROBE, kind, mode], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_deterministic_flag_reaches_xla_where_a_gpu_can_start():
  r = _probe("gpu", "on")
  assert r["flags"].split() == ["--xla_gpu_deterministic_ops=true"]
  # XLA parsed the flag at start-up (an unknown flag aborts the process) and computes.
  assert r["started"] and r["value"] == 14.0


def test_no_gpu_flag_where_no_gpu_can_start_or_when_off():
  assert _probe("cpu", "on")["flags"] == ""
  assert _probe("gpu", "off")["flags"] == ""


def test_users_flags_are_kept_and_the_config_wins_for_determinism():
  r = _probe("gpu", "on", xla_flags="--xla_cpu_enable_fast_math=false "
             "--xla_gpu_deterministic_ops=false")
  assert r["flags"].split() == ["--xla_cpu_enable_fast_math=false",
                                "--xla_gpu_deterministic_ops=false",
                                "--xla_gpu_deterministic_ops=true"]
  assert backend._flag_value(r["flags"]) is True  # the last occurrence wins, as in XLA
  # Off never removes determinism the user asked for.
  r = _probe("gpu", "off", xla_flags="--xla_gpu_deterministic_ops=true")
  assert r["flags"] == "--xla_gpu_deterministic_ops=true"


def test_platform_list_decides_whether_a_gpu_can_start():
  assert backend.gpu_backend_possible("cuda,cpu")
  assert backend.gpu_backend_possible("rocm")
  assert not backend.gpu_backend_possible("cpu")
  assert not backend.gpu_backend_possible("tpu,cpu")


def test_after_start_cpu_is_deterministic_and_configure_is_a_no_op():
  jax.numpy.zeros(1).block_until_ready()
  before = os.environ.get("XLA_FLAGS")
  backend.configure(True)
  backend.configure(False)
  assert os.environ.get("XLA_FLAGS") == before
  if not ON_GPU:
    assert backend.deterministic()


def test_determinism_a_started_gpu_lacks_is_an_error(monkeypatch):
  jax.numpy.zeros(1).block_until_ready()
  monkeypatch.setattr(backend, "_gpu_started", lambda: True)
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=false")
  with pytest.raises(backend.BackendError, match="before the first JAX computation"):
    backend.configure(True)
  backend.configure(False)  # asking for less than the backend gives is fine
  assert not backend.deterministic()


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU backend (the flag only matters there)")
def test_gpu_backend_runs_with_deterministic_ops():
  # tests/conftest.py configures the backend as `python -m bnlab.main` does.
  assert backend.gpu_ops_deterministic() and backend.deterministic()


def test_deterministic_is_a_validated_config_key():
  c = config_lib.base_config()
  assert c.train.deterministic is True
  c.train = ml_collections.ConfigDict({**c.train.to_dict(), "deterministic": 1})
  with pytest.raises(config_lib.ConfigError, match="train.deterministic"):
    config_lib.validate(c)


def test_environment_records_backend_devices_versions_and_code():
  env = provenance.environment(deterministic=True)
  assert env["backend"] == jax.default_backend()
  assert env["device_count"] == len(jax.devices()) and env["device_kind"]
  assert env["cpu_cores"] == os.cpu_count() and env["deterministic"] is True
  assert set(env["versions"]) == {"python", "jax", "jaxlib", "flax", "optax",
                                  "orbax-checkpoint", "numpy"}
  assert env["versions"]["jax"] == jax.__version__
  json.dumps(env)  # a summary.json field
  line = provenance.describe(env)
  assert line.startswith(f"{env['backend']}: {env['device_count']} x ")
  assert f"jax {jax.__version__}" in line and "deterministic on" in line


def test_code_version_is_the_checkout_commit_or_unknown(monkeypatch, tmp_path):
  code = provenance.code_version()
  if os.path.isdir(os.path.join(ROOT, ".git")):
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert code["commit"] == head and isinstance(code["dirty"], bool)
  # The root is restored before anything asks again: a cached "unknown" would otherwise
  # outlive this test and label every later report in this process "bnlab unknown".
  with monkeypatch.context() as m:
    m.setattr(provenance, "_REPO_ROOT", str(tmp_path))
    provenance.code_version.cache_clear()
    try:
      assert provenance.code_version() == {"commit": "unknown", "dirty": None}
    finally:
      provenance.code_version.cache_clear()
  assert provenance.code_version()["commit"] == code["commit"]
  env = {**provenance.environment(), "code": {"commit": "a" * 40, "dirty": True}}
  assert re.search(r"bnlab a{12} with uncommitted changes$", provenance.describe(env))


def test_a_study_sets_deterministic_mode_before_it_starts_jax(monkeypatch, tmp_path):
  from bnlab import study, sweep  # pylint: disable=g-import-not-at-top
  path = os.path.join(ROOT, "configs/studies/seed_comparison.py")
  module = sweep.load_config_file(path)
  s = study.Study.from_file(path, "runlocal", module.get_config("runlocal"))
  calls = []
  monkeypatch.setattr(backend, "configure", lambda d: calls.append(("configure", d)))
  real = provenance.environment
  monkeypatch.setattr(provenance, "environment",
                      lambda *a: calls.append(("environment",)) or real(*a))
  monkeypatch.setattr(sweep, "run_sweep", lambda *a, **k: [])
  study.run_stage(s, str(tmp_path))
  assert calls == [("configure", True), ("environment",)]
  stage = json.load(open(tmp_path / "stages.json"))[0]
  assert stage["environment"]["deterministic"] is backend.deterministic()


def test_head_read_from_files_matches_git(monkeypatch, tmp_path):
  """The commit is read without a subprocess (a loaded machine once timed git out)."""
  def git(*args, cwd):
    return subprocess.run(["git", "-C", str(cwd), *args], capture_output=True, text=True,
                          check=True).stdout.strip()
  repo = tmp_path / "repo"
  repo.mkdir()
  git("init", "-q", "-b", "main", cwd=repo)
  (repo / "f").write_text("1")
  git("add", "f", cwd=repo)
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one", cwd=repo)
  git("worktree", "add", "-q", "--detach", str(tmp_path / "wt"), cwd=repo)
  cases = {"clone": repo, "worktree": tmp_path / "wt"}
  for name, root in cases.items():
    monkeypatch.setattr(provenance, "_REPO_ROOT", str(root))
    assert provenance._head_from_files() == git("rev-parse", "HEAD", cwd=root), name
  git("pack-refs", "--all", cwd=repo)   # the branch ref now lives only in packed-refs
  monkeypatch.setattr(provenance, "_REPO_ROOT", str(repo))
  assert not (repo / ".git/refs/heads/main").exists()
  assert provenance._head_from_files() == git("rev-parse", "HEAD", cwd=repo)
