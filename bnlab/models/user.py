"""Your own model by name: `model.name="package.module:target"`, imported, built and checked.

A user's module is traced once on two images before any run compiles, so a model
that cannot train as bnlab runs it (wrong output, another RNG stream, another
mutable collection) is one `UserModelError` naming the problem, not a traceback
mid-training.
"""

from __future__ import annotations

import functools
import importlib
import inspect

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp


class UserModelError(ValueError):
  """`model.name` names no usable model of the user's; the message says why and the fix."""


def is_user_model(name: str) -> bool:
  """Whether `model.name` is a "package.module:target" path (not a built-in network)."""
  return ":" in name


def _accepts(fn, name: str) -> bool:
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
        f"{' '.join(str(e).split())[:200]}; fix the module") from None
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
  - a `flax.nnx.Module` class, built with its defaults (and `rngs`) through
    `flax.nnx.bridge.to_linen`, so its `nnx.BatchNorm`/`bnlab.nnx` statistics
    live in the `batch_stats` collection like linen's.

  With `dtype` (train.half_precision) the target also gets `dtype=dtype`.
  A function must return a linen Module (an NNX model: return
  `nnx.bridge.to_linen(MyNNXModel, ...)`). The model is called as
  `model.apply(variables, images, train=...)` on uint8 images of shape
  (batch, 28, 28) and returns (batch, 10) logits; it may read the RNG
  streams "noise" and "dropout" in train mode. Raises UserModelError.
  """
  target = load_target(cfg.name)
  kwargs = {} if dtype is None else {"dtype": dtype}
  is_class = isinstance(target, type)
  if is_class and issubclass(target, nnx.Module):
    init = target.__init__
    if dtype is not None and not _accepts(init, "dtype"):
      raise UserModelError(_no_dtype(cfg.name))
    module = nnx.bridge.to_linen(target, **kwargs)
  else:
    if is_class and not issubclass(target, nn.Module):
      raise UserModelError(f"{cfg.name} is a class but no flax.linen or flax.nnx Module")
    if not callable(target):
      raise UserModelError(
          f"{cfg.name} is a {type(target).__name__}, not a function or Module class")
    if dtype is not None and not _accepts(target, "dtype"):
      raise UserModelError(_no_dtype(cfg.name))
    args = (cfg,) if not is_class and _takes_positional(target) else ()
    try:
      module = target(*args, **kwargs)
    except Exception as e:  # pylint: disable=broad-except
      raise UserModelError(
          f"calling {cfg.name}({'config.model' if args else ''}) raised "
          f"{type(e).__name__}: {' '.join(str(e).split())[:200]}; fix the function or the "
          "config.model keys it reads") from None
  if isinstance(module, nnx.Module):
    raise UserModelError(
        f"{cfg.name} returned a flax.nnx Module; return "
        f"flax.nnx.bridge.to_linen({type(module).__name__}, ...) instead (or name the NNX "
        "class itself), so that each run initializes it from its own seed")
  if not isinstance(module, nn.Module):
    raise UserModelError(
        f"{cfg.name} returned an object of type {type(module).__name__}, not a flax.linen "
        "Module")
  if not _accepts(module.__call__, "train"):
    raise UserModelError(
        f"{type(module).__name__}.__call__ takes no `train` argument; give it "
        "`__call__(self, x, train: bool)` (BN uses batch statistics when train is True)")
  problem = _output_problem(module)
  if problem:
    raise UserModelError(f"{type(module).__name__} {problem}")
  return module


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


@per_module_cache(64)
def _output_problem(module: nn.Module) -> str | None:
  """What keeps `module` from training as bnlab runs it, traced on 2 images (nothing
  computed): init in inference mode, then a train-mode apply with the "noise" and
  "dropout" streams and `batch_stats` mutable, returning (batch, 10) float logits."""
  x, key = jnp.zeros((2, 28, 28), jnp.uint8), jax.random.key(0)
  try:
    variables = jax.eval_shape(lambda: module.init(key, x, train=False))
  except Exception as e:  # pylint: disable=broad-except
    return (f"fails to initialize on (batch, 28, 28) uint8 images ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]})")
  try:
    logits, _ = jax.eval_shape(lambda v: module.apply(
        v, x, train=True, mutable=["batch_stats"], rngs={"noise": key, "dropout": key}),
                               variables)
  except Exception as e:  # pylint: disable=broad-except
    return (f"fails in train mode ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
            "bnlab's train step gives it the RNG streams 'noise' and 'dropout' and lets it "
            "update only `batch_stats`")
  if (not hasattr(logits, "shape") or tuple(logits.shape) != (2, 10)
      or not jnp.issubdtype(logits.dtype, jnp.floating)):
    got = (f"{getattr(logits, 'dtype', type(logits).__name__)}"
           f"{list(getattr(logits, 'shape', []))}")
    return f"returns {got} for 2 images; return float logits of shape (batch, 10)"
  return None


def _no_dtype(name: str) -> str:
  return (f"train.half_precision=True passes dtype=jnp.bfloat16 to {name}, which takes no "
          "`dtype`; add a `dtype` argument (the computation dtype) or set "
          "train.half_precision=False")
