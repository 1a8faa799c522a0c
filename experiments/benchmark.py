"""Training speed: bnlab's engine against the conventional Flax loop, side by side.

  python experiments/benchmark.py [--steps_scale=1.0] [--sweep_steps=2000] \
      [--split_steps=50000] [--big_sweep] [--keras=jax,tensorflow] [--unrolls=5,10] \
      [--convs=gemm,im2col] [--out=results/benchmark.md]

For each case (seed CNN with/without BN at batch 32 and 128, paper MLP with BN
at batch 60) it times training examples per second, median of --reps timed
repetitions after a warm-up (the in-process runners round-robin, so a slow
spell of the machine falls on all of them), of:
  - flax_loop: the Flax MNIST-example way: host batches from a host-shuffled
    numpy array, one jitted step per batch, flax.linen Conv/max_pool/BatchNorm;
  - PyTorch eager (when installed: `pip install -e .[peers]`), the same models
    and SGD, batches gathered from tensors resident on the CUDA GPU when torch
    sees one, else on the CPU with all its threads; with CUDA also PyTorch
    CUDA graph: the whole step captured once and replayed
    (experiments/torch_peer.py);
  - Keras 3 `model.fit` on each backend of --keras that imports (JAX with the
    peers extra; TensorFlow where installed, or from another environment with
    `--keras=tensorflow=/path/to/python`), one subprocess per case and backend
    (experiments/keras_peer.py);
  - bnlab: bnlab's engine (device-resident data, the loop form and convolution
    `auto` resolves to on this platform), plus each explicit form for insight,
    and, as extra columns with their ratio to the fastest peer, each scan unroll
    of --unrolls and each convolution implementation of --convs (seed CNN).
"vs PyTorch" is against the fastest PyTorch column, "vs fastest peer" against
the fastest of all peer columns. Below the table: BN's cost in the seed CNN,
the paper MLP's matmul floor, where the wall time of one --split_steps-step
paper-MLP run through `bnlab.engine.train.train_and_evaluate` goes (summary.json's
time split), and the 24-member paper-MLP sweep (8 learning rates x 3 seeds)
grouped into one vmapped program against the same runs one after another,
then 240 members (x 10 seeds x 3 BN momenta) grouped
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
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # sweep_speed

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402

from bnlab.engine import steps as steps_lib
from bnlab.engine import state as state_lib
from bnlab.engine import optim as optim_lib
from bnlab.engine import calls as calls_lib
from bnlab import config as config_lib  # noqa: E402
from bnlab import data as data_lib  # noqa: E402
from bnlab.models import networks as models  # noqa: E402
from bnlab.engine import timesplit  # noqa: E402
from bnlab.engine import train  # noqa: E402
import sweep_speed  # noqa: E402
import torch_peer  # noqa: E402
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
                 dtype=None, unroll=1):
  """(run, steps, form): `run(n)` trains n steps with bnlab's engine; n = `steps` is compiled.

  `steps` is capped at one epoch; `dtype`: the computation dtype
  (train.half_precision); `unroll`: the scan's (`train.unroll`). `form` names
  the loop form, with the unroll of a scan.
  """
  c = config_lib.base_config()
  c.model.name = model_name
  c.model.norm = norm
  c.model.conv_implementation = conv
  if model_name == "paper_mlp":
    c.model.activation, c.model.bn_position = "sigmoid", "before"
  if model_name == "resnet20":  # configs/resnet20.py's network and optimizer
    c.model.bn_position, c.model.kernel_init = "before", "he_normal_fan_out"
    c.optimizer.name, c.optimizer.learning_rate, c.optimizer.weight_decay = "momentum", 0.1, 1e-3
  c.train.batch_size = batch
  loop = steps_lib.resolve_loop(loop, c.model)
  model = models.build_model(c.model, dtype=dtype)
  tx = optim_lib.make_optimizer(c.optimizer, steps)
  state = state_lib.create_train_state(model, tx, jax.random.key(0), batch)
  x, y = jax.device_put(images), jax.device_put(labels.astype(np.int32))
  n = (len(labels) // batch) * batch
  perm = steps_lib.epoch_permutation(state, 0, n)
  x, y = x[:n], y[:n]
  carry = [state, steps_lib.metric_sums_zero()]
  steps = min(steps, n // batch)

  def run(n):
    st, sums = carry
    st = st.replace(step=jnp.zeros((), jnp.int32))
    if loop == "scan":
      st, sums = calls_lib.run_steps(st, sums, x, y, perm, length=n, batch_size=batch,
                                 unroll=unroll)
    else:
      for _ in range(n):
        st, sums = calls_lib.run_one_step(st, sums, x, y, perm, batch_size=batch)
    jax.block_until_ready(sums)
    carry[:] = [st, sums]

  run(steps)  # warm-up (compiles the timed program)
  return run, steps, f"scan, unroll {unroll}" if loop == "scan" else loop


def bn_step_time_ratio(batch, steps, rounds, images, labels) -> float:
  """Seed CNN step time with BN over without, the two timed in alternation (median)."""
  runs = {norm: bnlab_runner("seed_cnn", norm, batch, steps, images, labels)
          for norm in ("batch", "none")}
  rates = interleaved_rates({norm: r[0] for norm, r in runs.items()}, runs["batch"][1],
                            batch, rounds)
  return rates["none"] / rates["batch"]


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
  ds = data_lib.load_mnist(source)
  return ds.train_images, ds.train_labels


_REPS = flags.DEFINE_integer("reps", 3, "Timed repetitions per runner (the median is shown).")
_STEPS_SCALE = flags.DEFINE_float(
    "steps_scale", 1.0, "Multiply the steps per repetition (smaller = quicker, noisier).")
_DATA = flags.DEFINE_string("data", "embedded", "A data source, or 'random'.")
_FORMS = flags.DEFINE_string("forms", "auto,scan,loop",
                             "bnlab loop forms to time besides 'auto'.")
_UNROLLS = flags.DEFINE_list(
    "unrolls", [], "Scan unroll factors (train.unroll) to time as extra bnlab columns, e.g. "
    "5,10; 'bnlab auto' uses the default, 1.")
_CONVS = flags.DEFINE_list(
    "convs", [], "Convolution implementations (model.conv_implementation) to time as extra "
    "bnlab columns of the seed-CNN cases, e.g. gemm,im2col; 'bnlab auto' uses 'auto' (xla "
    "on GPUs and TPUs, gemm on CPUs).")
_OUT = flags.DEFINE_string("out", "results/benchmark.md", "Where the table is written.")
_SWEEP_STEPS = flags.DEFINE_integer(
    "sweep_steps", 2000, "Steps per member of the 24-member sweep case (0: skip it).")
_BIG_SWEEP = flags.DEFINE_bool(
    "big_sweep", True, "With the sweep case, also time 240 members (8 learning rates x "
    "10 seeds x 3 BN momenta) grouped.")
_SPLIT_STEPS = flags.DEFINE_integer(
    "split_steps", 50_000, "Steps of the paper-MLP run whose wall time is split (0: skip it).")
_SWEEP_WORKDIR = flags.DEFINE_string("sweep_workdir", "/tmp/bnlab_benchmark_sweep",
                                     "Work directory of the sweep case.")
_KERAS = flags.DEFINE_string(
    "keras", "jax,tensorflow", "Keras backends to time, each 'name' or "
    "'name=/path/to/python' (another environment); empty: none.")


def platform_header() -> str:
  """The table's first line: backend, device, CPU, versions and the repetitions."""
  device = jax.devices()[0]
  torch = torch_peer.import_torch()
  torch_text = ""
  if torch is not None:
    where = (f"on {torch.cuda.get_device_name()}, TF32 matmuls and convolutions"
             if torch.cuda.is_available() else f"{torch_peer.threads()} threads")
    torch_text = f", torch {torch.__version__} ({where})"
  return (f"Platform: {jax.default_backend()} ({device.device_kind}), "
          f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}; "
          f"jax {jax.__version__}{torch_text}. Training examples/s, median of {_REPS.value} "
          "after warm-up.")


