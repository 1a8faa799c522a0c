"""The study config: its fields, their checks, and the study a config file defines.

Checked once, before any run is trained or read, so a mistyped key, metric or rule
fails at the start and not in the report.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import shlex
import sys
import types
from typing import Callable

import ml_collections

from bnlab import config as config_lib
from bnlab import sweep
from bnlab.study import checks
from bnlab.study import choice
from bnlab.study import registry

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- the study config ---------------------------------------------------------------

def base_config() -> ml_collections.ConfigDict:
  """Every field a study config may set; `validate` rejects any other."""
  s = ml_collections.ConfigDict()
  s.title = ""  # the report's heading; "" -> the config file's name
  s.run = ml_collections.ConfigDict()
  s.run.config = ""  # run config file the members override; "" -> bnlab.config.base_config()
  s.run.arg = ""  # its get_config argument, e.g. "nobn"
  s.run.overrides = ml_collections.ConfigDict()  # nested, e.g. {"train": {"num_steps": 50}}
  s.data = ml_collections.ConfigDict()  # set on every run when not ""
  s.data.source = ""
  s.data.dir = ""
  s.grouped = True  # train members that can share one vmapped program together
  s.cells = ()  # the keys that define a cell; the others (seed) replicate within it
  # Member keys besides the seed that a cell pools on purpose (they vary within a cell, each
  # run of which still has its own seed); any other swept key must be in `cells` or follow
  # from them. Left out of study.json when empty.
  s.pooled = ()
  s.metrics = {}  # name -> (kind, *args), kind in METRICS
  s.measurements = {}  # name -> {"kind": ..., ...}, kind in MEASUREMENTS
  s.tables = {}  # name -> {"metrics": (...), "by": (...), "across": key}
  s.figures = {}  # name -> {"kind": ..., ...}, kind in FIGURES
  # name -> {"statement": ..., "rule": ..., "each": (...), "within": "key=value,...",
  # "primary": bool, **params}; `within` (a where-string or a tuple of them, matching any)
  # keeps a claim and its `each` to the cells it names;
  # the primary claims (tests: registry.TESTS) are corrected together for multiplicity (Holm).
  s.claims = {}
  s.labels = {}  # value or metric name -> what the report calls it
  s.notes = ""  # Markdown after the claims: definitions, budgets, context
  return s


def parse_arg(arg: str | None, **defaults) -> types.SimpleNamespace:
  """`"epochs=2,runlocal"` as typed fields; a bare name means True; unknown names fail."""
  out = dict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, eq, text = part.partition("=")
    if key not in defaults:
      raise config_lib.ConfigError(
          f"unknown study argument {key!r}; this study takes {sorted(defaults)}")
    kind = type(defaults[key])
    try:
      if kind is bool:
        value = (text.lower() not in ("false", "0", "no")) if eq else True
        if eq and text.lower() not in ("true", "1", "yes", "false", "0", "no"):
          raise ValueError(text)
      else:
        value = kind(text)
    except ValueError:
      raise config_lib.ConfigError(
          f"study argument {key}={text!r} is not a {kind.__name__}") from None
    out[key] = value
  return types.SimpleNamespace(**out)


def load_run_config(path: str, arg: str = "", near: str | None = None):
  """The run config of a config file: `path` from the study file `near` first, then the
  cwd, then bnlab's own configs (`config_lib.find_config`: runs outside the repository)."""
  if not path:
    return config_lib.base_config()
  full = config_lib.find_config(path, near)
  module = sweep.load_config_file(full)
  return module.get_config(arg) if arg else module.get_config()


def config_variant(path: str, overrides: dict | None = None, arg: str = "") -> dict:
  """The dotted overrides that turn the base run config into `path`'s, plus `overrides`.

  For `sweep.variants("model", {"mlp": config_variant("configs/paper_mlp.py", ...)})`;
  `path` is found from the file that calls this (the study file) first.
  """
  near = sys._getframe(1).f_globals.get("__file__")  # pylint: disable=protected-access
  return {**sweep.config_overrides(load_run_config(path, arg, near)), **(overrides or {})}


