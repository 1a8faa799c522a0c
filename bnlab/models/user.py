"""Your own model by name: `model.name="package.module:target"`, imported, built and checked.

A name that does not resolve to a model is one `UserModelError`. The model is then
traced (`jax.eval_shape`: nothing computed or allocated) as the run will use it, at
its own training and evaluation batch sizes, in train and eval mode, through the
gradient of the loss (`run_problem`), before any step compiles: a model that cannot
train as bnlab runs it (wrong output, another RNG stream or mutable collection, a
shape right only for some batch size, an eval-mode bug, an operation without a
gradient, memory) is one line naming what failed, not a traceback mid-training.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import optax

from bnlab.errors import one_line


class UserModelError(ValueError):
  """`model.name` names no usable model of the user's; the message says why and the fix."""


def is_user_model(name: str) -> bool:
  """Whether `model.name` is a "package.module:target" path (not a built-in network)."""
  return ":" in name


def accepts(fn, name: str) -> bool:
  """Whether `fn` takes a keyword argument `name` (or any keyword)."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return True  # not introspectable: let the call decide
  return any(p.name == name and p.kind != p.POSITIONAL_ONLY or p.kind == p.VAR_KEYWORD
             for p in params)


def _takes_positional(fn) -> bool:
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
             for p in params)


def load_target(name: str):
  """The object "package.module:target" names, imported; UserModelError if it cannot be."""
  module_name, _, attr = name.partition(":")
  if not module_name or not attr or ":" in attr:
    raise UserModelError("expected 'package.module:target', e.g. 'mymodels:make_model'")
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and module_name.startswith(e.name):
      raise UserModelError(
          f"module {module_name!r} cannot be imported ({e}); run from the directory that "
          "holds it, add that directory to PYTHONPATH, or install its package") from None
    raise UserModelError(f"importing {module_name!r} failed ({e}); fix its imports") from None
  except Exception as e:  # pylint: disable=broad-except
    raise UserModelError(
        f"importing {module_name!r} raised {type(e).__name__}: "
        f"{one_line(e)}; fix the module") from None
  target = module
  for part in attr.split("."):
    if not hasattr(target, part):
      public = sorted(n for n in dir(module) if not n.startswith("_"))[:12]
      raise UserModelError(f"module {module_name!r} has no {attr!r}; it defines {public}")
    target = getattr(target, part)
  return target


def user_model(cfg, dtype=None) -> nn.Module:
  """Your own model from `cfg.name` = "package.module:target". The target is one of:

  - a function, called as `target(cfg)` (the `model` config section, whose
    free-form `options` holds the model's own settings) if it takes a
    positional argument, else as `target()`;
  - a `flax.linen.Module` class, built with its defaults;
  - a `flax.nnx.Module` class, built with its defaults (and `rngs`: the streams
    `params`, `dropout` and `noise`) through `flax.nnx.bridge.to_linen`, so its
    `nnx.BatchNorm`/`bnlab.nnx` statistics live in the `batch_stats` collection like
    linen's. Its `__call__` takes `train`, or it is an idiomatic NNX model whose mode
    `.train()`/`.eval()` set (`nnx_with_train_argument`).

  With `dtype` (train.half_precision) the target also gets `dtype=dtype`.
  A function must return a linen Module (an NNX model: return
  `nnx.bridge.to_linen(MyNNXModel, ...)`, which gets the same mode handling). The
  model is called as `model.apply(variables, images, train=...)` on the data's images
  (MNIST: uint8 (batch, 28, 28); a TFDS `data.name`: by default standardized float32
  (batch, H, W, C), `bnlab.data.input_spec`) and returns (batch, num_classes) logits; it may read the RNG
  streams "noise" and "dropout" in train mode. Raises UserModelError; what the
  model does when traced is `run_problem`'s to check (it needs the batch sizes).
  """
  target = load_target(cfg.name)
  kwargs = {} if dtype is None else {"dtype": dtype}
  is_class = isinstance(target, type)
  if is_class and issubclass(target, nnx.Module):
    init = target.__init__
    if dtype is not None and not accepts(init, "dtype"):
      raise UserModelError(_no_dtype(cfg.name))
    module = nnx.bridge.to_linen(nnx_with_train_argument(target), **kwargs)
  else:
    if is_class and not issubclass(target, nn.Module):
      raise UserModelError(f"{cfg.name} is a class but no flax.linen or flax.nnx Module")
    if not callable(target):
      raise UserModelError(
          f"{cfg.name} is a {type(target).__name__}, not a function or Module class")
    if dtype is not None and not accepts(target, "dtype"):
      raise UserModelError(_no_dtype(cfg.name))
    args = (cfg,) if not is_class and _takes_positional(target) else ()
    try:
      module = target(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      raise UserModelError(
          f"calling {cfg.name}({'config.model' if args else ''}) raised "
          f"{type(e).__name__}: {one_line(e)}; fix the function or the "
          "config.model keys it reads") from None
  if isinstance(module, nnx.bridge.ToLinen) and isinstance(module.nnx_class, type):
    module = module.clone(nnx_class=nnx_with_train_argument(module.nnx_class))
  if isinstance(module, nnx.Module):
    raise UserModelError(
        f"{cfg.name} returned a flax.nnx Module; return "
        f"flax.nnx.bridge.to_linen({type(module).__name__}, ...) instead (or name the NNX "
        "class itself), so that each run initializes it from its own seed")
  if not isinstance(module, nn.Module):
    raise UserModelError(
        f"{cfg.name} returned an object of type {type(module).__name__}, not a flax.linen "
        "Module")
  if not accepts(module.__call__, "train"):
    raise UserModelError(
        f"{type(module).__name__}.__call__ takes no `train` argument; give it "
        "`__call__(self, x, train: bool)` (BN uses batch statistics when train is True)")
  return module


@functools.lru_cache(maxsize=None)
def nnx_with_train_argument(cls: type) -> type:
  """NNX class `cls` as bnlab calls a model, `__call__(x, train)`.

  A class whose `__call__` takes `train` is returned as it is. An idiomatic NNX model
  takes none: its mode is set on the module, `model.train()` (dropout on, BN on batch
  statistics) or `model.eval()`. It gets a subclass (same name, variables and paths)
  whose `__call__(x, train)` sets that mode and calls the model's own. Cached: one
  subclass per class, so runs of one model share their compiled steps.
  """
  if accepts(cls.__call__, "train"):
    return cls

  def __call__(self, x, train: bool):  # pylint: disable=invalid-name
    if train:
      self.train()
    else:
      self.eval()
    return cls.__call__(self, x)

  names = {"__call__": __call__, "__module__": cls.__module__,
           "__qualname__": cls.__qualname__, "__doc__": cls.__doc__}
  return types.new_class(cls.__name__, (cls,), {}, lambda ns: ns.update(names))


def per_module_cache(maxsize: int):
  """Decorator: the function cached on its arguments (a Flax module among them), so that
  runs of one model in a process share what it made; called uncached where an argument
  cannot be hashed (a user's module with a list attribute)."""
  def wrap(fn):
    cached = functools.lru_cache(maxsize=maxsize)(fn)

    @functools.wraps(fn)
    def call(*args):
      try:
        hash(args)
      except TypeError:
        return fn(*args)
      return cached(*args)
    return call
  return wrap


# What the memory errors of XLA (and of a model that raises its own) say; a full disk,
# which orbax also reports as RESOURCE_EXHAUSTED, is not one (bnlab.rundir.errors).
_MEMORY_MARKERS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory")
_DISK_MARKERS = ("No space left", "ENOSPC", "quota", "File too large")


def is_out_of_memory(e: BaseException) -> bool:
  """Whether `e` says the device (or host) ran out of memory, not a disk out of space."""
  text = str(e)
  return isinstance(e, MemoryError) or (any(m in text for m in _MEMORY_MARKERS)
                                        and not any(m in text for m in _DISK_MARKERS))


def is_nondeterministic_op(e: BaseException) -> bool:
  """Whether `e` is XLA refusing an operation that has no deterministic GPU implementation
  while `--xla_gpu_deterministic_ops` (bnlab's deterministic mode) is on: e.g. the
  select-and-scatter of `flax.linen.max_pool`'s gradient."""
  return "does not have a deterministic implementation" in str(e)


def reason(e: BaseException) -> str:
  """`e` as a short phrase for a one-line message: its type and its first 200 characters."""
  return f"{type(e).__name__}: {one_line(e)}"


def memory_fix(batch_size: int, group_size: int | None = None) -> str:
  """What to lower when a model runs out of memory: the batch sizes, and a sweep's group."""
  group = (f", or the sweep's --max_group_size (this group trains {group_size} members)"
           if group_size else "; in a sweep, also --max_group_size")
  return f"lower train.batch_size (now {batch_size}) or train.eval_batch_size{group}"


def _traced(fn, failure: str, where: str, fix: str, batch_size: int):
  """(`fn()`, None), or (None, the problem in words) when tracing it raises: `failure`
  `where` and the error, then `fix`; an error that says memory, as running out of it."""
  try:
    return fn(), None
  except Exception as e:  # pylint: disable=broad-except
    if is_out_of_memory(e):
      return None, (f"runs out of memory {where} ({reason(e)}); {memory_fix(batch_size)}")
    return None, f"{failure} {where} ({reason(e)}){fix}"


def _bad_logits(logits, batch: int, where: str, num_classes: int = 10) -> str | None:
  if (hasattr(logits, "shape") and tuple(logits.shape) == (batch, num_classes)
      and jnp.issubdtype(logits.dtype, jnp.floating)):
    return None
  got = (f"{getattr(logits, 'dtype', type(logits).__name__)}"
         f"{list(getattr(logits, 'shape', []))}")
  return (f"returns {got} {where}; return float logits of shape (batch, {num_classes}) for "
          "any batch (the data's classes)")


@per_module_cache(64)
def _output_problem(module: nn.Module, batch_size: int, eval_batch_sizes: tuple[int, ...],
                    eval_in_train_mode: bool, inputs=((28, 28), "uint8"),
                    num_classes: int = 10) -> str | None:
  """What keeps `module` from training as bnlab runs it, or None.

  Traced with `jax.eval_shape` at the run's own batch sizes: nothing is computed or
  allocated, however large the batch, and a model right only for some batch size
  (a hard-coded shape), only in one mode, or without a gradient is caught before
  any step compiles, instead of as a traceback from inside the compiled step. In
  the engine's order: init in inference mode at `batch_size` (with the "params",
  "noise" and "dropout" streams, as `networks.init_rngs`); a train-mode apply
  with the "noise" and "dropout" streams and `batch_stats` mutable, returning
  (batch, 10) float logits; the gradient of the loss through it; an eval-mode
  apply at each of `eval_batch_sizes` (with `eval_in_train_mode`, a train-mode one
  too: train.eval_statistics "batch").
  """
  key = jax.random.key(0)
  rngs = {"noise": key, "dropout": key}
  shape, dtype = tuple(inputs[0]), inputs[1]
  images = jax.ShapeDtypeStruct((batch_size, *shape), dtype)
  described = f"(batch, {', '.join(map(str, shape))}) {dtype}"
  at_train = f"at batch {batch_size} (train.batch_size)"
  variables, problem = _traced(
      lambda: jax.eval_shape(lambda x: module.init({"params": key, **rngs}, x, train=False),
                             images),
      "fails to initialize", f"(model.init, train=False) {at_train}",
      f"; it is initialized on {described} images", batch_size)
  if problem:
    return problem
  # What the engine keeps of them (`state.create_train_state`), as arguments (abstract
  # values), never as constants.
  params = variables.get("params", {})
  others = {"batch_stats": variables.get("batch_stats", {})}

  def train_apply(p, o, x):
    return module.apply({**o, "params": p}, x, train=True, mutable=["batch_stats"], rngs=rngs)

  train_fix = ("; bnlab's train step gives it the RNG streams 'noise' and 'dropout' and lets "
               "it update only `batch_stats`")
  out, problem = _traced(lambda: jax.eval_shape(train_apply, params, others, images),
                         "fails", f"in train mode (train=True) {at_train}", train_fix,
                         batch_size)
  problem = problem or _bad_logits(out[0], batch_size, f"in train mode {at_train}",
                                   num_classes)
  if problem:
    return problem

  def loss(p, o, x):
    logits = train_apply(p, o, x)[0].astype(jnp.float32)
    labels = jnp.zeros(logits.shape[:1], jnp.int32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  _, problem = _traced(
      lambda: jax.eval_shape(jax.grad(loss), params, others, images),
      "is not differentiable: jax.grad of the loss fails", f"in train mode {at_train}",
      "; every operation between the parameters and the logits needs a gradient (wrap one "
      "without, such as jax.pure_callback, in jax.custom_jvp or jax.custom_vjp)", batch_size)
  if problem:
    return problem
  for b in eval_batch_sizes:
    eval_images = jax.ShapeDtypeStruct((b, *shape), dtype)
    at_eval = f"at batch {b} (train.eval_batch_size, at most the examples evaluated)"
    out, problem = _traced(
        lambda x=eval_images: jax.eval_shape(
            lambda p, o, x: module.apply({**o, "params": p}, x, train=False), params, others,
            x),
        "fails", f"in eval mode (train=False) {at_eval}",
        "; evaluations apply it with train=False to its params and batch_stats", batch_size)
    problem = problem or _bad_logits(out, b, f"in eval mode {at_eval}", num_classes)
    if problem:
      return problem
    if eval_in_train_mode:
      out, problem = _traced(
          lambda x=eval_images: jax.eval_shape(train_apply, params, others, x), "fails",
          f"in train mode evaluating with batch statistics {at_eval}", train_fix, batch_size)
      if problem:
        return problem
  return None


def run_problem(module: nn.Module, batch_size: int, eval_batch_sizes=(),
                eval_in_train_mode: bool = False, inputs=((28, 28), "uint8"),
                num_classes: int = 10) -> str | None:
  """What fails when `module` trains at `batch_size` and evaluates at each of
  `eval_batch_sizes` (`_output_problem`), as "<its class> <problem>"; None if nothing.
  `inputs`: one example's (shape, dtype) (`bnlab.data.InputSpec`); `num_classes`: the
  logits it must return."""
  problem = _output_problem(module, int(batch_size),
                            tuple(sorted({int(b) for b in eval_batch_sizes})),
                            bool(eval_in_train_mode), (tuple(inputs[0]), str(inputs[1])),
                            int(num_classes))
  return problem and f"{type(module).__name__} {problem}"


def _no_dtype(name: str) -> str:
  return (f"train.half_precision=True passes dtype=jnp.bfloat16 to {name}, which takes no "
          "`dtype`; add a `dtype` argument (the computation dtype) or set "
          "train.half_precision=False")
