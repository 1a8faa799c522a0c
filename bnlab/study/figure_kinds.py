"""Figure kinds: what each of a study's `figures` draws, registered into
`bnlab.study.FIGURES` when `bnlab.study` is imported, with the call shape, context and
style of `bnlab.study.figures` (`fn(cells, path, ctx, **spec) -> caption`).

- "final_vs": a per-run metric against a swept value (seeds, means, 95% t intervals);
- "curves": a series metric over training (seeds, mean by step, min..max band);
- "percentiles": one unit's recorded percentiles over training, seed means by step;
- "unit_percentiles": a recorded layer's percentiles over training, per unit and run;
- "paired_difference": a's minus b's series, run by run of the same seed;
- "per_checkpoint": a measured series of numbers or per-layer lists, per layer.
"""

from __future__ import annotations

import math
from typing import Callable

from bnlab.study import cells as cells_lib
from bnlab.study import figures as fig_lib
from bnlab.study import registry
from bnlab.study import rules as rules_lib

STEP_LINE = {"color": "0.45", "lw": 0.9, "ls": ":"}


def _dodge(xs: list, offset: float, log: bool) -> Callable:
  """x -> x shifted by `offset` x 2% of the axis's span (of its log span on a log axis)."""
  if not offset or not all(isinstance(v, (int, float)) for v in xs):
    return lambda v: v
  if log:
    span = math.log10(max(xs) / min(xs)) if len(xs) > 1 and min(xs) > 0 else 1.0
    return lambda v: v * 10 ** (0.02 * offset * span)
  span = (max(xs) - min(xs)) or 1.0
  return lambda v: v + 0.02 * offset * span


def _legend(fig, ctx, groups, keys) -> None:
  """The figure's legend: every line label of its panels, in the study's order."""
  names = [n for _, g in groups for n in fig_lib.by_line(g, keys, ctx.labels)]
  fig_lib.legend(fig, ctx.style, names, fig_lib.legend_title(keys, ctx.labels))


@registry.register(registry.FIGURES, "final_vs")
def final_vs(cells, path, ctx, metric: str, x: str, hue=(), panels=(), logx: bool = False,
             logy: bool = False) -> str:
  """A per-run metric against a swept value: seeds as dots, cell means with 95% t bars."""
  labels, keys = ctx.labels, fig_lib.hue_keys(cells, hue, tuple(panels) + (x,))
  counts, shifted = [], False
  with fig_lib.drawing() as plt:
    groups = fig_lib.panel_groups(cells, panels)
    titles = [fig_lib.panel_title(first, panels, labels) for first, _ in groups]
    fig, axes = fig_lib.grid(plt, len(groups), sharey=True, titles=titles)
    for ax, title, (_, group) in zip(axes.flat, titles, groups):
      lines = fig_lib.by_line(group, keys, labels)
      xs = sorted({c["key"][x] for c in group})
      shifted = shifted or len(lines) > 1
      for i, (line_name, line) in enumerate(lines.items()):
        props = ctx.style.of(line_name)
        at = _dodge(xs, i - (len(lines) - 1) / 2, logx)
        line.sort(key=lambda c: c["key"][x])
        for c in line:
          have = [v for v in c["values"][metric] if v is not None]
          counts.append(len(have))
          ax.plot([at(c["key"][x])] * len(have), have, ".", color=props["color"], alpha=0.4,
                  ms=4, zorder=1)
        pts = [(at(c["key"][x]), c["stats"][metric]) for c in line
               if "mean" in c["stats"][metric]]
        ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                    yerr=[p[1]["ci"] or 0 for p in pts], capsize=2.5, lw=1.4, ms=4, **props)
      ax.set(title=title, xscale="log" if logx else "linear",
             yscale="log" if logy else "linear")
      if not any(c["stats"][metric]["n"] for c in group):
        fig_lib.no_values(ax)
      if logy:
        fig_lib.log_axis(ax.yaxis)
      if logx or len(xs) <= 10:
        fig_lib.ticks_at(ax.xaxis, xs)
      if len(xs) == 1 and logx:
        ax.set_xlim(xs[0] / 3, xs[0] * 3)
    fig_lib.label_outer(axes, fig_lib.name(labels, x), fig_lib.name(labels, metric))
    _legend(fig, ctx, groups, keys)
    fig_lib.save(fig, path, ctx)
  return fig_lib.sentence(
      f"{fig_lib.name(labels, metric)} against {fig_lib.name(labels, x)}"
      f"{fig_lib.panels_phrase(panels, labels)}. Dots: single runs (seeds); markers and error "
      "bars: the mean over a cell's seeds and its 95% Student t interval (no bar for one seed"
      + ("; a bar down to the axis: the interval reaches 0 or below" if logy else "")
      + f"); {fig_lib.count_phrase(counts)} per point, a run without a value (e.g. one that "
      "never got there) left out"
      + ("; lines shifted a little sideways so that they do not hide each other"
         if shifted else "") + ".")


