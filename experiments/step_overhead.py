"""The paper MLP's train step against its matmul floor, by scan unroll and XLA flags.

  python experiments/step_overhead.py [--unrolls=1,2,5] [--timed_steps=2000] [--timed_reps=5] \
      [--variants=default,while_graphs] [--data_source=embedded]

Each XLA_FLAGS variant runs in its own process (XLA reads the flags once, at
start-up): the bnlab scanned epoch of the paper MLP with BN (batch 60) at each
`train.unroll`, and the matmul floor of experiments/benchmark.py (the step's
matrix products and SGD update alone), as training examples/s, median of
--timed_reps timed calls of --timed_steps steps. Prints one Markdown table: rate and % of
the floor. On a GPU each step is dozens of small kernels, so launch overhead,
not arithmetic, sets its time; the variants say how much of it the scan's
unroll or XLA's command buffers (CUDA graphs of the loop body) remove.
"""

from __future__ import annotations

import json
from bnlab.engine import steps as steps_lib
from bnlab.engine import state as state_lib
from bnlab.engine import optim as optim_lib
from bnlab.engine import calls as calls_lib
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

# XLA_FLAGS added by each variant. `while_graphs` also captures loop bodies
# (a scanned epoch) in command buffers, which XLA leaves out by default.
VARIANTS = {
    "default": "",
    "while_graphs": "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,"
                    "CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1",
}

flags.DEFINE_list("unrolls", ["1", "2", "5"], "train.unroll values to time.")
flags.DEFINE_integer("timed_steps", 2000, "Steps per timed call.")
flags.DEFINE_integer("timed_reps", 5, "Timed calls per measure (median).")
flags.DEFINE_list("variants", list(VARIANTS), f"XLA_FLAGS variants: {sorted(VARIANTS)}.")
flags.DEFINE_string("data_source", "embedded", "MNIST source.")
flags.DEFINE_string("_child", "", "Internal: run one variant in this process.")
FLAGS = flags.FLAGS


def measure(unrolls, steps: int, reps: int, source: str) -> dict:
  """{"unroll=N": ex/s, "floor": ex/s, "device": ...} in this process."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  import benchmark  # pylint: disable=g-import-not-at-top
  from bnlab import config as config_lib  # pylint: disable=g-import-not-at-top
  from bnlab.models import networks as models  # pylint: disable=g-import-not-at-top
  from timing import median_rate  # pylint: disable=g-import-not-at-top

  images, labels = benchmark.load_images(source)
  c = config_lib.base_config()
  c.model.name, c.model.activation, c.model.bn_position = "paper_mlp", "sigmoid", "before"
  batch = c.train.batch_size = 60
  model = models.build_model(c.model)
  tx = optim_lib.make_optimizer(c.optimizer, steps)
  state0 = state_lib.create_train_state(model, tx, jax.random.key(0), batch)
  x, y = jax.device_put(images), jax.device_put(labels.astype(np.int32))
  perm = steps_lib.epoch_permutation(state0, 0, len(labels) // batch * batch)
  out = {"device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}
  for unroll in unrolls:
    carry = [state0, steps_lib.metric_sums_zero()]

    def run(n, unroll=unroll, carry=carry):
      st, sums = carry
      st, sums = calls_lib.run_steps(st.replace(step=jnp.zeros((), jnp.int32)), sums, x, y, perm,
                                 length=n, batch_size=batch, unroll=unroll)
      jax.block_until_ready(sums)
      carry[:] = [st, sums]

    run(steps)  # compiles the timed length
    out[f"unroll={unroll}"] = median_rate(run, steps, batch, reps)
  out["floor"] = benchmark.mlp_matmul_floor_rate(batch, steps, reps)
  return out


def table(results: dict) -> str:
  """Markdown: one row per variant, ex/s and % of that variant's floor per unroll."""
  keys = sorted({k for r in results.values() if "floor" in r for k in r
                 if k.startswith("unroll=")}, key=lambda k: int(k.split("=")[1]))
  lines = ["| XLA flags | " + " | ".join(keys) + " | matmul floor |",
           "|---|" + "---|" * (len(keys) + 1)]
  for name, r in results.items():
    if "floor" not in r:
      lines.append(f"| {name} | failed: {r.get('error', '?')} |")
      continue
    cells = [f"{r[k]:,.0f} ({100 * r[k] / r['floor']:.0f}%)" for k in keys]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['floor']:,.0f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  unrolls = [int(u) for u in FLAGS.unrolls]
  if FLAGS._child:  # pylint: disable=protected-access
    print("RESULT " + json.dumps(measure(unrolls, FLAGS.timed_steps, FLAGS.timed_reps, FLAGS.data_source)))
    return
  results = {}
  for name in FLAGS.variants:
    if name not in VARIANTS:
      raise app.UsageError(f"--variants: unknown {name!r}; choose from {sorted(VARIANTS)}")
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {VARIANTS[name]}".strip()
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), f"--_child={name}",
         f"--unrolls={','.join(FLAGS.unrolls)}", f"--timed_steps={FLAGS.timed_steps}",
         f"--timed_reps={FLAGS.timed_reps}", f"--data_source={FLAGS.data_source}"],
        env=env, capture_output=True, text=True, check=False)
    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    results[name] = (json.loads(found[-1][7:]) if found else
                     {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:200]})
  device = next((r["device"] for r in results.values() if "device" in r), "?")
  print(f"Paper MLP + BN, batch 60, training examples/s on {device}:")
  print(table(results))


if __name__ == "__main__":
  app.run(main)
