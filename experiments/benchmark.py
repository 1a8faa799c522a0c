"""Training speed: bnlab's engine against the conventional Flax loop, side by side.

  python experiments/benchmark.py [--steps_scale=1.0] [--sweep_steps=2000] \
      [--keras=jax,tensorflow] [--out=results/benchmark.md]

For each case (seed CNN with/without BN at batch 32 and 128, paper MLP with BN
at batch 60) it times training examples per second, median of --reps timed
repetitions after a warm-up (the in-process runners round-robin, so a slow
spell of the machine falls on all of them), of:
  - flax_loop: the Flax MNIST-example way: host batches from a host-shuffled
    numpy array, one jitted step per batch, flax.linen Conv/max_pool/BatchNorm;
  - PyTorch eager (when installed: `pip install -e .[peers]`), the same models
    and SGD, all CPU threads, batches sliced from in-memory tensors;
  - Keras 3 `model.fit` on each backend of --keras that imports (JAX with the
    peers extra; TensorFlow where installed, or from another environment with
    `--keras=tensorflow=/path/to/python`), one subprocess per case and backend
    (experiments/keras_peer.py);
  - bnlab: bnlab's engine (device-resident data, the loop form and convolution
    `auto` resolves to on this platform), plus each explicit form for insight.
Then the 24-member paper-MLP sweep (8 learning rates x 3 seeds) grouped into
one vmapped program against the same runs one after another
(experiments/sweep_speed.py). Prints a Markdown table with ratios and the
platform (backend and device), and writes it to --out.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sweep_speed

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from bnlab import config as config_lib  # noqa: E402
from bnlab import models, train  # noqa: E402
from timing import interleaved_rates, median_rate  # noqa: E402

CASES = (
    # name, model, norm, batch, steps per timed repetition
    ("seed CNN + BN", "seed_cnn", "batch", 32, 150),
    ("seed CNN, no BN", "seed_cnn", "none", 32, 150),
    ("seed CNN + BN", "seed_cnn", "batch", 128, 40),
    ("seed CNN, no BN", "seed_cnn", "none", 128, 40),
    ("paper MLP + BN", "paper_mlp", "batch", 60, 2000),
)


class FlaxSeedCNN(nn.Module):
  """The seed CNN written the usual Flax way (nn.Conv, nn.max_pool, nn.BatchNorm)."""

  norm: bool

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = images.astype(jnp.float32)[..., None] / 255.0
    x = nn.relu(nn.Conv(32, (3, 3), padding="VALID")(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(64, (3, 3), padding="VALID")(x))
    x = x.reshape(x.shape[0], -1)
    if self.norm:
      x = nn.BatchNorm(use_running_average=not train, epsilon=1e-3)(x)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


class FlaxPaperMLP(nn.Module):
  """784-100-100-100-10 sigmoid MLP with nn.BatchNorm before each sigmoid."""

  @nn.compact
  def __call__(self, images, train: bool = False):
    x = images.astype(jnp.float32).reshape(images.shape[0], -1) / 255.0
    for _ in range(3):
      x = nn.Dense(100, use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      x = nn.sigmoid(x)
    return nn.Dense(10)(x)


def flax_loop_runner(model_name, norm, batch, images, labels):
  """`run(n)`: n steps of the conventional loop: host batches, one jitted step each."""
  model = FlaxSeedCNN(norm == "batch") if model_name == "seed_cnn" else FlaxPaperMLP()
  tx = optax.sgd(0.01)
  v = model.init(jax.random.key(0), images[:batch])
  params, stats = v["params"], v.get("batch_stats", {})
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state, x, y):
    def loss_fn(p):
      logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd
    (loss, upd), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
    u, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, u), upd.get("batch_stats", {}), opt_state, loss

  rng = np.random.default_rng(0)
  perm = rng.permutation(len(labels))

  def run(n):
    nonlocal params, stats, opt_state
    for i in range(n):
      idx = perm[(i * batch) % (len(labels) - batch):][:batch]
      params, stats, opt_state, loss = step(params, stats, opt_state, images[idx], labels[idx])
    jax.block_until_ready(loss)

  return run


def bnlab_runner(model_name, norm, batch, steps, images, labels, loop="auto", conv="auto",
                 dtype=None):
  """(run, steps, loop): `run(n)` trains n steps with bnlab's engine; n = `steps` is compiled.

  `steps` is capped at one epoch; `dtype`: the computation dtype (train.half_precision).
  """
  c = config_lib.base_config()
  c.model.name = model_name
  c.model.norm = norm
  c.model.conv_implementation = conv
  if model_name == "paper_mlp":
    c.model.activation, c.model.bn_position = "sigmoid", "before"
  c.train.batch_size = batch
  loop = train.resolve_loop(loop, c.model)
  model = models.build_model(c.model, dtype=dtype)
  tx = train.make_optimizer(c.optimizer, steps)
  state = train.create_train_state(model, tx, jax.random.key(0), batch)
  x, y = jax.device_put(images), jax.device_put(labels.astype(np.int32))
  n = (len(labels) // batch) * batch
  perm = train.epoch_permutation(state, 0, n)
  x, y = x[:n], y[:n]
  carry = [state, train.metric_sums_zero()]
  steps = min(steps, n // batch)

  def run(n):
    st, sums = carry
    st = st.replace(step=jnp.zeros((), jnp.int32))
    if loop == "scan":
      st, sums = train.run_steps(st, sums, x, y, perm, length=n, batch_size=batch)
    else:
      for _ in range(n):
        st, sums = train.run_one_step(st, sums, x, y, perm, batch_size=batch)
    jax.block_until_ready(sums)
    carry[:] = [st, sums]

  run(steps)  # warm-up (compiles the timed program)
  return run, steps, loop


def bn_step_time_ratio(batch, steps, rounds, images, labels) -> float:
  """Seed CNN step time with BN over without, the two timed in alternation (median)."""
  runs = {norm: bnlab_runner("seed_cnn", norm, batch, steps, images, labels)
          for norm in ("batch", "none")}
  rates = interleaved_rates({norm: r[0] for norm, r in runs.items()}, runs["batch"][1],
                            batch, rounds)
  return rates["none"] / rates["batch"]


def torch_runner(model_name, norm, batch, images, labels):
  """`run(n)`: n steps of PyTorch eager training; None if torch is absent.

  On a CUDA GPU when torch sees one (data resident there, like bnlab's), else
  on the CPU with all its threads (BNLAB_TORCH_THREADS overrides).
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torch import nn as tnn  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.manual_seed(0)
  torch.set_num_threads(int(os.environ.get("BNLAB_TORCH_THREADS", os.cpu_count() or 1)))
  if model_name == "seed_cnn":
    layers = [tnn.Conv2d(1, 32, 3), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Conv2d(32, 64, 3),
              tnn.ReLU(), tnn.Flatten()]
    if norm == "batch":
      layers.append(tnn.BatchNorm1d(7744, eps=1e-3, momentum=0.01))
    layers += [tnn.Linear(7744, 64), tnn.ReLU(), tnn.Linear(64, 10)]
    x_all = torch.from_numpy(images[:, None].astype(np.float32) / 255.0)
  else:
    layers = [tnn.Flatten()]
    for fan_in in (784, 100, 100):
      layers += [tnn.Linear(fan_in, 100, bias=False), tnn.BatchNorm1d(100), tnn.Sigmoid()]
    layers.append(tnn.Linear(100, 10))
    x_all = torch.from_numpy(images.astype(np.float32) / 255.0)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = tnn.Sequential(*layers).train().to(device)
  x_all = x_all.to(device)
  y_all = torch.from_numpy(labels.astype(np.int64)).to(device)
  opt = torch.optim.SGD(model.parameters(), lr=0.01)
  loss_fn = tnn.CrossEntropyLoss()
  perm = torch.randperm(len(y_all), device=device)

  def run(n):
    for i in range(n):
      idx = perm[(i * batch) % (len(y_all) - batch):][:batch]
      opt.zero_grad(set_to_none=True)
      loss = loss_fn(model(x_all[idx]), y_all[idx])
      loss.backward()
      opt.step()
    if device == "cuda":
      torch.cuda.synchronize()

  return run


def keras_rate(spec, model_name, norm, batch, steps, reps, data_file):
  """(examples/s, description) of Keras 3 `fit` on backend `spec` ("name[=python]").

  None for the rate when that python cannot import keras or the backend.
  """
  backend, _, python = spec.partition("=")
  env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
  cmd = [python or sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "keras_peer.py"),
         f"--data={data_file}", f"--model={model_name}", f"--norm={norm}",
         f"--batch={batch}", f"--steps={steps}", f"--reps={reps}"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if proc.returncode:
    if "ModuleNotFoundError" in proc.stderr:
      return None, "not installed"
    raise RuntimeError(f"Keras peer ({backend}) failed:\n{proc.stderr[-2000:]}")
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  return r["rate"], f"keras {r['keras']} on {r['framework']} ({r['device']})"


def mlp_matmul_floor_rate(batch: int, steps: int, reps: int) -> float:
  """Examples/s of the paper MLP's matrix products alone, scanned like a training epoch.

  Per step: the 4 forward products, the 4 weight-gradient products and the 3
  input-gradient products of 784-100-100-100-10 at `batch`, plus an SGD
  update; no BN, activations, loss or data gather. No training step of this
  model can run faster on the same matmul kernels.
  """
  dims = (784, 100, 100, 100, 10)
  ws = [jnp.full((a, b), 0.01, jnp.float32) for a, b in zip(dims[:-1], dims[1:])]
  x = jnp.ones((batch, dims[0]), jnp.float32)
  g = jnp.ones((batch, dims[-1]), jnp.float32)

  def body(ws, _):
    hs = [x]
    for w in ws:
      hs.append(hs[-1] @ w)
    d, grads = g + hs[-1], []
    for i in reversed(range(len(ws))):
      grads.append(hs[i].T @ d)
      if i:
        d = d @ ws[i].T
    return [w - 1e-6 * dw for w, dw in zip(ws, reversed(grads))], None

  @functools.partial(jax.jit, static_argnums=1)
  def epoch(ws, n):
    return jax.lax.scan(body, ws, None, length=n)[0]

  def run(n):
    jax.block_until_ready(epoch(ws, n))

  epoch(ws, steps)  # compile the timed length too
  return median_rate(run, steps, batch, reps)


def load_images(source: str):
  if source == "random":
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (60000, 28, 28), dtype=np.uint8),
            rng.integers(0, 10, 60000).astype(np.uint8))
  from bnlab import data
  ds = data.load_mnist(source)
  return ds.train_images, ds.train_labels