def _lookup(kind: str, name: str, table: dict) -> Callable:
  if name not in table:
    raise config_lib.ConfigError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}")
  return table[name]


def _check_params(kind: str, where: str, fn: Callable, skip: int, args=(), kwargs=None) -> None:
  params = list(inspect.signature(fn).parameters.values())[skip:]
  try:
    inspect.Signature(params).bind(*args, **(kwargs or {}))
  except TypeError as e:
    raise config_lib.ConfigError(f"study config {where}: {e} for the {kind}") from None


def validate(cfg) -> None:
  """Checks the study config (a ConfigDict, or a plain dict as `Study.config`) against
  `base_config()`, the registries and the signatures of its rules and figure kinds
  (ConfigError); `check_study` checks it against the sweep's members too."""
  if isinstance(cfg, dict):
    cfg = ml_collections.ConfigDict(cfg)
  base = base_config()
  for section in (None, "run", "data"):
    have, want = (cfg, base) if section is None else (cfg[section], base[section])
    for key in have.keys():
      if key not in want:
        dotted = key if section is None else f"{section}.{key}"
        raise config_lib.ConfigError(
            f"study config: unknown key {dotted!r}; the keys are those of "
            "bnlab.study.base_config()")
  for key in ("cells", "pooled"):
    value = cfg.get(key, ())
    if not isinstance(value, (tuple, list)) or not all(isinstance(k, str) for k in value):
      raise config_lib.ConfigError(
          f"study config {key}={value!r}: give a tuple of member keys, e.g. ('model.norm',)")
  names = metric_order(cfg.metrics)
  for name in names:
    spec = tuple(cfg.metrics[name])
    _check_params("metric", f"metrics.{name}={spec}", registry.METRICS[spec[0]], 1, spec[1:])
  for name, spec in cfg.measurements.items():
    _lookup("measurement", _kind(f"measurements.{name}", spec), registry.MEASUREMENTS)
  for name, spec in cfg.figures.items():
    spec = dict(spec)
    kind = _kind(f"figures.{name}", spec.pop("kind", None))
    fn = _lookup("figure kind", kind, registry.FIGURES)
    _check_params("figure kind", f"figures.{name}", fn, 3, kwargs=spec)
    checks.check_params(f"study config figures.{name}", f"figure kind {kind!r}", fn, 3, spec)
    _known_metrics(f"figures.{name}", [v for k, v in spec.items()
                                       if k in checks.METRIC_PARAMS and v], names)
  for name, spec in cfg.tables.items():
    spec = dict(spec)
    unknown = sorted(set(spec) - {"metrics", "by", "across"})
    if unknown or not spec.get("metrics"):
      raise config_lib.ConfigError(
          f"study config tables.{name}: " + (f"unknown keys {unknown}" if unknown else
                                              "no metrics") +
          "; a table is {'metrics': (...), 'by': (cell keys), 'across': a cell key}")
    for key, value in spec.items():
      problem = checks.param_problem(key, value, what="a table")
      if problem:
        raise config_lib.ConfigError(f"study config tables.{name}.{key}={value!r} {problem}")
    _known_metrics(f"tables.{name}", spec["metrics"], names)
  for name, spec in cfg.claims.items():
    spec = dict(spec)
    if not spec.pop("statement", ""):
      raise config_lib.ConfigError(f"study config claims.{name} has no statement")
    each = spec.pop("each", ())
    problem = checks.param_problem("each", each, what="a claim")
    if problem:
      raise config_lib.ConfigError(f"study config claims.{name}.each={each!r} {problem}")
    within = spec.pop("within", "")
    if not isinstance(within, str) and not (
        isinstance(within, (tuple, list)) and within and all(isinstance(w, str) for w in within)):
      raise config_lib.ConfigError(
          f"study config claims.{name}.within={within!r}: give the cells as "
          "'key=value,key=value' (a string), or a tuple of such strings (cells matching any)")
    rule = spec.pop("rule", "")
    fn = _lookup("claim rule", rule, registry.RULES)
    primary = spec.pop("primary", False)
    if not isinstance(primary, bool):
      raise config_lib.ConfigError(
          f"study config claims.{name}.primary={primary!r}: give True or False")
    if primary and rule not in registry.TESTS:
      raise config_lib.ConfigError(
          f"study config claims.{name} is primary but its rule {rule!r} gives no p-value to "
          f"correct for multiplicity; use one of {sorted(registry.TESTS)} or make it secondary")
    if "choose" in spec:
      _check_choose(f"claims.{name}", rule, fn, spec.pop("choose"), names)
    problem = registry.RULE_CHECKS[rule](spec) if rule in registry.RULE_CHECKS else ""
    if problem:
      raise config_lib.ConfigError(f"study config claims.{name}: {problem}")
    _check_params("claim rule", f"claims.{name}", fn, 1, kwargs=spec)
    checks.check_params(f"study config claims.{name}", f"rule {rule!r}", fn, 1, spec)
    for m in claim_metrics(spec):
      if m not in names:
        raise config_lib.ConfigError(f"study config claims.{name}: unknown metric {m!r}")


