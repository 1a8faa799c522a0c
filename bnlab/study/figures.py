"""Figures: how a study's figures are drawn from its cells, in print formats, one style
per compared method; the kinds themselves are in `figure_kinds`.

`draw_all(cfg["figures"], cells, cfg["labels"], out_dir, formats)` draws every figure of a
study. A figure kind is one registered function

    fn(cells, path, ctx: FigureContext, **spec) -> caption

that writes `path.FORMAT` for each of `ctx.formats` and returns its caption: what its
lines, dots and bands mean. One `Style` per study gives each line label (a hue value's
label, e.g. "BN") the same colour, line style and marker in every figure, in the order the
cells (the sweep's order) first show it. Series are averaged by step (`mean_by_step`), not
by position. Names on the figures come from the study's `labels`, else from the key
("test_acc_curve" -> "test acc curve"). matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from bnlab.study import cells as cells_lib
from bnlab.study import files
from bnlab.study import registry

FORMATS = ("png", "pdf", "svg")
DPI = 200  # PNG; pdf and svg are vector
PANEL = (2.6, 2.05)  # inches per panel (width, height)
# Okabe & Ito's colour-blind-safe palette (yellow left out: too light on white).
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
RC = {"font.size": 8, "axes.titlesize": 8.5, "axes.labelsize": 8, "xtick.labelsize": 7,
      "ytick.labelsize": 7, "legend.fontsize": 8, "legend.title_fontsize": 8,
      "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
      "grid.alpha": 0.3, "grid.linewidth": 0.5, "lines.solid_capstyle": "round",
      "pdf.fonttype": 42, "svg.hashsalt": "bnlab", "figure.constrained_layout.use": True}
METADATA = {"png": None, "pdf": {"CreationDate": None}, "svg": {"Date": None}}
SEED_BAND = "band: min..max over them"


def parse_formats(text: str) -> tuple[str, ...]:
  """`"png,pdf"` -> ("png", "pdf"): the figure formats to write, each once, in order."""
  asked = [f.strip().lower().lstrip(".") for f in text.split(",") if f.strip()]
  unknown = [f for f in asked if f not in FORMATS]
  if unknown or not asked:
    raise ValueError(f"unknown figure format(s) {unknown or [text]}; the formats are "
                     f"{', '.join(FORMATS)} (comma-separated, e.g. png,pdf)")
  return tuple(dict.fromkeys(asked))


@dataclasses.dataclass
class Style:
  """Line label -> {"color", "linestyle", "marker"}; a label not seen takes the next one."""

  assigned: dict[str, dict] = dataclasses.field(default_factory=dict)

  def of(self, label: str) -> dict:
    if label not in self.assigned:
      i = len(self.assigned)
      self.assigned[label] = {"color": COLORS[i % len(COLORS)],
                              "linestyle": LINESTYLES[i % len(LINESTYLES)],
                              "marker": MARKERS[i % len(MARKERS)]}
    return self.assigned[label]


@dataclasses.dataclass(frozen=True)
class FigureContext:
  """What every figure kind is given besides the cells: the study's labels, its Style
  (shared by all its figures) and the formats to write."""

  labels: dict = dataclasses.field(default_factory=dict)
  style: Style = dataclasses.field(default_factory=Style)
  formats: tuple[str, ...] = ("png",)

  def __post_init__(self):
    asked = self.formats if isinstance(self.formats, str) else ",".join(self.formats)
    object.__setattr__(self, "formats", parse_formats(asked))


def mean_by_step(series_list) -> tuple[list, list, list, list, list]:
  """Runs' series aligned by step: (steps, mean, lo, hi, n).

  `series_list` holds one `[[step, value], ...]` per run (None or [] for a run without
  one). steps: the union of the runs' steps, ascending; at each, the mean, min and max
  over the runs that have that step, and how many do (n). A step a run recorded twice
  counts once, with its last value; a None value is left out; where a run's value is
  NaN or infinite, the mean and band are NaN there (a gap in the line).
  """
  by_step: dict = {}
  for series in series_list:
    for step, v in dict((s, v) for s, v in series or () if v is not None).items():
      by_step.setdefault(step, []).append(float(v))
  steps = sorted(by_step)
  out: tuple[list, list, list, list, list] = (steps, [], [], [], [])
  for s in steps:
    vals = by_step[s]
    ok = all(math.isfinite(v) for v in vals)
    out[1].append(sum(vals) / len(vals) if ok else math.nan)
    out[2].append(min(vals) if ok else math.nan)
    out[3].append(max(vals) if ok else math.nan)
    out[4].append(len(vals))
  return out


def sorted_series(series) -> tuple[list, list]:
  """One run's series as (steps, values), by step, a repeated step once (its last value)."""
  points = sorted(dict((s, v) for s, v in series if v is not None).items())
  return [s for s, _ in points], [v for _, v in points]