_REPS = flags.DEFINE_integer("reps", 3, "Timed repetitions per runner (the median is shown).")
_STEPS_SCALE = flags.DEFINE_float(
    "steps_scale", 1.0, "Multiply the steps per repetition (smaller = quicker, noisier).")
_DATA = flags.DEFINE_string("data", "embedded", "A data source, or 'random'.")
_FORMS = flags.DEFINE_string("forms", "auto,scan,loop",
                             "bnlab loop forms to time besides 'auto'.")
_OUT = flags.DEFINE_string("out", "results/benchmark.md", "Where the table is written.")
_SWEEP_STEPS = flags.DEFINE_integer(
    "sweep_steps", 2000, "Steps per member of the 24-member sweep case (0: skip it).")
_SWEEP_WORKDIR = flags.DEFINE_string("sweep_workdir", "/tmp/bnlab_benchmark_sweep",
                                     "Work directory of the sweep case.")
_KERAS = flags.DEFINE_string(
    "keras", "jax,tensorflow", "Keras backends to time, each 'name' or "
    "'name=/path/to/python' (another environment); empty: none.")


def platform_header() -> str:
  """The table's first line: backend, device, CPU, versions and the repetitions."""
  device = jax.devices()[0]
  torch_version = torch_where = None
  try:
    import torch  # pylint: disable=g-import-not-at-top
    torch_version = torch.__version__
    torch_where = (f"on {torch.cuda.get_device_name()}" if torch.cuda.is_available() else
                   f"{int(os.environ.get('BNLAB_TORCH_THREADS', os.cpu_count() or 1))} threads")
  except ImportError:
    pass
  return (f"Platform: {jax.default_backend()} ({device.device_kind}), "
          f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}; "
          f"jax {jax.__version__}"
          + (f", torch {torch_version} ({torch_where})" if torch_version else "")
          + f". Training examples/s, median of {_REPS.value} after warm-up.")


