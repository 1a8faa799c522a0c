"""Evaluation: test loss, accuracy and per-image results of a state or of stacked members, and
activation percentiles."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


def eval_model_config(model_cfg):
  """The model config for forward-only evaluation: same parameters and outputs.

  With `conv_implementation=auto`, evaluation uses XLA's convolution: forward
  convolutions compile well inside loops on every backend, and on a 2-core CPU
  a 60,000-image evaluation of the seed CNN ran ~3x faster than with im2col
  (13,200 vs 4,600 examples/s at batch 2,000).
  """
  if model_cfg.conv_implementation != "auto":
    return model_cfg
  cfg = model_cfg.copy_and_resolve_references()
  cfg.conv_implementation = "xla"
  return cfg


def _summed_loss_and_correct(logits, labels, mask):
  """(summed cross-entropy, number of correct predictions) over the examples `mask` selects,
  and which of the batch's examples were predicted correctly (masked ones False)."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = mask & (jnp.argmax(logits, -1) == labels)
  return jnp.sum(jnp.where(mask, loss, 0.0)), jnp.sum(correct), correct


@functools.partial(jax.jit, static_argnames=("apply_fn", "batch_size", "per_image"))
def evaluate(apply_fn, params, batch_stats, images, labels, *, batch_size: int,
             per_image: bool = True):
  """Mean loss and accuracy over every example, BN with running averages.

  Runs in batches of `batch_size`; the last batch is padded and its padding
  masked out, so no example is dropped. With `per_image`, also "correct":
  whether each example (in order, n of them) was classified correctly; its sum
  is the count behind "accuracy".
  """
  n = images.shape[0]
  num_batches = -(-n // batch_size)
  pad = num_batches * batch_size - n
  images = jnp.pad(images, ((0, pad),) + ((0, 0),) * (images.ndim - 1))
  labels = jnp.pad(labels, (0, pad))
  valid = jnp.arange(num_batches * batch_size) < n

  def body(carry, i):
    x = jax.lax.dynamic_slice_in_dim(images, i * batch_size, batch_size)
    y = jax.lax.dynamic_slice_in_dim(labels, i * batch_size, batch_size)
    w = jax.lax.dynamic_slice_in_dim(valid, i * batch_size, batch_size)
    logits = apply_fn({"params": params, "batch_stats": batch_stats}, x, train=False)
    loss, count, correct = _summed_loss_and_correct(logits, y, w)
    return (carry[0] + loss, carry[1] + count), correct if per_image else None

  (loss, count), correct = jax.lax.scan(
      body, (jnp.zeros(()), jnp.zeros((), jnp.int32)), jnp.arange(num_batches))
  out = {"loss": loss / n, "accuracy": count / n}
  if per_image:  # the batches in order, the padding cut off
    out["correct"] = correct.reshape(-1)[:n]
  return out


@functools.partial(jax.jit, static_argnames=("apply_fn", "batch_size", "per_image"))
def evaluate_members(apply_fn, params, batch_stats, images, labels, *, batch_size: int,
                     per_image: bool = True):
  """`evaluate` of each stacked member, one after another in one program.

  Sequential (`lax.map`) rather than vmapped: evaluation is compute-bound, and
  each member then sees exactly the batches (and memory) of a solo run.
  """
  return jax.lax.map(lambda pb: evaluate(apply_fn, pb[0], pb[1], images, labels,
                                         batch_size=batch_size, per_image=per_image),
                     (params, batch_stats))


# The BN statistics an evaluation can use (`train.eval_statistics`): the running
# averages (test_accuracy), statistics recomputed over training images
# (test_accuracy_population) or each test batch's own (test_accuracy_batch).
EVAL_STATISTICS = ("running", "population", "batch")


def population_model_config(model_cfg):
  """The evaluation model config whose BN layers average every batch they see (Algorithm 2)."""
  cfg = eval_model_config(model_cfg).copy_and_resolve_references()
  cfg.bn.running_average = "population"
  return cfg


def _has_counts(tree) -> bool:
  """Whether `batch_stats` keeps a `num_batches` count (population-average layers)."""
  if not hasattr(tree, "items"):
    return False
  return "num_batches" in tree or any(_has_counts(v) for v in tree.values())


def _with_counts(tree, count):
  """`batch_stats` with `num_batches` (= count) beside every mean/var, or without (None)."""
  if not isinstance(tree, dict) and not hasattr(tree, "items"):
    return tree
  out = {k: _with_counts(v, count) for k, v in tree.items() if k != "num_batches"}
  if "mean" in out and "var" in out and count is not None:
    out["num_batches"] = jnp.asarray(count, jnp.int32)
  return out


@functools.partial(jax.jit, static_argnames=("population_apply", "batch_size", "num_batches"))
def population_statistics(population_apply, params, batch_stats, images, *, batch_size: int,
                          num_batches: int):
  """Each BN layer's mean and variance over `num_batches` training batches (Algorithm 2).

  The BN paper's inference step: with the parameters frozen, the training
  network (BN in train mode, each batch normalised with its own statistics)
  processes `num_batches` consecutive batches of `batch_size` (m) images;
  each layer's E[x] is the mean of its batch means and Var[x] the mean of its
  batch variances times m/(m-1). `population_apply` is the model built with
  `population_model_config` (its BN layers keep that average); `batch_stats`
  the run's, whose values are replaced. Returns `batch_stats` in the run's
  structure, for `evaluate`.
  """
  stats = _with_counts(batch_stats, 0)

  def body(st, i):
    x = jax.lax.dynamic_slice_in_dim(images, i * batch_size, batch_size)
    _, updates = population_apply({"params": params, "batch_stats": st}, x, train=True,
                                  mutable=["batch_stats"])
    return updates["batch_stats"], None

  stats, _ = jax.lax.scan(body, stats, jnp.arange(num_batches))
  # The run's own layers may keep counts too (model.bn.running_average="population").
  return stats if _has_counts(batch_stats) else _with_counts(stats, None)


@functools.partial(jax.jit, static_argnames=("apply_fn", "batch_size"))
def evaluate_batch_statistics(apply_fn, params, batch_stats, images, labels, *,
                              batch_size: int):
  """Mean loss and accuracy with BN normalising each test batch with its own statistics.

  Train-mode normalisation, the running averages neither used nor updated
  (the updates are discarded). Every batch holds `batch_size` real images
  (no padding, which would enter the statistics): the last one is the last
  `batch_size` images, counting only those not counted before. Needs
  `images.shape[0] >= batch_size`. "correct": whether each image (in order)
  was classified correctly in the batch that counted it.
  """
  n = images.shape[0]
  num_batches = -(-n // batch_size)
  rngs = {"noise": jax.random.key(0), "dropout": jax.random.key(0)}

  def body(carry, i):
    start = jnp.minimum(i * batch_size, n - batch_size)
    x = jax.lax.dynamic_slice_in_dim(images, start, batch_size)
    y = jax.lax.dynamic_slice_in_dim(labels, start, batch_size)
    new = start + jnp.arange(batch_size) >= i * batch_size
    logits, _ = apply_fn({"params": params, "batch_stats": batch_stats}, x, train=True,
                         mutable=["batch_stats"], rngs=rngs)
    loss, count, correct = _summed_loss_and_correct(logits, y, new)
    return (carry[0] + loss, carry[1] + count), correct

  (loss, count), correct = jax.lax.scan(
      body, (jnp.zeros(()), jnp.zeros((), jnp.int32)), jnp.arange(num_batches))
  # Batch i < last covers images [i*b, (i+1)*b), all new; the last covers [n-b, n), of
  # which its last n - (num_batches-1)*b are new (the images its `new` mask counts).
  last_new = n - (num_batches - 1) * batch_size
  correct = jnp.concatenate([correct[:-1].reshape(-1), correct[-1, batch_size - last_new:]])
  return {"loss": loss / n, "accuracy": count / n, "correct": correct}


def _per_member(fn, params, batch_stats, stacked: bool):
  """`fn((params, batch_stats))` of one state, or of each stacked member in turn (`lax.map`)."""
  if stacked:
    return jax.lax.map(fn, (params, batch_stats))
  return fn((params, batch_stats))


# One compiled program per evaluation kind and model, reused at every
# evaluation (an eager `lax.map` of a new closure would trace and lower anew).
@functools.partial(jax.jit, static_argnames=(
    "kind", "apply_fn", "population_apply", "batch_size", "train_batch_size",
    "population_examples", "stacked"))
def evaluate_statistics(kind: str, apply_fn, population_apply, params, batch_stats, images,
                        labels, train_images, *, batch_size: int, train_batch_size: int,
                        population_examples: int, stacked: bool):
  """`evaluate` with BN statistics `kind` ("population" or "batch"), of one state or members.

  "population": `population_statistics` over the first `population_examples`
  of `train_images` (whole batches of `train_batch_size`, at least one), then
  `evaluate` with them. Models without running statistics (no BN) evaluate
  as with "running".
  """
  if kind == "batch":
    fn = lambda pb: evaluate_batch_statistics(  # noqa: E731
        apply_fn, pb[0], pb[1], images, labels, batch_size=batch_size)
  elif kind == "population":
    num_batches = max(1, min(population_examples, train_images.shape[0]) // train_batch_size)

    def fn(pb):
      stats = pb[1]
      if jax.tree.leaves(stats):
        stats = population_statistics(population_apply, pb[0], stats, train_images,
                                      batch_size=train_batch_size, num_batches=num_batches)
      return evaluate(apply_fn, pb[0], stats, images, labels, batch_size=batch_size)
  else:
    raise ValueError(f"evaluation statistics {kind!r}; expected one of {EVAL_STATISTICS[1:]}")
  return _per_member(fn, params, batch_stats, stacked)


@functools.partial(jax.jit, static_argnames=("apply_fn", "layers", "units", "percentiles"))
def activation_percentiles(apply_fn, params, batch_stats, images, *, layers, units,
                           percentiles):
  """Per-unit percentiles of activation inputs, inference mode: {layer: (units, q)}."""
  _, state = apply_fn({"params": params, "batch_stats": batch_stats}, images, train=False,
                      mutable=["intermediates"])
  found = {}
  for block in state["intermediates"].values():
    for name, values in block.items():
      found[name] = values[0].reshape(images.shape[0], -1)
  return {layer: jnp.percentile(found[layer][:, jnp.array(units)], jnp.array(percentiles),
                                axis=0).T
          for layer in layers}


def analysis_outputs(acfg, apply_fn, params, batch_stats, test_images, stacked: bool):
  """The `analysis` section's percentiles at an evaluation, on the device ({} if none).

  `params`/`batch_stats` are one state's, or stacked members' (`stacked`).
  """
  if not acfg.layers:
    return {}
  return _analysis_outputs(apply_fn, params, batch_stats, test_images,
                           num_examples=acfg.num_examples, layers=tuple(acfg.layers),
                           units=tuple(acfg.units),
                           percentiles=tuple(float(q) for q in acfg.percentiles),
                           stacked=stacked)


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_examples", "layers", "units",
                                             "percentiles", "stacked"))
def _analysis_outputs(apply_fn, params, batch_stats, test_images, *, num_examples: int,
                      layers, units, percentiles, stacked: bool):
  images = test_images[:num_examples]
  return _per_member(lambda pb: activation_percentiles(
      apply_fn, pb[0], pb[1], images, layers=layers, units=units, percentiles=percentiles),
                     params, batch_stats, stacked)


def analysis_records(outputs, n: int, stacked: bool) -> list[dict]:
  """`analysis_outputs` (copied to the host) as one record dict per member."""
  return [{f"{layer}/percentiles": np.asarray(v[i] if stacked else v).tolist()
           for layer, v in outputs.items()} for i in range(n)]