def _series_panels(plt, cells, ctx, metric: str, keys, panels, draw):
  """A panel per value of `panels` with a line per value of `keys`, each drawn by
  `draw(ax, runs' series, style)`; (figure, axes, panel groups, runs per line)."""
  groups = fig_lib.panel_groups(cells, panels)
  titles = [fig_lib.panel_title(first, panels, ctx.labels) for first, _ in groups]
  fig, axes = fig_lib.grid(plt, len(groups), sharey=True, titles=titles)
  counts = []
  for ax, title, (_, group) in zip(axes.flat, titles, groups):
    for line_name, line in fig_lib.by_line(group, keys, ctx.labels).items():
      runs = [s for c in line for s in c["values"][metric] if s]
      counts.append(len(runs))
      if runs:
        draw(ax, runs, ctx.style.of(line_name))
    ax.set_title(title)
    if not any(s for c in group for s in c["values"][metric]):
      fig_lib.no_values(ax)
  return fig, axes, groups, counts


@registry.register(registry.FIGURES, "curves")
def curves(cells, path, ctx, metric: str, hue=(), panels=(), logy: bool = False,
           xlabel: str = "step") -> str:
  """A series metric over training: each seed thin, the seed mean by step thick, min..max band."""
  labels, keys = ctx.labels, fig_lib.hue_keys(cells, hue, panels)
  with fig_lib.drawing() as plt:
    fig, axes, groups, counts = _series_panels(plt, cells, ctx, metric, keys, panels,
                                               fig_lib.series_band)
    if logy:
      for ax in axes.flat[:len(groups)]:
        ax.set_yscale("log")
        fig_lib.log_axis(ax.yaxis)
    fig_lib.label_outer(axes, fig_lib.name(labels, xlabel), fig_lib.name(labels, metric))
    _legend(fig, ctx, groups, keys)
    fig_lib.save(fig, path, ctx)
  x_name = fig_lib.name(labels, xlabel)
  return fig_lib.sentence(
      f"{fig_lib.name(labels, metric)} against {x_name}{fig_lib.panels_phrase(panels, labels)}. "
      f"Thin lines: single runs (seeds); thick line: the mean over the runs evaluated at each "
      f"{x_name}; {fig_lib.SEED_BAND}; {fig_lib.count_phrase(counts)} per line.")


@registry.register(registry.FIGURES, "percentiles")
def percentiles(cells, path, ctx, metric: str, unit: int = 0, hue=(), panels=()) -> str:
  """Percentiles over training of one unit (a series metric of `{layer}/percentiles`
  records: [[step, [[p, ...] per unit]], ...]); seed means by step."""
  labels, keys = ctx.labels, fig_lib.hue_keys(cells, hue, panels)
  with fig_lib.drawing() as plt:
    fig, axes, groups, counts = _series_panels(
        plt, cells, ctx, metric, keys, panels,
        lambda ax, runs, style: fig_lib.percentile_lines(ax, runs, unit, style))
    fig_lib.label_outer(axes, "step", f"{fig_lib.name(labels, metric)}, unit {unit}")
    _legend(fig, ctx, groups, keys)
    fig_lib.save(fig, path, ctx)
  return (f"Percentiles of unit {unit}'s {fig_lib.name(labels, metric)} over training"
          f"{fig_lib.panels_phrase(panels, labels)}; each the mean over the seeds evaluated at "
          f"that step ({fig_lib.count_phrase(counts)} per line). {fig_lib.PERCENTILE_WORDS}")


def _row_keys(picked: list[dict], hue) -> tuple:
  """`hue`, else the keys on which the rows' cells differ (all keys when they do not)."""
  if hue:
    return tuple(hue)
  keys = tuple(picked[0]["key"]) if picked else ()
  return tuple(k for k in keys if len({cells_lib.show(c["key"][k]) for c in picked}) > 1) or keys


