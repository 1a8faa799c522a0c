"""The training entry points: `train_and_evaluate` for one run, `train_group` for vmapped members.

Each validates its configs, opens the work directories, skips what is
complete, loads the data, builds the pieces (model, optimizer, initial state,
compiled calls), runs `loop.Loop` and writes each run's summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from bnlab.engine import backend
from bnlab.engine import calls as calls_lib
from bnlab import config as config_lib
from bnlab.models import conv as conv_lib
from bnlab import data as data_lib
from bnlab.engine import distributed
from bnlab.engine import loop as loop_lib
from bnlab.engine import members as members_lib
from bnlab.models import networks as models
from bnlab.models import user as user_models
from bnlab.engine import optim
from bnlab.engine import provenance
from bnlab.engine import state as state_lib
from bnlab.engine import steps as steps_lib
from bnlab.engine import timesplit
from bnlab.rundir import signals
from bnlab.rundir import workdir as workdir_lib
from bnlab.engine.calls import data_parallel_mesh
from bnlab.engine.collapse import CollapseWatch
from bnlab.engine.evaluation import eval_model_config
from bnlab.engine.members import GROUPABLE_KEYS, group_key, init_models
from bnlab.engine.schedule import make_schedule_plan


def train_and_evaluate(cfg, workdir: str, data: data_lib.Dataset | None = None
                       ) -> dict[str, Any]:
  """Runs (or resumes) the experiment `cfg` in `workdir`; returns its summary.

  Leaves in `workdir`: config.json, metrics.jsonl, TensorBoard events under
  tensorboard/, orbax checkpoints under checkpoints/, and summary.json. A run
  whose summary.json exists is complete: its summary is returned as is,
  unless `cfg` makes it longer (`train.num_steps`/`num_epochs` raised): then
  it continues from its last checkpoint and its summary is replaced at the end.
  `data`: the already loaded dataset of `cfg.data` (else it is loaded).

  SIGTERM or SIGUSR1 (preemption) stops it at the next step boundary with a
  checkpoint there and raises `signals.Preempted` (a KeyboardInterrupt):
  calling it again resumes, bit-identical. The caller's handlers of those
  signals are put back when it returns (`signals.stop_signals_caught`).
  """
  split = timesplit.TimeSplit()
  config_lib.validate(cfg)
  backend.configure_run(cfg)  # before anything starts JAX
  distributed.initialize(cfg.distributed)
  # After jax.distributed starts: its preemption notifier takes SIGTERM (and keeps
  # it from ending the process); bnlab's handlers replace it while the run trains,
  # and every process stops at the same step (`loop.Loop._stop_if_requested`).
  with signals.stop_signals_caught():
    wd = workdir_lib.WorkDir(workdir, cfg)
    try:
      done = wd.read_summary()
      if done is not None and not extends(done, cfg, workdir, _last_record_step(wd)):
        logging.info("Run in %s is complete; nothing to do.", workdir)
        return done
      _train([loop_lib.Member(cfg, wd)], wd, data, stacked=False, split=split)
      return wd.read_summary()
    finally:
      wd.close()


def train_group(cfgs, workdirs, group_dir: str, data: data_lib.Dataset | None = None
                ) -> list[dict[str, Any]]:
  """Trains runs with one `group_key` together: their states stacked, steps vmapped.

  Each member starts from its own seed and shuffles with its own rng, and its
  workdir gets what `train_and_evaluate` leaves (metrics, summary, its final
  checkpoint). `group_dir` holds the group's checkpoints; rerunning resumes
  there. Members whose summary.json exists are carried along but not
  recorded. Returns the members' summaries. SIGTERM and SIGUSR1 stop it as
  they stop `train_and_evaluate`, the checkpoint in `group_dir`.
  """
  with signals.stop_signals_caught():
    return _train_group(cfgs, workdirs, group_dir, data)


def _train_group(cfgs, workdirs, group_dir: str, data: data_lib.Dataset | None
                 ) -> list[dict[str, Any]]:
  split = timesplit.TimeSplit()
  cfgs = list(cfgs)
  for cfg in cfgs:
    config_lib.validate(cfg)
  keys = {group_key(c) for c in cfgs}
  backend.configure_run(cfgs[0])  # deterministic mode is the same for all (group_key)
  if len(keys) != 1:
    raise config_lib.ConfigError(
        f"a group's members may differ only in {GROUPABLE_KEYS} (learning rate with a "
        "constant schedule)")
  wds = []
  try:
    for cfg, path in zip(cfgs, workdirs):
      wds.append(workdir_lib.WorkDir(path, cfg))
    summaries = [wd.read_summary() for wd in wds]
    finished = [s is not None and not extends(s, c, p, _last_record_step(w))
                for s, c, p, w in zip(summaries, cfgs, workdirs, wds)]
    if all(finished):
      return summaries
    gwd = workdir_lib.WorkDir(group_dir, _group_config(cfgs, workdirs))
    try:
      members = [loop_lib.Member(c, wd, recording=not f)
                 for c, wd, f in zip(cfgs, wds, finished)]
      _train(members, gwd, data, stacked=True, split=split)
    finally:
      gwd.close()
    return [wd.read_summary() for wd in wds]
  finally:
    for wd in wds:
      wd.close()


def extends(summary: dict, cfg, workdir: str, reached: int | None = None) -> bool:
  """Whether `cfg` makes the finished run of `summary` longer (it then continues).

  A diverged run, and one stopped at a collapse, stays finished. Raises
  ConfigError when `cfg` is shorter than what the run already trained: a run
  can be extended, not shortened. `reached`: the step of the run's last record,
  past the summary's when an extension was started and stopped; `cfg` must
  then reach that step too.
  """
  spe, final = summary.get("steps_per_epoch"), summary.get("final_step")
  if (summary.get("diverged") or summary.get("stopped_on_collapse")
      or not isinstance(spe, int) or not isinstance(final, int)):
    return False
  t = cfg.train
  total = t.num_steps or t.num_epochs * spe
  key = "num_steps" if t.num_steps else "num_epochs"
  if total < final:
    raise config_lib.ConfigError(
        f"config.train.{key}={t[key]} makes the run {total} steps long, but the run in "
        f"{workdir} finished at step {final}: a finished run can be extended, not "
        "shortened; use a new --workdir")
  if reached is not None and total < reached:
    raise config_lib.ConfigError(
        f"config.train.{key}={t[key]} makes the run {total} steps long, but the run in "
        f"{workdir} was being made longer and is at step {reached} (its summary says "
        f"{final}): rerun with a length of at least {reached} steps to finish that, or use "
        "a new --workdir")
  if total > final:
    logging.info("Extending the finished run in %s from step %d to %d.", workdir, final, total)
  return total > final


def _last_record_step(wd: workdir_lib.WorkDir) -> int | None:
  records = wd.read_metrics()
  return records[-1]["step"] if records else None


def is_complete(cfg, workdir: str) -> bool:
  """Whether the run of `cfg` in `workdir` has nothing left to train (reads, locks nothing)."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      summary = json.load(f)
    return not extends(summary, cfg, workdir)
  except (OSError, ValueError, config_lib.ConfigError):
    return False  # training it reports the problem


