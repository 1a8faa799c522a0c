"""Study 5: why does BN help? Internal covariate shift vs landscape smoothness.

Santurkar et al. (2018) argue that BN's benefit comes from a smoother loss landscape,
not from less internal covariate shift (ICS). The paper MLP (configs/paper_mlp.py,
lr 1.0, 4,000 steps, a checkpoint every 500) and the seed CNN (configs/seed_cnn.py,
lr 0.1, 1,000 steps, every 200), each with BN, without BN and with noisy BN (BN, then
a random per-activation scale U(1, 1.5) and shift U(-0.5, 0.5) redrawn every step),
one seed, plain SGD. At initialisation and at every checkpoint the measurement
`ics_smoothness` (bnlab.study_measurements) takes `bnlab.analysis`'s ICS per layer and
gradient smoothness over 9 step sizes eta from lr/4 to 4 lr, mean over 8 fixed training
batches; cached in runs/<member>/measurements/ics.json.

Run:    python -m bnlab.study --config=configs/studies/why_bn.py --workdir=runs/why_bn
Smoke:  ...why_bn.py:runlocal (the paper MLP, three norms, 10 steps, 2 batches, 3 etas)
Budget: 6 runs; 5.8 min on a 2-core CPU (training 2.6 min, measurements 3.2 min).
Expected: ics_lower refuted (both); ics_rel_lower inconclusive (MLP), refuted (CNN);
        noisy_more_ics supported (both); beta_lower and grad_change_lower refuted
        (both); loss_range_lower supported (both); noisy_beta_lower refuted (both).
"""

from bnlab import study
from bnlab import study_measurements  # noqa: F401  (registers ics_smoothness, mostly_lower, ...)
from bnlab import sweep

QUANTITIES = ("ics_l2", "ics_cos", "ics_rel")
SMOOTHNESS = ("grad_change", "grad_change_rel", "beta_max", "loss_range", "grad_norm")
MOSTLY = 0.75  # a claim holds when its comparison goes one way in >= 3/4 of the pairs
NOTES = """
Learning rates: the paper MLP's 1.0 is configs/paper_mlp.py's, the rate at which the
network *without* BN trains best of {0.01, 0.1, 1} (results/paper_figure1); the seed
CNN's 0.1 is the largest rate of the learning-rate sweep at which both the BN and the
no-BN network trained on every seed (results/lr_sweep). Neither favours BN.
ICS of layer i: G = gradient of the loss wrt the kernel W_i; G' = the same after every
layer before i took one SGD step of the run's lr on the same batch; `ics_l2` =
||G - G'||, `ics_cos` = cos(G, G'), `ics_rel` = ||G - G'|| / ||G||, per layer (@2..@4;
layer 1's is 0 by definition), median over the checkpoints after initialisation.
Smoothness along g = grad L(w): `grad_change` = ||grad L(w - lr g) - g||, `grad_change_rel`
= that / ||g||, `beta_max` = max over eta of ||grad L(w - eta g) - g|| / ||eta g||,
`loss_range` = max - min over eta of L(w - eta g). Pairs: checkpoint x layer 2..4 (ICS)
or checkpoint (smoothness), after initialisation, one seed.
Caveats: a few thousand steps, the early and middle part of training; with BN the loss
is invariant to the scale of each normalised kernel, so absolute gradient sizes depend
on the weight norms: `ics_rel`, `ics_cos` and `grad_change_rel` are the scale-free ones.
This is Santurkar et al.'s definition on bnlab's networks, not a reproduction of their
figures.
"""


def parse(arg):
  return study.parse_arg(arg, runlocal=False)


def models(runlocal: bool) -> list[dict]:
  """The two models with their rate, steps and checkpoint interval; every checkpoint kept."""
  def budget(lr, steps, every):
    return {"optimizer.learning_rate": lr, "train.num_steps": steps, "train.num_epochs": 0,
            "train.eval_every_steps": every, "train.log_every_steps": every,
            "train.checkpoint_every_steps": every, "train.keep_checkpoints": steps // every + 2,
            "train.final_train_eval": False}
  both = {"paper_mlp": study.config_variant("configs/paper_mlp.py", budget(1.0, 4_000, 500)),
          "seed_cnn": study.config_variant("configs/seed_cnn.py", budget(0.1, 1_000, 200))}
  if runlocal:  # the MLP only: each model and norm compiles its own measurement
    both = {"paper_mlp": study.config_variant("configs/paper_mlp.py", budget(1.0, 10, 5))}
  return sweep.variants("model", both)