def _check_choose(where: str, rule: str, fn: Callable, choose, names: list[str]) -> None:
  """A claim's `choose` (`bnlab.study.choice`): its keys and types, a metric that exists,
  and a rule that compares two cells a and b (each is narrowed to its chosen value)."""
  problem = choice.problem(choose)
  if problem:
    raise config_lib.ConfigError(f"study config {where}.{problem}")
  if choose["by"] not in names:
    raise config_lib.ConfigError(
        f"study config {where}.choose.by: unknown metric {choose['by']!r}; the metrics are "
        f"{', '.join(names)}")
  params = inspect.signature(fn).parameters
  if "a" not in params or "b" not in params:
    raise config_lib.ConfigError(
        f"study config {where}.choose: rule {rule!r} does not compare two cells a and b; "
        "choose narrows a and b each to its chosen value (e.g. rules paired_interval, "
        "reaches_sooner)")


def _kind(where: str, spec) -> str:
  """The `kind` of a figure or measurement spec (or the kind itself); ConfigError without one."""
  kind = spec.get("kind") if isinstance(spec, (dict, ml_collections.ConfigDict)) else spec
  if not isinstance(kind, str) or not kind:
    raise config_lib.ConfigError(f"study config {where} has no kind; give 'kind': NAME")
  return kind


def _known_metrics(where: str, used, names: list[str]) -> None:
  unknown = [m for m in used if m not in names]
  if unknown:
    raise config_lib.ConfigError(
        f"study config {where}: unknown metrics {unknown}; the metrics are {', '.join(names)}")


def check_study(config: dict, members: list[dict]) -> None:
  """The whole check of a study before anything trains: `validate(config)`, then its names,
  values and cells against the sweep's `members` ({"name": ..., "key": {override: value}};
  `bnlab.study.checks.against_members`). ConfigError naming the first problem."""
  validate(config)
  checks.against_members(json.loads(json.dumps(
      config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config)), members)


def claim_metrics(spec: dict) -> list[str]:
  """The metric names a claim's parameters read (`metric`, `metrics`, `other`, ...)."""
  out = []
  for k, v in spec.items():
    if k in ("metric", "other", "require", "fails", "trains") and v:
      out.append(v)
    elif k == "metrics":
      out += list(v)
    elif k == "choose" and hasattr(v, "keys") and isinstance(v.get("by"), str) and v["by"]:
      out.append(v["by"])  # the metric that chooses is read, so it is published
  return out


DERIVED_METRICS = ("at_least", "below", "any")


def metric_refs(spec) -> tuple:
  """The metrics a derived metric reads (`("at_least", "final_acc", 0.9)` -> ("final_acc",))."""
  return () if spec[0] not in DERIVED_METRICS else spec[1:] if spec[0] == "any" else spec[1:2]


