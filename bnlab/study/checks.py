"""The study config's names, types and cells checked against its sweep before anything trains.

`bnlab.study.config.validate` checks the config alone and calls `check_params` for each
claim and figure: every parameter has the type its rule's or figure kind's signature
annotates (a bool is a real bool, not the string "false") and lies in its range.
`against_members` checks the config against the sweep's members ({"name": ...,
"key": {override: value}}, as study.json keeps them): every cell key, `each`, `along`,
`x`, `hue`, `panels`, `by` and `across` is a key of the cells; every where-string
("key=value,key=value": `a`, `b`, `treat`, `base`, `where`, `rows`) names values some
member has, as `cells.show` prints them; and the cells pair runs by seed (a swept key
left out of `cells` that varies within a cell, or two runs of one cell with the same
seed, is an error naming the members). Each failure is one `ConfigError` naming the
config key, what is wrong and what exists.
"""

from __future__ import annotations

import inspect
import json
import math
from typing import Callable

from bnlab.errors import ConfigError
from bnlab.study import cells as cells_lib

SEED = "seed"  # the member key that replicates within a cell (`bnlab.sweep.seeds`)

# What a parameter of a claim rule, figure kind or table names, by the parameter's name.
METRIC_PARAMS = ("metric", "other", "require", "fails", "trains", "unit_metric")  # "": none
METRIC_LISTS = ("metrics",)
KEY_PARAMS = ("along", "x", "across")  # one cell key
KEY_LISTS = ("each", "hue", "panels", "by")
WHERE_PARAMS = ("a", "b", "treat", "base", "where")  # "key=value,key=value"
WHERE_LISTS = ("rows",)
# Ranges the annotations do not state: parameter -> (holds(value), what it must be).
RANGES: dict[str, tuple[Callable, str]] = {
    **{p: (lambda v: v >= 0, ">= 0") for p in ("from_step", "to_step", "seed", "unit", "first")},
    "fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
}
_TYPES = {
    "bool": (lambda v: isinstance(v, bool), "True or False"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "float": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "None": (lambda v: v is None, "None"),
    "tuple": (lambda v: isinstance(v, (tuple, list)), "a tuple"),
    "list": (lambda v: isinstance(v, (tuple, list)), "a tuple"),
    "strings": (lambda v: isinstance(v, (tuple, list)) and all(isinstance(x, str) for x in v),
                "a tuple of strings"),
}


def _kinds(annotation, default, param: str) -> list[str] | None:
  """The `_TYPES` a value of this parameter may have; None when not known (not checked)."""
  if param in METRIC_LISTS + KEY_LISTS + WHERE_LISTS:
    return ["strings"]
  if param in METRIC_PARAMS + KEY_PARAMS + WHERE_PARAMS:
    return ["str"]
  if annotation is inspect.Parameter.empty:  # unannotated: the default's type, if it has one
    if default is inspect.Parameter.empty or default is None:
      return None
    annotation = "tuple" if isinstance(default, (tuple, list)) else type(default).__name__
  text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__",
                                                                str(annotation))
  if text.startswith("Optional[") and text.endswith("]"):
    text = f"{text[9:-1]} | None"
  kinds = []
  for alt in (a.strip() for a in text.split("|")):
    base = alt.split("[", 1)[0]
    if alt in ("tuple[str, ...]", "list[str]"):
      kinds.append("strings")
    elif base in _TYPES:
      kinds.append(base)
    else:
      return None  # a type this check does not know: left to the function
  return kinds


def _words(kinds: list[str]) -> str:
  return " or ".join(_TYPES[k][1] for k in kinds)


def param_problem(param: str, value, annotation=inspect.Parameter.empty,
                  default=inspect.Parameter.empty, what: str = "it") -> str:
  """Why `value` cannot be parameter `param` of `what` (annotated `annotation`, a string under
  `from __future__ import annotations`, or else typed by its default), or "": the tail of
  "claims.c.higher='false' is a str; rule 'separated' takes True or False for higher"."""
  kinds = _kinds(annotation, default, param)
  if kinds is not None and not any(_TYPES[k][0](value) for k in kinds):
    got = type(value).__name__
    article = "an" if got[0] in "aeiou" else "a"
    return f"is {article} {got}; {what} takes {_words(kinds)} for {param}"
  if isinstance(value, float) and not isinstance(value, bool) and not math.isfinite(value):
    return f"is not finite; {what} takes a finite number for {param}"
  if param in RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
    holds, text = RANGES[param]
    if not holds(value):
      return f"is out of range; {what} takes {param} {text}"
  return ""


