"""Studies: a config names a sweep, its cells, metrics, figures and claims; this runs and reports it.

  python -m bnlab.study --config=configs/studies/NAME.py[:ARGS] --workdir=DIR \
      [--config.KEY=VALUE] [--stage=all|run|report] [--out=results/NAME]

A study config module exports `get_config(arg=None)`, a `base_config()` with a
few fields set (pure data: strings, numbers, tuples, dicts), and
`get_sweep(arg=None)`, the members as `bnlab.sweep` combinators build them.
Behaviour is looked up by name in four registries, each of small functions:

- METRICS: `fn(run, *args) -> value` reduces one run's files to a number, a
  bool, a series or None; `config.metrics = {"final_acc": ("summary",
  "test_accuracy")}`. A metric may use the metrics named before it.
- MEASUREMENTS: `fn(run_dir, run_cfg, spec) -> dict` measures what the engine
  does not record (e.g. from the run's checkpoints); cached per run in
  `runs/<member>/measurements/NAME.json`; the metric `("measured", NAME, KEY)`
  reads one of its values.
- FIGURES: `fn(cells, path, labels, **spec)` draws the cells into a PNG.
- RULES: `fn(cells, **params) -> (verdict, numbers)`, verdict one of
  supported / refuted / inconclusive, for each claim.

Stages (each idempotent): *run* trains what is missing through
`bnlab.sweep.run_sweep` (grouping, resuming; members in `DIR/runs/`) and
records the stage's wall time and `bnlab.engine.provenance.environment()` in
`DIR/stages.json`; *report* reads only the files (`DIR/study.json` and the run
directories) and writes `report.md`, `results.json`, `results.csv` (one row per
run, its reduced values; series stay in the run's metrics.jsonl), `cells.csv`, `claims.json` and `figures/`. A cell pools the runs that
agree on `config.cells` (normally all but the seed): n, mean, a 95% Student t
interval on the seed mean, min and max; for test accuracies also the test
set's binomial standard error sqrt(p(1-p)/N).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import inspect
import json
import math
import os
import re
import shlex
import shutil
import sys
import time
import types
from typing import Any, Callable

import ml_collections

from bnlab import config as config_lib
from bnlab import sweep

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VERDICTS = ("supported", "refuted", "inconclusive")


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
  s.metrics = {}  # name -> (kind, *args), kind in METRICS
  s.measurements = {}  # name -> {"kind": ..., ...}, kind in MEASUREMENTS
  s.tables = {}  # name -> {"metrics": (...), "by": (...), "across": key}
  s.figures = {}  # name -> {"kind": ..., ...}, kind in FIGURES
  s.claims = {}  # name -> {"statement": ..., "rule": ..., "each": (...), **params}
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


def load_run_config(path: str, arg: str = ""):
  """The run config of a config file (path relative to the repository or the cwd)."""
  if not path:
    return config_lib.base_config()
  full = path if os.path.exists(path) else os.path.join(REPO_ROOT, path)
  module = sweep.load_config_file(full)
  return module.get_config(arg) if arg else module.get_config()


def config_variant(path: str, overrides: dict | None = None, arg: str = "") -> dict:
  """The dotted overrides that turn the base run config into `path`'s, plus `overrides`.

  For `sweep.variants("model", {"mlp": config_variant("configs/paper_mlp.py", ...)})`.
  """
  return {**sweep.config_overrides(load_run_config(path, arg)), **(overrides or {})}


def _registry(kind: str, name: str, table: dict) -> Callable:
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
  """Checks the study config against `base_config()` and the registries (ConfigError)."""
  base = base_config()
  for section in (None, "run", "data"):
    have, want = (cfg, base) if section is None else (cfg[section], base[section])
    for key in have.keys():
      if key not in want:
        dotted = key if section is None else f"{section}.{key}"
        raise config_lib.ConfigError(
            f"study config: unknown key {dotted!r}; the keys are those of "
            "bnlab.study.base_config()")
  names = metric_order(cfg.metrics)
  for name in names:
    spec = tuple(cfg.metrics[name])
    _check_params("metric", f"metrics.{name}={spec}", METRICS[spec[0]], 1, spec[1:])
  for name, spec in cfg.measurements.items():
    _registry("measurement", spec["kind"], MEASUREMENTS)
  for name, spec in cfg.figures.items():
    spec = dict(spec)
    fn = _registry("figure kind", spec.pop("kind"), FIGURES)
    _check_params("figure kind", f"figures.{name}", fn, 3, kwargs=spec)
  for name, spec in cfg.tables.items():
    unknown = [m for m in spec["metrics"] if m not in names]
    if unknown:
      raise config_lib.ConfigError(f"study config tables.{name}: unknown metrics {unknown}")
  for name, spec in cfg.claims.items():
    spec = dict(spec)
    if not spec.pop("statement", ""):
      raise config_lib.ConfigError(f"study config claims.{name} has no statement")
    spec.pop("each", None)
    fn = _registry("claim rule", spec.pop("rule", ""), RULES)
    _check_params("claim rule", f"claims.{name}", fn, 1, kwargs=spec)
    for m in claim_metrics(spec):
      if m not in names:
        raise config_lib.ConfigError(f"study config claims.{name}: unknown metric {m!r}")


def claim_metrics(spec: dict) -> list[str]:
  """The metric names a claim's parameters read (`metric`, `metrics`, `other`, ...)."""
  out = []
  for k, v in spec.items():
    if k in ("metric", "other", "require", "fails", "trains") and v:
      out.append(v)
    elif k == "metrics":
      out += list(v)
  return out


# -- runs and their metrics --------------------------------------------------------

@dataclasses.dataclass
class Run:
  """What one member's directory holds, and the values computed from it."""

  name: str
  path: str
  key: dict  # the member's overrides (a Variant by its label)
  cfg: dict | None  # config.json
  records: list  # metrics.jsonl
  summary: dict | None  # summary.json; None while unfinished or its records cut short
  values: dict = dataclasses.field(default_factory=dict)
  error: str | None = None  # why a run with a summary is not read (`sweep.records_cut_short`)
  measured: dict = dataclasses.field(default_factory=dict)


METRICS: dict[str, Callable] = {}
MEASUREMENTS: dict[str, Callable] = {}
FIGURES: dict[str, Callable] = {}
RULES: dict[str, Callable] = {}
DERIVED_METRICS = ("at_least", "below", "any")


def register(table: dict, name: str):
  """Decorator: `@register(METRICS, "last")` adds the function under that name."""
  def add(fn):
    table[name] = fn
    return fn
  return add


def _finite(v):
  return None if isinstance(v, float) and not math.isfinite(v) else v


@register(METRICS, "summary")
def summary_value(run: Run, key: str):
  """summary.json's `key` (None for a diverged run's final accuracy)."""
  return _finite((run.summary or {}).get(key))


