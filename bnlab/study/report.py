"""The report stage: report.md, results, cells, claims and figures from the work directory.

It reads only the files there, so --stage=report rebuilds the same report at any time.
"""

from __future__ import annotations

import datetime
import inspect
import json
import math
import os

import ml_collections

from bnlab.rundir import files as rundir_files
from bnlab.study import cells as cells_lib
from bnlab.study import config as study_config
from bnlab.study import figures
from bnlab.study import files
from bnlab.study import metrics as metrics_lib
from bnlab.study import published
from bnlab.study import registration
from bnlab.study import registry
from bnlab.study import runs as runs_lib


def _fmt(st: dict) -> str:
  """A cell statistic: `mean ±ci95 [min..max]`, `k/n` for counts, `(n/of)` when runs lack it."""
  if "count" in st:
    return f"{st['count']}/{st['n']}"
  if not st["n"]:
    return f"- (0/{st['of']})"
  f = ",.0f" if st.get("integer") else ".4f"
  # Values under 0.001 (e.g. rounding-level weight differences) keep their size.
  big = max(abs(st[k]) for k in ("mean", "min", "max") if st.get(k) is not None)
  if not st.get("integer") and 0 < big < 1e-3:
    f = ".2e"
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


def _numbers(numbers: dict) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    if isinstance(v, list):
      return "[" + ", ".join(fmt(x) for x in v) + "]"
    return str(v)
  return "; ".join(f"{k}: {fmt(v)}" for k, v in numbers.items())


def _rule_text(spec: dict) -> str:
  params = {k: v for k, v in spec.items()
            if k not in ("statement", "rule", "each", "primary", "within")}
  doc = " ".join((registry.RULES[spec["rule"]].__doc__ or "").split())
  each = f" For each {', '.join(spec['each'])}." if spec.get("each") else ""
  if spec.get("choose"):
    c = spec["choose"]
    each += (f" Each of a and b at its own {c['along']}: the value whose runs have the "
             f"{'highest' if c.get('higher', True) else 'lowest'} seed-mean {c['by']}, chosen "
             "before the rule reads anything else (ties to the smaller value; a value with a "
             f"run lacking {c['by']} is not chosen).")
  within = spec.get("within") or ()
  each += f" Within {within if isinstance(within, str) else ' or '.join(within)}." \
      if within else ""
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
  wall, overlapped = stage_wall_s(stages)
  cut = sum(s["interrupted"] for s in stages)
  return [f"- Study wall time: {wall / 60:.1f} min over {len(stages)} run stage(s)"
          + (f", {cut} of them interrupted" if cut else "")
          + (f", {overlapped} of them beside another (workers: their overlap counted once)"
             if overlapped else "") + " (stages.json).",
          f"- The runs' own wall times (summary.json), summed: "
          f"{sum(r.summary.get('wall_time', 0.0) for r in done) / 60:.1f} min over "
          f"{len(done)} finished runs; with each grouped (vmapped) program counted once: "
          f"{sum(groups.values()) / 60:.1f} min."]


def stage_wall_s(stages: list[dict]) -> tuple[float, int]:
  """(seconds covered by the run stages, how many overlapped another): concurrent workers'
  stages are one span of wall time, not the sum of theirs."""
  spans = sorted((t, t + s["wall_s"]) for s in stages
                 for t in [datetime.datetime.fromisoformat(s["started"]).timestamp()])
  # `started` is whole seconds: spans that touch within a second follow one another.
  overlapped = sum(any(i != j and a < d - 1 and c < b - 1 for j, (c, d) in enumerate(spans))
                   for i, (a, b) in enumerate(spans))
  total, end = 0.0, -math.inf
  for a, b in spans:
    total += max(0.0, b - (max(a, end) if a < end - 1 else a))
    end = max(end, b)
  return total, overlapped


def _where_lines(stages: list[dict]) -> list[str]:
  from bnlab.engine import provenance  # pylint: disable=g-import-not-at-top
  code = provenance.code_version()
  made = (f"- This report was made by bnlab {code['commit'][:12]}"
          + (" with uncommitted changes" if code["dirty"] else "") + " from the files.")
  if not stages:
    return ["- No run stage of this command is recorded: the runs were made before it.", made]
  return [f"- {s['started']}, {s['wall_s'] / 60:.1f} min, {s['trained']} run(s) trained"
          + (" (interrupted)" if s["interrupted"] else "")
          + f": {provenance.describe(s['environment'])}" for s in stages] + [made]


def analyse(study: study_config.Study, workdir: str):
  """(runs, rows, cells, data, verdicts) from the files: metrics per run, statistics per cell,
  the published data, and the claims judged from that data alone (as `verify` judges them)."""
  cfg = study.config
  runs = runs_lib.collect(study, workdir)
  errors = {r["name"]: r.get("error")
            for r in files.read_json(os.path.join(workdir, "runs", "results.json"), [])}
  rows = runs_lib.result_rows(runs, errors)
  cells = published.annotate_test_sets(
      cells_lib.make_cells(rows, cfg["cells"], list(cfg["metrics"])), cfg["metrics"])
  data = published.data_of(rows, cfg, study.members)
  return runs, rows, cells, data, published.verdicts(cfg, data)