def _row_lines(cells, rows, hue=(), **_) -> tuple[tuple, list[dict]]:
  picked = [c for c in (cells_lib.one(cells, w) for w in rows) if c]
  return _row_keys(picked, hue), picked


@registry.register(registry.FIGURES, "unit_percentiles")
def unit_percentiles(cells, path, ctx, metric: str, rows, units=(), unit_metric: str = "",
                     from_step: int = 0, hue=()) -> str:
  """One row per cell of `rows` (where-strings); columns: the fixed `units` of its first run,
  or each run (seed) at the unit its `unit_metric` names. Line: the middle percentile; band:
  lowest..highest; colour and line style: the row's label on `hue` (default: the keys on
  which the rows differ)."""
  labels = ctx.labels
  keys, picked = _row_lines(cells, rows, hue)
  differ = _row_keys(picked, ())  # what tells the rows apart, named left of each
  missing = [w for w in rows if cells_lib.one(cells, w) is None]
  common = [k for k in (picked[0]["key"] if picked else ()) if k not in differ]
  layout = []
  for c in picked:
    runs = ([(c["rows"][0], u) for u in units] if units else
            [(r, r.get(unit_metric)) for r in c["rows"]])
    layout.append((c, [(r, u) for r, u in runs if r.get(metric) and u is not None]))
  cols = max([len(p) for _, p in layout] + [1])
  with fig_lib.drawing() as plt:
    fig, axes = fig_lib.grid(plt, len(layout) * cols, rows=max(len(layout), 1), cols=cols,
                             sharey=True, size=(2.3 if cols <= 4 else max(1.5, 11 / cols), 1.9))
    for i, (c, runs) in enumerate(layout):
      props = ctx.style.of(fig_lib.line_label(c, keys, labels))
      for j, (r, u) in enumerate(runs):
        ax = axes[i, j]
        fig_lib.percentile_lines(ax, [r[metric]], u, props)
        if from_step:
          ax.axvline(from_step, **STEP_LINE)
        ax.set_title(f"seed {r.get('seed')}, unit {u}")
      for ax in axes[i, len(runs):]:
        ax.set_visible(False)
      axes[i, 0].set_visible(True)
      axes[i, 0].set_ylabel(f"{fig_lib.describe(c, differ, labels)}\n"
                            f"{fig_lib.name(labels, metric)}")
    fig_lib.label_outer(axes, "step", None)
    if common:
      fig.suptitle(fig_lib.panel_title(picked[0], common, labels), fontsize=9)
    more = {f"step {from_step:,}": {"color": STEP_LINE["color"], "ls": STEP_LINE["ls"]}}
    fig_lib.legend(fig, ctx.style, [fig_lib.line_label(c, keys, labels) for c in picked],
                   fig_lib.legend_title(keys, labels), more if from_step else None)
    fig_lib.save(fig, path, ctx)
  which = (f"unit ({', '.join(map(str, units))}) of each row's first run" if units else
           f"run (seed), each at its own unit ({fig_lib.name(labels, unit_metric)})")
  return (fig_lib.sentence(f"{fig_lib.name(labels, metric)} over training, one row per "
                           f"cell, one panel per {which}. ") + fig_lib.PERCENTILE_WORDS
          + (f" Dotted grey line: step {from_step:,}." if from_step else "")
          + (f" No runs: {'; '.join(missing)}." if missing else ""))


unit_percentiles.lines = _row_lines


def _where_keys(where: str) -> list[str]:
  return [part.split("=", 1)[0] for part in filter(None, where.split(","))]


