"""Why does BN help? Internal covariate shift vs loss-landscape smoothness (Santurkar et al. 2018).

  python experiments/why_bn.py --workdir=runs/why_bn --out=results/why_bn

Trains the paper MLP and the seed CNN with BN, without BN and with noisy BN
(BN followed by random per-activation scale and shift, resampled each step)
at one learning rate per model, checkpointing along the way. At every
checkpoint (and at initialisation) it measures, on fixed training batches
with BN in train mode, `bnlab.analysis.internal_covariate_shift` per layer
and `bnlab.analysis.gradient_smoothness` over step sizes lr/4..4*lr. Writes
report.md, figures and measurements.json into --out.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from bnlab import analysis, models, train  # noqa: E402
from bnlab import workdir as workdir_lib  # noqa: E402
from configs import paper_mlp, seed_cnn  # noqa: E402
from experiments import study  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", "runs/why_bn", "Where the runs go.")
_OUT = flags.DEFINE_string("out", "results/why_bn", "Where report, figures and json go.")
_MLP_STEPS = flags.DEFINE_integer("mlp_steps", 4000, "Training steps of the paper MLP.")
_MLP_EVERY = flags.DEFINE_integer("mlp_every", 500, "Checkpoint interval of the MLP.")
_CNN_STEPS = flags.DEFINE_integer("cnn_steps", 1000, "Training steps of the seed CNN.")
_CNN_EVERY = flags.DEFINE_integer("cnn_every", 200, "Checkpoint interval of the CNN.")
_BATCHES = flags.DEFINE_integer("batches", 8, "Fixed training batches measured per checkpoint.")
_NUM_ETAS = flags.DEFINE_integer("num_etas", 9, "Step sizes in the grid lr/4..4*lr.")
_MEASURE = flags.DEFINE_bool(
    "measure", True, "Train and measure; false: redraw figures and report from "
    "--out/measurements.json and the runs' metrics.")

NORMS = (("batch", "BN"), ("none", "no BN"), ("noisy", "noisy BN"))
COLORS = {"batch": "tab:blue", "none": "tab:red", "noisy": "tab:green"}
# lr: paper MLP 1.0 = configs/paper_mlp.py, the no-BN network's best rate of
# {0.01, 0.1, 1} (results/paper_figure1). Seed CNN 0.1: the largest rate of the
# learning-rate sweep at which both networks trained on every seed
# (results/lr_sweep: BN 0.9625, no BN 0.9601 mean final test accuracy).
MODELS = {"paper_mlp": ("paper MLP (sigmoid, batch 60)", 1.0),
          "seed_cnn": ("seed CNN (ReLU, batch 32)", 0.1)}


def make_config(model: str, norm: str):
  if model == "paper_mlp":
    cfg = paper_mlp.get_config()
    steps, every = _MLP_STEPS.value, _MLP_EVERY.value
  else:
    cfg = seed_cnn.get_config()
    steps, every = _CNN_STEPS.value, _CNN_EVERY.value
  cfg.model.norm = norm
  cfg.optimizer.learning_rate = MODELS[model][1]
  cfg.train.num_steps = steps
  cfg.train.num_epochs = 0
  cfg.train.eval_every_steps = every
  cfg.train.log_every_steps = every
  cfg.train.checkpoint_every_steps = every
  cfg.train.keep_checkpoints = steps // every + 2
  cfg.train.final_train_eval = False
  return cfg


def fixed_batches(ds, batch_size: int, count: int, seed: int = 1234):
  """`count` training batches drawn once (same for every run and checkpoint)."""
  idx = np.random.default_rng(seed).permutation(len(ds.train_labels))[:count * batch_size]
  images = ds.train_images[idx].reshape(count, batch_size, 28, 28)
  labels = ds.train_labels[idx].astype(np.int32).reshape(count, batch_size)
  return jnp.asarray(images), jnp.asarray(labels)


def make_measure(model, lr: float, etas, noisy: bool):
  """(params, batch_stats, rng, step, images, labels) -> per-batch ICS and smoothness."""

  @jax.jit
  def measure(params, batch_stats, rng, step, images, labels):
    rngs = models.train_rngs(rng, step) if noisy else None

    def one(batch):
      x, y = batch
      loss_fn = analysis.classifier_loss(
          model.apply, {"params": params, "batch_stats": batch_stats}, x, y, rngs=rngs)
      return {"ics": analysis.internal_covariate_shift(loss_fn, params, lr),
              "smooth": analysis.gradient_smoothness(loss_fn, params, etas)}

    return jax.lax.map(one, (images, labels))

  return measure


def checkpoints(cfg, workdir: str):
  """(step, params, batch_stats, rng) at initialisation and at every saved checkpoint."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  model = models.build_model(cfg.model)
  tx = train.make_optimizer(cfg.optimizer, cfg.train.num_steps)
  init = train.create_train_state(model, tx, jax.random.key(cfg.seed), cfg.train.batch_size)
  yield 0, init.params, init.batch_stats, init.rng
  root = os.path.join(os.path.abspath(workdir), "checkpoints")
  for step in sorted(int(s) for s in os.listdir(root) if s.isdigit()):
    st = ocp.PyTreeCheckpointer().restore(os.path.join(root, str(step), "default"))["state"]
    yield step, st["params"], st.get("batch_stats", {}), st["rng"]


