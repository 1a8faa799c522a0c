"""Measurements and rules of the studies that compare runs seed by seed.

Registered into `bnlab.study`'s registries when imported (study configs import it):

- MEASUREMENTS "unit_drift": per unit of one recorded layer, how far the
  percentiles moved from the first evaluation at or after `from_step` to the
  last (median over units), and within windows of `window` steps, and the unit of
  median drift;
  "bn_affine": median |scale| and |bias| of one BN layer in the final checkpoint;
  "ics_smoothness": `bnlab.analysis` internal covariate shift and gradient
  smoothness (optionally the top Hessian eigenvalue) at initialisation and at every
  checkpoint, on fixed training batches, also read at matched training loss
  (`at_matched_loss`).
- RULES "every_seed", "paired_above", "selected_value", "mostly_lower"
  (pairs by seed: `bnlab.study.rules.paired_runs`); they count or compare values and give
  no p-value, so a claim that uses one is secondary.
"""

from __future__ import annotations

import functools
import math
import os
import statistics

from bnlab import config as config_lib
from bnlab import sweep
from bnlab.study import cells as cells_lib
from bnlab.study import registry
from bnlab.study import rules as rules_lib

# -- measurements -------------------------------------------------------------------------


def drift_of(steps: list[int], pct: list, from_step: int, window: int = 0) -> dict:
  """Per-unit change of the median and of the (highest - lowest) percentile spread.

  `pct[i][unit]` holds the percentiles (ascending) at evaluation `steps[i]`;
  changes run from the first evaluation at or after `from_step` to the last.
  "typical_unit": the unit whose |change of median| + |change of spread| is the
  median of all units' (the lower middle one for an even count).
  "median_rel_dspread": |change of spread| / start spread, over the units whose start
  spread is not 0 (absent where none is).
  "median_norm_dspread": |change of spread| over the unit's mean spread across the
  evaluations compared, so scale-free without dividing by a start that may be near 0.
  With `window` > 0, also `window_drift` of the same evaluations.
  """
  i0 = next(i for i, s in enumerate(steps) if s >= from_step)
  p0, p1 = pct[i0], pct[-1]
  mid = len(p0[0]) // 2
  spread0 = [u[-1] - u[0] for u in p0]
  spread1 = [u[-1] - u[0] for u in p1]
  d_med = [b[mid] - a[mid] for a, b in zip(p0, p1)]
  d_spread = [b - a for a, b in zip(spread0, spread1)]
  score = [abs(m) + abs(s) for m, s in zip(d_med, d_spread)]
  order = sorted(range(len(score)), key=lambda u: score[u])
  med = statistics.median
  mean_spread = [statistics.fmean(p[u][-1] - p[u][0] for p in pct[i0:])
                 for u in range(len(p0))]
  out = {"from_step": steps[i0], "to_step": steps[-1],
         "typical_unit": order[(len(order) - 1) // 2],
         "median_abs_dmedian": med(abs(x) for x in d_med),
         "median_abs_dspread": med(abs(x) for x in d_spread),
         "median_norm_dspread": med(abs(d) / s if s > 0 else 0.0
                                    for d, s in zip(d_spread, mean_spread)),
         "median_spread_early": med(spread0), "median_spread_late": med(spread1),
         "median_abs_median_early": med(abs(u[mid]) for u in p0),
         "median_abs_median_late": med(abs(u[mid]) for u in p1)}
  # Relative to a start spread of 0 (a unit saturated to one value, as in a diverged
  # run) the change is undefined: such units are left out, and the key with them where
  # every unit is one.
  rel = [abs(d) / s for d, s in zip(d_spread, spread0) if s > 0]
  if rel:
    out["median_rel_dspread"] = med(rel)
  if window:
    out.update(window_drift(steps[i0:], pct[i0:], window))
  return out


def window_drift(steps: list[int], pct: list, window: int) -> dict:
  """How far the units move within each window of `window` steps, not only end to end.

  Window edges: the first evaluation, every evaluation at a multiple of `window` after
  it, and the last. Per window, the median over units of |change of median| and of
  |change of spread|; "window_abs_dmedian" and "window_abs_dspread" average them over
  the windows (a drift that comes and goes counts; an end-to-end change can hide it),
  and "windows" lists [start, end, median |d median|, median |d spread|] of each.
  """
  edges = [0] + [i for i, s in enumerate(steps)
                 if 0 < i < len(steps) - 1 and s % window == 0 and s > steps[0]]
  edges.append(len(steps) - 1)
  mid = len(pct[0][0]) // 2
  rows = []
  for i, j in zip(edges, edges[1:]):
    a, b = pct[i], pct[j]
    rows.append([steps[i], steps[j],
                 statistics.median(abs(v[mid] - u[mid]) for u, v in zip(a, b)),
                 statistics.median(abs((v[-1] - v[0]) - (u[-1] - u[0])) for u, v in zip(a, b))])
  if not rows:
    return {}
  return {"window_abs_dmedian": statistics.fmean(r[2] for r in rows),
          "window_abs_dspread": statistics.fmean(r[3] for r in rows), "windows": rows}


@registry.register(registry.MEASUREMENTS, "unit_drift")
def unit_drift(run_dir: str, run_cfg: dict, spec: dict) -> dict:
  """`drift_of` the `{spec["layer"]}/percentiles` records from `spec["from_step"]`."""
  del run_cfg
  key = f"{spec['layer']}/percentiles"
  records = [r for r in sweep.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
             if key in r]
  if not any(r["step"] >= spec["from_step"] for r in records):
    return {}
  return drift_of([r["step"] for r in records], [r[key] for r in records], spec["from_step"],
                  spec.get("window", 0))


def _restore(run_dir: str, step: int) -> dict:
  """The train state a run saved at `step` (params, batch_stats, rng) as arrays."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.abspath(run_dir), "checkpoints", str(step), "default")
  return ocp.PyTreeCheckpointer().restore(path)["state"]


def _steps_saved(run_dir: str) -> list[int]:
  root = os.path.join(run_dir, "checkpoints")
  return sorted(int(s) for s in os.listdir(root) if s.isdigit()) if os.path.isdir(root) else []


@registry.register(registry.MEASUREMENTS, "bn_affine")
def bn_affine(run_dir: str, run_cfg: dict, spec: dict) -> dict:
  """Median |scale| and |bias| of the BN in `spec["block"]` at the last checkpoint ({} without)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  steps = _steps_saved(run_dir)
  if run_cfg["model"]["norm"] != "batch" or not steps:
    return {}
  block = _restore(run_dir, steps[-1])["params"][spec["block"]]
  bn = next(v for k, v in block.items() if "Norm" in k)
  return {"median_abs_scale": float(np.median(np.abs(bn["scale"]))),
          "median_abs_bias": float(np.median(np.abs(bn["bias"])))}


@registry.register(registry.MEASUREMENTS, "pre_norm_bias")
def pre_norm_bias(run_dir: str, run_cfg: dict, spec: dict) -> dict:
  """How far the biases just before BN moved, and how far the run's weights differ from its
  twin without them, at the last checkpoint ({} for a run without such biases).

  A bias before BN has a zero gradient in train mode, so it moves only under weight decay
  (or by rounding), and the other weights should follow the twin's exactly. The twin is the
  run directory named with `spec["partner"] = (this, that)` replaced in this one's name
  (e.g. ("bias_before=true", "bias_before=false")): "max_abs_bias" over every such bias
  (they start at 0), "max_abs_param_diff" and "max_abs_stats_diff" over every parameter and
  running statistic the two runs share (absent where the twin has no checkpoint).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  steps = _steps_saved(run_dir)
  if (run_cfg["model"]["norm"] != "batch" or not run_cfg["model"]["bn"].get("bias_before")
      or not steps):
    return {}
  state = _restore(run_dir, steps[-1])
  # A block holding a norm layer: its Dense/Conv bias is the one before the norm.
  blocks = [b for b in state["params"].values()
            if isinstance(b, dict) and any("Norm" in k for k in b)]
  biases = [layer["bias"] for b in blocks for k, layer in b.items()
            if k.startswith(("Dense", "Conv")) and "bias" in layer]
  out = {"max_abs_bias": float(max(np.max(np.abs(b)) for b in biases)) if biases else 0.0}
  this, that = spec["partner"]
  name = os.path.basename(os.path.normpath(run_dir))
  twin = os.path.join(os.path.dirname(os.path.normpath(run_dir)), name.replace(this, that))
  if twin != run_dir and steps[-1] in _steps_saved(twin):
    other = _restore(twin, steps[-1])
    def max_diff(a, b):
      flat_a, flat_b = config_lib.flatten(a), config_lib.flatten(b)
      return float(max(np.max(np.abs(np.asarray(flat_a[k], np.float64) - flat_b[k]))
                       for k in flat_a if k in flat_b))
    out["max_abs_param_diff"] = max_diff(state["params"], other["params"])
    out["max_abs_stats_diff"] = max_diff(state.get("batch_stats", {}),
                                         other.get("batch_stats", {}))
  return out


def summarize_checkpoints(rows: list[dict], mid: int) -> dict:
  """Medians over the checkpoints after initialisation (step > 0) of `ics_smoothness` rows.

  Per layer j >= 2 (1-based): "{q}@{j}" for q in ics_l2, ics_cos, ics_rel;
  pooled: "{q}/pairs", the values of every later checkpoint x layer 2..L;
  smoothness: "grad_change" at the middle eta (`mid`), "grad_change_rel"
  (that over |g|), "beta_max", "loss_range", "grad_norm" and, when measured,
  "hessian_top", each also "/pairs".
  """
  later = [r for r in rows if r["step"] > 0]
  out: dict = {}
  for q in ("ics_l2", "ics_cos", "ics_rel"):
    for j in range(1, len(later[0][q])):
      out[f"{q}@{j + 1}"] = statistics.median(r[q][j] for r in later)
    out[f"{q}/pairs"] = [x for r in later for x in r[q][1:]]
  scalars = checkpoint_scalars(later, mid)
  for k in (*SMOOTHNESS, "hessian_top"):
    if k in scalars:
      out[k], out[f"{k}/pairs"] = statistics.median(scalars[k]), scalars[k]
  return out


SMOOTHNESS = ("grad_change", "grad_change_rel", "beta_max", "loss_range", "grad_norm")
OPTIONAL = ("loss", "hessian_top", "hessian_change")  # in rows measured with them


def checkpoint_scalars(rows: list[dict], mid: int) -> dict[str, list]:
  """The one-number-per-checkpoint series of `ics_smoothness` rows: SMOOTHNESS (grad_change
  at the middle eta `mid`, grad_change_rel = that / grad_norm), "step", and those of
  OPTIONAL the rows hold."""
  out = {"step": [r["step"] for r in rows],
         "grad_change": [r["grad_change"][mid] for r in rows],
         "grad_change_rel": [r["grad_change"][mid] / r["grad_norm"] for r in rows],
         **{k: [r[k] for r in rows] for k in ("beta_max", "loss_range", "grad_norm")}}
  return {**out, **{k: [r[k] for r in rows] for k in OPTIONAL if rows and k in rows[0]}}


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x)


def at_matched_loss(losses: list, values: list, targets) -> list:
  """`values` (one per checkpoint) read where the training loss `losses` first reaches each target.

  Comparing BN and no BN at equal steps compares networks at different stages of training
  (BN's loss falls faster), so a smoothness measure that changes as training goes on
  differs for that reason alone; read at equal training loss it compares equal progress.
  For each target: the first checkpoint i with losses[i] <= target (a loss that rises again
  later does not matter), its value linearly interpolated in loss between checkpoints i - 1
  and i (value[i] itself when i is the first checkpoint, its loss is the target, or
  loss[i - 1] is not finite); None when no checkpoint reaches the target: censored, not a
  number to average. A list value is interpolated element by element; None gives None.
  """
  def lerp(a, b, w):
    if a is None or b is None:
      return None
    if isinstance(a, list):
      return [lerp(x, y, w) for x, y in zip(a, b)]
    return a + w * (b - a)

  out = []
  for t in targets:
    i = next((i for i, x in enumerate(losses) if _finite(x) and x <= t), None)
    if i is None:
      out.append(None)
    elif i == 0 or losses[i] == t or not _finite(losses[i - 1]):
      out.append(values[i])
    else:  # losses[i - 1] > t >= losses[i]
      w = (losses[i - 1] - t) / (losses[i - 1] - losses[i])
      out.append(lerp(values[i - 1], values[i], w))
  return out


def loss_key(target: float) -> str:
  """The suffix of a value read at matched training loss: "@loss=0_5", "@loss=1" (no dot:
  measurement keys are metric names in a study config, a ConfigDict, which refuses dots)."""
  return f"@loss={target:g}".replace(".", "_")


def matched_progress(series: dict[str, list], targets) -> dict:
  """Every series of `series` (which holds "loss") read `at_matched_loss` at each target:
  "{name}@loss={target}" (also "step@loss=...": when the loss got there, interpolated), and
  "reached@loss={target}", whether it did (False: every value at that target is None)."""
  out = {}
  for t in targets:
    out[f"reached{loss_key(t)}"] = any(_finite(x) and x <= t for x in series["loss"])
  for name, values in series.items():
    if name != "loss":
      for t, v in zip(targets, at_matched_loss(series["loss"], values, targets)):
        out[f"{name}{loss_key(t)}"] = v
  return out


@functools.lru_cache(maxsize=8)
def _measure_fn(model, lr: float, etas: tuple, noisy: bool, hessian_iterations: int = 0):
  """(params, batch_stats, rng, step, images, labels) -> per-batch ICS and smoothness, and
  with `hessian_iterations` > 0 the top Hessian eigenvalue of the loss averaged over the
  batches (the loss the batches' training loss is; one eigenvalue, not a mean of per-batch
  ones, which batch noise would inflate). Cached: the seeds of one model and rate share
  one compiled program (with the Hessian, compiling costs more than measuring a run)."""
  import jax  # pylint: disable=g-import-not-at-top
  from bnlab import analysis  # pylint: disable=g-import-not-at-top
  from bnlab.models import networks as models  # pylint: disable=g-import-not-at-top

  @jax.jit
  def measure(params, batch_stats, rng, step, images, labels):
    rngs = models.train_rngs(rng, step) if noisy else None

    def one(batch):
      loss_fn = analysis.classifier_loss(
          model.apply, {"params": params, "batch_stats": batch_stats}, *batch, rngs=rngs)
      return {"ics": analysis.internal_covariate_shift(loss_fn, params, lr),
              "smooth": analysis.gradient_smoothness(loss_fn, params, etas)}

    out = jax.lax.map(one, (images, labels))
    if hessian_iterations:
      def mean_loss(p):
        return jax.lax.map(lambda batch: analysis.classifier_loss(
            model.apply, {"params": p, "batch_stats": batch_stats}, *batch, rngs=rngs)(p),
                           (images, labels)).mean()
      out["hessian"] = analysis.top_hessian_eigenvalue(mean_loss, params, hessian_iterations)
    return out

  return measure


@registry.register(registry.MEASUREMENTS, "ics_smoothness")
def ics_smoothness(run_dir: str, run_cfg: dict, spec: dict) -> dict:
  """ICS (Santurkar et al. 2018, Def. 2.1) and smoothness along the gradient, per checkpoint.

  At initialisation and at every checkpoint: means over `spec["batches"]`
  training batches (drawn once with `spec["batch_seed"]`, the same for every
  run), BN in train mode, noisy BN with that step's noise; step sizes
  `analysis.eta_grid(lr, num=spec["num_etas"])`. Each checkpoint also records
  "loss", the mean training loss on those batches, and with
  `spec["hessian_iterations"]` > 0 (default 0: off, it costs about two gradients per
  iteration) "hessian_top", the top Hessian eigenvalue of that loss by that many
  power iterations, "hessian_change", its change in the last one, and over the run
  "hessian_change_rel_max", the largest change / |eigenvalue|. Returns
  "{q}/series" per quantity ([[step, value or per-layer list]]; grad_change at
  the middle eta), `summarize_checkpoints` of them (equal steps) and, for each
  target in `spec["matched_losses"]` (default none), `matched_progress` of the
  scalar series (equal training loss): e.g. "beta_max@loss=0_5", None when censored.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bnlab import analysis  # pylint: disable=g-import-not-at-top
  from bnlab.models import networks as models  # pylint: disable=g-import-not-at-top
  from bnlab.engine import optim as optim_lib  # pylint: disable=g-import-not-at-top
  from bnlab.engine import state as state_lib  # pylint: disable=g-import-not-at-top
  from bnlab.engine import train  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict(run_cfg)
  lr, batch = cfg.optimizer.learning_rate, cfg.train.batch_size
  ds = train.load_data(cfg)
  idx = np.random.default_rng(spec["batch_seed"]).permutation(len(ds.train_labels))
  idx = idx[:spec["batches"] * batch]
  # The run's data, whatever its image shape and classes (data.name), not MNIST's.
  images = jnp.asarray(ds.train_images[idx].reshape(spec["batches"], batch,
                                                    *ds.train_images.shape[1:]))
  labels = jnp.asarray(ds.train_labels[idx].astype(np.int32).reshape(spec["batches"], batch))
  model = models.build_model(cfg.model, num_classes=ds.num_classes)
  etas = analysis.eta_grid(lr, num=spec["num_etas"])
  hessian = int(spec.get("hessian_iterations", 0))
  measure = _measure_fn(model, float(lr), tuple(float(e) for e in etas),
                        cfg.model.norm == "noisy", hessian)
  tx = optim_lib.make_optimizer(cfg.optimizer, cfg.train.num_steps)
  init = state_lib.create_train_state(model, tx, jax.random.key(cfg.seed), batch,
                                      ds.input_spec())
  states = [(0, init.params, init.batch_stats, init.rng)]
  for step in _steps_saved(run_dir):
    st = _restore(run_dir, step)
    states.append((step, st["params"], st.get("batch_stats", {}), st["rng"]))
  rows = []
  for step, params, batch_stats, rng in states:
    out = jax.device_get(measure(params, batch_stats, jnp.asarray(rng), jnp.int32(step),
                                 images, labels))
    ics, sm = out["ics"], out["smooth"]
    rows.append({"step": step, "ics_l2": ics["l2"].mean(0).tolist(),
                 "ics_cos": ics["cosine"].mean(0).tolist(),
                 "ics_rel": (ics["l2"] / ics["grad_norm"]).mean(0).tolist(),
                 "grad_change": sm["grad_change"].mean(0).tolist(),
                 **{k: float(sm[k].mean()) for k in ("loss_range", "beta_max", "grad_norm")},
                 "loss": float(sm["loss0"].mean()),
                 **({"hessian_top": float(out["hessian"]["eigenvalue"]),
                     "hessian_change": float(out["hessian"]["change"])} if hessian else {})})
  mid = spec["num_etas"] // 2
  series = {f"{k}/series": [[r["step"], r[k][mid] if k == "grad_change" else r[k]] for r in rows]
            for k in rows[0] if k != "step"}
  matched = matched_progress(checkpoint_scalars(rows, mid), spec.get("matched_losses", ()))
  if hessian:  # how far the fixed number of power iterations was from converged, at worst
    matched["hessian_change_rel_max"] = max(
        r["hessian_change"] / max(abs(r["hessian_top"]), 1e-12) for r in rows)
  return {"layers": ["/".join(p) for p in analysis.layer_weights(init.params)],
          "etas": np.asarray(etas).tolist(), **series, **summarize_checkpoints(rows, mid),
          **matched}


# -- rules ----------------------------------------------------------------------------------


@registry.register(registry.RULES, "every_seed")
def every_seed(cells, metric: str, a: str):
  """Supported when every seed of cell a has the boolean `metric`; else refuted."""
  c = cells_lib.one(cells, a)
  if c is None or not c["values"][metric]:
    return "inconclusive", {"missing": a}
  values = c["values"][metric]
  return ("supported" if all(values) else "refuted", {"values": values})


def _above(x, y, from_step: int) -> dict:
  """How a's series (or number) `x` compares with `y`, point by point from `from_step`."""
  if not isinstance(x, list):
    return {"above": int(x > y), "of": 1, "margin": round(x - y, 4)}
  ys = dict((s, v) for s, v in y)
  diff = [(s, v - ys[s]) for s, v in x if s >= from_step and s in ys]
  low = min(diff, key=lambda d: d[1])
  return {"above": sum(d > 0 for _, d in diff), "of": len(diff), "min_margin": round(low[1], 4),
          "min_margin_step": low[0], "mean_margin": round(sum(d for _, d in diff) / len(diff), 4)}


@registry.register(registry.RULES, "paired_above")
def paired_above(cells, metrics, a: str, b: str, from_step: int = 0):
  """Supported when, for every seed and each of `metrics`, a's run is strictly above b's run
  of the same seed (a series: at every point from `from_step`); else refuted."""
  numbers, ok = {}, True
  for m in metrics:
    pairs = rules_lib.paired_runs(cells, m, a, b)
    if not pairs or any(x is None or y is None for _, x, y in pairs):
      return "inconclusive", {"missing": f"{m}: a pair of runs of {a!r} and {b!r}"}
    for seed, x, y in pairs:
      n = _above(x, y, from_step)
      numbers[f"{m} seed {seed}"] = n
      ok = ok and n["of"] > 0 and n["above"] == n["of"]
  return ("supported" if ok else "refuted", numbers)


@registry.register(registry.RULES, "selected_value")
def selected_value(cells, metric: str, along: str, where: str, expected, seed: int = 0):
  """Supported when, among the cells `where`, the `along` value whose seed-`seed` run has the
  lowest `metric` (a missing value counting as highest) is `expected`; else refuted."""
  scores = {}
  for c in cells_lib.select(cells, where):
    v = next((r.get(metric) for r in c["rows"] if r.get("seed") == seed), None)
    scores[c["key"][along]] = v
  if not scores:
    return "inconclusive", {"missing": where}
  chosen = min(scores, key=lambda x: (scores[x] is None, scores[x] or 0.0))
  return ("supported" if chosen == expected else "refuted",
          {"selected": chosen, "expected": expected, metric: scores})


@registry.register(registry.RULES, "mostly_lower")
def mostly_lower(cells, metric: str, a: str, b: str, fraction: float, per_seed: bool = False):
  """Compares a's and b's runs of the same seed element by element (lists of values):
  supported when a is lower in at least `fraction` of the pairs, refuted when a is
  higher in at least `fraction` of them, inconclusive between. With `per_seed`, each
  seed's pairs must meet the fraction on their own (the same way on every seed)."""
  pairs = rules_lib.paired_runs(cells, metric, a, b)
  if not pairs or any(x is None or y is None for _, x, y in pairs):
    return "inconclusive", {"missing": f"a pair of runs of {a!r} and {b!r}"}
  groups = [list(zip(x, y)) for _, x, y in pairs] if per_seed else []
  both = [(u, v) for _, x, y in pairs for u, v in zip(x, y)]
  lower, higher = sum(u < v for u, v in both), sum(u > v for u, v in both)
  numbers = {"lower": lower, "higher": higher, "of": len(both),
             "median_ratio": statistics.median(u / v for u, v in both)}
  if per_seed:
    numbers["lower_per_seed"] = {seed: sum(u < v for u, v in g)
                                 for (seed, _, _), g in zip(pairs, groups)}

  def holds(test):
    return all(sum(test(u, v) for u, v in g) >= fraction * len(g) for g in groups or [both])
  if holds(lambda u, v: u < v):
    return "supported", numbers
  return ("refuted" if holds(lambda u, v: u > v) else "inconclusive"), numbers