def table_head(keras_specs: list[str], forms: list[str]) -> list[str]:
  """The Markdown table's header and separator rows."""
  keras_cols = "".join(f" Keras {k.partition('=')[0]} |" for k in keras_specs)
  return ["| case | batch | Flax loop | PyTorch eager |" + keras_cols + " bnlab auto (form) | "
          "vs Flax loop | vs PyTorch | vs fastest peer |" + "".join(f" bnlab {f} |" for f in forms),
          "|---|---|---|---|" + "---|" * len(keras_specs) + "---|---|---|---|" + "---|" * len(forms)]


def case_row(case, forms, keras_specs, keras_notes, images, labels, data_file):
  """Times one case; returns (its table row, the Flax loop's rate)."""
  name, model_name, norm, batch, steps = case
  steps = max(5, int(steps * _STEPS_SCALE.value))
  # In-process runners timed round-robin; the Keras peers run in subprocesses.
  runs = {"flax": flax_loop_runner(model_name, norm, batch, images, labels),
          "torch": torch_runner(model_name, norm, batch, images, labels)}
  runs["bnlab"], steps, form = bnlab_runner(model_name, norm, batch, steps, images, labels)
  for f in forms:
    runs[f] = bnlab_runner(model_name, norm, batch, steps, images, labels, loop=f)[0]
  rates = interleaved_rates({k: v for k, v in runs.items() if v is not None}, steps, batch,
                            _REPS.value)
  base, auto = rates["flax"], rates["bnlab"]
  peers = {"PyTorch": rates.get("torch")}
  for spec in keras_specs:
    backend = spec.partition("=")[0]
    peers[f"Keras {backend}"], keras_notes[backend] = keras_rate(
        spec, model_name, norm, batch, steps, _REPS.value, data_file)
  present = {k: v for k, v in peers.items() if v is not None}
  fastest = max(present, key=present.get) if present else None
  cells = ["not installed" if v is None else f"{v:,.0f}" for v in peers.values()]
  row = (f"| {name} | {batch} | {base:,.0f} | " + " | ".join(cells) + f" | {auto:,.0f} ({form}) | "
         f"{auto / base:.2f}x | "
         + ("-" if peers["PyTorch"] is None else f"{auto / peers['PyTorch']:.2f}x") + " | "
         + ("-" if fastest is None else f"{auto / present[fastest]:.2f}x ({fastest})") + " |"
         + "".join(f" {rates[f]:,.0f} |" for f in forms))
  return row, base