def measure_run(cfg, workdir: str, images, labels, etas) -> dict:
  """Means over the fixed batches at every checkpoint, as lists."""
  model = models.build_model(cfg.model)
  measure = make_measure(model, cfg.optimizer.learning_rate, etas, cfg.model.norm == "noisy")
  rows = []
  for step, params, batch_stats, rng in checkpoints(cfg, workdir):
    out = jax.device_get(measure(params, batch_stats, jnp.asarray(rng), jnp.int32(step),
                                 images, labels))
    ics, sm = out["ics"], out["smooth"]
    rows.append({
        "step": step,
        "ics_l2": ics["l2"].mean(0).tolist(),
        "ics_cos": ics["cosine"].mean(0).tolist(),
        "ics_rel": (ics["l2"] / ics["grad_norm"]).mean(0).tolist(),
        "grad_norm_layer": ics["grad_norm"].mean(0).tolist(),
        "loss": sm["loss"].mean(0).tolist(),
        "grad_change": sm["grad_change"].mean(0).tolist(),
        "beta": sm["beta"].mean(0).tolist(),
        "loss_range": float(sm["loss_range"].mean()),
        "beta_max": float(sm["beta_max"].mean()),
        "loss0": float(sm["loss0"].mean()),
        "grad_norm": float(sm["grad_norm"].mean()),
    })
  return {"layers": ["/".join(p) for p in analysis.layer_weights(params)], "checkpoints": rows}


# ----------------------------------------------------------------------------- figures


def _log_axis(ax):
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  ax.set_yscale("log")
  lo, hi = ax.dataLim.y0, ax.dataLim.y1
  few = lo > 0 and np.log10(hi / lo) < 2  # under two decades: label 1, 2, 5 of each
  ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0) if few else (1.0,)))
  ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _series(res, key, j=None):
  steps = np.array([r["step"] for r in res["checkpoints"]])
  vals = np.array([r[key] if j is None else r[key][j] for r in res["checkpoints"]])
  return steps, vals


