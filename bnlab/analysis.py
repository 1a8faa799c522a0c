"""Instruments for why BN helps: internal covariate shift and loss-landscape smoothness.

Pure functions over a scalar loss of the parameters, `loss_fn(params)`;
`classifier_loss` builds one from a bnlab model, its variables and a batch,
with BN in train mode (batch statistics; running statistics are not updated).
Everything is jit-compatible.

- `internal_covariate_shift`: Santurkar et al. (2018), Definition 2.1. For
  layer i, G_i is the gradient of the loss with respect to W_i with every
  layer at W^t, and G'_i the same gradient after the layers before i took
  one SGD step W^t -> W^t - lr * grad(W^t) on the same batch; returns
  ||G_i - G'_i|| and cos(G_i, G'_i) per layer.
- `gradient_smoothness`: Santurkar et al. (2018), section 3.2. Along the
  gradient g = grad L(w), for each step size eta: L(w - eta g), the
  gradient predictiveness ||grad L(w - eta g) - grad L(w)|| and the
  effective beta-smoothness max_eta ||grad L(w - eta g) - grad L(w)|| / ||eta g||.
- `top_hessian_eigenvalue`: the Hessian eigenvalue of largest magnitude
  (the curvature along the sharpest direction, which beta along the gradient
  only bounds from below), by power iteration with Hessian-vector products.

A layer is a top-level entry of the params tree (`conv_block_i`,
`dense_block_i`, `logits` in a `bnlab.models.networks.Classifier`); its weight is its
kernel. Updating a layer updates all of its parameters (kernel, bias, BN
scale and shift).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

Path = tuple[str, ...]
LossFn = Callable[[Any], jax.Array]

_ORDER = {"conv_block": 0, "dense_block": 1}


def _layer_sort_key(name: str):
  m = re.fullmatch(r"(conv_block|dense_block)_(\d+)", name)
  if m:
    return (_ORDER[m.group(1)], int(m.group(2)), name)
  if name == "logits":
    return (2, 0, name)
  return (3, 0, name)


def layer_weights(params: Mapping[str, Any]) -> list[Path]:
  """The paths of the weights W_1..W_L, input to output.

  For a Classifier: each block's kernel (`conv_block_i/Conv_0/kernel`,
  `dense_block_i/Dense_0/kernel`), then `logits/kernel`. A top-level entry
  that is an array is its own weight (path of length 1); one without a
  kernel is skipped.
  """
  paths = []
  for name in sorted(params, key=_layer_sort_key):
    sub = params[name]
    if not isinstance(sub, Mapping):
      paths.append((name,))
      continue
    found = [tuple(str(getattr(k, "key", k)) for k in p)
             for p, _ in jax.tree_util.tree_flatten_with_path(sub)[0]]
    kernels = sorted(p for p in found if p[-1] == "kernel")
    if kernels:
      paths.append((name, *kernels[0]))
  return paths


def get_path(tree, path: Path):
  """The subtree of `tree` at `path`."""
  for key in path:
    tree = tree[key]
  return tree


def classifier_loss(apply_fn: Callable, variables: Mapping[str, Any], images, labels,
                    rngs: Mapping[str, jax.Array] | None = None) -> LossFn:
  """params -> mean softmax cross-entropy on (images, labels), BN on batch statistics.

  `variables`: every collection but "params" (e.g. `batch_stats`) is held
  fixed. `rngs`: e.g. `bnlab.models.networks.train_rngs(rng, step)` for norm="noisy";
  the same noise is drawn at every call.
  """
  others = {k: v for k, v in variables.items() if k != "params"}

  def loss_fn(params):
    logits, _ = apply_fn({"params": params, **others}, images, train=True,
                         mutable=["batch_stats"], rngs=rngs or {})
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  return loss_fn


def _norm(tree) -> jax.Array:
  return optax.tree_utils.tree_norm(tree)


def _cosine(a, b) -> jax.Array:
  dot = sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  return dot / jnp.maximum(_norm(a) * _norm(b), jnp.finfo(jnp.float32).tiny)


def internal_covariate_shift(loss_fn: LossFn, params, learning_rate: float,
                             weights: Sequence[Path] | None = None) -> dict[str, jax.Array]:
  """Per-layer ICS (Santurkar et al. 2018, Def. 2.1) at `params`, one SGD step of `learning_rate`.

  Returns {"l2": ||G - G'||, "cosine": cos(G, G'), "grad_norm": ||G||}, each
  of shape (L,), in the order of `weights` (default `layer_weights(params)`).
  Layer 1's entries are exactly ||G - G'|| = 0, cos = 1.
  """
  weights = list(weights if weights is not None else layer_weights(params))
  owner = {path[0]: i for i, path in enumerate(weights)}
  grad_fn = jax.grad(loss_fn)
  grads = grad_fn(params)
  stepped = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
  # Each leaf's layer index (L for leaves of no listed layer: never updated).
  layer_of = {name: owner.get(name, len(weights)) for name in params}

  def shifted_grads(i):
    mixed = {name: jax.tree.map(lambda p, q, n=name: jnp.where(layer_of[n] < i, q, p),
                                params[name], stepped[name])
             for name in params}
    g = grad_fn(mixed)
    return [get_path(g, path) for path in weights]

  # Row 0 updates nothing: G itself, computed exactly as the G' rows are.
  shifted = jax.vmap(shifted_grads)(jnp.arange(len(weights)))
  before = [s[0] for s in shifted]
  after = [s[i] for i, s in enumerate(shifted)]
  return {
      "l2": jnp.stack([_norm(g - h) for g, h in zip(before, after)]),
      "cosine": jnp.stack([_cosine(g, h) for g, h in zip(before, after)]),
      "grad_norm": jnp.stack([_norm(g) for g in before]),
  }


def gradient_smoothness(loss_fn: LossFn, params, etas) -> dict[str, jax.Array]:
  """Loss and gradient along the gradient direction (Santurkar et al. 2018, sec. 3.2).

  With g = grad L(params), for each eta in `etas` (shape (E,)):
  "loss": L(params - eta g); "grad_change": ||grad L(params - eta g) - g||
  (gradient predictiveness; lower is more predictive); "beta": their ratio
  to ||eta g||. Scalars: "loss_range" = max - min of "loss",
  "beta_max" = max of "beta" (the effective beta-smoothness), "loss0" and
  "grad_norm" at `params`.
  """
  etas = jnp.asarray(etas, jnp.float32)
  value_and_grad = jax.value_and_grad(loss_fn)
  loss0, g = value_and_grad(params)
  g_norm = _norm(g)

  def along(eta):
    loss, h = value_and_grad(jax.tree.map(lambda p, d: p - eta * d, params, g))
    return loss, _norm(jax.tree.map(jnp.subtract, h, g))

  losses, change = jax.vmap(along)(etas)
  beta = change / jnp.maximum(etas * g_norm, jnp.finfo(jnp.float32).tiny)
  return {
      "loss": losses, "grad_change": change, "beta": beta,
      "loss_range": jnp.max(losses) - jnp.min(losses), "beta_max": jnp.max(beta),
      "loss0": loss0, "grad_norm": g_norm,
  }


def eta_grid(learning_rate: float, low: float = 0.25, high: float = 4.0,
             num: int = 9) -> jax.Array:
  """`num` step sizes spaced geometrically from low * lr to high * lr."""
  return learning_rate * jnp.geomspace(low, high, num)


def hessian_vector_product(loss_fn: LossFn, params, vector):
  """H(params) @ vector as a tree like `params`: forward-over-reverse (jvp of grad).

  Costs about two gradients and never forms H (P x P for P parameters).
  """
  return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]


def top_hessian_eigenvalue(loss_fn: LossFn, params, iterations: int = 20,
                           seed: int = 0) -> dict[str, jax.Array]:
  """The Hessian eigenvalue of largest magnitude at `params`, by power iteration.

  v_0 is a unit normal vector drawn with `seed` (fixed, so an estimate is
  reproducible and re-measuring a checkpoint gives the same number); each of `iterations`
  steps takes the Rayleigh quotient lambda_k = v_k . H v_k and v_{k+1} =
  H v_k / ||H v_k||. Returns "eigenvalue" = lambda of the last step (with its
  sign: a negative one means the sharpest direction is concave) and "change"
  = |lambda_last - lambda_previous|, NaN for one iteration: power iteration
  converges geometrically at the rate |lambda_2 / lambda_1|, which is unknown,
  so a fixed count is an estimate whose change shows how far from converged it
  is. Jit-compatible (a `fori_loop`; `iterations` and `seed` are static).
  """
  if iterations < 1:
    raise ValueError(f"iterations must be >= 1, got {iterations}")
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  v = treedef.unflatten([jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
                         for k, x in zip(keys, leaves)])
  tiny = jnp.finfo(jnp.float32).tiny

  def unit(t):
    n = jnp.maximum(_norm(t), tiny)
    return jax.tree.map(lambda x: x / n.astype(x.dtype), t)

  def dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  def step(_, carry):
    v, lam, _ = carry
    hv = hessian_vector_product(loss_fn, params, v)
    return unit(hv), dot(v, hv).astype(jnp.float32), lam

  nan = jnp.float32(jnp.nan)
  _, lam, prev = jax.lax.fori_loop(0, iterations, step, (unit(v), nan, nan))
  return {"eigenvalue": lam, "change": jnp.abs(lam - prev)}