def metric_order(metrics: dict) -> list[str]:
  """Metric names, each after the metrics it reads; ConfigError for unknown kinds or names."""
  order: list[str] = []
  pending = dict(metrics)
  for name, spec in metrics.items():
    _lookup("metric", tuple(spec)[0], registry.METRICS)
    for ref in metric_refs(tuple(spec)):
      if ref not in metrics:
        raise config_lib.ConfigError(f"study config metrics.{name}: no metric named {ref!r}")
  while pending:
    ready = [n for n, s in pending.items() if all(r in order for r in metric_refs(tuple(s)))]
    if not ready:
      raise config_lib.ConfigError(f"study config metrics {sorted(pending)} read each other")
    order += ready
    for n in ready:
      del pending[n]
  return order


# -- loading a study -------------------------------------------------------------------

def _jsonable(value):
  """A sweep value as study.json keeps it (a Variant by its label)."""
  if isinstance(value, sweep.Variant):
    return value.label
  return list(value) if isinstance(value, tuple) else value


def _keyed(members: list[dict]) -> list[dict]:
  """Sweep members as `Study.members` keeps them: {"name": ..., "key": {override: value}}."""
  return [{"name": sweep.member_name(m), "key": {k: _jsonable(v) for k, v in m.items()}}
          for m in members]


@dataclasses.dataclass
class Study:
  """A study as data: its config (a plain dict), docstring and members."""

  path: str
  arg: str
  doc: str
  config: dict
  members: list[dict]  # {"name": ..., "key": {override: value}}
  sweep: list | None = None  # the members' overrides, when loaded from the file
  flags: tuple[str, ...] = ()  # the command line's --config.KEY=VALUE overrides

  @classmethod
  def from_file(cls, path: str, arg: str, cfg) -> "Study":
    validate(cfg)
    module = sweep.load_config_file(path)
    if not hasattr(module, "get_sweep"):
      raise config_lib.ConfigError(f"study config {path} defines no get_sweep()")
    members = module.get_sweep(arg) if arg else module.get_sweep()
    config = json.loads(json.dumps(cfg.to_dict()))
    if not config["title"]:
      config["title"] = os.path.splitext(os.path.basename(path))[0]
    if not config["pooled"]:  # so that registrations made before it existed stay unchanged
      del config["pooled"]
    keyed, design = _keyed(members), None
    if arg:  # the argument may reduce the sweep (e.g. runlocal): its cells are the whole one's
      try:
        design = _keyed(module.get_sweep())
      except Exception:  # pylint: disable=broad-except  # needs its argument: none to compare
        design = None
    absent = checks.against_members(config, keyed, design)
    if absent:
      from absl import logging  # pylint: disable=g-import-not-at-top
      entries = list(dict.fromkeys(at.rsplit(".", 1)[0] for at, _ in absent))
      logging.warning("%s:%s has no run in cells that only its whole sweep has (e.g. %s), named "
                      "by %s: they are inconclusive or left out here", path, arg, absent[0][1],
                      ", ".join(entries))
    return cls(path, arg, inspect.cleandoc(module.__doc__ or ""), config, keyed, members)

  def to_json(self) -> dict:
    return {"path": self.path, "arg": self.arg, "doc": self.doc, "config": self.config,
            "members": self.members}

  def command(self, workdir: str) -> str:
    arg = f":{self.arg}" if self.arg else ""
    flags = "".join(f" {shlex.quote(f)}" for f in self.flags)
    return f"python -m bnlab.study --config={self.path}{arg}{flags} --workdir={workdir}"

  def base_run_config(self):
    run = self.config["run"]
    cfg = load_run_config(run["config"], run["arg"], self.path)
    overrides = config_lib.flatten(run["overrides"])
    overrides.update({f"data.{k}": v for k, v in self.config["data"].items() if v != ""})
    cfg = sweep.apply_overrides(cfg, overrides, "study config run.overrides")
    config_lib.validate(cfg)
    return cfg