# -- names ------------------------------------------------------------------------------


def name(labels: dict, value) -> str:
  """What a figure calls a key, metric or value: its label in the study, else the value
  ("8"), else the key's last part made readable ("train.batch_size" -> "batch size")."""
  text = cells_lib.show(value)
  if not isinstance(value, str):
    return labels.get(text, text)
  last = text.rsplit(".", 1)[-1]
  return labels.get(text, labels.get(last, last.replace("_", " ")))


def key_value(labels: dict, key: str, value) -> str:
  """'lr = 0.1', 'batch size = 8', 'init = LeCun normal'."""
  return f"{name(labels, key)} = {name(labels, value)}"


def panel_title(cell: dict, keys, labels: dict, width: int = 34) -> str:
  """'init = LeCun normal, lr = 0.1'; one line per key when longer than `width`."""
  parts = [key_value(labels, k, cell["key"][k]) for k in keys]
  return (", " if len(", ".join(parts)) <= width else ",\n").join(parts)


def describe(cell: dict, keys, labels: dict) -> str:
  """Each string value's label and 'key = value' for the others: "BN, lr = 0.01"."""
  return ", ".join(name(labels, cell["key"][k]) if isinstance(cell["key"][k], str)
                   else key_value(labels, k, cell["key"][k]) for k in keys) or "all runs"


def line_label(cell: dict, keys, labels: dict) -> str:
  """A line's legend entry: its value's label for one key ("BN", "0.1": the legend's title
  names the key), else `describe` ("BN, lr = 0.01")."""
  return name(labels, cell["key"][keys[0]]) if len(keys) == 1 else describe(cell, keys, labels)


def sentence(text: str) -> str:
  return text[:1].upper() + text[1:]


def legend_title(keys, labels: dict) -> str | None:
  return name(labels, keys[0]) if len(keys) == 1 else None


def hue_keys(cells: list[dict], hue=(), exclude=()) -> tuple:
  """The keys that tell a figure's lines apart: `hue`, else every cell key not in `exclude`."""
  if hue:
    return tuple(hue)
  return tuple(k for k in (cells[0]["key"] if cells else ()) if k not in exclude)


def default_lines(cells, hue=(), panels=(), x=None, **_) -> tuple[tuple, list[dict]]:
  """(the keys naming a figure's lines, the cells drawn): how `study_style` reads a kind
  without its own `lines` attribute."""
  return hue_keys(cells, hue, tuple(panels) + ((x,) if x else ())), cells


def study_style(figures_cfg: dict, cells: list[dict], labels: dict) -> Style:
  """One Style for all of a study's figures: line labels in the order the cells first show
  them (cell by cell, each figure's label of that cell in the config's figure order)."""
  drawn = []
  for spec in figures_cfg.values():
    spec = dict(spec)
    fn = registry.FIGURES[spec.pop("kind")]
    keys, used = getattr(fn, "lines", default_lines)(cells, **spec)
    drawn.append((tuple(keys), {id(c) for c in used}))
  style = Style()
  for c in cells:
    for keys, used in drawn:
      if id(c) in used:
        style.of(line_label(c, keys, labels))
  return style


