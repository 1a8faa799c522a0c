"""Strict JSON for records that may hold NaN or infinity.

Python's json writes NaN/inf as bare tokens that strict JSON readers (JavaScript's
JSON.parse, for one) reject. metrics.jsonl and summary.json are for any reader,
so a non-finite value is written as null and named under "nonfinite" (the
format: `bnlab.rundir.workdir`'s docstring), and `decode_nonfinite` restores it.
"""

from __future__ import annotations

import json
import math


_KINDS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _kind(x: float) -> str:
  return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")


def _strip_nonfinite(value, path: list, found: list):
  """`value` with non-finite floats as None; appends their ([path], kind) to `found`."""
  if isinstance(value, float) and not math.isfinite(value):
    found.append((list(path), _kind(value)))
    return None
  if isinstance(value, (list, tuple)):
    return [_strip_nonfinite(v, path + [i], found) for i, v in enumerate(value)]
  if isinstance(value, dict):
    return {k: _strip_nonfinite(v, path + [k], found) for k, v in value.items()}
  return value


def encode_nonfinite(obj: dict) -> dict:
  """`obj` as strict JSON can hold it: NaN/inf -> null, named under "nonfinite"."""
  out, flags = {}, {}
  for key, value in obj.items():
    found: list = []
    out[key] = _strip_nonfinite(value, [], found)
    if found:
      flags[key] = found[0][1] if found[0][0] == [] else [[p, k] for p, k in found]
  if flags:
    out["nonfinite"] = flags
  return out


def decode_nonfinite(obj: dict) -> dict:
  """The inverse of `encode_nonfinite` (objects without "nonfinite" pass as they are)."""
  flags = obj.get("nonfinite")
  if not isinstance(flags, dict):
    return obj
  out = {k: v for k, v in obj.items() if k != "nonfinite"}
  for key, where in flags.items():
    if key not in out:
      continue
    if isinstance(where, str):
      if where in _KINDS and out[key] is None:
        out[key] = _KINDS[where]
      continue
    out[key] = json.loads(json.dumps(out[key]))  # a copy to fill in
    for path, kind in where if isinstance(where, list) else ():
      try:
        parent = out[key]
        for step in path[:-1]:
          parent = parent[step]
        if parent[path[-1]] is None and kind in _KINDS:
          parent[path[-1]] = _KINDS[kind]
      except (KeyError, IndexError, TypeError):
        pass
  return out


def dumps(obj: dict, **kwargs) -> str:
  """`obj` as strict JSON text (`encode_nonfinite`); `kwargs` go to json.dumps."""
  return json.dumps(encode_nonfinite(obj), allow_nan=False, **kwargs)