def _group_config(cfgs, workdirs) -> ml_collections.ConfigDict:
  """What a group's directory records: its members, their shared config, its retention."""
  return ml_collections.ConfigDict({
      "members": [{"workdir": os.path.basename(os.path.abspath(p)), "seed": c.seed,
                   "learning_rate": c.optimizer.learning_rate}
                  for c, p in zip(cfgs, workdirs)],
      "shared": json.loads(cfgs[0].to_json_best_effort()),
      "train": {k: cfgs[0].train[k] for k in ("keep_checkpoints", "checkpoint_every_steps",
                                              "checkpoint_min_interval_secs")}})


def _train(members: list[loop_lib.Member], ckpt_wd: workdir_lib.WorkDir, ds,
           stacked: bool, split: timesplit.TimeSplit) -> None:
  """Builds the pieces of a solo run (one member) or of a group and runs the step loop.

  `split` started when the entry point was called: what precedes the first
  train step is its start-up.
  """
  cfg = members[0].cfg
  env = provenance.environment(deterministic=backend.deterministic())
  logging.info("Environment: %s", provenance.describe(env))
  if stacked and distributed.process_count() > 1:
    raise config_lib.ConfigError(
        "grouped runs (train_group, sweeps) run in one process; set "
        "config.distributed.* only for single runs, or turn grouping off")
  ds = _load_everywhere(cfg, ds)
  identity = data_identity(ds)
  for wd in {id(w): w for w in [ckpt_wd] + [m.wd for m in members if m.recording]}.values():
    wd.check_data(identity)  # a resume only on the data the run was trained on
  num_train = ds.num_train
  for m in members:  # chance (the loss rule's floor) is the data's: ln(num_classes)
    m.watch = CollapseWatch.of(m.cfg.train, ds.num_classes)
  if ds.stream is not None and (stacked or cfg.train.num_devices != 1
                                or distributed.process_count() > 1
                                or "population" in tuple(cfg.train.eval_statistics)):
    raise config_lib.ConfigError(
        f"config.data.pipeline={cfg.data.pipeline!r} streams {cfg.data.name}'s training split "
        "through grain, which feeds one run on one device: train it alone (no sweep groups) "
        "with train.num_devices=1 and without train.eval_statistics 'population', or use a "
        "device that holds the data (data.pipeline='device')")
  plan = make_schedule_plan(cfg, num_train)
  config_lib.check_profile_steps(cfg.train, plan.total_steps)  # epochs: known only now
  dtype = models.compute_dtype(cfg.train.half_precision)
  inputs = ds.input_spec()
  model = models.build_model(cfg.model, dtype=dtype, num_classes=ds.num_classes)
  eval_model = models.build_model(eval_model_config(cfg.model), dtype=dtype,
                                  num_classes=ds.num_classes)
  # validate() traced a user's model at the batch sizes the config gives; the
  # evaluations' may be smaller now the data's size is known.
  config_lib.check_model_runs(cfg, num_train, len(ds.test_labels))
  _check_analysis_layers(cfg, model, inputs)
  tx = optim.shared_optimizer(cfg.optimizer, plan.total_steps)
  bs = cfg.train.batch_size
  mesh = None if stacked else data_parallel_mesh(cfg.train.num_devices)
  if mesh is not None and bs % mesh.size:
    raise config_lib.ConfigError(
        f"config.train.batch_size={bs} does not split over {mesh.size} devices; make it a "
        f"multiple of {mesh.size} or set train.num_devices")
  calls = calls_lib.StepCalls(cfg, eval_model, num_train, stacked, mesh, ds.num_classes)
  with _device_errors_named(cfg, len(members) if stacked else None):
    state, zero_sums = _initial_state(model, tx, members, stacked, inputs, ds.num_classes)
    info = _run_info(cfg, ds, plan, calls, len(members), mesh)
    logging.info("Run: %s", json.dumps(info))
    info["environment"] = env

    # Data, state and metric sums live on the device(s); with a mesh, replicated
    # (on every process's devices); a checkpoint is restored into that placement.
    place = functools.partial(distributed.replicate, mesh=mesh)
    run = loop_lib.Loop(members, ckpt_wd, plan, calls, calls_lib.DeviceData.place(ds, mesh),
                        place(zero_sums), functools.partial(_write_summary, info), split,
                        stream=ds.stream)
    run.run(place(state))