def case_rows(forms, keras_specs, keras_notes, images, labels):
  """Times every case, printing each row as it comes; returns (rows, Flax rate per model)."""
  rows, base_rates = [], {}
  data_dir = tempfile.mkdtemp(prefix="bnlab_benchmark_")
  data_file = os.path.join(data_dir, "mnist.npz")
  if keras_specs:
    np.savez(data_file, images=images, labels=labels)
  for case in CASES:
    row, base_rates[case[1]] = case_row(case, forms, keras_specs, keras_notes, images, labels,
                                        data_file)
    rows.append(row)
    print(row, flush=True)
  shutil.rmtree(data_dir, ignore_errors=True)
  return rows, base_rates


def bn_cost_line(batch: int, steps: int, images, labels) -> str:
  """BN's share of the seed CNN's step time at `batch`."""
  ratio = bn_step_time_ratio(batch, max(5, int(steps * _STEPS_SCALE.value)), 2 * _REPS.value + 1,
                             images, labels)
  return (f"\nBN's cost in the seed CNN, batch {batch} (with and without BN timed in "
          f"alternation, median of {2 * _REPS.value + 1}): step time with BN = {ratio:.3f}x "
          "without.\n")


def mlp_floor_line(flax_rate: float) -> str:
  """The paper MLP's matmul-only rate against the Flax loop's."""
  mlp_steps = max(5, int(dict((c[1], c[4]) for c in CASES)["paper_mlp"] * _STEPS_SCALE.value))
  floor = mlp_matmul_floor_rate(60, mlp_steps, _REPS.value)
  return (f"\nPaper MLP floor: its 11 matrix products per step alone (no BN, activations "
          f"or data) run at {floor:,.0f} examples/s = {floor / flax_rate:.2f}x "
          f"the Flax loop.\n")


def sweep_line() -> str:
  """The 24-member sweep grouped against one member after another."""
  import sweep_speed  # pylint: disable=g-import-not-at-top
  r = sweep_speed.measure(_SWEEP_STEPS.value, _SWEEP_WORKDIR.value)
  return (f"\nSweep as one program: {r['members']} paper-MLP members (8 learning rates x "
          f"3 seeds), {r['steps']:,} steps each: grouped {r['grouped_s']:.1f} s, one after "
          f"another {r['solo_s']:.1f} s, **{r['ratio']:.1f}x**; max |grouped - solo| final "
          f"test accuracy {r['worst_accuracy_gap']:.4f}.\n")


def lines_after_table(images, labels, flax_mlp_rate: float):
  """The lines below the table, each yielded as soon as it is measured."""
  for batch, steps in ((32, 150), (128, 40)):
    yield bn_cost_line(batch, steps, images, labels)
  yield mlp_floor_line(flax_mlp_rate)
  if _SWEEP_STEPS.value:
    yield sweep_line()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  images, labels = load_images(_DATA.value)
  forms = [f for f in ("scan", "loop") if f in _FORMS.value.split(",")]
  header = platform_header()
  print(header, flush=True)
  keras_specs = [k for k in _KERAS.value.split(",") if k]
  keras_notes = {}
  rows, base_rates = case_rows(forms, keras_specs, keras_notes, images, labels)
  if keras_notes:
    header += " Keras: " + "; ".join(f"{k}: {v}" for k, v in keras_notes.items()) + "."
  text = header + "\n\n" + "\n".join(table_head(keras_specs, forms) + rows) + "\n"
  for line in lines_after_table(images, labels, base_rates["paper_mlp"]):
    print(line, flush=True)
    text += line
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
      f.write(text)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
