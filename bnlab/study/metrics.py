"""A run's metrics: its files reduced to a number, bool or series by registered reductions.

One small function per reduction, named in the study config (`config.metrics`), so a
new metric is one function; `measured` reads a measurement cached next to the run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

from bnlab import sweep
from bnlab.study import config as study_config
from bnlab.study import files
from bnlab.study import registry


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
  per_image: dict = dataclasses.field(default_factory=dict)  # metric -> `per_image_of`


def _finite(v):
  return None if isinstance(v, float) and not math.isfinite(v) else v


@registry.register(registry.METRICS, "summary")
def summary_value(run: Run, key: str):
  """summary.json's `key` (None for a diverged run's final accuracy)."""
  return _finite((run.summary or {}).get(key))


def _values(run: Run, key: str) -> list:
  return [r[key] for r in run.records if r.get(key) is not None]


@registry.register(registry.METRICS, "last")
def last(run: Run, key: str):
  """The last value of `key` in metrics.jsonl."""
  v = _values(run, key)
  return _finite(v[-1]) if v else None


@registry.register(registry.METRICS, "max")
def max_(run: Run, key: str):
  """The largest value of `key` in metrics.jsonl."""
  v = _values(run, key)
  return _finite(max(v)) if v else None


@registry.register(registry.METRICS, "first_step_at_least")
def first_step_at_least(run: Run, key: str, threshold: float):
  """The first step whose `key` is >= threshold, or None."""
  return next((r["step"] for r in run.records
               if r.get(key) is not None and r[key] >= threshold), None)


@registry.register(registry.METRICS, "first_step_at_most")
def first_step_at_most(run: Run, key: str, threshold: float):
  """The first step whose `key` is <= threshold (e.g. a training loss reaching 0.1), or None."""
  return next((r["step"] for r in run.records
               if r.get(key) is not None and r[key] <= threshold), None)


@registry.register(registry.METRICS, "value_when_at_most")
def value_when_at_most(run: Run, key: str, when: str, threshold: float):
  """`key` at the first evaluation whose `when` is <= threshold, or None if it never is.

  Compares runs at matched progress instead of matched steps: e.g. test accuracy when the
  training loss first reaches 0.1, so a model that only trains faster does not look as if
  it generalized better.
  """
  return next((_finite(r[key]) for r in run.records
               if r.get(when) is not None and r[when] <= threshold and r.get(key) is not None),
              None)


@registry.register(registry.METRICS, "series")
def series(run: Run, key: str, x: str = "step"):
  """[[x, value], ...] of every record with `key`."""
  return [[r[x], r[key]] for r in run.records if r.get(key) is not None]


@registry.register(registry.METRICS, "epoch_means")
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


@registry.register(registry.METRICS, "mean_over_last_epoch")
def mean_over_last_epoch(run: Run, key: str):
  """The last epoch's mean of a train metric (see epoch_means)."""
  means = epoch_means(run, key)
  return means[-1][1] if means else None


@registry.register(registry.METRICS, "diverged")
def diverged(run: Run):
  """Whether the training loss became non-finite (the engine stopped the run)."""
  return bool(run.summary.get("diverged")) if run.summary else None


@registry.register(registry.METRICS, "diverged_at")
def diverged_at(run: Run):
  """The step at which the run diverged, or None."""
  return (run.summary or {}).get("diverged_at_step")


@registry.register(registry.METRICS, "collapsed")
def collapsed(run: Run):
  """Whether the run collapsed: a finite loss that exploded or accuracy back near chance.

  `bnlab.engine.collapse.CollapseWatch`; a run that collapsed may have recovered (see its
  final accuracy) unless it stopped there (`train.stop_on_collapse`).
  """
  return bool(run.summary.get("collapsed")) if run.summary else None


@registry.register(registry.METRICS, "collapsed_at")
def collapsed_at(run: Run):
  """The step at which the run first collapsed, or None."""
  return (run.summary or {}).get("collapsed_at_step")


@registry.register(registry.METRICS, "summary_difference")
def summary_difference(run: Run, key: str, minus: str):
  """summary.json's `key` minus its `minus` (e.g. train-mode minus inference accuracy)."""
  a, b = summary_value(run, key), summary_value(run, minus)
  return None if a is None or b is None else a - b


@registry.register(registry.METRICS, "at_least")
def at_least(run: Run, metric: str, threshold: float):
  """Metric `metric` >= threshold; False where it is None (e.g. a diverged run's accuracy)."""
  v = run.values.get(metric)
  return v is not None and v >= threshold


@registry.register(registry.METRICS, "below")
def below(run: Run, metric: str, threshold: float):
  """Metric `metric` < threshold; False where it is None."""
  v = run.values.get(metric)
  return v is not None and v < threshold


