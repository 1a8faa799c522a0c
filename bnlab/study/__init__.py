"""Studies: a config names a sweep, its cells, metrics, figures and claims; this runs and reports it.

  python -m bnlab.study --config=configs/studies/NAME.py[:ARGS] --workdir=DIR \
      [--config.KEY=VALUE] [--stage=all|register|run|report|verify] [--out=results/NAME]
      [--figure_format=png,pdf,svg] [--num_workers=N] [--launcher=local|ray]
      [--ray_address=auto|HOST:PORT]

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
- FIGURES: `fn(cells, path, ctx, **spec) -> caption` draws the cells into `path.FORMAT`
  for each of `ctx.formats` (a `FigureContext`: the study's labels, one line style per
  compared method shared by all its figures, the formats) and returns what its lines,
  dots and bands mean; `draw_all` draws a study's figures (bnlab/study/figures.py; the
  kinds in bnlab/study/figure_kinds.py).
- RULES: `fn(cells, **params) -> (verdict, numbers)`, verdict one of
  supported / refuted / inconclusive, for each claim. The tests among them
  (`registry.TESTS`: `paired_interval`, `equivalent`) add seed and test-set noise
  as variances (`intervals`) and give a p-value; a claim marked `primary` must
  use one, and the primaries are corrected together (Holm).

Stages (each idempotent): *register* writes `DIR/registration.json` (claims,
rules, seeds, config hash, time, commit; later changes appended as amendments)
before anything trains; *run* registers, then trains what is missing through
`bnlab.sweep.run_sweep` (grouping, resuming; members in `DIR/runs/`) and
records the stage's wall time and `bnlab.engine.provenance.environment()` in
`DIR/stages.json` (any number of workers may run it at once, each training
the groups it claims: docs/scale-out.md); *report* reads only the files and writes `report.md`,
`results.json`/`results.csv` (one row per run), `cells.csv`, `claims.json`,
`data.json.gz` (everything the verdicts read: `published`) and `figures/`. The
verdicts are judged from `data.json.gz` alone, so *verify* re-judges a published
directory and fails on any difference. A cell pools the runs that agree on
`config.cells` (normally all but the seed): n, mean, a 95% Student t interval on
the seed mean, min and max.

Before any stage, `Study.from_file` checks the config whole against its sweep
(`check_study`; `checks`): every metric, cell key and where-string value a claim,
figure or table names exists, every parameter has its signature's type, and each
cell holds one run per seed (a swept key that varies within a cell must be in
`cells`, or in `config.pooled` to pool it on purpose), so paired rules pair right.
"""

# Re-exported: the names study configs, tests and new registrations use as `study.NAME`.
# Each module imports only those below it: cli -> runner -> report -> published,
# registration, runs, figures -> rules -> intervals, metrics, cells, files -> config ->
# checks -> cells, registry (figure_kinds -> figures, rules). Importing the package registers
# every kind.
from bnlab.study.cells import binomial_se, describe_values, make_cells, show
from bnlab.study.cli import run, study_fix
from bnlab.study.config import (
    Study, base_config, check_study, config_variant, load_run_config, metric_order, parse_arg,
    validate)
from bnlab.study.figure_kinds import percentiles  # importing it registers every figure kind
from bnlab.study.figures import (
    FORMATS, FigureContext, Style, draw_all, mean_by_step, parse_formats)
from bnlab.study import measurements  # noqa: F401  (registers its measurements and rules)
from bnlab.study import train_gap  # noqa: F401  (registers the train_gap measurement)
from bnlab.study.metrics import (
    Run, diverged, diverged_at, epoch_means, evaluate_metrics, first_step_at_least,
    first_step_at_most, last, max_, mean_over_last_epoch, percentile_drift, series, summary_value,
    value_when_at_most)
from bnlab.study.registry import FIGURES, MEASUREMENTS, METRICS, RULE_CHECKS, RULES, register
from bnlab.study.report import STATISTICS, statistics_of
from bnlab.study.rules import (
    VERDICTS, below_everywhere, difference_at_least, equivalent, judge, paired_interval,
    reaches_sooner, same_verdict, separated, wins_above_best)
from bnlab.study.runner import run_stage, run_study

__all__ = [
    "base_config", "below_everywhere", "binomial_se", "check_study", "config_variant",
    "describe_values",
    "difference_at_least", "diverged", "diverged_at", "draw_all", "epoch_means", "equivalent",
    "evaluate_metrics", "FigureContext", "FIGURES", "first_step_at_least", "first_step_at_most",
    "FORMATS", "judge",
    "last", "load_run_config", "make_cells", "max_", "mean_by_step", "mean_over_last_epoch",
    "MEASUREMENTS", "metric_order", "METRICS", "paired_interval", "parse_arg", "parse_formats",
    "percentile_drift", "percentiles", "reaches_sooner", "register", "RULE_CHECKS", "RULES", "Run", "run",
    "run_stage", "run_study", "same_verdict", "separated", "series", "show", "STATISTICS",
    "statistics_of", "Study", "study_fix", "Style", "summary_value", "validate",
    "value_when_at_most", "VERDICTS",
    "wins_above_best",
]
