"""Cells: the runs that agree on the cell keys, pooled, with each metric's statistics and name.

The rules, the figures and the report read cells, not runs, so each statistic (the t
interval, the binomial noise) and each label is made in one place.
"""

from __future__ import annotations

import json
import math
from typing import Any

from bnlab import sweep


def t_interval(values: list[float], quantile: float = 0.975) -> tuple[float, float | None]:
  """(mean, half-width of the two-sided Student t interval on the mean); None for n < 2.

  `quantile` 0.975 (default) is the 95% interval; 0.95 the 90% interval that two
  one-sided tests at 0.05 read.
  """
  from scipy import stats as scipy_stats  # pylint: disable=g-import-not-at-top
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, None
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  return mean, float(scipy_stats.t.ppf(quantile, n - 1)) * sd / math.sqrt(n)


def describe_values(values: list) -> dict:
  """Statistics of one metric over the runs of a cell (None values: runs without one)."""
  have = [v for v in values if v is not None]
  out: dict[str, Any] = {"n": len(have), "of": len(values)}
  if not have or isinstance(have[0], list):
    return out
  if all(isinstance(v, bool) for v in have):
    return {**out, "count": sum(have)}
  mean, half = t_interval([float(v) for v in have])
  return {**out, "mean": mean, "ci": half, "min": min(have), "max": max(have),
          "integer": all(isinstance(v, int) for v in have)}


def binomial_se(p: float, n_test: int) -> float:
  """The standard error of an accuracy p measured on n_test examples: sqrt(p(1-p)/n)."""
  return math.sqrt(p * (1 - p) / n_test)


def make_cells(rows: list[dict], keys, metrics) -> list[dict]:
  """Rows (one per run) grouped by `keys`, in first-seen order, with per-metric statistics.

  A cell: {"key": {k: v}, "rows": [...], "values": {metric: [per run]},
  "stats": {metric: describe_values(...)}}.
  """
  groups: dict[str, list[dict]] = {}
  for r in rows:
    groups.setdefault(json.dumps([r.get(k) for k in keys], default=str), []).append(r)
  cells = []
  for members in groups.values():
    values = {m: [r.get(m) for r in members] for m in metrics}
    cells.append({"key": {k: members[0].get(k) for k in keys}, "rows": members,
                  "values": values, "stats": {m: describe_values(v) for m, v in values.items()}})
  return cells


def show(value) -> str:
  return sweep.format_value(value)


def select(cells: list[dict], where: str) -> list[dict]:
  """The cells matching `"key=value,key=value"` (values as member names show them)."""
  want = [part.split("=", 1) for part in filter(None, where.split(","))]
  return [c for c in cells if all(k in c["key"] and show(c["key"][k]) == v for k, v in want)]


def one(cells: list[dict], where: str) -> dict | None:
  found = select(cells, where)
  return found[0] if len(found) == 1 else None


def label(labels: dict, value) -> str:
  """What the report calls a value, metric or config key (a dotted key by its last part)."""
  text = show(value)
  last = text.rsplit(".", 1)[-1] if isinstance(value, str) else text
  return labels.get(text, labels.get(last, last))


def cell_label(cell: dict, keys, labels: dict) -> str:
  return ", ".join(label(labels, cell["key"][k]) for k in keys) or "all"