def _values(run: Run, key: str) -> list:
  return [r[key] for r in run.records if r.get(key) is not None]


@register(METRICS, "last")
def last(run: Run, key: str):
  """The last value of `key` in metrics.jsonl."""
  v = _values(run, key)
  return _finite(v[-1]) if v else None


@register(METRICS, "max")
def max_(run: Run, key: str):
  """The largest value of `key` in metrics.jsonl."""
  v = _values(run, key)
  return _finite(max(v)) if v else None


@register(METRICS, "first_step_at_least")
def first_step_at_least(run: Run, key: str, threshold: float):
  """The first step whose `key` is >= threshold, or None."""
  return next((r["step"] for r in run.records
               if r.get(key) is not None and r[key] >= threshold), None)


@register(METRICS, "series")
def series(run: Run, key: str, x: str = "step"):
  """[[x, value], ...] of every record with `key`."""
  return [[r[x], r[key]] for r in run.records if r.get(key) is not None]


@register(METRICS, "epoch_means")
def epoch_means(run: Run, key: str):
  """[[epoch, mean], ...]: per-epoch means of a train metric, weighted by each record's steps."""
  sums: dict[int, list[float]] = {}
  for r in run.records:
    if r.get(key) is None:
      continue
    s = sums.setdefault(math.ceil(r["epoch"] - 1e-9), [0.0, 0.0])  # (k-1, k] is epoch k
    s[0] += r[key] * r.get("interval_steps", 1)
    s[1] += r.get("interval_steps", 1)
  return [[e, sums[e][0] / sums[e][1]] for e in sorted(sums)]


@register(METRICS, "mean_over_last_epoch")
def mean_over_last_epoch(run: Run, key: str):
  """The last epoch's mean of a train metric (see epoch_means)."""
  means = epoch_means(run, key)
  return means[-1][1] if means else None


@register(METRICS, "diverged")
def diverged(run: Run):
  """Whether the training loss became non-finite (the engine stopped the run)."""
  return bool(run.summary.get("diverged")) if run.summary else None


@register(METRICS, "diverged_at")
def diverged_at(run: Run):
  """The step at which the run diverged, or None."""
  return (run.summary or {}).get("diverged_at_step")


@register(METRICS, "collapsed")
def collapsed(run: Run):
  """Whether the run collapsed: a finite loss that exploded or accuracy back near chance.

  `bnlab.engine.loop.CollapseWatch`; a run that collapsed may have recovered (see its
  final accuracy) unless it stopped there (`train.stop_on_collapse`).
  """
  return bool(run.summary.get("collapsed")) if run.summary else None


@register(METRICS, "collapsed_at")
def collapsed_at(run: Run):
  """The step at which the run first collapsed, or None."""
  return (run.summary or {}).get("collapsed_at_step")


@register(METRICS, "summary_difference")
def summary_difference(run: Run, key: str, minus: str):
  """summary.json's `key` minus its `minus` (e.g. train-mode minus inference accuracy)."""
  a, b = summary_value(run, key), summary_value(run, minus)
  return None if a is None or b is None else a - b


@register(METRICS, "at_least")
def at_least(run: Run, metric: str, threshold: float):
  """Metric `metric` >= threshold; False where it is None (e.g. a diverged run's accuracy)."""
  v = run.values.get(metric)
  return v is not None and v >= threshold


@register(METRICS, "below")
def below(run: Run, metric: str, threshold: float):
  """Metric `metric` < threshold; False where it is None."""
  v = run.values.get(metric)
  return v is not None and v < threshold


@register(METRICS, "any")
def any_(run: Run, *metrics: str):
  """Whether any of the boolean `metrics` is True."""
  return any(bool(run.values.get(m)) for m in metrics)


@register(METRICS, "measured")
def measured(run: Run, measurement: str, key: str):
  """Value `key` of the measurement `measurement` (see MEASUREMENTS)."""
  return run.measured.get(measurement, {}).get(key)


@register(MEASUREMENTS, "percentile_drift")
def percentile_drift(run_dir: str, run_cfg: dict, spec: dict) -> dict:
  """From the `analysis` records: per layer, how far the percentiles moved from `from_step`.

  `{layer}/median_drift`: mean over units of |median(last) - median(first)|;
  `{layer}/spread_drift`: mean over units of the change of (highest - lowest percentile).
  """
  del run_cfg
  records = sweep._read_jsonl(os.path.join(run_dir, "metrics.jsonl"))  # pylint: disable=protected-access
  out = {}
  for key in sorted({k for r in records for k in r if k.endswith("/percentiles")}):
    evals = [r[key] for r in records if key in r and r["step"] >= spec.get("from_step", 0)]
    if len(evals) < 2:
      continue
    first, end = evals[0], evals[-1]
    mid = len(first[0]) // 2
    layer = key[:-len("/percentiles")]
    out[f"{layer}/median_drift"] = sum(abs(b[mid] - a[mid]) for a, b in zip(first, end)) / len(first)
    out[f"{layer}/spread_drift"] = sum((b[-1] - b[0]) - (a[-1] - a[0])
                                       for a, b in zip(first, end)) / len(first)
  return out


def _measure(run: Run, name: str, spec: dict) -> dict:
  """A measurement of one finished run, computed once and cached next to the run (again
  when the spec changed, or the run was made longer since)."""
  path = os.path.join(run.path, "measurements", f"{name}.json")
  final_step = run.summary.get("final_step")
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached.get("spec") == spec and cached.get("final_step") == final_step:
      return cached["values"]
  values = MEASUREMENTS[spec["kind"]](run.path, run.cfg, spec)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"spec": spec, "final_step": final_step, "values": values}, f)
  return values


def read_run(path: str, name: str, key: dict, configured: dict | None = None) -> Run:
  """A member's files: config.json, metrics.jsonl, summary.json (those that exist).

  A finished run is left out (`Run.error`) when its records end before its last
  step, or when its config differs from `configured` (the study's config of
  this member, flattened) in a key other than the resume-safe ones.
  """
  def load(file):
    p = os.path.join(path, file)
    if not os.path.exists(p):
      return None
    with open(p) as f:
      return json.load(f)
  records = sweep._read_jsonl(os.path.join(path, "metrics.jsonl"))  # pylint: disable=protected-access
  summary, cfg = load("summary.json"), load("config.json")
  error = summary and (sweep.records_cut_short(path, summary, records)
                       or _configured_otherwise(path, cfg, configured))
  if error:
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.warning("Run %s is left out: %s", name, error)
  return Run(name, path, key, cfg, records, None if error else summary, error=error or None)