def _method_lines(cfg: dict, verdicts: list[dict]) -> list[str]:
  """How the verdicts weigh noise and multiplicity, stated once before them."""
  tests = [v for v in verdicts if v["rule"] in registry.TESTS]
  if not tests:
    return ["", "No claim is a test with a p-value (registry.TESTS): every verdict follows its "
                "rule as stated, without intervals or a correction for multiplicity."]
  noises = sorted({v["numbers"]["noise"] for v in tests if v["numbers"].get("noise")})
  primaries = [v for v in verdicts if v["primary"]]
  lines = ["", "**Method.** Runs are paired by seed; d = a - b per pair. Two noises add as "
           "variances: the seeds' sd(d)/sqrt(n) and the test set's, from per-image results "
           "paired across the two models (per image, the seed-mean difference of right "
           "answers; its sd / sqrt(N)) or, where a metric has none, two unpaired binomials. "
           "Intervals and p-values use Student t with Welch-Satterthwaite degrees of "
           "freedom; a series is averaged over the claim's window of evaluations first. "
           f"Test-set noise here: {'; '.join(noises)}. *detectable*: the smallest true "
           "difference the design finds with 80% power at the 5% level (for an equivalence, "
           "the smallest margin it establishes at a true difference of 0)."]
  if any(v["rule"] == "reaches_sooner" for v in tests):
    lines.append("Steps to a target (*reaches_sooner*): per seed pair, which run reached it "
                 "first; a run that never reached it is censored at its last step, not "
                 "dropped (it loses to any run that reached it; two that never did are "
                 "undecided). p: the exact two-sided sign test over the decided pairs, ties "
                 "left out; medians: Kaplan-Meier's (none when half the runs never reached).")
  if primaries:
    lines.append(f"The {len(primaries)} verdict(s) of the primary claims form one family, "
                 "corrected by Holm's step-down at family level 0.05 (*Holm*); the other "
                 "claims are secondary and uncorrected: read them as exploratory.")
  else:
    lines.append("No claim is primary: every verdict is uncorrected for multiplicity; read "
                 "them as exploratory.")
  return lines


def _brief(verdicts: list[dict]) -> list[str]:
  """One line per claim, made from its verdicts only."""
  lines, by_claim = [], {}
  for v in verdicts:
    by_claim.setdefault(v["claim"], []).append(v)
  for name, vs in by_claim.items():
    groups: dict[str, list[str]] = {}
    for v in vs:
      final = v.get("corrected", v["verdict"])
      groups.setdefault(final, []).append(v["where"] or "all")
    text = "; ".join(f"{verdict} at {', '.join(w)}" if w != ["all"] else verdict
                     for verdict, w in groups.items())
    lines.append(f"- {name} ({'primary, Holm-corrected' if vs[0]['primary'] else 'secondary'})"
                 f": {text}.")
  return lines


def _claim_lines(cfg: dict, workdir: str, verdicts: list[dict], stages: list[dict]) -> list[str]:
  reg_lines, marks = registration.describe(workdir, cfg["claims"], stages)
  lines = ["## Registration", ""] + reg_lines + ["", "## Claims, with the rule of each verdict",
                                                   ""]
  for name, spec in cfg["claims"].items():
    kind = "primary" if spec.get("primary") else "secondary"
    lines += [f"- **{name}** ({kind}): {spec['statement']}", f"  Rule: {_rule_text(spec)}"]
    stats = list(dict.fromkeys(s for m in study_config.claim_metrics(spec)
                               for s in statistics_of(m, cfg["metrics"])))
    if stats:
      lines.append(f"  BN statistics behind it: {'; '.join(stats)}.")
    if name in marks:
      lines.append(f"  **Registration: {marks[name]}.**")
  lines += _method_lines(cfg, verdicts)
  if cfg["notes"]:
    lines += ["", inspect.cleandoc(cfg["notes"])]
  lines += ["", "## Verdicts in brief", ""] + _brief(verdicts)
  lines += ["", "## Verdicts", "", "| claim | where | verdict | Holm | detectable | numbers "
            "behind it |", "|---|---|---|---|---|---|"]
  return lines + [f"| {v['claim']} | {v['where'] or 'all'} | **{v['verdict']}** | "
                  f"{v.get('corrected', '-')} | {_fmt_number(v['numbers'].get('detectable'))} | "
                  f"{_numbers({k: x for k, x in v['numbers'].items() if k != 'detectable'})} |"
                  for v in verdicts]


def _fmt_number(v) -> str:
  return "-" if v is None else f"{v:.4g}"


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
  for m in published.test_accuracy_metrics(cfg["metrics"]):
    se = [(c["stats"][m]["mean"], c["stats"][m]["binomial_se"], c["stats"][m]["n_test"])
          for c in cells if "binomial_se" in c["stats"][m]]
    if se:
      lo, hi = min(se, key=lambda s: s[1]), max(se, key=lambda s: s[1])
      lines += [f"Test-set noise of {cells_lib.label(labels, m)}: one run's accuracy p on N test "
                f"images has binomial standard error sqrt(p(1-p)/N): {lo[1]:.4f} at p = "
                f"{lo[0]:.4f} to {hi[1]:.4f} at p = {hi[0]:.4f} (N = {hi[2]:,}; per cell in "
                "cells.csv).", ""]
  return lines


