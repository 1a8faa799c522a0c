"""Which function each metric, measurement, figure or claim rule name means.

One table of each kind, below every other module: the config's checks look names up
here and the modules that define kinds register into it, so neither imports the other.
"""

from __future__ import annotations

from typing import Callable

METRICS: dict[str, Callable] = {}
MEASUREMENTS: dict[str, Callable] = {}
FIGURES: dict[str, Callable] = {}
RULES: dict[str, Callable] = {}
# Rule name -> fn(params) -> why those parameter values cannot be judged, or "": the ranges a
# signature does not state (e.g. a margin > 0), checked by the config before any run.
RULE_CHECKS: dict[str, Callable] = {}
# The rules that are tests: their numbers carry the p-value of the verdict, so a primary
# claim (corrected with the others for multiplicity) must use one.
TESTS: set[str] = set()


def register(table: dict, name: str):
  """Decorator: `@register(METRICS, "last")` adds the function under that name."""
  def add(fn):
    table[name] = fn
    return fn
  return add