def plot_ics(results, path):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(results)
  n_layers = max(len(results[m]["batch"]["layers"]) for m in names)
  fig, axes = plt.subplots(2 * len(names), n_layers - 1,
                           figsize=(3.6 * (n_layers - 1), 2.6 * 2 * len(names)), squeeze=False)
  for mi, m in enumerate(names):
    for j in range(1, n_layers):
      for row, key, label in ((0, "ics_l2", "||G - G'||"), (1, "ics_cos", "cos(G, G')")):
        ax = axes[2 * mi + row, j - 1]
        for norm, nlabel in NORMS:
          s, v = _series(results[m][norm], key, j)
          ax.plot(s, v, "o-", ms=3, color=COLORS[norm], label=nlabel)
        if row == 0:
          _log_axis(ax)
          ax.set_title(f"{MODELS[m][0]}\nlayer {j + 1}: "
                       f"{results[m]['batch']['layers'][j].split('/')[0]}", fontsize=9)
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
        if 2 * mi + row == 2 * len(names) - 1:
          ax.set_xlabel("training step")
  axes[0, 0].legend(fontsize=8)
  fig.suptitle("Internal covariate shift (Santurkar et al. Def. 2.1), mean over "
               f"{_BATCHES.value} fixed training batches; layer 1 is 0 by definition",
               fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_smoothness(results, etas_by_model, path):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names = list(results)
  fig, axes = plt.subplots(len(names), 3, figsize=(13, 3.4 * len(names)), squeeze=False)
  for mi, m in enumerate(names):
    lr = MODELS[m][1]
    mid = len(etas_by_model[m]) // 2
    for norm, nlabel in NORMS:
      res, c = results[m][norm], COLORS[norm]
      s = np.array([r["step"] for r in res["checkpoints"]])
      gc = np.array([r["grad_change"] for r in res["checkpoints"]])
      axes[mi, 0].fill_between(s, gc.min(1), gc.max(1), color=c, alpha=0.15, lw=0)
      axes[mi, 0].plot(s, gc[:, mid], "o-", ms=3, color=c, label=nlabel)
      _, beta = _series(res, "beta_max")
      axes[mi, 1].plot(s, beta, "o-", ms=3, color=c, label=nlabel)
      _, rng = _series(res, "loss_range")
      axes[mi, 2].plot(s, rng, "o-", ms=3, color=c, label=nlabel)
    axes[mi, 0].set_title(f"{MODELS[m][0]}, lr {lr:g}\ngradient predictiveness "
                          f"||grad L(w - eta g) - grad L(w)||\nline: eta = lr; band: "
                          f"eta in [lr/4, 4 lr]", fontsize=9)
    axes[mi, 1].set_title("effective beta-smoothness\nmax over eta of "
                          "||grad change|| / ||eta g||", fontsize=9)
    axes[mi, 2].set_title("loss range over eta in [lr/4, 4 lr]\nmax - min of L(w - eta g)",
                          fontsize=9)
    for ax in axes[mi]:
      _log_axis(ax)
      ax.grid(alpha=0.3)
      ax.set_xlabel("training step")
    axes[mi, 0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_training(curves, path):
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 3.4), squeeze=False)
  for ax, (m, by_norm) in zip(axes[0], curves.items()):
    for norm, nlabel in NORMS:
      s, loss = by_norm[norm]["steps"], by_norm[norm]["train_loss"]
      ax.plot(s, loss, "o-", ms=3, color=COLORS[norm], label=f"{nlabel}: test acc "
              f"{by_norm[norm]['test_accuracy']:.4f}")
    _log_axis(ax)
    ax.set_title(f"{MODELS[m][0]}, lr {MODELS[m][1]:g}: train loss (interval mean)",
                 fontsize=9)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------- report


def _after_init(res, key, j=None):
  return np.array([(r[key] if j is None else r[key][j]) for r in res["checkpoints"]
                   if r["step"] > 0])


def compare(results, m, key, a="batch", b="none", layers=None) -> tuple[int, int, float]:
  """(#checkpoints after init where a < b, #compared, median ratio a / b), over layers."""
  below, total, ratios = 0, 0, []
  for j in (layers if layers is not None else [None]):
    va, vb = _after_init(results[m][a], key, j), _after_init(results[m][b], key, j)
    below += int(np.sum(va < vb))
    total += len(va)
    ratios.extend((va / vb).tolist())
  return below, total, float(np.median(ratios))


