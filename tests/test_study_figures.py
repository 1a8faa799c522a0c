"""bnlab.study.figures: series averaged by step, one style per method across a study's
figures, names from the labels, ticks at the swept values, one legend per figure, the
formats written, a caption per figure."""

import math
import os

import matplotlib
import PIL.Image
import pytest

from bnlab import study
from bnlab.study import figure_kinds
from bnlab.study import figures

matplotlib.use("Agg")

LABELS = {"batch": "BN", "none": "no BN", "learning_rate": "lr", "acc": "test accuracy"}
RATES = (0.001, 0.01, 0.1, 1.0)
# Two runs per cell evaluated at different steps: seed 0 every 10, seed 1 at 0, 5, 20.
STEPS = {0: (0, 10, 20), 1: (0, 5, 20)}


def series(norm, lr, seed):
  base = (0.5 if norm == "batch" else 0.3) + lr / 10
  return [[s, base + s / 100 + seed / 100] for s in STEPS[seed]]


def make_cells():
  pct = [[s, [[-1 - s, s, 1 + s], [0, 1, 2]]] for s in (0, 10, 20)]
  rows = [{"model.norm": norm, "optimizer.learning_rate": lr, "seed": seed,
           "final": 0.9 + lr / 100 + seed / 1000, "acc": series(norm, lr, seed), "pct": pct,
           "unit": seed, "ics": [[0, [1.0, 2.0, 3.0]], [10, [1.5, 2.5, 3.5]]]}
          for norm in ("none", "batch") for lr in RATES for seed in (0, 1)]
  return study.make_cells(rows, ("model.norm", "optimizer.learning_rate"),
                          ["final", "acc", "pct", "unit", "ics"])


FIGURES = {
    "curves": {"kind": "curves", "metric": "acc", "hue": ("model.norm",),
               "panels": ("optimizer.learning_rate",)},
    "final": {"kind": "final_vs", "metric": "final", "x": "optimizer.learning_rate",
              "logx": True},
    "pcts": {"kind": "percentiles", "metric": "pct", "panels": ("optimizer.learning_rate",)},
    "units": {"kind": "unit_percentiles", "metric": "pct", "unit_metric": "unit",
              "rows": ("model.norm=batch,optimizer.learning_rate=0.1",
                       "model.norm=none,optimizer.learning_rate=0.1")},
    "margin": {"kind": "paired_difference", "metric": "acc",
               "a": "model.norm=batch,optimizer.learning_rate=1",
               "b": "model.norm=none,optimizer.learning_rate=1", "from_step": 5},
    "layers": {"kind": "per_checkpoint", "metric": "ics", "hue": ("model.norm",),
               "panels": ("optimizer.learning_rate",), "first": 1},
}


@pytest.fixture
def drawn(monkeypatch):
  """path (without extension) -> the matplotlib figure each kind saved there."""
  figs = {}
  save = figures.save

  def keep(fig, path, ctx):
    figs[os.path.basename(path)] = fig
    return save(fig, path, ctx)
  monkeypatch.setattr(figures, "save", keep)
  return figs


def legend_styles(fig) -> dict:
  (legend,) = fig.legends
  return {t.get_text(): (h.get_color(), h.get_linestyle(), h.get_marker())
          for t, h in zip(legend.get_texts(), legend.legend_handles)}


def test_mean_by_step_aligns_runs_by_step():
  a = [[0, 1.0], [10, 3.0], [20, 5.0]]
  b = [[20, 9.0], [0, 2.0], [5, 4.0], [20, 7.0]]  # unsorted; step 20 twice: the last counts
  steps, mean, lo, hi, n = figures.mean_by_step([a, None, b, []])
  assert steps == [0, 5, 10, 20]
  assert mean == [1.5, 4.0, 3.0, 6.0]
  assert (lo, hi, n) == ([1.0, 4.0, 3.0, 5.0], [2.0, 4.0, 3.0, 7.0], [2, 1, 1, 2])
  _, mean, lo, _, n = figures.mean_by_step([[[0, 1.0], [1, float("nan")]], [[1, 2.0]]])
  assert mean[0] == 1.0 and math.isnan(mean[1]) and math.isnan(lo[1]) and n == [1, 2]
  assert figures.mean_by_step([]) == ([], [], [], [], [])


def test_curves_average_by_step_not_by_position(tmp_path, drawn):
  cells = make_cells()
  study.draw_all({"c": FIGURES["curves"]}, cells, LABELS, str(tmp_path))
  ax = drawn["c"].axes[0]  # lr 0.001: BN's runs at steps 0, 10, 20 and 0, 5, 20
  runs = [series("batch", 0.001, s) for s in (0, 1)]
  want = figures.mean_by_step(runs)
  means = [line for line in ax.get_lines() if list(line.get_xdata()) == [0, 5, 10, 20]]
  assert len(means) == 2  # BN's and no BN's seed means
  assert any(list(line.get_ydata()) == pytest.approx(want[1]) for line in means)


