"""Each method at its own best setting: a claim's `choose`, the value of a swept key (e.g. the
learning rate) picked per method on a validation metric before the claim's rule compares them.

Why: two methods compared at one shared rate are compared where that rate suits one of them;
each at its best rate chosen on the test set lets the test set both choose and judge, which
flatters whichever method's test noise happened to be kind. So a claim with
`"choose": {"along": KEY, "by": METRIC, "higher": bool}` first picks, for cell a and for cell
b separately, the value of KEY whose runs have the best seed mean of METRIC (a validation
metric: only METRIC is read to choose, never the metric the rule judges), then runs its rule
on a at a's value against b at b's, paired by seed as always. Ties go to the smaller value (a
smaller rate is the safer setting). A value at which any run lacks a finite METRIC (a run that
diverged has no final accuracy) is not eligible: its mean would be over the seeds that
survived. The chosen values and every value's mean go into the verdict's numbers (`chosen`).
"""

from __future__ import annotations

import math

from bnlab.study import cells as cells_lib

KEYS = ("along", "by", "higher")  # a claim's `choose`: along and by required


def problem(choose) -> str:
  """Why a claim's `choose` cannot be used, or "": its keys and their types."""
  if not hasattr(choose, "keys"):
    return (f"choose={choose!r}: give {{'along': a cell key, 'by': a metric, 'higher': "
            "True or False}")
  unknown = sorted(set(choose.keys()) - set(KEYS))
  if unknown:
    return f"choose has unknown keys {unknown}; its keys are {list(KEYS)}"
  for key, what in (("along", "a cell key"), ("by", "a metric name")):
    if not isinstance(choose.get(key), str) or not choose.get(key):
      return f"choose.{key}={choose.get(key)!r}: give {what}"
  if not isinstance(choose.get("higher", True), bool):
    return f"choose.higher={choose['higher']!r}: give True or False"
  return ""


def _finite(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def scores(cells: list[dict], where: str, along: str, by: str) -> list[list]:
  """[[value of `along`, seed mean of `by` or None], ...] ascending, over the cells `where`
  selects; None where a run of that value lacks a finite `by`."""
  out = {}
  for c in cells_lib.select(cells, where):
    values = c["values"].get(by) or []
    ok = bool(values) and all(_finite(v) for v in values)
    out[c["key"][along]] = sum(values) / len(values) if ok else None
  return [[x, out[x]] for x in sorted(out)]


def chosen(scored: list[list], higher: bool = True):
  """The value with the best mean (highest, or lowest if not `higher`), ties to the smaller
  value; None when no value has a mean."""
  eligible = [(x, m) for x, m in scored if m is not None]
  if not eligible:
    return None
  sign = 1 if higher else -1
  return min(eligible, key=lambda xm: (-sign * xm[1], xm[0]))[0]


def at_chosen(cells: list[dict], params: dict, choose: dict) -> tuple[dict | None, dict]:
  """(the rule's `params` with a and b each narrowed to its chosen value of `along`, or None
  when a side has no eligible value; the numbers of the choice)."""
  along, by, higher = choose["along"], choose["by"], choose.get("higher", True)
  numbers = {"along": along, "by": by, "higher": higher}
  out = dict(params)
  for side in ("a", "b"):
    scored = scores(cells, params[side], along, by)
    value = chosen(scored, higher)
    numbers[side], numbers[f"{side}_scores"] = value, scored
    if value is None:
      numbers["reason"] = (f"no value of {along} of {params[side]!r} has {by} on every run"
                           if scored else f"no cell of {params[side]!r}")
      return None, numbers
    out[side] = f"{params[side]},{along}={cells_lib.show(value)}"
  return out, numbers