def _configured_otherwise(path: str, ran: dict | None, configured: dict | None) -> str | None:
  """Why a run's config.json is not the study's config of it (resume-safe keys aside)."""
  if ran is None or configured is None:
    return None
  ran = config_lib.flatten(ran)
  changed = [k for k in config_lib.changed_keys(ran, configured)
             if k not in config_lib.RESUME_SAFE_KEYS]
  if not changed:
    return None
  k = changed[0]
  more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
  return (f"{os.path.join(path, 'config.json')} differs from the study's config of this run "
          f"in {k} ({ran[k]!r} -> {configured.get(k)!r}){more}: it ran as another study; run "
          "the study without --stage=report to train it as configured (a longer "
          "train.num_steps continues it), or use a new --workdir")


def member_configs(study: "Study") -> dict[str, dict]:
  """{member name: its config as the study gives it now, flattened}; {} if it cannot be
  built here (the study's run config file is missing), with a warning."""
  if study.sweep is None:
    return {}
  try:
    members = sweep.resolve_members(study.base_run_config(), study.sweep)
  except (config_lib.ConfigError, OSError) as e:
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.warning("The runs' configs are not compared with the study's: %s", e)
    return {}
  return {m.name: config_lib.flatten(json.loads(m.cfg.to_json_best_effort()))
          for m in members}


def _refs(spec) -> tuple:
  """The metrics a derived metric reads (`("at_least", "final_acc", 0.9)` -> ("final_acc",))."""
  return () if spec[0] not in DERIVED_METRICS else spec[1:] if spec[0] == "any" else spec[1:2]


def metric_order(metrics: dict) -> list[str]:
  """Metric names, each after the metrics it reads; ConfigError for unknown kinds or names."""
  order: list[str] = []
  pending = dict(metrics)
  for name, spec in metrics.items():
    _registry("metric", tuple(spec)[0], METRICS)
    for ref in _refs(tuple(spec)):
      if ref not in metrics:
        raise config_lib.ConfigError(f"study config metrics.{name}: no metric named {ref!r}")
  while pending:
    ready = [n for n, s in pending.items() if all(r in order for r in _refs(tuple(s)))]
    if not ready:
      raise config_lib.ConfigError(f"study config metrics {sorted(pending)} read each other")
    order += ready
    for n in ready:
      del pending[n]
  return order


def evaluate_metrics(run: Run, metrics: dict, measurements: dict) -> Run:
  """Fills `run.measured` and `run.values` (all None while the run is unfinished)."""
  if run.summary is not None:
    run.measured = {n: _measure(run, n, dict(s)) for n, s in measurements.items()}
  for name in metric_order(metrics):
    spec = tuple(metrics[name])
    run.values[name] = None if run.summary is None else METRICS[spec[0]](run, *spec[1:])
  run.values = {n: run.values[n] for n in metrics}
  return run


# -- cells ---------------------------------------------------------------------------

def t_interval(values: list[float]) -> tuple[float, float | None]:
  """(mean, half-width of the 95% Student t interval on the mean); None for n < 2."""
  from scipy import stats as scipy_stats  # pylint: disable=g-import-not-at-top
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, None
  sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  return mean, float(scipy_stats.t.ppf(0.975, n - 1)) * sd / math.sqrt(n)


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
  return sweep._format_value(value)  # pylint: disable=protected-access


def select(cells: list[dict], where: str) -> list[dict]:
  """The cells matching `"key=value,key=value"` (values as member names show them)."""
  want = [part.split("=", 1) for part in filter(None, where.split(","))]
  return [c for c in cells if all(k in c["key"] and show(c["key"][k]) == v for k, v in want)]


def one(cells: list[dict], where: str) -> dict | None:
  found = select(cells, where)
  return found[0] if len(found) == 1 else None


# -- claim rules -----------------------------------------------------------------------

def _mean(cell: dict | None, metric: str):
  return None if cell is None else cell["stats"][metric].get("mean")


def _mean_series(cell: dict, metric: str) -> list[float]:
  runs = [s for s in cell["values"][metric] if s]
  if not runs:
    return []
  length = min(len(s) for s in runs)
  return [sum(s[i][1] for s in runs) / len(runs) for i in range(length)]


@register(RULES, "below_everywhere")
def below_everywhere(cells, metric: str, a: str, b: str):
  """Supported when a's seed-mean series is below b's at every point; else refuted."""
  ca, cb = one(cells, a), one(cells, b)
  if ca is None or cb is None or not _mean_series(ca, metric) or not _mean_series(cb, metric):
    return "inconclusive", {"missing": [w for w, c in ((a, ca), (b, cb)) if c is None]}
  sa, sb = _mean_series(ca, metric), _mean_series(cb, metric)
  not_below = [i + 1 for i, (x, y) in enumerate(zip(sa, sb)) if not x < y]
  return ("refuted" if not_below else "supported",
          {"a": [round(x, 4) for x in sa], "b": [round(y, 4) for y in sb],
           "points_not_below": not_below})


@register(RULES, "difference_at_least")
def difference_at_least(cells, metric: str, a: str, b: str, threshold: float):
  """Supported when mean(a) - mean(b) >= threshold (means over the cells' seeds); else refuted.

  A comparison of two means without their noise: for seeded results, `paired_interval` with
  `margin` makes the same claim with error bars."""
  ma, mb = _mean(one(cells, a), metric), _mean(one(cells, b), metric)
  if ma is None or mb is None:
    return "inconclusive", {"mean_a": ma, "mean_b": mb}
  return ("supported" if ma - mb >= threshold else "refuted",
          {"mean_a": ma, "mean_b": mb, "difference": ma - mb, "threshold": threshold})


def _all(cell: dict | None, metric: str) -> bool:
  return cell is not None and bool(cell["values"][metric]) and all(cell["values"][metric])


@register(RULES, "wins_above_best")
def wins_above_best(cells, metric: str, along: str, treat: str, base: str, fails: str,
                    trains: str):
  """Supported when, at some value of `along` above base's best (highest mean `metric`),
  every base seed `fails` and every treat seed `trains`; refuted when there is none."""
  xs = sorted({c["key"][along] for c in cells})
  at = lambda where, x: one(cells, f"{where},{along}={show(x)}")  # noqa: E731
  scored = [(_mean(at(base, x), metric), x) for x in xs if _mean(at(base, x), metric) is not None]
  if not scored:
    return "inconclusive", {"reason": f"no {base} run has a {metric}"}
  best = max(scored)[1]
  high_fail = [x for x in xs if x > best and _all(at(base, x), fails)]
  wins = [x for x in high_fail if _all(at(treat, x), trains)]
  return ("supported" if wins else "refuted",
          {"base_best": best, "above_best": [x for x in xs if x > best],
           "base_fails_above_best": high_fail, "treat_trains_there": wins,
           "base_fails_below_best": [x for x in xs if x < best and _all(at(base, x), fails)]})