@contextlib.contextmanager
def _device_errors_named(cfg, group_size: int | None):
  """XLA's errors that are the user's to fix (compiling or running the init, a step or an
  evaluation) as one UnusableModelError naming the model and the fix, not XLA's traceback:
  out of memory (a batch size or group too large for the device) and, on a GPU in
  deterministic mode, an operation with no deterministic implementation. They come at the
  start (compiling, the first step), before any checkpoint: the work directory then
  accepts the changed config."""
  try:
    yield
  except jax.errors.JaxRuntimeError as e:
    if user_models.is_nondeterministic_op(e):
      raise config_lib.UnusableModelError(
          f"config.model.name={cfg.model.name!r} uses an operation XLA cannot run "
          f"deterministically on this device ({user_models.reason(e)}); set "
          "config.train.deterministic=False (runs then repeat only to float rounding), or "
          "replace it: for flax.linen.max_pool, bnlab.models.conv.max_pool") from None
    if not user_models.is_out_of_memory(e):
      raise
    raise config_lib.UnusableModelError(
        f"config.model.name={cfg.model.name!r} ran out of device memory"
        f"{f' training {group_size} members' if group_size else ''} at batch "
        f"{cfg.train.batch_size} ({user_models.reason(e)}); "
        f"{user_models.memory_fix(cfg.train.batch_size, group_size)}") from None


def data_identity(ds: data_lib.Dataset) -> dict[str, Any]:
  """What names a dataset for a run's resume check: source, sizes, sha256 of its arrays."""
  identity = {"source": ds.source, "num_train": ds.num_train,
              "num_test": len(ds.test_labels),
              "sha256": hashlib.sha256(distributed.data_fingerprint(ds)).hexdigest()}
  if ds.stream is not None:  # its info and examples taken: hashing it would read it all
    identity["stream"] = ds.stream.identity()
  if ds.val_labels is not None:
    identity["num_val"] = len(ds.val_labels)
  return identity