def extra_columns(unrolls=(), convs=()) -> list[tuple[str, dict]]:
  """The extra bnlab columns: (label, `bnlab_runner` keywords) per scan unroll and per
  convolution implementation."""
  return ([(f"unroll {u}", {"unroll": int(u)}) for u in unrolls]
          + [(f"conv {c}", {"conv": c}) for c in convs])


def column_applies(kwargs: dict, model_name: str, scanned: bool) -> bool:
  """Whether an extra column's setting exists for a case: unrolls for scanned models,
  convolution implementations for the seed CNN."""
  return ("unroll" not in kwargs or scanned) and ("conv" not in kwargs
                                                   or model_name == "seed_cnn")


def table_head(peer_columns: list[str], forms: list[str], extras=()) -> list[str]:
  """The Markdown table's header and separator rows (`extras`: `extra_columns`)."""
  cols = ["case", "batch", "Flax loop"] + peer_columns + [
      "bnlab auto (form)", "vs Flax loop", "vs PyTorch", "vs fastest peer"] + [
          f"bnlab {f}" for f in forms] + [f"bnlab {label} (vs fastest peer)"
                                          for label, _ in extras]
  return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]


def fastest(peers: dict) -> tuple[str, float] | None:
  """(column, rate) of the fastest of `peers` ({column: rate, or a note}); None if none ran."""
  rates = {k: v for k, v in peers.items() if isinstance(v, (int, float))}
  if not rates:
    return None
  best = max(rates, key=rates.get)
  return best, rates[best]