@register(RULES, "separated")
def separated(cells, metric: str, a: str, b: str, higher: bool = True, require: str = ""):
  """Supported when every a seed beats every b seed on `metric` (higher, or lower if not
  `higher`); refuted when every b seed beats every a seed; inconclusive when the seed
  ranges overlap, a value is missing, or a seed fails `require`."""
  ca, cb = one(cells, a), one(cells, b)
  if ca is None or cb is None:
    return "inconclusive", {"missing": [w for w, c in ((a, ca), (b, cb)) if c is None]}
  va, vb = ca["values"][metric], cb["values"][metric]
  numbers = {"a": va, "b": vb}
  if require and not (_all(ca, require) and _all(cb, require)):
    return "inconclusive", {**numbers, "reason": f"not every seed {require}"}
  if None in va or None in vb or not va or not vb:
    return "inconclusive", {**numbers, "reason": f"not every seed has a {metric}"}
  sign = 1 if higher else -1
  numbers["difference"] = sum(va) / len(va) - sum(vb) / len(vb)
  if min(sign * x for x in va) > max(sign * y for y in vb):
    return "supported", numbers
  if min(sign * y for y in vb) > max(sign * x for x in va):
    return "refuted", numbers
  return "inconclusive", {**numbers, "reason": "the seed ranges overlap"}


def paired_runs(cells, metric: str, a: str, b: str, other: str = ""):
  """[(seed, a's `metric`, b's `other` or `metric`)] of the runs of cells a and b with the
  same seed, or None when a or b is not one cell."""
  ca, cb = one(cells, a), one(cells, b)
  if ca is None or cb is None:
    return None
  by_seed = {r.get("seed"): r.get(other or metric) for r in cb["rows"]}
  return [(r.get("seed"), r.get(metric), by_seed[r.get("seed")])
          for r in ca["rows"] if r.get("seed") in by_seed]


Z95 = 1.959963984540054  # the two-sided 95% point of the standard normal


def call_difference(diffs: list[float], p_a: float, p_b: float, n_test: int | None,
                    higher: bool = True, margin: float = 0.0) -> tuple[str, dict]:
  """(verdict, numbers) of paired differences a - b: see `paired_interval`."""
  mean, half = t_interval(diffs)
  binom = (Z95 * math.sqrt(binomial_se(p_a, n_test) ** 2 + binomial_se(p_b, n_test) ** 2)
           if n_test else 0.0)
  numbers = {"difference": mean, "t95": half, "binomial95": binom if n_test else None}
  if half is None:
    return "inconclusive", {**numbers, "reason": "fewer than 2 seeds"}
  bar, sign = max(half, binom), 1 if higher else -1
  if sign * mean - bar > margin:
    return "supported", numbers
  return ("refuted" if sign * mean + bar < margin else "inconclusive"), numbers


def _n_test_of(cells, where: str, metric: str):
  c = one(cells, where)
  return None if c is None else c["stats"][metric].get("n_test")


@register(RULES, "paired_interval")
def paired_interval(cells, metric: str, a: str, b: str, other: str = "", higher: bool = True,
                    from_step: int = 0, margin: float = 0.0):
  """Runs of a and b paired by seed, d = a's `metric` - b's `other` (default: `metric`).
  A difference is called only outside both noises: the 95% t interval on the seed mean of d
  (t_0.975,n-1 x sd(d) / sqrt(n)) and, for test accuracies, the test set's binomial noise
  1.96 x sqrt(se_a^2 + se_b^2), se = sqrt(p(1-p)/N) at each side's seed mean p. Supported
  when mean d is beyond both in the claimed direction (above; below if not `higher`),
  refuted when beyond both the other way, else inconclusive (also with < 2 seed pairs or a
  missing value). With `margin` m the claim is a difference of at least m: supported when
  the difference less both noises exceeds m, refuted when it plus them stays below m. A
  series is judged at every point from `from_step` that every pair has:
  supported when every point is, refuted when any point is."""
  pairs = paired_runs(cells, metric, a, b, other)
  if not pairs or any(x is None or y is None for _, x, y in pairs):
    return "inconclusive", {"missing": f"a pair of {metric} values of {a!r} and {b!r}"}
  n_a, n_b = _n_test_of(cells, a, metric), _n_test_of(cells, b, other or metric)
  n_test = n_a if n_a and n_a == n_b else None
  seeds = [s for s, _, _ in pairs]

  def call(xs, ys):
    verdict, numbers = call_difference([x - y for x, y in zip(xs, ys)], sum(xs) / len(xs),
                                       sum(ys) / len(ys), n_test, higher, margin)
    return verdict, {"mean_a": sum(xs) / len(xs), "mean_b": sum(ys) / len(ys), **numbers}

  if not isinstance(pairs[0][1], list):
    verdict, numbers = call([x for _, x, _ in pairs], [y for _, _, y in pairs])
    return verdict, {"seeds": seeds, **numbers}
  by_point: dict = {}
  for _, x, y in pairs:
    ys = dict((p, v) for p, v in y)
    for p, v in x:
      if p in ys:
        by_point.setdefault(p, []).append((v, ys[p]))
  points = {p: call(*zip(*v)) for p, v in sorted(by_point.items())
            if len(v) == len(pairs) and p >= from_step}
  if not points:
    return "inconclusive", {"missing": "no point that every pair has"}
  count = {v: [p for p, (w, _) in points.items() if w == v] for v in VERDICTS}
  numbers = {"seeds": seeds, "points": len(points), **{v: len(count[v]) for v in VERDICTS},
             **{f"{v}_at": count[v][:5] for v in VERDICTS[1:] if count[v]}}
  if count["refuted"]:
    return "refuted", numbers
  return ("supported" if len(count["supported"]) == len(points) else "inconclusive"), numbers


@register(RULES, "same_verdict")
def same_verdict(cells, metrics, a: str, b: str, higher: bool = True):
  """`paired_interval` of a against b once with each of `metrics` (e.g. test accuracy with
  running averages, population and test-batch statistics): supported when all give the
  same verdict, refuted when the choice of metric changes it; inconclusive when a metric
  lacks a value."""
  calls = {m: paired_interval(cells, m, a, b, higher=higher) for m in metrics}
  numbers = {m: v for m, (v, _) in calls.items()}
  numbers.update({f"{m} difference": n["difference"] for m, (_, n) in calls.items()
                  if "difference" in n})
  if any("missing" in n for _, n in calls.values()):
    return "inconclusive", numbers
  return ("supported" if len(set(numbers[m] for m in metrics)) == 1 else "refuted"), numbers