def _figure_lines(drawn: list[dict]) -> list[str]:
  return [line for d in drawn for line in
          (f"### Figure: {d['name']}", "", f"![{d['name']}](figures/{d['name']}.png)", "",
           d["caption"], "")]


def report(study: study_config.Study, workdir: str, formats: tuple = ("png",)) -> str:
  """Writes report.md, results.json/csv, cells.csv, claims.json and figures/; returns the report.

  Reads only the files under `workdir`: the report depends on nothing else.
  """
  cfg = study.config
  runs, rows, cells, data, verdicts = analyse(study, workdir)
  stages = files.read_json(os.path.join(workdir, "stages.json"), [])
  os.makedirs(os.path.join(workdir, "figures"), exist_ok=True)
  drawn = figures.draw_all(cfg["figures"], cells, cfg["labels"],
                           os.path.join(workdir, "figures"), formats)
  published.write(os.path.join(workdir, published.DATA), data)
  _write_outputs(workdir, rows, cells, verdicts, stages, list(cfg["metrics"]))
  lines = [f"# {cfg['title']}", "", study.doc, ""] + _claim_lines(cfg, workdir, verdicts, stages)
  lines += [""] + _result_lines(cfg, rows, cells) + _figure_lines(drawn)
  lines += ["## Time", ""] + _time_lines(runs, stages)
  lines += ["", "## Where and with which code it ran", ""] + _where_lines(stages)
  lines += ["", f"Command: `{study.command(workdir)}`", "",
            "Files: `results.csv`/`results.json` (one row per run), `cells.csv` (the cell "
            "statistics), `claims.json` (verdicts and their numbers), `data.json.gz` "
            "(everything the verdicts read, per run: values, series and per-image results), "
            "`registration.json`, `study.json` (the study config), `runs/` (each run's "
            "config, metrics and summary). `--stage=verify` recomputes every verdict from the "
            "published files alone."]
  text = "\n".join(lines) + "\n"
  rundir_files.atomic_write(os.path.join(workdir, "report.md"), text)
  return text


def console_summary(workdir: str, out: str = "", width: int = 160) -> str:
  """What a study prints at its end: the runs and verdicts counted, one line per claim, and
  where report.md is. Why not the report: its rules, tables and figures are for reading in
  the file (a console would scroll them away); the verdicts and the path are what to act on.
  Read from the files the report stage wrote (claims.json, results.json)."""
  verdicts = files.read_json(os.path.join(workdir, "claims.json"), [])
  rows = files.read_json(os.path.join(workdir, "results.json"), {}).get("rows", [])
  finals = [v.get("corrected", v["verdict"]) for v in verdicts]

  def counted(values) -> str:
    return ", ".join(f"{n} {k}" for k, n in _tally(values)) or "none"
  lines = [f"{len(rows)} runs ({counted(r.get('status') for r in rows)}); "
           f"{len(verdicts)} verdicts ({counted(finals)}):"]
  by_claim: dict[str, list] = {}
  for v in verdicts:
    by_claim.setdefault(v["claim"], []).append(v)
  for line, (name, vs) in zip(_brief(verdicts), by_claim.items()):
    if len(line) > width:  # many places: counted, not listed
      kind = "primary, Holm-corrected" if vs[0]["primary"] else "secondary"
      line = f"- {name} ({kind}): " + ", ".join(
          f"{verdict} at {n} of {len(vs)}"
          for verdict, n in _tally(v.get("corrected", v["verdict"]) for v in vs)) + "."
    lines.append(line)
  report = os.path.join(workdir, "report.md")
  lines.append(f"Full report: {report}" + (
      f" (published with its data to {os.path.join(out, 'report.md')})" if out else ""))
  return "\n".join(lines)


def _tally(values) -> list[tuple[str, int]]:
  """(value, count) of `values`, the most frequent first."""
  out: dict[str, int] = {}
  for v in values:
    out[str(v)] = out.get(str(v), 0) + 1
  return sorted(out.items(), key=lambda kv: -kv[1])


def _write_outputs(workdir, rows, cells, verdicts, stages, metrics) -> None:
  scalar = [m for m in metrics if _scalar(cells, m)]
  # One row per run of reduced values; series (curves, percentiles over
  # training) stay in each run's metrics.jsonl, and the figures draw them.
  flat = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in rows]
  files.write_json(os.path.join(workdir, "results.json"), {"rows": flat, "stages": stages})
  files.write_json(os.path.join(workdir, "claims.json"), verdicts)
  files.write_csv(os.path.join(workdir, "results.csv"), flat)
  stat_keys = ("n", "of", "mean", "ci", "min", "max", "count", "binomial_se")
  files.write_csv(os.path.join(workdir, "cells.csv"), [
      {**c["key"], **{f"{m}.{s}": c["stats"][m].get(s) for m in scalar for s in stat_keys
                      if s in c["stats"][m]}} for c in cells])
