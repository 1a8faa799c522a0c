"""Figure kinds: functions that draw cells into a PNG, named by a study config's `figures`.

Apart from the report so that a new kind is one registered function; matplotlib is
imported only when a figure is drawn.
"""

from __future__ import annotations

import math

from bnlab.study import cells as cells_lib
from bnlab.study import registry


def _panels(cells: list[dict], panels, labels: dict, width: float = 5.2, height: float = 3.8):
  """(figure, [(axis, panel cells, title)]) with one panel per value of the `panels` keys."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  groups: dict[tuple, list[dict]] = {}
  for c in cells:
    groups.setdefault(tuple(cells_lib.show(c["key"][k]) for k in panels), []).append(c)
  cols = min(len(groups), 3)
  rows = math.ceil(len(groups) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
  for ax in axes.flat[len(groups):]:
    ax.set_visible(False)
  return fig, [(ax, g, cells_lib.cell_label(g[0], panels, labels) if panels else "")
               for ax, g in zip(axes.flat, groups.values())]


def save(fig, path: str) -> None:
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _hue_keys(cells, panels, hue):
  return tuple(hue) if hue else tuple(k for k in cells[0]["key"] if k not in panels)


COLORS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown",
          "tab:pink", "tab:gray", "tab:olive", "tab:cyan")


@registry.register(registry.FIGURES, "final_vs")
def final_vs(cells, path, labels, metric: str, x: str, hue=(), panels=(), logx: bool = False,
             logy: bool = False):
  """A per-run metric against a swept value: seeds as dots, cell means with 95% t bars."""
  fig, layout = _panels(cells, panels, labels)
  hue = _hue_keys(cells, tuple(panels) + (x,), hue)
  for ax, group, title in layout:
    lines: dict[str, list] = {}
    for c in group:
      lines.setdefault(cells_lib.cell_label(c, hue, labels), []).append(c)
    for (name, line), color in zip(lines.items(), COLORS):
      line.sort(key=lambda c: c["key"][x])
      pts = [(c["key"][x], c["stats"][metric]) for c in line if "mean" in c["stats"][metric]]
      for c in line:
        for v in c["values"][metric]:
          if v is not None:
            ax.plot(c["key"][x], v, ".", color=color, alpha=0.4, ms=5)
      ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts],
                  yerr=[p[1]["ci"] or 0 for p in pts], color=color, marker="o", ms=4,
                  capsize=3, label=name)
    ax.set(title=title, xlabel=cells_lib.label(labels, x), ylabel=cells_lib.label(labels, metric),
           xscale="log" if logx else "linear", yscale="log" if logy else "linear")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="mean, 95% t interval; dots: seeds", title_fontsize=7)
  save(fig, path)


@registry.register(registry.FIGURES, "curves")
def curves(cells, path, labels, metric: str, hue=(), panels=(), logy: bool = False,
           xlabel: str = "step"):
  """A series metric over training: each seed thin, the cell's seed mean thick, min..max band."""
  fig, layout = _panels(cells, panels, labels)
  hue = _hue_keys(cells, panels, hue)
  for ax, group, title in layout:
    for c, color in zip(group, COLORS):
      runs = [s for s in c["values"][metric] if s]
      for s in runs:
        ax.plot([p[0] for p in s], [p[1] for p in s], color=color, lw=0.6, alpha=0.4)
      if not runs:
        continue
      length = min(len(s) for s in runs)
      xs = [runs[0][i][0] for i in range(length)]
      ys = [[s[i][1] for s in runs] for i in range(length)]
      ax.plot(xs, [sum(y) / len(y) for y in ys], color=color, lw=2, marker="o", ms=3,
              label=cells_lib.cell_label(c, hue, labels))
      if len(runs) > 1:
        ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], color=color,
                        alpha=0.15, lw=0)
    ax.set(title=title, xlabel=xlabel, ylabel=cells_lib.label(labels, metric),
           yscale="log" if logy else "linear")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="thick: seed mean; band: min..max", title_fontsize=7)
  save(fig, path)


@registry.register(registry.FIGURES, "percentiles")
def percentiles(cells, path, labels, metric: str, unit: int = 0, hue=(), panels=()):
  """Percentiles over training of one unit (a series metric of `{layer}/percentiles`
  records: [[step, [[p, ...] per unit]], ...]); seed means, one line per percentile."""
  fig, layout = _panels(cells, panels, labels)
  hue = _hue_keys(cells, panels, hue)
  for ax, group, title in layout:
    for c, color in zip(group, COLORS):
      runs = [s for s in c["values"][metric] if s]
      if not runs:
        continue
      length = min(len(s) for s in runs)
      xs = [runs[0][i][0] for i in range(length)]
      for q in range(len(runs[0][0][1][unit])):
        ax.plot(xs, [sum(s[i][1][unit][q] for s in runs) / len(runs) for i in range(length)],
                color=color, lw=1.5, ls=("--", "-", ":")[q % 3],
                label=cells_lib.cell_label(c, hue, labels) if q == 0 else None)
    ax.set(title=title, xlabel="step", ylabel=f"{cells_lib.label(labels, metric)}, unit {unit}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="seed means; one line per percentile", title_fontsize=7)
  save(fig, path)