def judge(claims: dict, cells: list[dict]) -> list[dict]:
  """Every claim's verdict(s): one per value combination of its `each` keys."""
  out = []
  for name, spec in claims.items():
    spec = dict(spec)
    statement, rule, each = spec.pop("statement"), spec.pop("rule"), tuple(spec.pop("each", ()))
    groups = list(dict.fromkeys(
        ",".join(f"{k}={show(c['key'][k])}" for k in each) for c in cells)) if each else [""]
    for where in groups:
      params = {k: (f"{where},{v}" if k in ("a", "b", "treat", "base") and where else v)
                for k, v in spec.items()}
      verdict, numbers = RULES[rule](select(cells, where) if where else cells, **params)
      out.append({"claim": name, "statement": statement, "where": where, "rule": rule,
                  "params": spec, "verdict": verdict, "numbers": numbers})
  return out


# -- figures ---------------------------------------------------------------------------

def _label(labels: dict, value) -> str:
  """What the report calls a value, metric or config key (a dotted key by its last part)."""
  text = show(value)
  last = text.rsplit(".", 1)[-1] if isinstance(value, str) else text
  return labels.get(text, labels.get(last, last))


def _cell_label(cell: dict, keys, labels: dict) -> str:
  return ", ".join(_label(labels, cell["key"][k]) for k in keys) or "all"


def _panels(cells: list[dict], panels, labels: dict, width: float = 5.2, height: float = 3.8):
  """(figure, [(axis, panel cells, title)]) with one panel per value of the `panels` keys."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  groups: dict[tuple, list[dict]] = {}
  for c in cells:
    groups.setdefault(tuple(show(c["key"][k]) for k in panels), []).append(c)
  cols = min(len(groups), 3)
  rows = math.ceil(len(groups) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
  for ax in axes.flat[len(groups):]:
    ax.set_visible(False)
  return fig, [(ax, g, _cell_label(g[0], panels, labels) if panels else "")
               for ax, g in zip(axes.flat, groups.values())]


def _save(fig, path: str) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _hue_keys(cells, panels, hue):
  return tuple(hue) if hue else tuple(k for k in cells[0]["key"] if k not in panels)


@register(FIGURES, "final_vs")
def final_vs(cells, path, labels, metric: str, x: str, hue=(), panels=(), logx: bool = False,
             logy: bool = False):
  """A per-run metric against a swept value: seeds as dots, cell means with 95% t bars."""
  fig, layout = _panels(cells, panels, labels)
  hue = _hue_keys(cells, tuple(panels) + (x,), hue)
  for ax, group, title in layout:
    lines: dict[str, list] = {}
    for c in group:
      lines.setdefault(_cell_label(c, hue, labels), []).append(c)
    for (name, line), color in zip(lines.items(), _COLORS):
      line.sort(key=lambda c: c["key"][x])
      pts = [(c["key"][x], c["stats"][metric]) for c in line if "mean" in c["stats"][metric]]
      for c in line:
        for v in c["values"][metric]:
          if v is not None:
            ax.plot(c["key"][x], v, ".", color=color, alpha=0.4, ms=5)
      ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                  yerr=[p[1]["ci"] or 0 for p in pts], color=color, marker="o", ms=4,
                  capsize=3, label=name)
    ax.set(title=title, xlabel=_label(labels, x), ylabel=_label(labels, metric),
           xscale="log" if logx else "linear", yscale="log" if logy else "linear")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="mean, 95% t interval; dots: seeds", title_fontsize=7)
  _save(fig, path)


_COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown",
           "tab:pink", "tab:gray", "tab:olive", "tab:cyan")


@register(FIGURES, "curves")
def curves(cells, path, labels, metric: str, hue=(), panels=(), logy: bool = False,
           xlabel: str = "step"):
  """A series metric over training: each seed thin, the cell's seed mean thick, min..max band."""
  fig, layout = _panels(cells, panels, labels)
  hue = _hue_keys(cells, panels, hue)
  for ax, group, title in layout:
    for c, color in zip(group, _COLORS):
      runs = [s for s in c["values"][metric] if s]
      for s in runs:
        ax.plot([p[0] for p in s], [p[1] for p in s], color=color, lw=0.6, alpha=0.4)
      if not runs:
        continue
      length = min(len(s) for s in runs)
      xs = [runs[0][i][0] for i in range(length)]
      ys = [[s[i][1] for s in runs] for i in range(length)]
      ax.plot(xs, [sum(y) / len(y) for y in ys], color=color, lw=2, marker="o", ms=3,
              label=_cell_label(c, hue, labels))
      if len(runs) > 1:
        ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=color,
                        alpha=0.15, lw=0)
    ax.set(title=title, xlabel=xlabel, ylabel=_label(labels, metric),
           yscale="log" if logy else "linear")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="thick: seed mean; band: min..max", title_fontsize=7)
  _save(fig, path)


@register(FIGURES, "percentiles")
def percentiles(cells, path, labels, metric: str, unit: int = 0, hue=(), panels=()):
  """Percentiles over training of one unit (a series metric of `{layer}/percentiles`
  records: [[step, [[p, ...] per unit]], ...]); seed means, one line per percentile."""
  fig, layout = _panels(cells, panels, labels)
  hue = _hue_keys(cells, panels, hue)
  for ax, group, title in layout:
    for c, color in zip(group, _COLORS):
      runs = [s for s in c["values"][metric] if s]
      if not runs:
        continue
      length = min(len(s) for s in runs)
      xs = [runs[0][i][0] for i in range(length)]
      for q in range(len(runs[0][0][1][unit])):
        ax.plot(xs, [sum(s[i][1][unit][q] for s in runs) / len(runs) for i in range(length)],
                color=color, lw=1.5, ls=("--", "-", ":")[q % 3],
                label=_cell_label(c, hue, labels) if q == 0 else None)
    ax.set(title=title, xlabel="step", ylabel=f"{_label(labels, metric)}, unit {unit}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="seed means; one line per percentile", title_fontsize=7)
  _save(fig, path)


# -- loading a study -------------------------------------------------------------------

def _jsonable(value):
  """A sweep value as study.json keeps it (a Variant by its label)."""
  if isinstance(value, sweep.Variant):
    return value.label
  return list(value) if isinstance(value, tuple) else value


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
    return cls(path, arg, inspect.cleandoc(module.__doc__ or ""), config,
               [{"name": sweep.member_name(m), "key": {k: _jsonable(v) for k, v in m.items()}}
                for m in members], members)

  def to_json(self) -> dict:
    return {"path": self.path, "arg": self.arg, "doc": self.doc, "config": self.config,
            "members": self.members}

  def command(self, workdir: str) -> str:
    arg = f":{self.arg}" if self.arg else ""
    flags = "".join(f" {shlex.quote(f)}" for f in self.flags)
    return f"python -m bnlab.study --config={self.path}{arg}{flags} --workdir={workdir}"

  def base_run_config(self):
    run = self.config["run"]
    cfg = load_run_config(run["config"], run["arg"])
    overrides = config_lib.flatten(run["overrides"])
    overrides.update({f"data.{k}": v for k, v in self.config["data"].items() if v != ""})
    cfg = sweep.apply_overrides(cfg, overrides, "study config run.overrides")
    config_lib.validate(cfg)
    return cfg


def _read_json(path: str, default):
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def _write_json(path: str, value) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=1, default=str)
    f.write("\n")


