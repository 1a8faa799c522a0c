"""Train steps as pure, un-jitted functions: one step, an epoch's shuffle, a batch, a run of steps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bnlab.data import augment as augment_lib
from bnlab.models import conv as conv_lib
from bnlab.models import networks as models
from bnlab.engine.state import TrainState


def metric_sums_zero(num_members: int | None = None) -> dict[str, jax.Array]:
  """Device-side accumulators of training metrics over a log interval.

  With `num_members`, one per member (a leading member axis). Made on the host
  and copied: nothing is compiled.
  """
  shape = () if num_members is None else (num_members,)
  return jax.device_put({
      "loss": np.zeros(shape, np.float32),
      "correct": np.zeros(shape, np.float32),
      "count": np.zeros(shape, np.float32),
      # First step whose loss was not finite; -1 while none was.
      "first_nonfinite_step": np.full(shape, -1, np.int32),
  })


def resolve_loop(loop: str, model_cfg, backend: str | None = None) -> str:
  """The loop form for a model on a backend ("scan" or "loop").

  Measured on a 2-core CPU (see results/README): a scanned epoch beats a loop
  of jitted steps for the MLPs (no convolutions) and for the CNNs with
  im2col convolutions; XLA's own convolutions run ~5x slower inside a scan on
  CPU (their backward passes fall to a generic emitter in loop bodies), so a
  CPU model with `conv_implementation=xla` uses the loop. A user's model
  (`model.name="module:factory"`) uses the scan; set `train.loop` to choose.
  """
  if loop != "auto":
    return loop
  backend = backend or jax.default_backend()
  has_conv = model_cfg.name in models.CNN_MODELS
  impl = conv_lib.resolve_conv_implementation(model_cfg.conv_implementation)
  if backend == "cpu" and has_conv and impl == "xla":
    return "loop"
  return "scan"


def train_step(state: TrainState, sums, images, labels, augment: str = "none"
               ) -> tuple[TrainState, dict]:
  """One SGD step on a batch (the model's inputs), with BN in train mode; `augment`
  (`data.augment`) transforms the batch first with the step's own key."""
  images = augment_lib.apply(augment, images, augment_lib.step_key(state.rng, state.step))

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images,
        train=True, mutable=["batch_stats"], rngs=models.train_rngs(state.rng, state.step))
    logits = logits.astype(jnp.float32)  # a half-precision model's loss in float32
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits, updates.get("batch_stats", {}))

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss)
  first_bad = jnp.where(
      (sums["first_nonfinite_step"] < 0) & ~finite, state.step, sums["first_nonfinite_step"])
  sums = {
      "loss": sums["loss"] + loss,
      "correct": sums["correct"] + jnp.sum(jnp.argmax(logits, -1) == labels),
      "count": sums["count"] + 1.0,
      "first_nonfinite_step": first_bad,
  }
  state = state.replace(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
  return state, sums


def permutation(rng, epoch, num_examples: int) -> jax.Array:
  """The shuffle of `num_examples` for `epoch` drawn from raw key data `rng`."""
  key = jax.random.fold_in(jax.random.wrap_key_data(rng), epoch)
  return jax.random.permutation(key, num_examples)


def epoch_permutation(state: TrainState, epoch, num_examples: int) -> jax.Array:
  """The device-side shuffle of the training set for `epoch`."""
  return permutation(state.rng, epoch, num_examples)


def gather_batch(images, labels, perm, step, batch_size: int, batch_sharding):
  """Step `step`'s batch from device-resident data, split over devices if sharded."""
  steps_per_epoch = perm.shape[0] // batch_size
  start = (step % steps_per_epoch) * batch_size
  idx = jax.lax.dynamic_slice_in_dim(perm, start, batch_size)
  x, y = images[idx], labels[idx]
  if batch_sharding is not None:
    x = jax.lax.with_sharding_constraint(x, batch_sharding)
    y = jax.lax.with_sharding_constraint(y, batch_sharding)
  return x, y


def scan_steps(state, sums, images, labels, perm, *, length: int, batch_size: int,
               unroll: int = 1, batch_sharding=None, augment: str = "none"):
  """`length` consecutive train steps of one epoch as one `lax.scan`.

  The batch of step s is `perm[(s mod steps_per_epoch) * batch_size:][:batch_size]`,
  gathered from the device-resident `images`/`labels`. With `batch_sharding`
  (a `NamedSharding` over the batch axis) each device computes on its part of
  the batch; reductions over the batch, BN's statistics included, stay global.
  """

  def body(carry, _):
    st, sm = carry
    x, y = gather_batch(images, labels, perm, st.step, batch_size, batch_sharding)
    return train_step(st, sm, x, y, augment), None

  (state, sums), _ = jax.lax.scan(body, (state, sums), None, length=length, unroll=unroll)
  return replicated(state, batch_sharding), replicated(sums, batch_sharding)


def scan_batches(state, sums, images, labels, *, unroll: int = 1, augment: str = "none"):
  """Consecutive train steps, one per batch of `images` (steps, batch, ...) and `labels`
  (steps, batch): batches streamed from the host (`bnlab.data.grain_source`)."""

  def body(carry, batch):
    return train_step(*carry, *batch, augment), None

  (state, sums), _ = jax.lax.scan(body, (state, sums), (images, labels), unroll=unroll)
  return state, sums


def one_step(state, sums, images, labels, perm, *, batch_size: int, batch_sharding=None,
             augment: str = "none"):
  """A single train step, gathering its batch on the device."""
  x, y = gather_batch(images, labels, perm, state.step, batch_size, batch_sharding)
  state, sums = train_step(state, sums, x, y, augment)
  return replicated(state, batch_sharding), replicated(sums, batch_sharding)


def replicated(tree, batch_sharding):
  """With a mesh, `tree` leaves the step replicated: every process reads it whole."""
  if batch_sharding is None:
    return tree
  return jax.lax.with_sharding_constraint(
      tree, jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec()))
