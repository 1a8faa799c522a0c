"""Data-parallel training over N host CPU devices equals one-device training."""

import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {tests!r})
    import tiny_mnist
    from bnlab import config as config_lib
    from bnlab.engine import train
    assert len(jax.devices()) == 8, jax.devices()
    tiny_mnist.write_mnist_dir({data!r}, num_train=256, num_test=64)
    out = {{}}
    # Ghost batches of 8 on 8 devices of 4 examples each: a ghost batch spans
    # two devices and its statistics are still those of its 8 examples.
    for model, norm, all_devices in (("seed1_mlp", "batch", (1, 4, 8)),
                                     ("seed1_cnn", "batch", (1, 4, 8)),
                                     ("seed1_mlp", "ghost", (1, 8))):
     for devices in all_devices:
      c = config_lib.base_config()
      c.data.source, c.data.dir = "idx", {data!r}
      c.model.name, c.model.bn_position, c.model.norm = model, "before", norm
      c.model.bn.ghost_size = 8
      c.optimizer.learning_rate = 0.05
      c.train.batch_size, c.train.num_epochs, c.train.num_devices = 32, 1, devices
      c.train.final_train_eval = False
      key = model + ("_ghost" if norm == "ghost" else "")
      wd = {work!r} + f"/{{key}}_{{devices}}"
      summary = train.train_and_evaluate(c, wd)
      import orbax.checkpoint as ocp
      mngr = ocp.CheckpointManager(wd + "/checkpoints")
      state = mngr.restore(mngr.latest_step())["state"]
      out[f"{{key}}_{{devices}}"] = {{
          "num_devices": summary["num_devices"], "test_accuracy": summary["test_accuracy"],
          "leaves": [np.asarray(x).ravel()[:64].tolist()
                     for x in jax.tree.leaves((state["params"], state["batch_stats"]))]}}
    print("RESULT" + json.dumps(out))
""")


def test_sharded_runs_on_4_and_8_devices_equal_one_device_run(tmp_path):
  script = SCRIPT.format(tests=os.path.join(ROOT, "tests"), data=str(tmp_path / "data"),
                         work=str(tmp_path / "work"))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                     env=env, cwd=ROOT, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.split("RESULT", 1)[1])
  import numpy as np
  for model, counts in (("seed1_mlp", (4, 8)), ("seed1_cnn", (4, 8)), ("seed1_mlp_ghost", (8,))):
    for n in counts:
      one, many = out[f"{model}_1"], out[f"{model}_{n}"]
      assert one["num_devices"] == 1 and many["num_devices"] == n
      for a, b in zip(one["leaves"], many["leaves"]):
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=2e-4, atol=2e-5)
      assert abs(one["test_accuracy"] - many["test_accuracy"]) <= 1 / 64


GROUP_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    sys.path.insert(0, {tests!r})
    import test_sweep
    from bnlab import config as config_lib, sweep
    from bnlab.engine import loop
    from bnlab.engine import state as state_lib
    from bnlab.engine import train
    assert len(jax.devices()) == 4, jax.devices()
    cfgs = [sweep.apply_overrides(test_sweep.momenta_base({data!r}), o)
            for o in test_sweep.MOMENTA + [{{"seed": 3}}]]
    spread = []
    create = state_lib.create_member_states
    def watched(*args, **kwargs):
      st = create(*args, **kwargs)
      spread.append(len(st.params["logits"]["kernel"].sharding.device_set))
      return st
    state_lib.create_member_states = watched
    with jax.default_matmul_precision("highest"):
      train.train_group(cfgs, [{work!r} + f"/{{i}}" for i in range(4)], {work!r} + "/g")
      for c in cfgs:  # extended: the group resumes from its checkpoint on the 4 devices
        c.train.num_epochs += 1
      train.train_group(cfgs, [{work!r} + f"/{{i}}" for i in range(4)], {work!r} + "/g")
    print("RESULT" + json.dumps(spread))
""")


def test_group_members_spread_over_4_devices_equal_one_device_group(idx_dir, tmp_path):
  # Trained, then extended (resumed from its checkpoint, which must restore its metric sums
  # on the 4 devices beside the states), against the same epochs in one go on one device.
  import jax
  import numpy as np
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  import test_sweep  # pylint: disable=g-import-not-at-top
  from bnlab import sweep  # pylint: disable=g-import-not-at-top
  from bnlab.engine import train  # pylint: disable=g-import-not-at-top
  from run_files import final_state, read_jsonl  # pylint: disable=g-import-not-at-top
  work = tmp_path / "four"
  script = GROUP_SCRIPT.format(tests=os.path.join(ROOT, "tests"), data=idx_dir, work=str(work))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                     env=env, cwd=ROOT, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert json.loads(p.stdout.split("RESULT", 1)[1]) == [4, 4]
  cfgs = [sweep.apply_overrides(test_sweep.momenta_base(idx_dir), o)
          for o in test_sweep.MOMENTA + [{"seed": 3}]]
  for c in cfgs:
    c.train.num_epochs += 1
  one = tmp_path / "one"
  with jax.default_matmul_precision("highest"):
    train.train_group(cfgs, [str(one / str(i)) for i in range(4)], str(one / "g"))
  for i in range(4):
    a, b = read_jsonl(one / str(i) / "metrics.jsonl"), read_jsonl(work / str(i) / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
      for key in ("train_loss", "test_loss", "test_accuracy"):
        if key in x:
          np.testing.assert_allclose(y[key], x[key], rtol=1e-4, atol=1e-6)
    _, sa = final_state(str(one / str(i)))
    _, sb = final_state(str(work / str(i)))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), sa, sb)