def test_one_style_per_method_across_the_figures(tmp_path, drawn):
  out = study.draw_all(FIGURES, make_cells(), LABELS, str(tmp_path))
  assert [f["name"] for f in out] == list(FIGURES)
  curves, final, units = (legend_styles(drawn[n]) for n in ("curves", "final", "units"))
  # First in the cells' order (the sweep's): no BN takes the first style, BN the second.
  assert curves["no BN"][0] == figures.COLORS[0] and curves["BN"][0] == figures.COLORS[1]
  assert curves["no BN"][1] != curves["BN"][1]  # also apart in black and white
  for other in (final, units):
    assert other["BN"] == curves["BN"] and other["no BN"] == curves["no BN"]
  style = figures.study_style(FIGURES, make_cells(), LABELS)
  assert list(style.assigned) == ["no BN", "BN"]
  # The thick BN line of the curves is drawn in BN's colour and line style.
  assert any(line.get_color() == curves["BN"][0] and line.get_linestyle() == curves["BN"][1]
             and line.get_linewidth() > 1 for line in drawn["curves"].axes[0].get_lines())


def test_names_come_from_the_labels(tmp_path, drawn):
  cells = make_cells()
  study.draw_all(FIGURES, cells, LABELS, str(tmp_path))
  axes = [ax for ax in drawn["curves"].axes if ax.get_visible()]
  assert [ax.get_title() for ax in axes] == ["lr = 0.001", "lr = 0.01", "lr = 0.1", "lr = 1"]
  assert axes[0].get_ylabel() == "test accuracy" and axes[-1].get_xlabel() == "step"
  final = drawn["final"].axes[0]
  assert (final.get_xlabel(), final.get_ylabel()) == ("lr", "final")
  # A key or metric with no label: its last part, readable.
  assert figures.name({}, "test_acc_curve") == "test acc curve"
  assert figures.name({}, "train.batch_size") == "batch size"
  assert figures.key_value({}, "train.batch_size", 8) == "batch size = 8"
  assert figures.name(LABELS, "optimizer.learning_rate") == "lr"
  assert figures.name({}, 1.0) == "1"
  units = drawn["units"]
  assert units.axes[0].get_ylabel() == "BN\npct" and units.axes[0].get_title() == "seed 0, unit 0"
  assert units.get_suptitle() == "lr = 0.1"


def test_log_axis_ticks_at_the_swept_values(tmp_path, drawn):
  study.draw_all({"final": FIGURES["final"]}, make_cells(), LABELS, str(tmp_path))
  ax = drawn["final"].axes[0]
  assert ax.get_xscale() == "log"
  assert list(ax.get_xticks()) == list(RATES)
  assert [t.get_text() for t in ax.get_xticklabels()] == ["0.001", "0.01", "0.1", "1"]
  assert len(ax.xaxis.get_minorticklocs()) == 0


def test_one_legend_per_figure_and_a_caption_each(tmp_path, drawn):
  out = study.draw_all(FIGURES, make_cells(), LABELS, str(tmp_path))
  for fig_name, fig in drawn.items():
    assert len(fig.legends) == 1, fig_name
    assert all(ax.get_legend() is None for ax in fig.axes), fig_name
  for f in out:
    assert f["caption"] and f["caption"][0].isupper() and f["caption"].endswith("."), f
  captions = {f["name"]: f["caption"] for f in out}
  assert "mean over the runs evaluated at each step" in captions["curves"]
  assert "min..max" in captions["curves"] and "95% Student t interval" in captions["final"]
  # Panels that compare one metric share their y axis.
  curves = drawn["curves"].axes
  assert curves[0].get_shared_y_axes().joined(curves[0], curves[1])


def test_each_format_is_written(tmp_path, drawn):
  out = study.draw_all({"final": FIGURES["final"]}, make_cells(), LABELS, str(tmp_path),
                       formats=("png", "pdf", "svg"))
  files = [str(tmp_path / f"final.{f}") for f in ("png", "pdf", "svg")]
  assert out[0]["files"] == files and all(os.path.getsize(f) > 0 for f in files)
  assert open(files[1], "rb").read(5) == b"%PDF-" and b"<svg" in open(files[2], "rb").read()
  with PIL.Image.open(files[0]) as png:
    assert png.info["dpi"] == pytest.approx((200, 200), abs=0.01)
    width, height = drawn["final"].get_size_inches()  # cropped to what is drawn, at most
    assert 0.8 * width * 200 < png.size[0] <= width * 200 + 20


def test_formats_are_checked(tmp_path):
  assert study.FORMATS == ("png", "pdf", "svg")
  assert study.parse_formats("png") == ("png",)
  assert study.parse_formats(" png, PDF,svg,png ") == ("png", "pdf", "svg")
  for bad in ("jpg", "png,eps", "", ","):
    with pytest.raises(ValueError, match="the formats are png, pdf, svg"):
      study.parse_formats(bad)
  with pytest.raises(ValueError, match="'jpg'"):
    study.draw_all({"final": FIGURES["final"]}, make_cells(), LABELS, str(tmp_path), ("jpg",))
  assert not os.listdir(tmp_path)


def test_every_kind_is_registered_with_the_context_call_shape():
  kinds = {"final_vs", "curves", "percentiles", "unit_percentiles", "paired_difference",
           "per_checkpoint"}
  assert kinds <= set(study.FIGURES)
  assert study.FIGURES["unit_percentiles"] is figure_kinds.unit_percentiles
  for kind in kinds:
    params = list(study.FIGURES[kind].__code__.co_varnames[:3])
    assert params == ["cells", "path", "ctx"], kind
  ctx = study.FigureContext(LABELS, formats=["pdf"])
  assert ctx.formats == ("pdf",) and ctx.style.assigned == {}