def run_stage(study: Study, workdir: str) -> None:
  """Trains the members that are not finished; records the stage in stages.json."""
  from bnlab.engine import backend  # pylint: disable=g-import-not-at-top
  from bnlab.engine import provenance  # pylint: disable=g-import-not-at-top
  # Deterministic mode is set before anything starts JAX (provenance does).
  backend.configure_run(study.base_run_config())
  os.makedirs(workdir, exist_ok=True)
  _write_json(os.path.join(workdir, "study.json"), study.to_json())
  registered = os.path.join(workdir, "claims_registered.json")
  if not os.path.exists(registered):
    _write_json(registered, study.config["claims"])
  runs_dir = os.path.join(workdir, "runs")

  def written(m):  # when the run's summary was written (a run made longer writes it again)
    try:
      return os.stat(os.path.join(runs_dir, m["name"], "summary.json")).st_mtime_ns
    except OSError:
      return None
  before = {m["name"]: written(m) for m in study.members}
  stage = {"started": datetime.datetime.now().isoformat(timespec="seconds"),
           "environment": provenance.environment(backend.deterministic()), "interrupted": True}
  start = time.perf_counter()
  try:
    sweep.run_sweep(study.base_run_config(), study.sweep, runs_dir,
                    grouped=study.config["grouped"])
    stage["interrupted"] = False
  finally:
    stage["wall_s"] = time.perf_counter() - start
    stage["trained"] = sum(written(m) not in (None, before[m["name"]]) for m in study.members)
    stages = _read_json(os.path.join(workdir, "stages.json"), [])
    _write_json(os.path.join(workdir, "stages.json"), stages + [stage])


def collect(study: Study, workdir: str) -> list[Run]:
  """Every member's files, with its measurements and metrics."""
  runs_dir = os.path.join(workdir, "runs")
  cfg, configured = study.config, member_configs(study)
  return [evaluate_metrics(read_run(os.path.join(runs_dir, m["name"]), m["name"], m["key"],
                                    configured.get(m["name"])),
                           cfg["metrics"], cfg["measurements"]) for m in study.members]


def result_rows(runs: list[Run], errors: dict) -> list[dict]:
  """One row per run: name, status, its overrides, its metric values."""
  rows = []
  for r in runs:
    error = r.error or errors.get(r.name)
    status = ("unfinished" if r.summary is None else
              "diverged" if r.summary.get("diverged") else "done")
    if r.summary is None and error:
      status = "failed"
    rows.append({"name": r.name, "status": status, **r.key, **r.values,
                 "wall_time": (r.summary or {}).get("wall_time"), "error": error})
  return rows


# -- the report ------------------------------------------------------------------------

def _fmt(st: dict) -> str:
  """A cell statistic: `mean ±ci95 [min..max]`, `k/n` for counts, `(n/of)` when runs lack it."""
  if "count" in st:
    return f"{st['count']}/{st['n']}"
  if not st["n"]:
    return f"- (0/{st['of']})"
  f = ",.0f" if st.get("integer") else ".4f"
  text = f"{st['mean']:{f}}"
  if st["ci"] is not None:
    text += f" ±{st['ci']:{f}} [{st['min']:{f}}..{st['max']:{f}}]"
  return text + (f" ({st['n']}/{st['of']})" if st["n"] < st["of"] else "")


def _scalar(cells: list[dict], metric: str) -> bool:
  return not any(isinstance(v, list) for c in cells for v in c["values"][metric])


def _table(cells: list[dict], metrics, labels: dict, across: str = "") -> list[str]:
  keys = [k for k in cells[0]["key"] if k != across]
  cols = list(dict.fromkeys(show(c["key"][across]) for c in cells)) if across else [None]
  head = [_label(labels, k) for k in keys] + [
      (f"{labels.get(a, a)}: " if a else "") + _label(labels, m) for m in metrics for a in cols]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  rows: dict[str, dict] = {}
  for c in cells:
    row = rows.setdefault(json.dumps([show(c["key"][k]) for k in keys]), {"cell": c, "by": {}})
    row["by"][show(c["key"][across]) if across else None] = c
  for row in rows.values():
    out = [_label(labels, row["cell"]["key"][k]) for k in keys]
    out += [_fmt(row["by"][a]["stats"][m]) if a in row["by"] else "" for m in metrics for a in cols]
    lines.append("| " + " | ".join(out) + " |")
  return lines


TEST_ACCURACIES = ("test_accuracy", "test_accuracy_population", "test_accuracy_batch")
# What each recorded key's BN used; a claim's report line names the statistics its metrics read.
STATISTICS = {
    "test_accuracy": "running averages (inference mode)",
    "test_loss": "running averages (inference mode)",
    "full_train_accuracy": "running averages (inference mode)",
    "full_train_loss": "running averages (inference mode)",
    "test_accuracy_population": "population statistics recomputed over training images "
                                "(Algorithm 2)",
    "test_accuracy_batch": "each test batch's own statistics",
    "train_loss": "batch statistics (train mode)",
    "train_accuracy": "batch statistics (train mode)",
}


def _test_accuracy_metrics(metrics: dict, kinds=("summary", "last", "max")) -> list[str]:
  return [n for n, s in metrics.items() if len(s) > 1 and s[1] in TEST_ACCURACIES
          and s[0] in kinds]


def statistics_of(metric: str, metrics: dict) -> list[str]:
  """The BN statistics behind `metric` (through the metrics it derives from), as STATISTICS."""
  spec = tuple(metrics.get(metric, ()))
  if not spec:
    return []
  if spec[0] in DERIVED_METRICS:
    return list(dict.fromkeys(s for r in _refs(spec) for s in statistics_of(r, metrics)))
  keys = spec[1:3] if spec[0] == "summary_difference" else spec[1:2]
  return list(dict.fromkeys(STATISTICS[k] for k in keys if k in STATISTICS))


def _n_test(cell: dict, runs_by_name: dict) -> int:
  cfg = next((runs_by_name[r["name"]].cfg for r in cell["rows"] if runs_by_name[r["name"]].cfg),
             None)
  return (cfg or {}).get("data", {}).get("num_test") or 10_000  # 0: MNIST's whole test set


def _numbers(numbers: dict) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    if isinstance(v, list):
      return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)
  return "; ".join(f"{k}: {fmt(v)}" for k, v in numbers.items())


def _rule_text(spec: dict) -> str:
  params = {k: v for k, v in spec.items() if k not in ("statement", "rule", "each")}
  doc = " ".join((RULES[spec["rule"]].__doc__ or "").split())
  each = f" For each {', '.join(spec['each'])}." if spec.get("each") else ""
  return (f"`{spec['rule']}({', '.join(f'{k}={v!r}' for k, v in params.items())})`: "
          f"{doc}{each}")


