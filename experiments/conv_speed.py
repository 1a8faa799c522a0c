"""Training speed of the seed CNN for several convolution / pooling forms.

Seed CNN: Conv32 3x3 relu -> MaxPool 2 -> Conv64 3x3 relu -> Flatten ->
BatchNorm -> Dense64 relu -> Dense10 on 28x28x1 inputs, SGD, softmax
cross-entropy. Data are random MNIST-shaped arrays resident on the device.

Each (form, loop kind, batch) cell is compiled, run once as warm-up, then
timed 3 times; the median examples/s is reported.

Loop kinds:
  loop    Python loop of jitted steps; the step slices its batch out of the
          device-resident epoch arrays (no host transfers).
  scan    the whole epoch in one jitted ``lax.scan``.
  scanU   the same with ``unroll=U``.

Why ``lax.conv_general_dilated`` is slow inside a scan on XLA:CPU (``--hlo``):
XLA:CPU's ConvCanonicalization pass rewrites convolutions into NHWC x HWIO ->
NHWC (adding transposes) so they run on YNNPACK/Eigen kernels, but it only
visits the entry computation. In a jitted step all five convolutions (two
forward, conv2's input gradient, both kernel gradients) end up canonical. In
a ``while`` body the forward ones are canonical as written, while the three
backward ones keep the dim_labels autodiff gives them (``b01f_01oi->b01f``,
``f01b_i01o->01bf``) and are compiled by the generic loop emitter. Unroll,
fori_loop and XLA flags do not change this; writing the backward pass as
canonical convolutions in a ``custom_vjp`` (``xla_canonical``) does.

Usage:
  PYTHONPATH=. python experiments/conv_speed.py                       # full table
  PYTHONPATH=. python experiments/conv_speed.py --forms=im2col --batches=32 --loops=scan
  PYTHONPATH=. python experiments/conv_speed.py --hlo                 # conv ops in/out of scan
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import linen as nn
from jax import lax

from bnlab.models.conv import Conv, max_pool


def flax_max_pool(x):
  return nn.max_pool(x, (2, 2), (2, 2))


# form name -> (conv implementation or a function (x, kernel) -> y, pooling)
FORMS: dict[str, tuple[str | Callable, Callable]] = {
    "xla+flaxpool": ("xla", flax_max_pool),
    "xla+reshapepool": ("xla", max_pool),
    "xla_canonical+reshapepool": ("xla_canonical", max_pool),
    "gemm+reshapepool": ("gemm", max_pool),
    "im2col+reshapepool": ("im2col", max_pool),
    "taps+reshapepool": ("taps", max_pool),
    # (first conv, second conv) implementations
    "taps/xla_canonical+reshapepool": (("taps", "xla_canonical"), max_pool),
    "xla_canonical/im2col+reshapepool": (("xla_canonical", "im2col"),
                                         max_pool),
    "xla_canonical/gemm+reshapepool": (("xla_canonical", "gemm"), max_pool),
}


class ConvWith(nn.Module):
  """``nn.Conv``-compatible 'VALID' conv layer calling ``conv_fn(x, kernel)``."""

  features: int
  kernel_size: tuple[int, int]
  conv_fn: Callable

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    return self.conv_fn(x, kernel) + bias


STAGES = ("conv1", "relu1", "pool", "conv2", "relu2", "bn", "dense1", "dense2")


class SeedCNN(nn.Module):
  """Conv32-MaxPool-Conv64-Flatten-BN-Dense64-Dense10.

  ``stop_after`` truncates the network after that stage (for profiling);
  the truncated network's output is flattened and fed to the loss as logits.
  """

  conv_impl: str | Callable | tuple[str, str] = "auto"
  pool: Callable = max_pool
  stop_after: str = "dense2"

  def conv(self, features):
    impl = self.conv_impl
    if isinstance(impl, tuple):  # per-layer implementations
      impl = impl[0] if features == 32 else impl[1]
    if callable(impl):
      return ConvWith(features, (3, 3), impl)
    return Conv(features, (3, 3), implementation=impl)

  @nn.compact
  def __call__(self, x, train: bool = True):
    layers = {
        "conv1": lambda x: self.conv(32)(x),
        "relu1": nn.relu,
        "pool": self.pool,
        "conv2": lambda x: self.conv(64)(x),
        "relu2": lambda x: nn.relu(x).reshape(x.shape[0], -1),
        "bn": lambda x: nn.BatchNorm(use_running_average=not train)(x),
        "dense1": lambda x: nn.relu(nn.Dense(64)(x)),
        "dense2": lambda x: nn.Dense(10)(x),
    }
    for stage in STAGES[:STAGES.index(self.stop_after) + 1]:
      x = layers[stage](x)
    return x.reshape(x.shape[0], -1)


def make_train_fns(form: str, learning_rate: float = 0.01,
                   stop_after: str = "dense2"):
  """Returns (init_state, train_step) for the seed CNN in ``form``."""
  conv_impl, pool = FORMS[form]
  model = SeedCNN(conv_impl=conv_impl, pool=pool, stop_after=stop_after)
  tx = optax.sgd(learning_rate)

  def init_state(key):
    variables = model.init(key, jnp.zeros((1, 28, 28, 1)), train=False)
    params = variables["params"]
    return params, variables.get("batch_stats", {}), tx.init(params)

  def train_step(state, x, y):
    params, batch_stats, opt_state = state

    def loss_fn(p):
      logits, updates = model.apply(
          {"params": p, "batch_stats": batch_stats}, x, train=True,
          mutable=["batch_stats"])
      if logits.shape[1] != 10:  # truncated network: a cheap scalar loss
        return jnp.mean(logits ** 2), updates.get("batch_stats", {})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
      return loss, updates["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), new_stats, opt_state), loss

  return init_state, train_step


def make_epoch_runner(train_step, loop: str):
  """Returns run(state, xs, ys) -> state, training on every batch of xs."""
  if loop == "loop":
    @partial(jax.jit, donate_argnums=0)
    def indexed_step(state, xs, ys, i):
      return train_step(state, xs[i], ys[i])[0]

    def run(state, xs, ys):
      for i in range(xs.shape[0]):
        state = indexed_step(state, xs, ys, i)
      return state
    return run

  unroll = 1 if loop == "scan" else int(loop.removeprefix("scan"))

  @partial(jax.jit, donate_argnums=0)
  def run(state, xs, ys):
    return lax.scan(lambda s, b: train_step(s, *b), state, (xs, ys),
                    unroll=unroll)[0]
  return run


def random_epoch(key, examples: int, batch: int):
  steps = examples // batch
  kx, ky = jax.random.split(key)
  xs = jax.random.uniform(kx, (steps, batch, 28, 28, 1))
  xs = jnp.where(xs < 0.8, 0.0, xs)  # MNIST-like: mostly exact zeros
  ys = jax.random.randint(ky, (steps, batch), 0, 10)
  return xs, ys


def prepare_cell(form: str, loop: str, batch: int, examples: int,
                 stop_after: str = "dense2") -> Callable[[], float]:
  """Compiles and warms up one cell; returns a function timing one epoch."""
  init_state, train_step = make_train_fns(form, stop_after=stop_after)
  run = make_epoch_runner(train_step, loop)
  xs, ys = random_epoch(jax.random.PRNGKey(0), examples, batch)
  state = [jax.block_until_ready(run(init_state(jax.random.PRNGKey(1)), xs,
                                     ys))]  # compile + warm-up

  def timed_epoch() -> float:
    t0 = time.perf_counter()
    state[0] = jax.block_until_ready(run(state[0], xs, ys))
    return xs.shape[0] * xs.shape[1] / (time.perf_counter() - t0)
  return timed_epoch


def time_cells(cells: list[tuple], examples: int, repeats: int = 3
               ) -> list[float]:
  """Median examples/s per (form, loop, batch[, stop_after]) cell.

  All cells are compiled and warmed up first; the timed epochs then go
  round-robin over the cells, so that load from other processes on the
  machine affects all cells alike.
  """
  timers = [prepare_cell(*cell[:3], examples, *cell[3:]) for cell in cells]
  rates = [[] for _ in cells]
  for _ in range(repeats):
    for timer, r in zip(timers, rates):
      r.append(timer())
  return [statistics.median(r) for r in rates]


_CONV_RE = re.compile(r"convolution\(.*?window=\{([^}]*)\}.*?"
                      r"dim_labels=([\w>-]+)")
_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')
CANONICAL_DIM_LABELS = "b01f_01io->b01f"  # NHWC x HWIO -> NHWC


def convolutions_in_hlo(hlo_text: str) -> list[tuple[str, str, str, bool]]:
  """(op_name, window, dim_labels, in_loop_body) of each convolution."""
  found = []
  for line in hlo_text.splitlines():
    m = _CONV_RE.search(line)
    if m:
      name = _OP_NAME_RE.search(line)
      op_name = name.group(1) if name else "?"
      found.append((op_name, m.group(1), m.group(2), "while/body" in op_name))
  return found


def report_hlo(form: str, batch: int) -> None:
  """Prints the convolutions of the compiled step and of the scanned epoch.

  A canonical convolution (NHWC x HWIO -> NHWC) runs on XLA:CPU's fast
  YNNPACK/Eigen kernels; any other dim_labels go to the generic loop emitter.
  """
  init_state, train_step = make_train_fns(form)
  state = init_state(jax.random.PRNGKey(1))
  xs, ys = random_epoch(jax.random.PRNGKey(0), 4 * batch, batch)
  step = jax.jit(lambda s, x, y: train_step(s, x, y)[0])
  epoch = make_epoch_runner(train_step, "scan")
  for name, fn, args in (("jitted step", step, (state, xs[0], ys[0])),
                         ("scanned epoch", epoch, (state, xs, ys))):
    text = fn.lower(*args).compile().as_text()
    print(f"--- {form}, batch {batch}, {name}: convolutions in compiled HLO")
    for op_name, window, labels, in_body in convolutions_in_hlo(text):
      kind = ("canonical" if labels == CANONICAL_DIM_LABELS
              else "NON-canonical -> generic emitter")
      where = "while body" if in_body else "entry"
      short = re.sub(r"^jit\([^)]*\)/", "", op_name)
      print(f"  {where:10s} {labels:18s} {window:22s} {kind:34s} {short}")


def report_profile(form: str, loop: str, batch: int, examples: int,
                   repeats: int) -> None:
  """Train-step time of the network truncated after each stage."""
  print(f"--- {form}, {loop}, batch {batch}: ms per step (fwd+bwd+SGD) of the "
        "network truncated after each stage")
  print("| up to stage | ms/step | stage adds ms |\n|---|---|---|")
  previous = 0.0
  rates = time_cells([(form, loop, batch, stage) for stage in STAGES],
                     examples, repeats)
  for stage, rate in zip(STAGES, rates):
    ms = 1000 * batch / rate
    print(f"| {stage} | {ms:.2f} | {ms - previous:+.2f} |", flush=True)
    previous = ms


_FORMS = flags.DEFINE_string("forms", ",".join(FORMS),
                             "comma-separated convolution / pooling forms")
_LOOPS = flags.DEFINE_string("loops", "loop,scan,scan4", "comma-separated loop kinds")
_BATCHES = flags.DEFINE_string("batches", "32,128", "comma-separated batch sizes")
_EXAMPLES = flags.DEFINE_integer("examples", 8192, "examples per timed epoch")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed repetitions per cell (median)")
_HLO = flags.DEFINE_bool("hlo", False, "print convolution ops in/out of the scan body")
_INTERLEAVE_FORMS = flags.DEFINE_bool(
    "interleave_forms", False,
    "time all forms in one round-robin (fairer under load from other processes)")
_PROFILE = flags.DEFINE_bool("profile", False, "time the step truncated after each stage")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # only warnings and errors, as Python logs by default
    logging.set_verbosity(logging.WARNING)
  print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"jax {jax.__version__}, {jax.device_count()} device(s)")
  forms = _FORMS.value.split(",")
  if _HLO.value:
    for form in forms:
      report_hlo(form, int(_BATCHES.value.split(",")[0]))
    return

  loops = _LOOPS.value.split(",")
  batches = [int(b) for b in _BATCHES.value.split(",")]
  if _PROFILE.value:
    for form in forms:
      for loop in loops:
        report_profile(form, loop, batches[0], _EXAMPLES.value, _REPEATS.value)
    return

  columns = [(b, l) for b in batches for l in loops]
  header = ["form"] + [f"b{b} {l}" for b, l in columns]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  if _INTERLEAVE_FORMS.value:  # one round-robin over every cell of the table
    flat = time_cells([(f, l, b) for f in forms for b, l in columns],
                      _EXAMPLES.value, _REPEATS.value)
    table = [flat[i * len(columns):(i + 1) * len(columns)]
             for i in range(len(forms))]
  for i, form in enumerate(forms):
    rates = (table[i] if _INTERLEAVE_FORMS.value else
             time_cells([(form, l, b) for b, l in columns], _EXAMPLES.value,
                        _REPEATS.value))
    print("| " + " | ".join([form] + [f"{r:,.0f}" for r in rates]) + " |",
          flush=True)


if __name__ == "__main__":
  app.run(main)