def draw_all(figures_cfg: dict, cells: list[dict], labels: dict, out_dir: str,
             formats=("png",)) -> list[dict]:
  """Draws every figure of `figures_cfg` (name -> {"kind": ..., **spec}) into `out_dir`.

  Returns, in the config's order, {"name", "files": [out_dir/NAME.FORMAT per format],
  "caption"}; every figure shares one Style, so a method looks the same in all of them.
  """
  ctx = FigureContext(dict(labels), study_style(figures_cfg, cells, labels), tuple(formats))
  files.make_dir(out_dir)
  out = []
  for fig_name, spec in figures_cfg.items():
    spec = dict(spec)
    path = os.path.join(out_dir, fig_name)
    caption = registry.FIGURES[spec.pop("kind")](cells, path, ctx, **spec)
    out.append({"name": fig_name, "files": [f"{path}.{f}" for f in ctx.formats],
                "caption": caption})
  return out


# -- drawing helpers ------------------------------------------------------------------------


@contextlib.contextmanager
def drawing():
  """pyplot with the figures' sizes and fonts (Agg: no display needed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  with plt.rc_context(RC):
    yield plt


def grid(plt, n: int, sharey=False, rows: int = 0, cols: int = 0, size=PANEL, titles=()):
  """(figure, axes array) of n panels, at most 3 a row (2 x 2 for 4); unused ones hidden.
  Panels are widened to fit the longest line of `titles`."""
  n = max(n, 1)  # no cells: one empty panel
  if not cols:
    cols = n if n <= 3 else 2 if n == 4 else 3
    rows = math.ceil(n / cols)
  rows = max(rows, 1)
  longest = max((len(line) for t in titles for line in t.split("\n")), default=0)
  width = max(size[0], 0.068 * longest + 0.5)  # ~8.5 pt characters, and the y tick labels
  width = max(width, 3.4) if cols == 1 and rows == 1 else width  # room for the legend
  fig, axes = plt.subplots(rows, cols, figsize=(width * cols, size[1] * rows + 0.45),
                           sharey=sharey, squeeze=False)
  for ax in axes.flat[n:]:
    ax.set_visible(False)
  return fig, axes


def label_outer(axes, xlabel: str, ylabel: str | None) -> None:
  """x label under the lowest visible panel of each column, y label left of each row."""
  rows, cols = axes.shape
  for i in range(rows):
    for j in range(cols):
      ax = axes[i, j]
      if not ax.get_visible():
        continue
      if not any(axes[k, j].get_visible() for k in range(i + 1, rows)):
        ax.set_xlabel(xlabel)
      if j == 0 and ylabel is not None:
        ax.set_ylabel(ylabel)


def ticks_at(axis, values) -> None:
  """Ticks at exactly the swept values, labelled as the sweep writes them; no minor ticks."""
  import matplotlib.ticker as ticker  # pylint: disable=g-import-not-at-top
  values = sorted(set(values))
  axis.set_major_locator(ticker.FixedLocator(values))
  axis.set_major_formatter(ticker.FixedFormatter([cells_lib.show(v) for v in values]))
  axis.set_minor_locator(ticker.NullLocator())


def log_axis(axis) -> None:
  """A log axis's labels as plain numbers (2, 0.5) when its range lies in [0.001, 1e5),
  else as powers of 10; which ticks get labels as matplotlib decides."""
  import matplotlib.ticker as ticker  # pylint: disable=g-import-not-at-top

  class Plain(ticker.LogFormatterSciNotation):

    def __call__(self, x, pos=None):
      text = super().__call__(x, pos)
      lo, hi = sorted(self.axis.get_view_interval()) if self.axis else (x, x)
      return f"{x:g}" if text and 1e-3 <= lo and hi < 1e5 else text
  axis.set_major_formatter(Plain(10))
  axis.set_minor_formatter(Plain(10, labelOnlyBase=False))


def step_axis(axis) -> None:
  """At most 5 ticks on a step (or epoch) axis, thousands as 'k' (50000 -> 50k)."""
  import matplotlib.ticker as ticker  # pylint: disable=g-import-not-at-top
  axis.set_major_locator(
      ticker.MaxNLocator(nbins=5, steps=[1, 2, 5, 10], integer=True, min_n_ticks=3))
  axis.set_major_formatter(ticker.FuncFormatter(
      lambda v, _: f"{v / 1000:g}k" if abs(v) >= 1000 else f"{v:g}"))


def legend(fig, style: Style, names, title: str | None = None, more: dict | None = None) -> None:
  """The figure's one legend, below its panels: its line labels in the study's order (the
  Style's), then `more` (label -> line properties) for what is not a line label."""
  from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
  names = set(names)
  entries = {n: style.of(n) for n in list(style.assigned) + sorted(names) if n in names}
  entries.update(more or {})
  if not entries:
    return
  handles = [Line2D([], [], lw=1.6, ms=4, **props) for props in entries.values()]
  fig.legend(handles, list(entries), loc="outside lower center", frameon=False,
             ncol=len(entries) if len(entries) <= 5 else math.ceil(len(entries) / 2),
             title=title)


def save(fig, path: str, ctx: FigureContext) -> list[str]:
  """Writes `path.FORMAT` for each of the context's formats (PNG at DPI), each whole or not
  at all; closes the figure."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  written = []
  try:
    for fmt in ctx.formats:
      written.append(f"{path}.{fmt}")
      with files.replacing(written[-1]) as tmp:
        fig.savefig(tmp, format=fmt, dpi=DPI, metadata=METADATA[fmt], bbox_inches="tight",
                    pad_inches=0.03)
  finally:
    plt.close(fig)
  return written


def panel_groups(cells: list[dict], panels) -> list[tuple[dict, list[dict]]]:
  """[(first cell, cells)] per value of the `panels` keys, in the cells' order."""
  groups: dict[tuple, list[dict]] = {}
  for c in cells:
    groups.setdefault(tuple(cells_lib.show(c["key"][k]) for k in panels), []).append(c)
  return [(g[0], g) for g in groups.values()]


def by_line(group: list[dict], keys, labels: dict) -> dict[str, list[dict]]:
  lines: dict[str, list[dict]] = {}
  for c in group:
    lines.setdefault(line_label(c, keys, labels), []).append(c)
  return lines


def count_phrase(counts: list[int], what: str = "seed") -> str:
  """'3 seeds', '1 seed' or '1 to 3 seeds'."""
  counts = [n for n in counts if n] or [0]
  lo, hi = min(counts), max(counts)
  return f"{hi} {what}{'s' * (hi != 1)}" if lo == hi else f"{lo} to {hi} {what}s"


def panels_phrase(panels, labels: dict) -> str:
  return (f"; one panel per {' and '.join(name(labels, k) for k in panels)}" if panels else "")


def no_values(ax) -> None:
  """Says so on a panel where no run has a value (rather than an empty frame)."""
  ax.text(0.5, 0.5, "no run has a value", transform=ax.transAxes, ha="center", va="center",
          color="0.4")


def series_band(ax, runs: list, props: dict, seeds: bool = True) -> None:
  """Each run thin (with `seeds`), the mean over the runs at each step thick, min..max band."""
  for s in runs if seeds else ():
    ax.plot(*sorted_series(s), color=props["color"], lw=0.5, alpha=0.35)
  steps, mean, lo, hi, _ = mean_by_step(runs)
  ax.plot(steps, mean, lw=1.6, ms=3.5, markevery=max(1, len(steps) // 8), **props)
  if len(runs) > 1:
    ax.fill_between(steps, lo, hi, color=props["color"], alpha=0.15, lw=0)
  step_axis(ax.xaxis)


def percentile_lines(ax, runs: list, unit: int, props: dict) -> None:
  """Seed means by step of one unit's percentiles: the middle one as the line, band
  lowest..highest (runs: [[step, [[p, ...] per unit]], ...] each)."""
  width = len(next(p for s in runs for _, p in s)[unit])
  means = [mean_by_step([[(step, p[unit][q]) for step, p in s] for s in runs])
           for q in range(width)]
  ax.fill_between(means[0][0], means[0][1], means[-1][1], color=props["color"], alpha=0.18,
                  lw=0)
  ax.plot(means[0][0], means[width // 2][1], lw=1.5, ms=3,
          markevery=max(1, len(means[0][0]) // 8), **props)
  step_axis(ax.xaxis)


PERCENTILE_WORDS = ("Line: the middle recorded percentile (the median, with the default "
                    "analysis.percentiles 15, 50, 85); band: the lowest..highest recorded "
                    "percentile (15th..85th).")