def claim(statement: str, metric: str, a: str, b: str) -> dict:
  return {"statement": statement, "rule": "mostly_lower", "metric": f"{metric}/pairs",
          "a": f"model.norm={a}", "b": f"model.norm={b}", "fraction": MOSTLY, "each": ("model",)}


def get_config(arg=None):
  local = parse(arg).runlocal
  s = study.base_config()
  s.title = "Study 5: why BN helps, internal covariate shift vs landscape smoothness"
  s.grouped = False  # the measurement reads every checkpoint in the run's own directory
  s.cells = ("model", "model.norm")
  s.measurements = {"ics": {"kind": "ics_smoothness", "batches": 2 if local else 8,
                            "num_etas": 3 if local else 9, "batch_seed": 1234}}
  per_layer = [f"{q}@{j}" for q in QUANTITIES for j in (2, 3, 4)]
  pooled = [f"{q}/{p}" for q in ("ics_l2", "ics_rel", "beta_max", "loss_range", "grad_change")
            for p in ("pairs", "series")]
  s.metrics = {"final_acc": ("summary", "test_accuracy"),
               "train_loss": ("series", "train_loss"),
               **{m: ("measured", "ics", m) for m in (*per_layer, *SMOOTHNESS, *pooled,
                                                      "ics_cos/series")}}
  s.labels = {"batch": "BN", "none": "no BN", "noisy": "noisy BN", "final_acc": "final test acc",
              "paper_mlp": "paper MLP (sigmoid, batch 60, lr 1)",
              "seed_cnn": "seed CNN (ReLU, batch 32, lr 0.1)"}
  s.notes = NOTES
  s.tables = {"internal covariate shift": {"metrics": tuple(per_layer)},
              "smoothness and training": {"metrics": ("final_acc", *SMOOTHNESS)}}
  s.figures = {"training": {"kind": "curves", "metric": "train_loss", "hue": ("model.norm",),
                            "panels": ("model",), "logy": True},
               **{q: {"kind": "per_checkpoint", "metric": f"{q}/series", "hue": ("model.norm",),
                      "panels": ("model",), "first": 1, "logy": q != "ics_cos"}
                  for q in ("ics_l2", "ics_cos")},
               **{q: {"kind": "per_checkpoint", "metric": f"{q}/series", "hue": ("model.norm",),
                      "panels": ("model",), "logy": True}
                  for q in ("grad_change", "beta_max", "loss_range")}}
  s.claims = {
      "ics_lower": claim("BN lowers ICS: ||G - G'|| is lower with BN than without.",
                         "ics_l2", "batch", "none"),
      "ics_rel_lower": claim("BN lowers relative ICS: ||G - G'|| / ||G|| is lower with BN "
                             "than without.", "ics_rel", "batch", "none"),
      "noisy_more_ics": claim("Noisy BN has more ICS than BN: ||G - G'|| is lower with BN "
                              "than with noisy BN.", "ics_l2", "batch", "noisy"),
      "beta_lower": claim("BN smooths the landscape: the effective beta is lower with BN "
                          "than without.", "beta_max", "batch", "none"),
      "grad_change_lower": claim("BN makes the gradient more predictive: ||grad L(w - lr g) "
                                 "- g|| is lower with BN than without.", "grad_change",
                                 "batch", "none"),
      "loss_range_lower": claim("BN makes the loss along the gradient vary less: the loss "
                                "range is smaller with BN than without.", "loss_range",
                                "batch", "none"),
      "noisy_beta_lower": claim("Noisy BN still smooths: its effective beta is lower than no "
                                "BN's.", "beta_max", "noisy", "none"),
  }
  return s


def get_sweep(arg=None):
  return sweep.product(models(parse(arg).runlocal),
                       sweep.axis("model.norm", ["batch", "none", "noisy"]), sweep.seeds(1))