def report(results, curves, etas_by_model, times, cmd) -> str:
  lines = ["# Why BN helps: internal covariate shift vs landscape smoothness", ""]
  lines += [
      "Santurkar et al. (2018), *How does batch normalization help optimization?*, argue that "
      "BN's benefit does not come from reducing internal covariate shift (ICS) but from a "
      "smoother loss landscape. This study measures both, with `bnlab.analysis`, on two "
      "networks trained with BN, without BN and with *noisy BN* (BN followed by a random "
      "per-activation scale s ~ U(1, 1.5) and shift m ~ U(-0.5, 0.5), redrawn every step: "
      "`model.norm=noisy`), all at the same learning rate per network.", "",
      "## Setup", ""]
  for m, (title, lr) in MODELS.items():
    cfg = make_config(m, "batch")
    lines.append(
        f"- **{title}**: {cfg.train.num_steps:,} plain-SGD steps at **lr {lr:g}** (all three "
        f"networks), checkpoints every {cfg.train.checkpoint_every_steps} steps, plus "
        f"initialisation. Step sizes eta: {len(etas_by_model[m])} values spaced "
        f"geometrically from lr/4 to 4 lr.")
  lines += [
      "- lr choices: the paper MLP's 1.0 is configs/paper_mlp.py's, the rate at which the "
      "network *without* BN trains best of {0.01, 0.1, 1} (results/paper_figure1); the seed "
      "CNN's 0.1 is the largest rate of the learning-rate sweep at which both the BN and the "
      "no-BN network trained on every seed (results/lr_sweep). Neither favours BN.",
      f"- Measurements at each checkpoint: mean over {_BATCHES.value} fixed training batches "
      "(the training batch size, drawn once, the same for every run), BN in train mode on "
      "the batch's statistics, noisy BN with the noise of that checkpoint's step (the same "
      "noise for G and G').",
      "- ICS of layer i: G = gradient of the loss wrt the kernel W_i at the checkpoint; G' = "
      "the same after every layer before i (all its parameters: kernel, bias, BN scale and "
      "shift) took one SGD step of the run's lr with the full gradient on the same batch. "
      "Reported: ||G - G'|| and cos(G, G'); layer 1's ICS is 0 by definition and not shown.",
      "- Smoothness along g = grad L(w) (all parameters): gradient predictiveness "
      "||grad L(w - eta g) - g||, effective beta = max over eta of that divided by "
      "||eta g||, loss range = max - min over eta of L(w - eta g).", ""]
  lines += ["## Training", "", "![training](training.png)", "",
            "| network | BN | no BN | noisy BN |", "|---|---|---|---|"]
  for m, (title, _) in MODELS.items():
    accs = " | ".join(f"{curves[m][n]['test_accuracy']:.4f}" for n, _ in NORMS)
    lines.append(f"| {title}: final test accuracy | {accs} |")
  lines += ["", "## Internal covariate shift", "", "![ICS](ics.png)", ""]
  lines += ["Median over the checkpoints after initialisation; layers 2..L.", "",
            "| network | layer | quantity | BN | no BN | noisy BN |",
            "|---|---|---|---|---|---|"]
  for m, (title, _) in MODELS.items():
    layer_names = results[m]["batch"]["layers"]
    for j in range(1, len(layer_names)):
      for key, label in (("ics_l2", "\\|G - G'\\|"), ("ics_cos", "cos(G, G')"),
                         ("ics_rel", "\\|G - G'\\| / \\|G\\|")):
        vals = " | ".join(f"{np.median(_after_init(results[m][n], key, j)):.3g}"
                          for n, _ in NORMS)
        lines.append(f"| {title} | {j + 1} ({layer_names[j].split('/')[0]}) | {label} | "
                     f"{vals} |")
  lines += ["", "## Smoothness", "", "![smoothness](smoothness.png)", "",
            "Median over the checkpoints after initialisation.", "",
            "| network | quantity | BN | no BN | noisy BN |", "|---|---|---|---|---|"]
  for m, (title, _) in MODELS.items():
    mid = len(etas_by_model[m]) // 2
    for key, label, j in (("grad_change", "gradient change at eta = lr", mid),
                          ("grad_change_rel", "gradient change at eta = lr / \\|g\\|", None),
                          ("beta_max", "effective beta", None),
                          ("loss_range", "loss range", None),
                          ("grad_norm", "\\|g\\| (all parameters)", None)):
      vals = " | ".join(f"{np.median(_after_init(results[m][n], key, j)):.3g}"
                        for n, _ in NORMS)
      lines.append(f"| {title} | {label} | {vals} |")
  lines += ["", "## Answers, measured", ""]
  for m, (title, _) in MODELS.items():
    n_layers = len(results[m]["batch"]["layers"])
    hidden = list(range(1, n_layers))
    mid = len(etas_by_model[m]) // 2
    l2 = compare(results, m, "ics_l2", layers=hidden)
    cos = compare(results, m, "ics_cos", b="none", layers=hidden)
    rel = compare(results, m, "ics_rel", layers=hidden)
    nl2 = compare(results, m, "ics_l2", a="noisy", b="batch", layers=hidden)
    beta = compare(results, m, "beta_max")
    gc = compare(results, m, "grad_change", layers=[mid])
    gcr = compare(results, m, "grad_change_rel")
    lrange = compare(results, m, "loss_range")
    nbeta = compare(results, m, "beta_max", a="noisy")
    lines += [
        f"**{title}** (pairs = checkpoint x layer 2..{n_layers} after initialisation; "
        "ratio = median of BN / no BN):", "",
        f"- ||G - G'|| lower with BN than without in {l2[0]}/{l2[1]} pairs (median ratio "
        f"{l2[2]:.2f}); relative to ||G||: {rel[0]}/{rel[1]} (ratio {rel[2]:.2f}); "
        f"cos(G, G') lower with BN (more shift) in {cos[0]}/{cos[1]}.",
        f"- Noisy BN vs BN: ||G - G'|| lower with noisy BN in {nl2[0]}/{nl2[1]} pairs "
        f"(ratio {nl2[2]:.2f}); final test accuracy {curves[m]['noisy']['test_accuracy']:.4f} "
        f"vs BN {curves[m]['batch']['test_accuracy']:.4f} and no BN "
        f"{curves[m]['none']['test_accuracy']:.4f}.",
        f"- Effective beta lower with BN at {beta[0]}/{beta[1]} checkpoints (ratio "
        f"{beta[2]:.2f}); gradient change at eta = lr lower at {gc[0]}/{gc[1]} (ratio "
        f"{gc[2]:.2f}; relative to ||g||: {gcr[0]}/{gcr[1]}, ratio {gcr[2]:.2f}); "
        f"loss range smaller at {lrange[0]}/{lrange[1]} (ratio "
        f"{lrange[2]:.2f}). Noisy BN's effective beta below no BN's at {nbeta[0]}/{nbeta[1]} "
        f"(ratio {nbeta[2]:.2f}).", ""]
  lines += [
      "## Caveats", "",
      "- One seed per network, a few thousand steps (MLP) and 1,000 steps (CNN): the "
      "early and middle part of training, not convergence.",
      "- Absolute gradient sizes are not comparable across parameterizations: with BN the "
      "loss is invariant to the scale of each normalized kernel, so its gradients are "
      "orthogonal to the kernel and scale as 1 / ||W||; ||G - G'||, the gradient change and "
      "beta depend on the weight norms. The relative quantities (divided by ||G|| or ||g||) "
      "and cos(G, G') are the scale-free ones.",
      "- Santurkar et al. measure ICS and smoothness with their own networks, rates and "
      "(for smoothness) along the training trajectory; this is the same definition on "
      "bnlab's networks, not a reproduction of their figures.", ""]
  lines += ["## Wall time", "",
            f"**{times['total']:.1f} min** for this invocation (cpu, 2 CPU cores shared with "
            f"other work): training {times['train']:.1f} min (runs already finished are "
            f"reloaded, not repeated: {times['trained']} of {times['runs']} trained here), "
            f"measurements {times['measure']:.1f} min.", "", f"Command: `{cmd}`", ""]
  return "\n".join(lines)