def ratio_cell(rate: float, peers: dict, name_it: bool) -> str:
  """`rate` over the fastest of `peers` ("-" if none ran), naming that peer if `name_it`."""
  best = fastest(peers)
  if best is None:
    return "-"
  return f"{rate / best[1]:.2f}x" + (f" ({best[0]})" if name_it else "")


def peer_cell(value) -> str:
  """A peer's rate, or the note it carries instead (e.g. 'not installed')."""
  return value if isinstance(value, str) else f"{value:,.0f}"


def case_row(case, forms, keras_specs, keras_notes, images, labels, data_file, extras=()):
  """Times one case; returns (its table row, {'flax': Flax loop rate, 'bnlab': bnlab auto's}).

  `extras`: the extra bnlab columns (`extra_columns`), "-" where `column_applies` says no.
  """
  name, model_name, norm, batch, steps = case
  steps = max(5, int(steps * _STEPS_SCALE.value))
  # In-process runners timed round-robin; the Keras peers run in subprocesses.
  torch_runs = torch_peer.runners(model_name, norm, batch, images, labels)
  runs = {"flax": flax_loop_runner(model_name, norm, batch, images, labels),
          **{k: v for k, v in torch_runs.items() if callable(v)}}
  runs["bnlab"], steps, form = bnlab_runner(model_name, norm, batch, steps, images, labels)
  for f in forms:
    runs[f] = bnlab_runner(model_name, norm, batch, steps, images, labels, loop=f)[0]
  scanned = form.startswith("scan")
  for column, kw in extras:
    if column_applies(kw, model_name, scanned):
      runs[column] = bnlab_runner(model_name, norm, batch, steps, images, labels, **kw)[0]
  rates = interleaved_rates(runs, steps, batch, _REPS.value)
  base, auto = rates["flax"], rates["bnlab"]
  torch_peers = {k: rates.get(k, v) for k, v in torch_runs.items()}
  peers = dict(torch_peers)
  for spec in keras_specs:
    backend = spec.partition("=")[0]
    rate, keras_notes[backend] = keras_rate(spec, model_name, norm, batch, steps, _REPS.value,
                                            data_file)
    peers[f"Keras {backend}"] = "not installed" if rate is None else rate
  cells = [f"{base:,.0f}"] + [peer_cell(v) for v in peers.values()] + [
      f"{auto:,.0f} ({form})", f"{auto / base:.2f}x",
      ratio_cell(auto, torch_peers, name_it=len(torch_peers) > 1),
      ratio_cell(auto, peers, name_it=True)] + [f"{rates[f]:,.0f}" for f in forms] + [
          f"{rates[column]:,.0f} ({ratio_cell(rates[column], peers, False)})"
          if column in rates else "-" for column, _ in extras]
  return f"| {name} | {batch} | " + " | ".join(cells) + " |", {"flax": base, "bnlab": auto}


def case_rows(forms, keras_specs, keras_notes, images, labels, extras=()):
  """Times every case, printing each row as it comes; returns (rows, `case_row` rates per model)."""
  rows, rates = [], {}
  data_dir = tempfile.mkdtemp(prefix="bnlab_benchmark_")
  data_file = os.path.join(data_dir, "mnist.npz")
  if keras_specs:
    np.savez(data_file, images=images, labels=labels)
  for case in CASES:
    row, rates[case[1]] = case_row(case, forms, keras_specs, keras_notes, images, labels,
                                   data_file, extras)
    rows.append(row)
    print(row, flush=True)
  shutil.rmtree(data_dir, ignore_errors=True)
  return rows, rates


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