def check_params(where: str, what: str, fn: Callable, skip: int, params: dict) -> None:
  """ConfigError when one of `params` does not have the type or range `fn`'s signature (after
  its first `skip` positional parameters) gives it; `where` names the config entry, `what` the
  function ("rule 'separated'")."""
  signature = list(inspect.signature(fn).parameters.values())[skip:]
  by_name = {p.name: p for p in signature
             if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
  for name, value in params.items():
    p = by_name.get(name)
    problem = param_problem(name, value, *((p.annotation, p.default) if p else
                                           (inspect.Parameter.empty,) * 2), what=what)
    if problem:
      raise ConfigError(f"{where}.{name}={value!r} {problem}")


# -- against the members -----------------------------------------------------------------------


def _ordered(values: list) -> list[str]:
  """Distinct values as `cells.show` prints them: numbers ascending, others in first-seen order."""
  distinct = list({json.dumps(v, default=str): v for v in values}.values())
  if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in distinct):
    distinct.sort()
  return list(dict.fromkeys(cells_lib.show(v) for v in distinct))


def _describe(cell: dict) -> str:
  return ",".join(f"{k}={cells_lib.show(v)}" for k, v in cell.items()) or "the study's one cell"


class _Members:
  """The members' keys, cells and values, and the checks of the names that refer to them."""

  def __init__(self, config: dict, members: list[dict], design: _Members | None = None):
    self.config = config
    self.design = design  # the study's whole sweep, when `members` are a part of it
    # (config entry, where-string) of the whole sweep's cells that `members` lack
    self.absent: list[tuple[str, str]] = []
    self.members = members
    self.keys = list(dict.fromkeys(k for m in members for k in m["key"]))
    self.cell_keys = list(config["cells"])
    self.pooled = list(config.get("pooled") or ())
    self.by_cell: dict[str, list[dict]] = {}
    for m in members:
      self.by_cell.setdefault(
          json.dumps([m["key"].get(k) for k in self.cell_keys], default=str), []).append(m)
    self.cells = [{k: group[0]["key"].get(k) for k in self.cell_keys}
                  for group in self.by_cell.values()]
    self.values = {k: _ordered([c[k] for c in self.cells]) for k in self.cell_keys}

  # The cells pair runs by seed.

  def check_cells(self) -> None:
    for k in self.cell_keys:
      if k not in self.keys:
        raise ConfigError(
            f"study config cells: no member has the key {k!r}; the members' keys are "
            f"{', '.join(self.keys) or 'none'}")
    for k in self.pooled:
      if k not in self.keys or k in self.cell_keys or k == SEED:
        raise ConfigError(
            f"study config pooled: {k!r} is not a member key outside cells and other than "
            f"the seed; the members' keys are {', '.join(self.keys) or 'none'}")
    for cell, group in zip(self.cells, self.by_cell.values()):
      for k in self.keys:
        if k in self.cell_keys or k in self.pooled or k == SEED:
          continue
        first = group[0]
        other = next((m for m in group if m["key"].get(k) != first["key"].get(k)), None)
        if other is not None:
          raise ConfigError(
              f"study config cells leave out {k}: members {first['name']} and "
              f"{other['name']} differ in it but fall in one cell ({_describe(cell)}), so the "
              f"cell would pool them; add {k!r} to cells (or to pooled, to pool its values "
              "on purpose)")
      seen: dict[str, dict] = {}
      for m in group:
        seed = json.dumps(m["key"].get(SEED), default=str)
        if seed in seen:
          a, b = seen[seed], m
          differ = [k for k in self.keys if a["key"].get(k) != b["key"].get(k)]
          same = (f"the same seed {cells_lib.show(m['key'][SEED])}" if SEED in m["key"] else
                  "no seed")
          raise ConfigError(
              f"study config cells: members {a['name']} and {b['name']} fall in one cell "
              f"({_describe(cell)}) with {same}, so a paired rule would pair a run with two "
              "partners; "
              + (f"add {', '.join(map(repr, differ))} to cells" if differ else
                 "the sweep lists the same member twice"))
        seen[seed] = m

  # Names and values.

  def key(self, at: str, k) -> None:
    if not isinstance(k, str):
      raise ConfigError(f"{at}: {k!r} is not a cell key (a string)")
    if k in self.cell_keys:
      return
    known = ", ".join(self.cell_keys) or "none (cells is empty)"
    if k in self.keys:
      raise ConfigError(f"{at}: {k} is a member key but not one of cells ({known}); add "
                        f"{k!r} to cells, or name the cells by their keys")
    raise ConfigError(f"{at}: no cell key {k!r}; the cell keys are {known}")

  def where(self, at: str, text) -> None:
    """`text` ("key=value,...") names cell keys, values some member has, and a cell; with a
    `design`, a cell of the whole sweep that these members lack is noted in `absent`."""
    try:
      self._where(at, text)
    except ConfigError:
      if self.design is None:
        raise
      self.design._where(at, text)  # pylint: disable=protected-access
      self.absent.append((at[len("study config "):], text))

  def _where(self, at: str, text) -> None:
    if not isinstance(text, str):
      raise ConfigError(f"{at}={text!r}: give cells as 'key=value,key=value' (a string)")
    want = []
    for part in filter(None, text.split(",")):
      k, eq, v = part.partition("=")
      if not eq:
        raise ConfigError(f"{at}: {part!r} in {text!r} is not key=value")
      self.key(at, k)
      if v not in self.values[k]:
        raise ConfigError(f"{at}: no cell has {k}={v}; its values are "
                          f"{', '.join(self.values[k])}")
      want.append((k, v))
    if not any(all(cells_lib.show(c[k]) == v for k, v in want) for c in self.cells):
      raise ConfigError(f"{at}: no cell has {text}: each value exists, but not together")

  def value_of(self, at: str, along: str, value) -> None:
    """`value` (compared as is, not as shown) is a value of the cell key `along`."""
    if along in self.cell_keys and not any(
        c[along] == value and isinstance(c[along], bool) == isinstance(value, bool)
        for c in self.cells):
      raise ConfigError(f"{at}: no cell has {along}={cells_lib.show(value)} ({value!r}); its "
                        f"values are {', '.join(self.values[along])}")

  def names(self, at: str, spec: dict) -> None:
    """The cell keys and where-strings among a claim's, figure's or table's parameters."""
    for p, v in spec.items():
      if p in KEY_PARAMS and v:
        self.key(f"{at}.{p}", v)
      elif p in KEY_LISTS:
        for k in v:
          self.key(f"{at}.{p}", k)
      elif p in WHERE_PARAMS:
        self.where(f"{at}.{p}", v)
      elif p == "within":  # a claim's: one where-string or a tuple of them
        for i, w in enumerate([v] if isinstance(v, str) else v):
          self.where(f"{at}.{p}" + ("" if isinstance(v, str) else f"[{i}]"), w)
      elif p in WHERE_LISTS:
        for i, w in enumerate(v):
          self.where(f"{at}.{p}[{i}]", w)

  def choose(self, at: str, spec: dict) -> None:
    """A claim's `choose.along` is a cell key that neither `each` nor `a`/`b` fixes (the
    choice is made among its values)."""
    along = spec["choose"]["along"]
    self.key(f"{at}.choose.along", along)
    if along in (spec.get("each") or ()):
      raise ConfigError(f"{at}.choose.along: {along} is also in each, so each verdict has one "
                        f"value of it to choose from; leave it out of each")
    for side in ("a", "b"):
      if along in [p.partition("=")[0] for p in str(spec.get(side, "")).split(",")]:
        raise ConfigError(f"{at}.{side}={spec[side]!r} fixes {along}, which choose chooses; "
                          f"name the cells without it")

  def check_names(self) -> None:
    for name, spec in self.config["claims"].items():
      at = f"study config claims.{name}"
      spec = {k: v for k, v in spec.items() if k not in ("statement", "rule", "primary")}
      self.names(at, spec)
      if "choose" in spec:
        self.choose(at, spec)
      if "expected" in spec and "along" in spec:
        self.value_of(f"{at}.expected", spec["along"], spec["expected"])
      if "seed" in spec:
        seeds = _ordered([m["key"].get(SEED) for m in self.members])
        if cells_lib.show(spec["seed"]) not in seeds:
          raise ConfigError(f"{at}.seed: no member has seed {spec['seed']!r}; the seeds are "
                            f"{', '.join(seeds)}")
    for name, spec in self.config["figures"].items():
      self.names(f"study config figures.{name}", {k: v for k, v in spec.items() if k != "kind"})
    for name, spec in self.config["tables"].items():
      self.names(f"study config tables.{name}", spec)


def against_members(config: dict, members: list[dict], design: list[dict] | None = None
                    ) -> list[tuple[str, str]]:
  """Checks a validated study config (a plain dict, as `Study.config`) against its members
  ({"name": ..., "key": {override: value}}); ConfigError naming the first problem.

  `design`: the members of the study's whole sweep when `members` are a reduced one (a
  study argument such as `runlocal`): a where-string naming a cell of the whole sweep that
  `members` lack is no error (its claim is inconclusive here); returns those (config entry,
  where-string).
  """
  if not members:
    raise ConfigError("study config: get_sweep() returned no members; return at least one")
  checked = _Members(config, members, _Members(config, design) if design else None)
  checked.check_cells()
  checked.check_names()
  return checked.absent