def run_curves(wd: str) -> dict:
  recs = study.read_metrics(wd)
  return {"steps": [r["step"] for r in recs if "train_loss" in r],
          "train_loss": [r["train_loss"] for r in recs if "train_loss" in r],
          "test_accuracy": [r["test_accuracy"] for r in recs if "test_accuracy" in r][-1]}


def write_outputs(out, results, curves, etas_by_model, times, cmd) -> None:
  for m, by_norm in results.items():
    mid = len(etas_by_model[m]) // 2
    for res in by_norm.values():
      for r in res["checkpoints"]:
        r["grad_change_rel"] = r["grad_change"][mid] / r["grad_norm"]
  plot_ics(results, os.path.join(out, "ics.png"))
  plot_smoothness(results, etas_by_model, os.path.join(out, "smoothness.png"))
  plot_training(curves, os.path.join(out, "training.png"))
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(report(results, curves, etas_by_model, times, cmd))


def replot(out: str) -> None:
  with open(os.path.join(out, "measurements.json")) as f:
    saved = json.load(f)
  curves = {m: {n: run_curves(os.path.join(_WORKDIR.value, f"{m}_{n}")) for n, _ in NORMS}
            for m in MODELS}
  write_outputs(out, saved["measurements"], curves, saved["etas"], saved["times_min"],
                saved.get(
                    "command", f"python experiments/why_bn.py --workdir={_WORKDIR.value} --out={out}"))