def _time_lines(runs: list[Run], stages: list[dict]) -> list[str]:
  from bnlab.engine import train  # pylint: disable=g-import-not-at-top
  done = [r for r in runs if r.summary]
  groups: dict[str, float] = {}
  for r in done:
    key = (train.group_key(ml_collections.ConfigDict(r.cfg)) if r.summary.get("group_size")
           and r.cfg else r.name)
    groups[key] = max(groups.get(key, 0.0), r.summary.get("wall_time", 0.0))
  wall = sum(s["wall_s"] for s in stages)
  cut = sum(s["interrupted"] for s in stages)
  return [f"- Study wall time: {wall / 60:.1f} min over {len(stages)} run stage(s)"
          + (f", {cut} of them interrupted" if cut else "") + " (stages.json).",
          f"- The runs' own wall times (summary.json), summed: "
          f"{sum(r.summary.get('wall_time', 0.0) for r in done) / 60:.1f} min over "
          f"{len(done)} finished runs; with each grouped (vmapped) program counted once: "
          f"{sum(groups.values()) / 60:.1f} min."]


def _where_lines(stages: list[dict]) -> list[str]:
  from bnlab.engine import provenance  # pylint: disable=g-import-not-at-top
  if not stages:
    return ["- No run stage of this command is recorded: the runs were made before it."]
  return [f"- {s['started']}, {s['wall_s'] / 60:.1f} min, {s['trained']} run(s) trained"
          + (" (interrupted)" if s["interrupted"] else "") + f": {provenance.describe(s['environment'])}"
          for s in stages]


def analyse(study: Study, workdir: str):
  """(runs, rows, cells, verdicts) from the files: metrics per run, statistics per cell, claims."""
  cfg = study.config
  runs = collect(study, workdir)
  errors = {r["name"]: r.get("error")
            for r in _read_json(os.path.join(workdir, "runs", "results.json"), [])}
  rows = result_rows(runs, errors)
  cells = make_cells(rows, cfg["cells"], list(cfg["metrics"]))
  runs_by_name = {r.name: r for r in runs}
  for c in cells:
    for m in _test_accuracy_metrics(cfg["metrics"], ("summary", "last", "max", "series")):
      if c["stats"][m]["n"]:
        c["stats"][m]["n_test"] = n = _n_test(c, runs_by_name)
        if "mean" in c["stats"][m]:
          c["stats"][m]["binomial_se"] = binomial_se(c["stats"][m]["mean"], n)
  return runs, rows, cells, judge(cfg["claims"], cells)


def _noise_line(cfg: dict, cells: list[dict]) -> list[str]:
  """The test set's binomial noise, stated before the verdicts when a claim reads test accuracy."""
  used = {m for spec in cfg["claims"].values() for m in claim_metrics(spec)}
  acc = set(_test_accuracy_metrics(cfg["metrics"], ("summary", "last", "max", "series")))
  reads = set()
  for m in used:  # a derived metric reads the test accuracy behind it
    reads |= {m, *(r for r in _refs(tuple(cfg["metrics"][m])))}
  n = next((c["stats"][m].get("n_test") for c in cells for m in acc & reads
            if c["stats"][m].get("n_test")), None)
  if not n:
    return []
  at = ", ".join(f"{100 * binomial_se(p, n):.2f} at p = {p}" for p in (0.99, 0.98, 0.9, 0.5))
  return ["", f"Test-set noise: one accuracy p measured on the N = {n:,} test images has "
              f"binomial standard error sqrt(p(1-p)/N), in points: {at}. Seeds share the test "
              "set, so averaging seeds does not shrink it."]


def _claim_lines(cfg: dict, workdir: str, verdicts: list[dict],
                 cells: list[dict] = ()) -> list[str]:
  lines = ["## Claims, with the rule of each verdict (fixed before the runs)", ""]
  for name, spec in cfg["claims"].items():
    lines += [f"- **{name}**: {spec['statement']}", f"  Rule: {_rule_text(spec)}"]
    stats = list(dict.fromkeys(s for m in claim_metrics(spec)
                               for s in statistics_of(m, cfg["metrics"])))
    if stats:
      lines.append(f"  BN statistics behind it: {'; '.join(stats)}.")
  lines += _noise_line(cfg, list(cells))
  if _read_json(os.path.join(workdir, "claims_registered.json"), cfg["claims"]) != cfg["claims"]:
    lines += ["", "**Note: these claims differ from those registered before the first run "
              "(claims_registered.json).**"]
  if cfg["notes"]:
    lines += ["", inspect.cleandoc(cfg["notes"])]
  lines += ["", "## Verdicts", "", "| claim | where | verdict | numbers behind it |",
            "|---|---|---|---|"]
  return lines + [f"| {v['claim']} | {v['where'] or 'all'} | **{v['verdict']}** | "
                  f"{_numbers(v['numbers'])} |" for v in verdicts]


def _result_lines(cfg: dict, rows: list[dict], cells: list[dict]) -> list[str]:
  labels = cfg["labels"]
  status: dict[str, int] = {}
  for r in rows:
    status[r["status"]] = status.get(r["status"], 0) + 1
  lines = ["## Results", "",
           f"{len(rows)} runs: " + ", ".join(f"{v} {k}" for k, v in sorted(status.items()))
           + f". A cell pools the runs that agree on {', '.join(cfg['cells']) or 'nothing'}. "
           "Each entry: mean over the cell's runs ±half-width of the 95% Student t interval on "
           "that mean (t_0.975,n-1 x sd / sqrt(n)) [min..max]; k/n for counts; (n/of) when "
           "only n of the cell's runs have a value (e.g. the others diverged or never reached "
           "it); '-': none has.", ""]
  tables = cfg["tables"] or {
      "all cells": {"metrics": [m for m in cfg["metrics"] if _scalar(cells, m)]}}
  for name, spec in tables.items():
    by = tuple(spec.get("by", ()))
    groups: dict[str, list] = {}
    for c in cells:
      groups.setdefault(_cell_label(c, by, labels) if by else "", []).append(c)
    for title, group in groups.items():
      sub = [{**c, "key": {k: v for k, v in c["key"].items() if k not in by}} for c in group]
      lines += [f"### {name}" + (f": {title}" if title else ""), ""]
      lines += _table(sub, spec["metrics"], labels, spec.get("across", "")) + [""]
  for m in _test_accuracy_metrics(cfg["metrics"]):
    se = [(c["stats"][m]["mean"], c["stats"][m]["binomial_se"], c["stats"][m]["n_test"])
          for c in cells if "binomial_se" in c["stats"][m]]
    if se:
      lo, hi = min(se, key=lambda s: s[1]), max(se, key=lambda s: s[1])
      lines += [f"Test-set noise of {_label(labels, m)}: one run's accuracy p on N test images "
                f"has binomial standard error sqrt(p(1-p)/N): {lo[1]:.4f} at p = {lo[0]:.4f} "
                f"to {hi[1]:.4f} at p = {hi[0]:.4f} (N = {hi[2]:,}; per cell in cells.csv).", ""]
  return lines + [f"![{name}](figures/{name}.png)\n" for name in cfg["figures"]]


