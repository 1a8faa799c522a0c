"""The report stage: report.md, results, cells, claims and figures from the work directory.

It reads only the files there, so --stage=report rebuilds the same report at any time.
"""

from __future__ import annotations

import inspect
import json
import os

import ml_collections

from bnlab.study import cells as cells_lib
from bnlab.study import config as study_config
from bnlab.study import files
from bnlab.study import metrics as metrics_lib
from bnlab.study import registry
from bnlab.study import rules as rules_lib
from bnlab.study import runs as runs_lib


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
  cols = list(dict.fromkeys(cells_lib.show(c["key"][across]) for c in cells)) if across else [None]
  head = [cells_lib.label(labels, k) for k in keys] + [
      (f"{labels.get(a, a)}: " if a else "") + cells_lib.label(labels, m)
      for m in metrics for a in cols]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  rows: dict[str, dict] = {}
  for c in cells:
    row = rows.setdefault(json.dumps([cells_lib.show(c["key"][k]) for k in keys]),
                          {"cell": c, "by": {}})
    row["by"][cells_lib.show(c["key"][across]) if across else None] = c
  for row in rows.values():
    out = [cells_lib.label(labels, row["cell"]["key"][k]) for k in keys]
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
  if spec[0] in study_config.DERIVED_METRICS:
    return list(dict.fromkeys(s for r in study_config.metric_refs(spec)
                              for s in statistics_of(r, metrics)))
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
  doc = " ".join((registry.RULES[spec["rule"]].__doc__ or "").split())
  each = f" For each {', '.join(spec['each'])}." if spec.get("each") else ""
  return (f"`{spec['rule']}({', '.join(f'{k}={v!r}' for k, v in params.items())})`: "
          f"{doc}{each}")


def _time_lines(runs: list[metrics_lib.Run], stages: list[dict]) -> list[str]:
  from bnlab.engine import members as members_lib  # pylint: disable=g-import-not-at-top
  done = [r for r in runs if r.summary]
  groups: dict[str, float] = {}
  for r in done:
    key = (members_lib.group_key(ml_collections.ConfigDict(r.cfg)) if r.summary.get("group_size")
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


def analyse(study: study_config.Study, workdir: str):
  """(runs, rows, cells, verdicts) from the files: metrics per run, statistics per cell, claims."""
  cfg = study.config
  runs = runs_lib.collect(study, workdir)
  errors = {r["name"]: r.get("error")
            for r in files.read_json(os.path.join(workdir, "runs", "results.json"), [])}
  rows = runs_lib.result_rows(runs, errors)
  cells = cells_lib.make_cells(rows, cfg["cells"], list(cfg["metrics"]))
  runs_by_name = {r.name: r for r in runs}
  for c in cells:
    for m in _test_accuracy_metrics(cfg["metrics"], ("summary", "last", "max", "series")):
      if c["stats"][m]["n"]:
        c["stats"][m]["n_test"] = n = _n_test(c, runs_by_name)
        if "mean" in c["stats"][m]:
          c["stats"][m]["binomial_se"] = cells_lib.binomial_se(c["stats"][m]["mean"], n)
  return runs, rows, cells, rules_lib.judge(cfg["claims"], cells)


def _noise_line(cfg: dict, cells: list[dict]) -> list[str]:
  """The test set's binomial noise, stated before the verdicts when a claim reads test accuracy."""
  used = {m for spec in cfg["claims"].values() for m in study_config.claim_metrics(spec)}
  acc = set(_test_accuracy_metrics(cfg["metrics"], ("summary", "last", "max", "series")))
  reads = set()
  for m in used:  # a derived metric reads the test accuracy behind it
    reads |= {m, *(r for r in study_config.metric_refs(tuple(cfg["metrics"][m])))}
  n = next((c["stats"][m].get("n_test") for c in cells for m in acc & reads
            if c["stats"][m].get("n_test")), None)
  if not n:
    return []
  at = ", ".join(f"{100 * cells_lib.binomial_se(p, n):.2f} at p = {p}"
                 for p in (0.99, 0.98, 0.9, 0.5))
  return ["", f"Test-set noise: one accuracy p measured on the N = {n:,} test images has "
              f"binomial standard error sqrt(p(1-p)/N), in points: {at}. Seeds share the test "
              "set, so averaging seeds does not shrink it."]


def _claim_lines(cfg: dict, workdir: str, verdicts: list[dict],
                 cells: list[dict] = ()) -> list[str]:
  lines = ["## Claims, with the rule of each verdict (fixed before the runs)", ""]
  for name, spec in cfg["claims"].items():
    lines += [f"- **{name}**: {spec['statement']}", f"  Rule: {_rule_text(spec)}"]
    stats = list(dict.fromkeys(s for m in study_config.claim_metrics(spec)
                               for s in statistics_of(m, cfg["metrics"])))
    if stats:
      lines.append(f"  BN statistics behind it: {'; '.join(stats)}.")
  lines += _noise_line(cfg, list(cells))
  registered = files.read_json(os.path.join(workdir, "claims_registered.json"), cfg["claims"])
  if registered != cfg["claims"]:
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
      groups.setdefault(cells_lib.cell_label(c, by, labels) if by else "", []).append(c)
    for title, group in groups.items():
      sub = [{**c, "key": {k: v for k, v in c["key"].items() if k not in by}} for c in group]
      lines += [f"### {name}" + (f": {title}" if title else ""), ""]
      lines += _table(sub, spec["metrics"], labels, spec.get("across", "")) + [""]
  for m in _test_accuracy_metrics(cfg["metrics"]):
    se = [(c["stats"][m]["mean"], c["stats"][m]["binomial_se"], c["stats"][m]["n_test"])
          for c in cells if "binomial_se" in c["stats"][m]]
    if se:
      lo, hi = min(se, key=lambda s: s[1]), max(se, key=lambda s: s[1])
      lines += [f"Test-set noise of {cells_lib.label(labels, m)}: one run's accuracy p on N test "
                f"images has binomial standard error sqrt(p(1-p)/N): {lo[1]:.4f} at p = "
                f"{lo[0]:.4f} to {hi[1]:.4f} at p = {hi[0]:.4f} (N = {hi[2]:,}; per cell in "
                "cells.csv).", ""]
  return lines + [f"![{name}](figures/{name}.png)\n" for name in cfg["figures"]]


def report(study: study_config.Study, workdir: str) -> str:
  """Writes report.md, results.json/csv, cells.csv, claims.json and figures/; returns the report.

  Reads only the files under `workdir`: the report depends on nothing else.
  """
  cfg = study.config
  runs, rows, cells, verdicts = analyse(study, workdir)
  stages = files.read_json(os.path.join(workdir, "stages.json"), [])
  os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
  for name, spec in cfg["figures"].items():
    spec = dict(spec)
    registry.FIGURES[spec.pop("kind")](cells, os.path.join(workdir, "figures", f"{name}.png"),
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
  files.write_json(os.path.join(workdir, "results.json"), {"rows": flat, "stages": stages})
  files.write_json(os.path.join(workdir, "claims.json"), verdicts)
  files.write_csv(os.path.join(workdir, "results.csv"), flat)
  stat_keys = ("n", "of", "mean", "ci", "min", "max", "count", "binomial_se")
  files.write_csv(os.path.join(workdir, "cells.csv"), [
      {**c["key"], **{f"{m}.{s}": c["stats"][m].get(s) for m in scalar for s in stat_keys
                      if s in c["stats"][m]}} for c in cells])