def split_run(steps: int, images, labels) -> tuple[float, dict]:
  """(wall s, summary) of configs/paper_mlp.py cut to `steps`, via `train_and_evaluate`.

  In a fresh temporary work directory; the data is `--data`'s, loaded inside
  the call (random data is handed in).
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  cfg = sweep_speed.paper_mlp_config()
  cfg.train.num_steps = steps
  cfg.train.eval_every_steps = min(cfg.train.eval_every_steps, steps)
  cfg.train.log_every_steps = min(cfg.train.log_every_steps, steps)
  ds = None
  if _DATA.value == "random":
    ds = data_lib.Dataset(images, labels, images[:10000], labels[:10000], source="random",
                          verified=False)
  else:
    cfg.data.source = _DATA.value
  workdir = tempfile.mkdtemp(prefix="bnlab_benchmark_split_")
  try:
    start = time.perf_counter()
    summary = train.train_and_evaluate(cfg, workdir, data=ds)
    return time.perf_counter() - start, summary
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


def split_text(steps: int, wall: float, summary: dict, bnlab_rate: float | None,
               batch: int = 60) -> str:
  """The time-split line of a `steps`-step paper-MLP run from its wall time and summary.

  `summary["time"]`: seconds of "total", "startup" (call start to the first
  train step), "compile", "train", "evaluate", "checkpoint", "log" (and
  "other", if given; else total less the parts). Without it the line says the
  split is missing and takes the train-step time from `bnlab_rate` (the
  table's examples/s for the paper MLP), if given.
  """
  split = summary.get("time")
  split = split if isinstance(split, dict) else None
  table_s = steps * batch / bnlab_rate if bnlab_rate else None
  text = (f"\nWhere a run's time goes: paper MLP, {steps:,} steps through "
          f"`train_and_evaluate`: wall {wall:.1f} s")
  if split and split.get("train"):
    text += (f" = **{wall / split['train']:.2f}x** its train steps ({split['train']:.1f} s; "
             "target <= 1.3x)")
    if table_s:
      text += f"; at the table's bnlab rate the steps take {table_s:.1f} s"
  elif table_s:
    text += (f" = **{wall / table_s:.2f}x** its steps at the table's bnlab rate "
             f"({table_s:.1f} s; target <= 1.3x)")
  if split is None:
    wall_time = summary.get("wall_time")
    return text + ("; the split is missing (summary.json has no 'time'"
                   + (f"; its wall_time {wall_time:.1f} s" if wall_time is not None else "")
                   + ").\n")
  parts = [k for k in timesplit.PARTS if k in split] + sorted(
      k for k in split if k not in timesplit.PARTS + ("total", "other"))
  total = split.get("total", wall)
  other = split.get("other", total - sum(split[k] for k in parts))
  return (text + ". Split (summary.json): " + ", ".join(f"{k} {split[k]:.2f} s" for k in parts)
          + f", other {other:.2f} s; total {total:.1f} s.\n")


def split_line(mlp_rates: dict, images, labels) -> str:
  """One paper-MLP run of --split_steps steps and where its wall time goes."""
  wall, summary = split_run(_SPLIT_STEPS.value, images, labels)
  return split_text(_SPLIT_STEPS.value, wall, summary, mlp_rates.get("bnlab"))


def sweep_text(r: dict, big: dict | None) -> str:
  """The sweep line: the 24 members grouped vs one after another, then the 240 grouped."""
  text = (f"\nSweep as one program: {r['members']} paper-MLP members (8 learning rates x "
          f"3 seeds), {r['steps']:,} steps each: grouped {r['grouped_s']:.1f} s, one after "
          f"another {r['solo_s']:.1f} s, **{r['ratio']:.1f}x**; the grouped sweep again with "
          f"its programs in the compilation cache {r['grouped_warm_s']:.1f} s, "
          f"**{r['warm_ratio']:.1f}x**; max |grouped - solo| final "
          f"test accuracy {r['worst_accuracy_gap']:.4f}.")
  if big is not None:
    text += (f" {big['members']} members (8 learning rates x 10 seeds x 3 BN momenta) in "
             f"{big['groups']} group(s): grouped {big['grouped_s']:.1f} s, "
             f"**{big['grouped_s'] / r['grouped_s']:.2f}x** the {r['members']} grouped "
             "(target <= 3x)" + (f"; {big['failed']} failed" if big["failed"] else "") + ".")
  return text + "\n"


def sweep_line() -> str:
  """The 24-member sweep grouped against one member after another, and the 240 grouped."""
  r = sweep_speed.measure(_SWEEP_STEPS.value, _SWEEP_WORKDIR.value)
  big = (sweep_speed.measure_big(_SWEEP_STEPS.value, _SWEEP_WORKDIR.value)
         if _BIG_SWEEP.value else None)
  return sweep_text(r, big)


def lines_after_table(images, labels, mlp_rates: dict):
  """The lines below the table, each yielded as soon as it is measured."""
  for batch, steps in ((32, 150), (128, 40)):
    yield bn_cost_line(batch, steps, images, labels)
  yield mlp_floor_line(mlp_rates["flax"])
  if _SPLIT_STEPS.value:
    yield split_line(mlp_rates, images, labels)
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
  peer_columns = torch_peer.columns(torch_peer.import_torch()) + [
      f"Keras {k.partition('=')[0]}" for k in keras_specs]
  extras = extra_columns([u for u in _UNROLLS.value if u], [c for c in _CONVS.value if c])
  rows, rates = case_rows(forms, keras_specs, keras_notes, images, labels, extras)
  if keras_notes:
    header += " Keras: " + "; ".join(f"{k}: {v}" for k, v in keras_notes.items()) + "."
  text = header + "\n\n" + "\n".join(table_head(peer_columns, forms, extras) + rows) + "\n"
  for line in lines_after_table(images, labels, rates["paper_mlp"]):
    print(line, flush=True)
    text += line
  if _OUT.value:
    os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
    with open(_OUT.value, "w") as f:
      f.write(text)
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