def report(study: Study, workdir: str) -> str:
  """Writes report.md, results.json/csv, cells.csv, claims.json and figures/; returns the report.

  Reads only the files under `workdir`: the report depends on nothing else.
  """
  cfg = study.config
  runs, rows, cells, verdicts = analyse(study, workdir)
  stages = _read_json(os.path.join(workdir, "stages.json"), [])
  os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
  for name, spec in cfg["figures"].items():
    spec = dict(spec)
    FIGURES[spec.pop("kind")](cells, os.path.join(workdir, "figures", f"{name}.png"),
                              cfg["labels"], **spec)
  _write_outputs(workdir, rows, cells, verdicts, stages, list(cfg["metrics"]))
  lines = [f"# {cfg['title']}", "", study.doc, ""] + _claim_lines(cfg, workdir, verdicts, cells)
  lines += [""] + _result_lines(cfg, rows, cells)
  lines += ["## Time", ""] + _time_lines(runs, stages)
  lines += ["", "## Where and with which code it ran", ""] + _where_lines(stages)
  lines += ["", f"Command: `{study.command(workdir)}`", "",
            "Files: `results.csv`/`results.json` (one row per run), `cells.csv` (the cell "
            "statistics), `claims.json` (verdicts and their numbers), `runs/` (each run's "
            "config, metrics and summary)."]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(text)
  return text


def _write_outputs(workdir, rows, cells, verdicts, stages, metrics) -> None:
  scalar = [m for m in metrics if _scalar(cells, m)]
  # One row per run of reduced values; series (curves, percentiles over
  # training) stay in each run's metrics.jsonl, and the figures draw them.
  flat = [{k: v for k, v in r.items() if not isinstance(v, list)} for r in rows]
  _write_json(os.path.join(workdir, "results.json"), {"rows": flat, "stages": stages})
  _write_json(os.path.join(workdir, "claims.json"), verdicts)
  _write_csv(os.path.join(workdir, "results.csv"), flat)
  stat_keys = ("n", "of", "mean", "ci", "min", "max", "count", "binomial_se")
  _write_csv(os.path.join(workdir, "cells.csv"), [
      {**c["key"], **{f"{m}.{s}": c["stats"][m].get(s) for m in scalar for s in stat_keys
                      if s in c["stats"][m]}} for c in cells])


def _write_csv(path: str, rows: list[dict]) -> None:
  columns = list(dict.fromkeys(k for r in rows for k in r))
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for r in rows:
      writer.writerow({k: "" if r.get(k) is None else r[k] for k in columns})


def run_study(study: Study, workdir: str, stage: str = "all", out: str = "") -> str:
  """The stages of `study` in `workdir`; returns the report ("" for --stage=run)."""
  if stage in ("run", "all"):
    run_stage(study, workdir)
  if stage == "run":
    return ""
  text = report(study, workdir)
  if out:
    os.makedirs(out, exist_ok=True)
    for name in ("report.md", "results.json", "results.csv", "cells.csv", "claims.json"):
      shutil.copy(os.path.join(workdir, name), os.path.join(out, name))
    shutil.copytree(os.path.join(workdir, "figures"), os.path.join(out, "figures"),
                    dirs_exist_ok=True)
  return text


# -- command line ----------------------------------------------------------------------

def main(argv):
  """`python -m bnlab.study`: see the module docstring."""
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from bnlab import data as data_lib  # pylint: disable=g-import-not-at-top
  from bnlab import main as main_lib  # pylint: disable=g-import-not-at-top
  from bnlab.rundir import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir_lib.quiet_library_logs()
  f = flags.FLAGS
  study, path = None, ""
  try:
    path, _, arg = f["config"].config_filename.partition(":")
    cfg = main_lib.loaded_config()
    try:
      study = Study.from_file(path, arg, cfg)
      study.flags = tuple(f"--config.{k}={v}" for k, v in
                          config_flags.get_override_values(f["config"]).items())
    except (config_lib.ConfigError, data_lib.DataError, workdir_lib.WorkDirError):
      raise
    except Exception as e:  # pylint: disable=broad-except  # get_config/get_sweep raised
      detail = " ".join(str(e).split())[:200]
      raise config_lib.ConfigError(
          f"study config {path} failed to load ({type(e).__name__}: {detail}); fix the "
          "file (its get_config() and get_sweep())") from None
    workdir = f.workdir or ""
    if not workdir.strip():
      raise workdir_lib.WorkDirError(
          f"the work directory is empty ({workdir!r}); give one with --workdir=DIR")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
      raise workdir_lib.WorkDirError(
          f"--workdir={workdir} is a file, not a directory; choose another --workdir")
    text = run_study(study, workdir, f.stage, f.out)
  except KeyboardInterrupt:
    if study is None:
      print("error: interrupted before the study started; rerun the same command",
            file=sys.stderr)
    else:
      print(f"interrupted: rerun the same command to resume ({study.command(f.workdir)})",
            file=sys.stderr)
    sys.exit(130)
  except (config_lib.ConfigError, data_lib.DataError, workdir_lib.WorkDirError) as e:
    if logging.get_verbosity() >= logging.DEBUG:
      raise
    print(f"error: {study_fix(' '.join(str(e).split()), path)}", file=sys.stderr)
    sys.exit(2)
  print(text or f"runs are in {os.path.join(f.workdir, 'runs')}")


def study_fix(message: str, path: str) -> str:
  """`message` with a run-config flag it suggests (not a study flag) replaced by the study's fix."""
  flag = re.search(r"Set it with --config\.([\w.]+)=\.\.\.", message)
  if flag is None or flag.group(1) in config_lib.flatten(base_config().to_dict()):
    return message
  return message.replace(flag.group(0), (
      f"The study sets config.{flag.group(1)} of its runs: change it through the study's "
      f"arguments (after ':' in --config={path}:...) or its run.overrides"))


def run():
  """The entry point: bnlab.main's --config and --workdir, plus --stage and --out."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from bnlab import main as main_lib  # pylint: disable=g-import-not-at-top
  flags.FLAGS["config"].help = "Study config file (configs/studies/*.py)[:ARGS]."
  flags.DEFINE_enum("stage", "all", ["all", "run", "report"],
                    "run: train what is missing; report: rebuild the report from the files.")
  flags.DEFINE_string("out", "", "Also copy the report, tables and figures here.")
  app.run(main, flags_parser=main_lib.parse_flags)