def _sown_units(model, batch_size: int, inputs) -> dict[str, int]:
  """{name: units per example} of what `model` sows into `intermediates` (nothing compiled),
  traced at the run's batch size: a user's model need not work at any other."""
  variables = jax.eval_shape(
      lambda: model.init(models.init_rngs(jax.random.key(0)),
                         jnp.zeros(*inputs.batch(batch_size)), train=False, mutable=True))
  out = {}
  for block in variables.get("intermediates", {}).values():
    if isinstance(block, dict):
      for name, value in block.items():
        if isinstance(value, tuple) and value:
          out[name] = math.prod(value[0].shape[1:])
  return out


def _check_analysis_layers(cfg, model, inputs) -> None:
  """`analysis.layers` must be names the model sows, `analysis.units` within each layer."""
  layers = tuple(cfg.analysis.layers)
  if not layers:
    return
  sizes = _sown_units(model, cfg.train.batch_size, inputs)
  missing = [layer for layer in layers if layer not in sizes]
  if missing:
    raise config_lib.ConfigError(
        f"config.analysis.layers={layers} names {missing}, which {cfg.model.name} does not "
        f"sow; it sows {sorted(sizes)} (a submodule's self.sow('intermediates', NAME, x))")
  units = tuple(cfg.analysis.units)
  for layer in layers:
    past = [u for u in units if u >= sizes[layer]]
    if past:
      raise config_lib.ConfigError(
          f"config.analysis.units={units} is invalid: {past} lie past the {sizes[layer]} "
          f"units of {layer} ({cfg.model.name}); use indices below {sizes[layer]}. "
          "Set it with --config.analysis.units=...")


def _run_info(cfg, ds, plan, calls, num_members: int, mesh) -> dict[str, Any]:
  """How a run executes (loop form, backend, data, sizes): logged and in its summary."""
  info = {"loop": calls.loop, "unroll": calls.unroll, "backend": jax.default_backend(),
          "conv_implementation": conv_lib.resolve_conv_implementation(
              cfg.model.conv_implementation),
          "data_source": ds.source, "data_verified": ds.verified,
          **_data_info(cfg, ds),
          "total_steps": plan.total_steps, "steps_per_epoch": plan.steps_per_epoch}
  if calls.stacked:
    info["group_size"] = num_members
  info["num_devices"] = 1 if mesh is None else mesh.size
  info["num_processes"] = distributed.process_count()
  return info


def _data_info(cfg, ds) -> dict[str, Any]:
  """What the model was given: the data's name, one input's shape and dtype, how it was
  standardized (the training split's per-channel statistics) and augmented."""
  inputs = ds.input_spec()
  info = {"data_name": ds.name, "data_input": [list(inputs.shape), inputs.dtype],
          "data_pipeline": "device" if ds.stream is None else "grain",
          "data_num_classes": ds.num_classes, "data_augment": cfg.data.augment}
  if ds.normalization is not None:
    mean, std = ds.normalization
    info["data_normalization"] = {
        "mean": list(mean), "std": list(std),
        "from": "the training split as loaded (before data.num_train), pixels / 255"}
  return info


def _initial_state(model, tx, members: list[loop_lib.Member], stacked: bool, inputs,
                   num_classes: int):
  """(initial train state, zeroed metric sums) of a solo run or of a group's stacked members."""
  bs = members[0].cfg.train.batch_size
  if not stacked:
    state = _solo_init(model, tx, bs, inputs)(np.uint32(members[0].cfg.seed))
    return state_lib.set_learning_rates(state, [members[0].cfg]), steps_lib.metric_sums_zero()
  # One update function for all; each member's hyperparameters (its learning
  # rate) live in its own optimizer state.
  cfgs = [m.cfg for m in members]
  state = state_lib.create_member_states(
      model, tx, cfgs, bs, init_models(
          cfgs, models.compute_dtype(cfgs[0].train.half_precision), num_classes),
      inputs=inputs)
  # The sums sit where the states do: a checkpoint restores into this placement, and a
  # resumed group's step would otherwise get sums on one device and states on several.
  return state, state_lib.spread_members(steps_lib.metric_sums_zero(len(members)),
                                         len(members))


@user_models.per_module_cache(16)
def _solo_init(model, tx, batch_size: int, inputs):
  """A run's initial state from its seed: one compiled program (unoptimized code
  generation: it runs once) instead of one compile per operation of an eager
  init, shared by the runs of one model and optimizer in a process."""
  return jax.jit(lambda seed: state_lib.create_train_state(
      model, tx, jax.random.key(seed), batch_size, inputs),
                 compiler_options={"xla_backend_optimization_level": 0})