def main(argv):
  del argv
  workdir_lib.quiet_library_logs()
  timer = study.Timer()
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  if not _MEASURE.value:
    return replot(out)
  ds = train.load_data(make_config("paper_mlp", "batch"))
  results, curves, etas_by_model = {}, {}, {}
  t_train = t_measure = 0.0
  trained = 0
  for m in MODELS:
    results[m], curves[m] = {}, {}
    lr = MODELS[m][1]
    etas = analysis.eta_grid(lr, num=_NUM_ETAS.value)
    etas_by_model[m] = np.asarray(etas).tolist()
    for norm, label in NORMS:
      cfg = make_config(m, norm)
      wd = os.path.join(_WORKDIR.value, f"{m}_{norm}")
      fresh = not os.path.exists(os.path.join(wd, "summary.json"))
      t0 = time.perf_counter()
      summary = train.train_and_evaluate(cfg, wd, data=ds)
      t_train += time.perf_counter() - t0
      trained += fresh
      curves[m][norm] = run_curves(wd)
      images, labels = fixed_batches(ds, cfg.train.batch_size, _BATCHES.value)
      t0 = time.perf_counter()
      results[m][norm] = measure_run(cfg, wd, images, labels, etas)
      dt = time.perf_counter() - t0
      t_measure += dt
      logging.info("%s %s: trained (%s), measured in %.1f s", m, label,
                   "now" if fresh else "before", dt)
      print(f"{m} {label}: test acc {curves[m][norm]['test_accuracy']:.4f}, "
            f"measured {len(results[m][norm]['checkpoints'])} checkpoints in {dt:.1f} s",
            flush=True)
      del summary
  times = {"total": timer.minutes(), "train": t_train / 60, "measure": t_measure / 60,
           "trained": trained, "runs": len(MODELS) * len(NORMS)}
  cmd = " ".join(["python", "experiments/why_bn.py", *sys.argv[1:]])
  with open(os.path.join(out, "measurements.json"), "w") as f:
    json.dump({"learning_rates": {m: v[1] for m, v in MODELS.items()}, "etas": etas_by_model,
               "batches": _BATCHES.value, "times_min": times, "command": cmd,
               "test_accuracy": {
                   m: {n: curves[m][n]["test_accuracy"] for n, _ in NORMS} for m in MODELS},
               "measurements": results}, f, indent=1)
  write_outputs(out, results, curves, etas_by_model, times, cmd)
  print(f"Wall time of the study: {times['total']:.1f} min (training {times['train']:.1f}, "
        f"measurements {times['measure']:.1f})")


if __name__ == "__main__":
  app.run(main)
