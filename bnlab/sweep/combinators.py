"""The member algebra: a sweep as a list of override dicts, and each member's name.

Nothing here runs or reads anything: `axis`, `product`, `zip_`, `seeds` and
`variants` build the list a sweep file's `get_sweep()` returns,
`apply_overrides` sets one member's overrides on a config, and `member_name`
is the directory name its overrides give it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import re
from typing import Any, Iterable, Sequence

import ml_collections

from bnlab import config as config_lib

# Longer member names are cut, and end with a hash of the whole name (distinct).
MAX_NAME = 200


@dataclasses.dataclass(frozen=True)
class Variant:
  """A labelled bundle of overrides, used as one value of a sweep key."""

  label: str
  overrides: dict

  def __str__(self) -> str:
    return self.label


def axis(key: str, values: Iterable) -> list[dict]:
  """One member per value: [{key: v} for v in values]."""
  return [{key: v} for v in values]


def product(*sweeps: Sequence[dict]) -> list[dict]:
  """Every combination, the last sweep varying fastest; later keys win."""
  out = []
  for combo in itertools.product(*sweeps):
    merged = {}
    for d in combo:
      merged.update(d)
    out.append(merged)
  return out


def zip_(*sweeps: Sequence[dict]) -> list[dict]:
  """Members side by side: the i-th member merges the i-th of each sweep."""
  lengths = [len(s) for s in sweeps]
  if len(set(lengths)) > 1:
    raise ValueError(f"zip_ needs sweeps of equal length; got lengths {lengths}")
  return [dict(kv for d in members for kv in d.items()) for members in zip(*sweeps)]


def seeds(n: int) -> list[dict]:
  """`n` seeds: axis("seed", range(n))."""
  return axis("seed", range(n))


def variants(key: str, bundles: dict[str, dict]) -> list[dict]:
  """One member per labelled bundle of overrides: {key: Variant(label, overrides)}."""
  return axis(key, [Variant(label, dict(o)) for label, o in bundles.items()])


def config_overrides(cfg, base=None) -> dict[str, Any]:
  """The dotted keys where `cfg` differs from `base` (default: `base_config()`)."""
  base = config_lib.base_config() if base is None else base
  a, b = config_lib.flatten(cfg.to_dict()), config_lib.flatten(base.to_dict())
  return {k: v for k, v in a.items() if b.get(k, object()) != v}


def format_value(v) -> str:
  if isinstance(v, Variant):
    return v.label
  if isinstance(v, bool):
    return str(v).lower()
  if isinstance(v, float):
    s = f"{v:g}"
    return s if float(s) == v else repr(v)
  if isinstance(v, (tuple, list)):
    return "-".join(format_value(x) for x in v)
  return str(v)


def member_name(overrides: dict) -> str:
  """A readable directory name: `key=value` pairs in order, keys by their last part.

  A `Variant` shows as its label; a last part shared by two keys stays dotted.
  """
  if not overrides:
    return "base"
  lasts = [k.rsplit(".", 1)[-1] for k in overrides]
  parts = []
  for key, last, value in zip(overrides, lasts, overrides.values()):
    if isinstance(value, Variant):
      parts.append(value.label)
    else:
      shown = last if lasts.count(last) == 1 else key
      parts.append(f"{shown}={format_value(value)}")
  name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))
  if len(name) > MAX_NAME:  # a directory name holds at most 255 bytes
    digest = hashlib.sha1(",".join(parts).encode()).hexdigest()[:12]
    name = f"{name[:MAX_NAME - 18]},hash={digest}"
  return name


def apply_overrides(base, overrides: dict, where: str = "sweep member"):
  """A copy of `base` with `overrides` (dotted keys; `Variant`s expanded) set."""
  cfg = base.copy_and_resolve_references()
  items = []
  for key, value in overrides.items():
    if isinstance(value, Variant):
      items.extend(value.overrides.items())
    else:
      items.append((key, value))
  for key, value in items:
    *path, last = key.split(".")
    node = cfg
    try:
      for part in path:
        node = node[part]
      free = ".".join(path) in config_lib.FREE_FORM  # the user's own keys: may be new
      if not isinstance(node, ml_collections.ConfigDict) or (last not in node and not free):
        raise KeyError(key)
      if isinstance(node.get(last), tuple) and isinstance(value, list):
        value = tuple(value)
      with node.unlocked():
        node[last] = value
    except (KeyError, AttributeError):
      raise config_lib.ConfigError(
          f"{where}: {key!r} is not a key of the config (keys and defaults are in "
          "bnlab/config.py)") from None
    except (TypeError, ValueError) as e:
      raise config_lib.ConfigError(f"{where}: bad value {value!r} for {key!r}: {e}") from None
  return cfg