@registry.register(registry.METRICS, "any")
def any_(run: Run, *metrics: str):
  """Whether any of the boolean `metrics` is True."""
  return any(bool(run.values.get(m)) for m in metrics)


@registry.register(registry.METRICS, "measured")
def measured(run: Run, measurement: str, key: str):
  """Value `key` of the measurement `measurement` (see MEASUREMENTS)."""
  return run.measured.get(measurement, {}).get(key)


@registry.register(registry.MEASUREMENTS, "percentile_drift")
def percentile_drift(run_dir: str, run_cfg: dict, spec: dict) -> dict:
  """From the `analysis` records: per layer, how far the percentiles moved from `from_step`.

  `{layer}/median_drift`: mean over units of |median(last) - median(first)|;
  `{layer}/spread_drift`: mean over units of the change of (highest - lowest percentile).
  """
  del run_cfg
  records = sweep.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
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
  when the spec changed, the run was made longer since, or the cache is damaged: with a
  warning)."""
  path = os.path.join(run.path, "measurements", f"{name}.json")
  final_step = run.summary.get("final_step")
  if os.path.exists(path):
    problem = files.damage(path)
    cached = {} if problem else files.read_json(path, {})
    if not problem and not (isinstance(cached, dict) and isinstance(cached.get("values"), dict)):
      problem = "it holds no values"
    if problem:
      from absl import logging  # pylint: disable=g-import-not-at-top
      logging.warning("The cached measurement %s is damaged (%s): measuring it again", path,
                      problem)
    elif cached.get("spec") == spec and cached.get("final_step") == final_step:
      return cached["values"]
  from absl import logging  # pylint: disable=g-import-not-at-top
  # Some measurements evaluate the final weights again (train_gap, ics_smoothness): seconds
  # to minutes each, after the sweep's last progress line.
  logging.info("Measuring %s (%s) of run %s", name, spec["kind"], run.name)
  start = time.perf_counter()
  values = registry.MEASUREMENTS[spec["kind"]](run.path, run.cfg, spec)
  logging.info("Measured %s of run %s in %.1f s (cached in %s)", name, run.name,
               time.perf_counter() - start, path)
  files.make_dir(os.path.dirname(path))
  files.write_json(path, {"spec": spec, "final_step": final_step, "values": values})
  return values


def correct_key(accuracy_key: str) -> str | None:
  """The record key of a test accuracy's per-image results (`test_accuracy_batch` ->
  `test_correct_batch`), or None for a key that is no test accuracy."""
  if not accuracy_key.startswith("test_accuracy"):
    return None
  return "test_correct" + accuracy_key[len("test_accuracy"):]


def per_image_of(run: Run, spec: tuple):
  """A test-accuracy metric's per-image results (`bnlab.rundir.per_image` text), or None:
  for `summary` and `last` the final evaluation's, for `series` [[step, text], ...]; for
  ("measured", NAME, "accuracy...") the measurement's "correct..." value (e.g. train_gap's
  "correct_batch" beside "accuracy_batch"), so rules pair its images too."""
  if spec[0] == "measured" and len(spec) == 3 and str(spec[2]).startswith("accuracy"):
    text = run.measured.get(spec[1], {}).get("correct" + spec[2][len("accuracy"):])
    return text if isinstance(text, str) else None
  key = correct_key(spec[1]) if len(spec) > 1 and isinstance(spec[1], str) else None
  if key is None or run.summary is None:
    return None
  if spec[0] == "summary":
    return (run.summary or {}).get(key)
  if spec[0] == "last":
    return next((r[key] for r in reversed(run.records) if r.get(spec[1]) is not None
                 and key in r), None)
  if spec[0] == "series" and spec[2:] in ((), ("step",)):
    points = [[r["step"], r[key]] for r in run.records if r.get(spec[1]) is not None]
    return points if all(key in r for r in run.records if r.get(spec[1]) is not None) else None
  return None


def evaluate_metrics(run: Run, metrics: dict, measurements: dict) -> Run:
  """Fills `run.measured` and `run.values` (all None while the run is unfinished)."""
  if run.summary is not None:
    run.measured = {n: _measure(run, n, dict(s)) for n, s in measurements.items()}
  for name in study_config.metric_order(metrics):
    spec = tuple(metrics[name])
    run.values[name] = None if run.summary is None else registry.METRICS[spec[0]](run, *spec[1:])
  run.values = {n: run.values[n] for n in metrics}
  run.per_image = {n: v for n in metrics if (v := per_image_of(run, tuple(metrics[n])))}
  return run