@registry.register(registry.FIGURES, "paired_difference")
def paired_difference(cells, path, ctx, metric: str, a: str, b: str, from_step: int = 0) -> str:
  """a's minus b's series, one line per seed; the y axis scaled to the points from `from_step`."""
  labels = ctx.labels
  ca, cb = cells_lib.select(cells, a), cells_lib.select(cells, b)
  named = list(dict.fromkeys(_where_keys(a) + _where_keys(b)))
  if ca and cb:
    differ = [k for k in named
              if cells_lib.show(ca[0]["key"][k]) != cells_lib.show(cb[0]["key"][k])]
    same = [k for k in named if k not in differ]
    name_a, name_b = (fig_lib.line_label(c[0], differ, labels) for c in (ca, cb))
    title = fig_lib.panel_title(ca[0], same, labels)
  else:
    name_a, name_b, title = a, b, ""
  color = ctx.style.assigned.get(name_a, {}).get("color", "black")
  seeds, entries = 0, {}
  with fig_lib.drawing() as plt:
    fig, axes = fig_lib.grid(plt, 1, size=(4.2, 2.6))
    ax, late = axes[0, 0], [0.0]
    for i, (seed, x, y) in enumerate(rules_lib.paired_runs(cells, metric, a, b) or []):
      ys = dict((s, v) for s, v in y)
      steps, xv = fig_lib.sorted_series([(s, v) for s, v in x if s in ys])
      diff = [100 * (v - ys[s]) for s, v in zip(steps, xv)]
      seeds, entries[f"seed {seed}"] = i + 1, {"color": color, "ls": fig_lib.LINESTYLES[i % 4]}
      ax.plot(steps, diff, lw=1.2, **entries[f"seed {seed}"])
      late += [abs(d) for s, d in zip(steps, diff) if s >= from_step]
    ax.axhline(0, color="k", lw=0.8, zorder=1.5)  # under the seeds' lines
    fig_lib.step_axis(ax.xaxis)
    if from_step:
      ax.axvline(from_step, **STEP_LINE)
      entries[f"step {from_step:,}"] = {"color": STEP_LINE["color"], "ls": STEP_LINE["ls"]}
    ax.set_ylim(-1.3 * max(late) - 1e-9, 1.3 * max(late) + 1e-9)
    ax.set(xlabel="step", title=title,
           ylabel=f"{name_a} \u2212 {name_b}:\n{fig_lib.name(labels, metric)} (points)")
    fig_lib.legend(fig, ctx.style, [], None, entries)
    fig_lib.save(fig, path, ctx)
  return (f"{name_a} minus {name_b}, {fig_lib.name(labels, metric)} in points (x 100), run by "
          f"run of the same seed: one line per seed ({seeds}); black line: no difference"
          + (f"; dotted grey line: step {from_step:,}, from which the y axis is scaled"
             if from_step else "") + ".")


paired_difference.lines = lambda cells, **_: ((), [])


@registry.register(registry.FIGURES, "per_checkpoint")
def per_checkpoint(cells, path, ctx, metric: str, hue=(), panels=(), first: int = 0,
                   logy: bool = False) -> str:
  """A series metric whose points are numbers or per-layer lists: one row per value of
  `panels`, one column per list index from `first`, one line per hue value (seed mean by
  step, min..max band)."""
  labels, keys, counts = ctx.labels, fig_lib.hue_keys(cells, hue, panels), []
  points = [s[0][1] for c in cells for s in c["values"][metric] if s]
  layered = any(isinstance(p, list) for p in points)
  cols = max(max((len(p) for p in points if isinstance(p, list)), default=1) - first, 1)
  cols = cols if layered else 1
  groups = fig_lib.panel_groups(cells, panels)
  with fig_lib.drawing() as plt:
    fig, axes = fig_lib.grid(plt, len(groups) * cols, rows=len(groups), cols=cols,
                             sharey="row")
    for row, (head, group) in enumerate(groups):
      for line_name, line in fig_lib.by_line(group, keys, labels).items():
        runs = [s for c in line for s in c["values"][metric] if s]
        counts.append(len(runs))
        for j in range(cols):
          column = [[(s, v[first + j] if isinstance(v, list) else v) for s, v in run]
                    for run in runs]
          fig_lib.series_band(axes[row, j], column, ctx.style.of(line_name))
      for j, ax in enumerate(axes[row]):
        ax.set(title="\n".join(filter(None, [fig_lib.panel_title(head, panels, labels),
                                             f"layer {first + j + 1}" if layered else ""])),
               yscale="log" if logy else "linear")
        if logy:
          fig_lib.log_axis(ax.yaxis)
    fig_lib.label_outer(axes, "step", fig_lib.name(labels, metric))
    _legend(fig, ctx, groups, keys)
    fig_lib.save(fig, path, ctx)
  return fig_lib.sentence(
      f"{fig_lib.name(labels, metric)} at initialisation and each checkpoint"
      f"{fig_lib.panels_phrase(panels, labels).replace('panel', 'row')}"
      + (f"; one column per layer from layer {first + 1}" if layered else "")
      + f". Thin lines: single runs (seeds); thick line: the mean over the runs at each step; "
      f"{fig_lib.SEED_BAND}; {fig_lib.count_phrase(counts)} per line.")