def _write_summary(info: dict, m: loop_lib.Member, step: int, full_train,
                   split: timesplit.TimeSplit) -> None:
  """Writes member `m`'s summary.json; `time` splits this process's wall time (`timesplit`)."""
  m.wd.wait()
  summary = {"diverged": m.diverged_at is not None, "diverged_at_step": m.diverged_at,
             "collapsed": m.collapsed_at is not None, "collapsed_at_step": m.collapsed_at,
             "collapse_reason": m.collapse_reason,
             "stopped_on_collapse": m.stopped_on_collapse, "final_step": step, **info}
  records = m.wd.read_metrics()
  last = {k: v for r in records for k, v in r.items()}  # each metric's latest value
  # The other statistics' results, and which test images were classified correctly
  # (test_correct*, `per_image`), of the last evaluation only: a statistic left out of
  # it (train.eval_statistics changed on resume) has no final value. The same of the
  # held-out validation examples (val_*, data.validation_size) where there are some.
  last_eval = next((r for r in reversed(records) if "test_accuracy" in r), {})
  others = tuple(k for k in last_eval
                 if k.startswith(("test_loss_", "test_accuracy_", "test_correct",
                                  "val_loss", "val_accuracy", "val_correct")))
  for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy") + others:
    if key in last:
      # A diverged run has no final accuracy: its last evaluation predates the blow-up.
      summary[key if m.diverged_at is None else f"{key}_before_divergence"] = last[key]
  if full_train is not None and m.diverged_at is None:
    summary.update(full_train_loss=float(full_train["loss"]),
                   full_train_accuracy=float(full_train["accuracy"]))
  summary["time"] = split.as_dict()
  summary["wall_time"] = summary["time"]["total"]
  m.wd.write_summary(summary)


def _load_everywhere(cfg, ds: data_lib.Dataset | None) -> data_lib.Dataset:
  """`ds`, or `cfg.data` loaded, checked to be the same data on every process."""
  # Every process loads the same data (process 0 first: it fills the cache).
  return distributed.together(
      "loading the data", lambda: ds if ds is not None else load_data(cfg),
      fingerprint=distributed.data_fingerprint, primary_first=True,
      differs="loaded other data than process 0; every process must read the same data "
      "(same config.data.*, same files)")


def load_data(cfg) -> data_lib.Dataset:
  """The dataset of `cfg.data` (`bnlab.data.load`: MNIST, or a TFDS dataset by name), with
  `validation_size` examples of its training split held out (`bnlab.data.split`: drawn
  first, with `validation_seed`), cut to `num_train` of the rest (the first, or a seeded
  sample: `subset_seed`) and `num_test` when set."""
  d = cfg.data
  if members_lib.streams(cfg):
    ds = data_lib.load_streamed(d)
    logging.info("Data: the %d training examples of %s stream through grain "
                 "(data.pipeline=%s).", ds.num_train, d.name, d.pipeline)
  else:
    ds = data_lib.load(d)
  if d.validation_size:
    config_lib.check_validation_split(d, ds.num_train, cfg.train.batch_size, ds.source)
  val = data_lib.split.held_out(ds.num_train, d.validation_size, d.validation_seed)
  held = {}
  if len(val):
    if ds.stream is not None:
      held = dict(zip(("val_images", "val_labels"), ds.stream.read_stored(val)))
    else:
      held = {"val_images": ds.train_images[val], "val_labels": ds.train_labels[val]}
  if d.num_train or d.num_test or d.validation_size:
    left = ds.num_train - d.validation_size
    n_train = d.num_train or left
    n_test = d.num_test or len(ds.test_labels)
    for key, n, have in (("data.num_train", n_train, left),
                         ("data.num_test", n_test, len(ds.test_labels))):
      if n > have:
        after = (f" left after data.validation_size={d.validation_size}"
                 if key == "data.num_train" and d.validation_size else "")
        raise config_lib.ConfigError(
            f"config.{key}={n} but the {ds.source} data has only {have} examples{after}; "
            "lower it (0 = all)")
    take = data_lib.split.training_positions(ds.num_train, val, d.num_train, d.subset_seed)
    train = ({"stream": ds.stream.subset(take)} if ds.stream is not None else
             {"train_images": ds.train_images[take], "train_labels": ds.train_labels[take]})
    ds = dataclasses.replace(
        ds, verified=False, **train, **held,
        test_images=ds.test_images[:n_test], test_labels=ds.test_labels[:n_test])
  if cfg.train.batch_size > ds.num_train:
    raise config_lib.ConfigError(
        f"config.train.batch_size={cfg.train.batch_size} is larger than the "
        f"{ds.num_train} training examples; lower it or raise data.num_train")
  return ds
