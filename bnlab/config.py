"""Run configuration: the defaults every config file starts from, and validation.

A run config is an `ml_collections.ConfigDict` with sections `data`, `model`,
`optimizer` and `train`. Config files in `configs/` call `base_config()` and
change what their experiment needs; `validate` checks a resolved config and
raises `ConfigError` naming the key before anything is compiled.
"""

from __future__ import annotations

import math
import os

import jax
import ml_collections

from bnlab.models import conv
from bnlab import data as data_lib
from bnlab.engine import distributed
from bnlab.engine import optim
from bnlab.models import networks as models
from bnlab.models import resnet
from bnlab.models import user as user_models
from bnlab.errors import ConfigError, UnusableModelError
from bnlab.layers.functional import VARIANCE_METHODS as VARIANCES
from bnlab.layers.variants import RUNNING_AVERAGES

# bnlab's own optimizer names; optimizer.name also takes any optax optimizer's and
# "package.module:function" (bnlab.engine.optim).
BN_STATISTICS = ("model", "channel", "activation")  # model.bn.statistics
OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULES = ("constant", "cosine", "piecewise", "step", "warmup_cosine")
LOOPS = ("auto", "scan", "loop")
CONV_IMPLEMENTATIONS = ("auto", *conv.IMPLEMENTATIONS)
# Integers beyond these do not fit what they become: a seed a uint32 (a group
# stacks its members' seeds as such), every other count a step counter (int32).
MAX_SEED = 2**32 - 1
MAX_INT = 2**31 - 1
# Sections whose keys are the user's own (a model's settings, an optax optimizer's keyword
# arguments): any key may be added, on the command line too (bnlab.main).
FREE_FORM = ("model.options", "optimizer.kwargs")


def configs_dir() -> str:
  """bnlab's own config files: the repository's top-level `configs/` in a checkout, and
  the copy an installed wheel carries as `bnlab/configs/` (pyproject.toml maps one to the other)."""
  package = os.path.dirname(os.path.abspath(__file__))
  installed = os.path.join(package, "configs")
  return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package),
                                                                 "configs")


def find_config(path: str, near: str | None = None) -> str:
  """The config file `path` names; ConfigError (one line, where it looked) if none.

  A relative path is looked up, in order: from the directory of the file `near` (a study
  file naming its run config) and each directory above it, so "configs/paper_mlp.py"
  in a study file means the configs beside that study, in a checkout or an installed
  bnlab, whatever the working directory; then from the working directory; then in
  bnlab's own configs (`configs_dir()`, a leading "configs/" dropped), so the built-in
  configs run from any directory once bnlab is installed.
  """
  if os.path.isabs(path):
    candidates = [path]
  else:
    candidates = []
    folder = os.path.dirname(os.path.abspath(near)) if near else None
    while folder:
      candidates.append(os.path.join(folder, path))
      parent = os.path.dirname(folder)
      folder = parent if parent != folder else None
    own = path[len("configs/"):] if path.startswith("configs/") else path
    candidates += [os.path.abspath(path), os.path.join(configs_dir(), own)]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  where = (f"beside {near} and above it, " if near and not os.path.isabs(path) else "")
  places = "" if os.path.isabs(path) else (
      f" (looked {where}in the working directory {os.getcwd()} and in bnlab's configs "
      f"{configs_dir()})")
  raise ConfigError(f"config file {path!r} does not exist{places}; check the path")


def flatten(d: dict, prefix: str = "") -> dict:
  """A nested dict as {"dotted.key": value}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


# What may change when a run resumes (`bnlab.rundir.workdir.WorkDir` compares a rerun's
# config with the run's config.json). Only keys that cannot alter the trained
# parameters: which evaluations are recorded, how many checkpoints are kept,
# and the device layout (a checkpoint restores onto any layout; another layout
# changes only the float rounding of the batch reductions). Keys that change
# what a recorded series means (the `analysis` section: which units,
# percentiles and examples; `train.population_examples`) are not here: a run's
# records would hold two definitions under one name. Keys that move the
# boundaries of the compiled train calls (train.log_every_steps,
# eval_every_*, checkpoint_every_steps, steps_per_call, loop, unroll) are not
# here: the same steps compiled into other calls can round differently, and a
# resumed run is bit-identical to an uninterrupted one only without them.
RESUME_SAFE_KEYS = (
    "train.eval_batch_size", "train.eval_at_start", "train.final_train_eval",
    "train.keep_checkpoints", "train.num_devices", "train.compilation_cache",
    "train.checkpoint_min_interval_secs", "train.profile_steps",
    "train.eval_statistics", "train.collapse_loss_factor",
    "train.collapse_accuracy", "train.collapse_trained_accuracy")
# The run's length. Raising it continues a finished run from its last
# checkpoint, unless the learning rate schedule is spread over the run's length
# (LENGTH_SCHEDULES): a longer run then has another learning rate at the steps
# already trained.
LENGTH_KEYS = ("train.num_steps", "train.num_epochs")
LENGTH_SCHEDULES = ("cosine", "warmup_cosine")


def changed_keys(old: dict, new: dict) -> list[str]:
  """The keys of flattened config `old` whose value `new` changes, sorted; `distributed`
  keys aside (how a launch is spread over processes, not what it computes)."""
  return sorted(k for k in old if old.get(k) != new.get(k) and not k.startswith("distributed."))


def resume_refusal(old: dict, new: dict) -> tuple[list[str], str | None]:
  """(the keys that forbid resuming, a reason or None), for flattened configs.

  A key may carry a "shared." prefix (a group's directory records its members'
  shared config under it). No key and no reason: the run may resume.
  """
  changed = changed_keys(old, new)

  def bare(key):
    return key[len("shared."):] if key.startswith("shared.") else key

  unsafe = [k for k in changed if bare(k) not in RESUME_SAFE_KEYS + LENGTH_KEYS]
  if unsafe:
    return unsafe, None
  length = [k for k in changed if bare(k) in LENGTH_KEYS]
  prefix = length[0][:-len(bare(length[0]))] if length else ""
  schedule = new.get(f"{prefix}optimizer.schedule")
  if length and schedule in LENGTH_SCHEDULES:
    return length, (
        f"its learning rate follows optimizer.schedule={schedule!r} over the run's length, so "
        "a run of another length has another learning rate at the steps already trained; "
        "use a new --workdir (runs with a 'constant' or 'step' schedule can be extended)")
  return [], None


def base_config() -> ml_collections.ConfigDict:
  """Defaults for every run: the seed CNN with BN, SGD, batch 32.

  One long function on purpose: the one place that names every key, each with
  its default and a comment; `validate` checks configs against it.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  # "mnist" (read from data.source), or any TFDS image-classification dataset prepared in
  # array_record format in data.dir (e.g. "cifar10", "cifar100", "fashion_mnist").
  c.data.name = "mnist"
  c.data.source = "embedded"  # MNIST's source: one of bnlab.data.SOURCES
  # Directory of IDX files (source=idx) or the TFDS data dir (source=tfds; a TFDS
  # data.name's, where "" is TFDS' default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
  c.data.dir = ""
  # The model's input: "per_channel" standardizes each channel with the training split's
  # mean and std (float32 (x/255 - mean) / std); "none" gives the uint8 pixels; "auto":
  # none for MNIST (as always), per_channel for a TFDS data.name.
  c.data.normalize = "auto"
  # Training batches only, on the device, keyed by the run's seed and the step:
  # "none", "crop_flip" (random crop of the image padded by 4 with zeros, and a
  # horizontal flip with probability 1/2), "crop" or "flip" (bnlab.data.augment).
  c.data.augment = "none"
  # Where the training examples live: "device" (all on the device), "grain" (streamed
  # from the TFDS files in batches), "auto" (device when they fit its memory).
  c.data.pipeline = "auto"
  c.data.cache_dir = ""  # "" -> $BNLAB_CACHE_DIR or ~/.cache/bnlab
  c.data.num_train = 0  # 0 -> all; else N training examples: the first N, or see subset_seed
  # -1: data.num_train takes the first N; >= 0: a fixed sample of N drawn with this seed
  # (the same images for every run that names it, whatever the run's own seed).
  c.data.subset_seed = -1
  c.data.num_test = 0  # 0 -> all 10,000 test examples
  # > 0: this many training-split examples held out for validation (bnlab.data.split): a
  # fixed sample drawn with validation_seed (the same for every run that names it, whatever
  # the run's own seed), never trained on; num_train's subset is drawn from the rest. Every
  # evaluation also scores them (val_loss, val_accuracy, val_correct) with the statistics
  # the test set is scored with. 0: none, as always.
  c.data.validation_size = 0
  c.data.validation_seed = 0

  c.model = ml_collections.ConfigDict()
  # A built-in network (bnlab.models.networks.MODELS) or your own Flax model,
  # "package.module:target" (see bnlab.models.user).
  c.model.name = "seed_cnn"
  c.model.norm = "batch"  # one of bnlab.models.networks.NORMS
  c.model.bn_position = "after"
  c.model.activation = "relu"
  c.model.widths = ()  # () -> the model's own widths (resnet20: its stages' filters)
  c.model.kernel_init = "glorot_uniform"
  c.model.init_std = 0.01  # for kernel_init="normal"
  c.model.conv_implementation = "auto"
  # Dropout rate on every hidden block's output (conv and dense), in training steps only.
  c.model.dropout = 0.0
  c.model.bn = ml_collections.ConfigDict()
  c.model.bn.momentum = 0.99
  c.model.bn.epsilon = 1e-5
  # With bn_position="before", keep the linear/conv layer's bias before BN (the paper drops
  # it: BN's mean subtraction cancels any constant in train mode, so its gradient is 0).
  c.model.bn.bias_before = False
  c.model.bn.variance = "shifted"
  # Running statistics: "ema" (momentum) or "population" (the mean over every
  # batch seen, with m/(m-1) on the variance: Algorithm 2).
  c.model.bn.running_average = "ema"
  c.model.bn.ghost_size = 16  # norm=ghost: examples per ghost batch
  # norm=renorm: r_max, d_max held at 1, 0 for warmup_steps, then linear to
  # these values at r_max_steps, d_max_steps.
  c.model.bn.renorm_r_max = 3.0
  c.model.bn.renorm_d_max = 5.0
  c.model.bn.renorm_warmup_steps = 5000
  c.model.bn.renorm_r_max_steps = 40000
  c.model.bn.renorm_d_max_steps = 25000
  # norm=noisy: y * s + m per activation and step, s ~ U(1, noise_scale_max),
  # m ~ U(-noise_shift_max, noise_shift_max).
  c.model.bn.noise_shift_max = 0.5
  c.model.bn.noise_scale_max = 1.5
  c.model.bn.num_groups = 4  # norm=group: must divide each normalized layer's features
  # A conv map's BN statistics: "channel" (one mean and variance per feature map, over the
  # batch and every position), "activation" (per (height, width, channel) position, as a
  # dense layer's BN would treat the flattened map), or "model" (each model's own: the seed
  # CNN's BN after Flatten is per activation, seed1_cnn's per channel).
  c.model.bn.statistics = "model"
  # model.name="resnet20" (bnlab.models.resnet): the shortcut where a block changes the
  # shape, "A" (subsampled identity, zero-padded channels: the paper's CIFAR net) or "B"
  # (1x1 conv + norm projection); zero_init_last_scale starts each block's last norm scale
  # at 0 (Goyal et al. 2017), so a block starts as its shortcut.
  c.model.resnet = ml_collections.ConfigDict()
  c.model.resnet.shortcut = "A"
  c.model.resnet.zero_init_last_scale = False
  # Your own model's settings, free-form (not checked), e.g. c.model.options.depth = 3;
  # its factory receives the whole `model` section.
  c.model.options = ml_collections.ConfigDict()

  c.optimizer = ml_collections.ConfigDict()
  # "sgd", "momentum", "adam", any optax optimizer by name ("adamw", "lamb", "lion", ...)
  # or "package.module:function", your own optax transformation (bnlab.engine.optim).
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.01
  c.optimizer.momentum = 0.9  # for name=momentum
  c.optimizer.nesterov = False
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  c.optimizer.decay_factor = 0.1  # schedule=step: multiply by this ...
  c.optimizer.decay_every_steps = 0  # ... every this many steps
  c.optimizer.decay_boundaries = ()  # schedule=piecewise: ... at each of these steps
  # Keyword arguments of the optax optimizer optimizer.name names (e.g. b2 for adamw),
  # checked against its signature; free-form for your own transformation.
  c.optimizer.kwargs = ml_collections.ConfigDict()
  # Decoupled weight decay: -learning_rate * weight_decay * param each step, on the
  # parameters weight_decay_mask selects: "kernels" (2+ dimensions: not BN's scale and
  # bias, nor biases) or "all". Optimizers with their own decay (adamw, lamb, lion, ...)
  # get it as their weight_decay argument, with the mask.
  c.optimizer.weight_decay = 0.0
  c.optimizer.weight_decay_mask = "kernels"
  c.optimizer.clip_global_norm = 0.0  # > 0: gradients clipped to this global norm first

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 32
  c.train.num_epochs = 2
  c.train.num_steps = 0  # > 0 overrides num_epochs
  c.train.loop = "auto"  # auto | scan | loop (see bnlab.engine.train.resolve_loop)
  c.train.steps_per_call = 0  # scan: max steps per call; 0 -> schedule.make_schedule_plan's
  c.train.unroll = 1  # scan unroll factor (GPU trade-off: results/README.md)
  c.train.num_devices = 1  # data-parallel over this many devices; 0 = all visible
  c.train.log_every_steps = 0  # 0 -> every eval
  c.train.eval_every_steps = 0  # > 0 overrides eval_every_epochs
  c.train.eval_every_epochs = 1
  c.train.eval_batch_size = 2000
  c.train.checkpoint_every_steps = 0  # > 0: every this many steps
  # With checkpoint_every_steps=0: checkpoints at evaluation steps, at most one
  # per this many seconds (a killed run loses at most that much work), and
  # always the last step; 0 = at every evaluation. Results are the same either
  # way (a resumed run is bit-identical to an uninterrupted one).
  c.train.checkpoint_min_interval_secs = 30.0
  c.train.keep_checkpoints = 2
  c.train.eval_at_start = True  # also evaluate (and record analysis) at step 0
  c.train.final_train_eval = True  # evaluate the whole train set at the end
  # Collapse (bnlab.engine.collapse.CollapseWatch): a finite train loss above
  # collapse_loss_factor x its running minimum and above chance (ln of the data's
  # number of classes), or a test accuracy <= collapse_accuracy after one >=
  # collapse_trained_accuracy.
  # Recorded (collapsed, collapsed_at_step); the run goes on (a collapse may
  # recover) unless stop_on_collapse. collapse_loss_factor=0 turns the loss rule off.
  c.train.collapse_loss_factor = 10.0
  c.train.collapse_accuracy = 0.2
  c.train.collapse_trained_accuracy = 0.5
  c.train.stop_on_collapse = False
  # The BN statistics each evaluation's test accuracy is measured with
  # (bnlab.engine.evaluation.EVAL_STATISTICS): "running" (the running averages:
  # test_accuracy), "population" (recomputed over the first population_examples
  # training images, Algorithm 2: test_accuracy_population), "batch" (each test
  # batch's own statistics: test_accuracy_batch).
  c.train.eval_statistics = ("running",)
  c.train.population_examples = 10000
  # Bit-identical results run to run on every backend (bnlab.engine.backend): on a GPU,
  # XLA's deterministic reductions and scatters, set before JAX starts.
  c.train.deterministic = True
  # bfloat16 computation (the model's dtype), float32 parameters, optimizer state
  # and BN statistics, as in Flax's ImageNet example.
  c.train.half_precision = False
  # JAX's persistent compilation cache in <data.cache_dir>/jax (default
  # ~/.cache/bnlab/jax): a rerun or another run of the same programs compiles
  # nothing. A directory set with jax_compilation_cache_dir is used instead.
  c.train.compilation_cache = True
  # A JAX profiler trace (TensorBoard's profile plugin; Perfetto reads its trace.json.gz)
  # of the train calls that run steps start+1..stop, given as (start, stop), written to
  # WORKDIR/profile/; () = none. The calls keep their boundaries: a traced run computes
  # what an untraced one does.
  c.train.profile_steps = ()

  # Distributions recorded at every evaluation (inference mode, first test images).
  c.analysis = ml_collections.ConfigDict()
  c.analysis.layers = ()  # activation inputs to record, e.g. ("preact_2",)
  c.analysis.units = (0, 1, 2)  # which units (features) of each layer
  c.analysis.percentiles = (15.0, 50.0, 85.0)
  c.analysis.num_examples = 1000

  # Several processes (hosts) in one data-parallel run (bnlab.engine.distributed): each
  # process gets the same config except process_id. "" / 0 / -1: single process.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.coordinator_address = ""  # "host:port" of process 0, the same for all
  c.distributed.num_processes = 0  # > 0 with coordinator_address; 0 = detected
  c.distributed.process_id = -1  # this process: 0..num_processes-1; -1 = detected
  c.distributed.local_device_ids = ()  # this host's devices to use; () = all (or detected)
  # "" = no detection; "auto" = SLURM, Open MPI or Cloud TPU from the environment
  # (plus $JAX_COORDINATOR_ADDRESS); or one method of bnlab.engine.distributed.CLUSTER_DETECTION.
  c.distributed.cluster_detection = ""
  c.distributed.initialization_timeout = 300  # seconds to wait for every process
  # Seconds without a heartbeat after which a process counts as dead and the
  # others stop (a process killed mid-run otherwise leaves them waiting).
  c.distributed.heartbeat_timeout = 100
  return c


def _check(ok: bool, key: str, value, expected: str) -> None:
  if not ok:
    raise ConfigError(
        f"config.{key}={value!r} is invalid: expected {expected}. "
        f"Set it with --config.{key}=...")


def _one_of(cfg, key: str, choices) -> None:
  value = cfg
  for part in key.split("."):
    value = value[part]
  _check(value in choices, key, value, f"one of {tuple(choices)}")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first invalid value, naming its key."""
  _check_keys(c, base_config(), "")
  _validate_seed_and_data(c)
  _validate_model(c)
  _validate_optimizer(c)
  _validate_train(c)
  _validate_analysis(c)
  _validate_distributed(c)
  # Last: a sweep records a member whose model fails here (UnusableModelError) as
  # failed, and that member's every other value must have been checked by then.
  check_model_runs(c)


def _validate_seed_and_data(c) -> None:
  _check(isinstance(c.seed, int) and 0 <= c.seed <= MAX_SEED, "seed", c.seed,
         f"an integer in [0, {MAX_SEED}] (2**32 - 1)")
  _check(isinstance(c.data.name, str) and bool(c.data.name), "data.name", c.data.name,
         "'mnist' or the name of a TFDS image-classification dataset, e.g. 'cifar10'")
  _one_of(c, "data.source", data_lib.SOURCES)
  _check(c.data.source != "idx" or bool(c.data.dir), "data.dir", c.data.dir,
         "a directory of MNIST IDX files when data.source=idx")
  _check(c.data.name == data_lib.MNIST or c.data.source in ("embedded", "tfds", "auto"),
         "data.source", c.data.source,
         f"its default with data.name={c.data.name!r} (data.source picks MNIST's source; "
         "another data.name is always read from TFDS)")
  _one_of(c, "data.normalize", data_lib.NORMALIZE)
  _one_of(c, "data.augment", data_lib.augment.AUGMENTS)
  _one_of(c, "data.pipeline", data_lib.PIPELINES)
  for key in ("data.num_train", "data.num_test"):
    v = c.data[key.split(".")[1]]
    _check(isinstance(v, int) and v >= 0, key, v, "an integer >= 0 (0 = all)")
  _check(isinstance(c.data.subset_seed, int) and -1 <= c.data.subset_seed <= MAX_SEED,
         "data.subset_seed", c.data.subset_seed,
         f"-1 (data.num_train takes the first examples) or a seed in [0, {MAX_SEED}]")
  _check(isinstance(c.data.validation_size, int) and c.data.validation_size >= 0,
         "data.validation_size", c.data.validation_size,
         "an integer >= 0 (0 = no validation split)")
  _check(isinstance(c.data.validation_seed, int) and 0 <= c.data.validation_seed <= MAX_SEED,
         "data.validation_seed", c.data.validation_seed, f"a seed in [0, {MAX_SEED}]")
  _check(c.data.name != data_lib.MNIST or c.data.pipeline != "grain", "data.pipeline",
         c.data.pipeline, "'device' or 'auto' with data.name='mnist' (grain streams a TFDS "
         "data.name from its files; MNIST fits on any device)")
  if c.data.pipeline == "grain":
    _check("population" not in tuple(c.train.eval_statistics), "data.pipeline",
           c.data.pipeline, "'device' with train.eval_statistics 'population' (it recomputes "
           "BN's statistics over device-resident training images)")
    _check(c.train.num_devices == 1 and not c.distributed.coordinator_address,
           "data.pipeline", c.data.pipeline, "'device' with several devices or processes "
           "(streaming feeds one device)")
  spec = data_lib.spec_of(c.data)  # DataError: unknown, unprepared or not images
  hw = spec.image_shape[:2]
  need = data_lib.augment.min_image_size(c.data.augment)
  _check(c.data.augment == "none" or min(hw) >= need, "data.augment", c.data.augment,
         f"'none' for the {hw[0]}x{hw[1]} images of {spec.name}; it needs at least "
         f"{need}x{need}")
  for key, n, have in (("data.num_train", c.data.num_train, spec.num_train),
                       ("data.num_test", c.data.num_test, spec.num_test)):
    _check(spec.name == data_lib.MNIST or n <= have, key, n,
           f"at most the {have} examples of {spec.name} (0 = all)")
  # The sizes are known here except for MNIST read from an IDX directory (any count):
  # train.load_data checks those once loaded.
  if c.data.validation_size and (spec.name != data_lib.MNIST or c.data.source != "idx"):
    check_validation_split(c.data, spec.num_train, c.train.batch_size, spec.name)


def check_validation_split(d, have: int, batch_size: int, where: str) -> None:
  """`data.validation_size` held out of the `have` training examples of `where` leaves
  `data.num_train` (or, with 0, at least one batch of `batch_size`) to train on."""
  left = have - d.validation_size
  _check(left >= max(batch_size, d.num_train), "data.validation_size", d.validation_size,
         f"at most {have - max(batch_size, d.num_train)}: holding it out of the {have} "
         f"training examples of {where} must leave "
         + (f"data.num_train={d.num_train} to sample from" if d.num_train > batch_size else
            f"at least one batch (train.batch_size={batch_size}) to train on"))


def _validate_model(c) -> None:
  _validate_model_name(c)
  _one_of(c, "model.norm", models.NORMS)
  _one_of(c, "model.bn_position", models.BN_POSITIONS)
  _one_of(c, "model.activation", tuple(models.ACTIVATIONS))
  _one_of(c, "model.kernel_init", models.KERNEL_INITS)
  _one_of(c, "model.conv_implementation", CONV_IMPLEMENTATIONS)
  _one_of(c, "model.bn.variance", VARIANCES)
  widths = tuple(c.model.widths)
  _check(all(isinstance(w, int) and w > 0 for w in widths), "model.widths", widths,
         "a tuple of positive integers, e.g. '(100,100,100)'")
  needed = {"seed_cnn": 3, "seed1_cnn": 2, "resnet20": 3}.get(c.model.name)
  _check(not widths or needed is None or len(widths) == needed, "model.widths", widths,
         f"{needed} entries for {c.model.name}")
  _check(c.model.init_std > 0, "model.init_std", c.model.init_std, "a number > 0")
  _one_of(c, "model.resnet.shortcut", resnet.SHORTCUTS)
  if c.model.name == "resnet20":
    _check(c.model.bn_position == "before", "model.bn_position", c.model.bn_position,
           "'before' with model.name=resnet20 (its norms sit before the activations, as "
           "He et al.'s)")
    _check(c.model.resnet.shortcut != "A" or list(widths) == sorted(widths),
           "model.widths", widths, "non-decreasing widths with model.resnet.shortcut='A' "
           "(it zero-pads channels, it cannot drop them), or shortcut 'B'")
  _check(0 <= c.model.bn.momentum < 1, "model.bn.momentum", c.model.bn.momentum,
         "a number in [0, 1)")
  _check(c.model.bn.epsilon > 0, "model.bn.epsilon", c.model.bn.epsilon, "a number > 0")
  _check(isinstance(c.model.dropout, (int, float)) and 0 <= c.model.dropout < 1,
         "model.dropout", c.model.dropout, "a rate in [0, 1)")
  _check(isinstance(c.model.bn.bias_before, bool), "model.bn.bias_before",
         c.model.bn.bias_before, "True or False")
  _validate_norm_variant(c)


def _validate_optimizer(c) -> None:
  _one_of(c, "optimizer.schedule", SCHEDULES)
  lr = c.optimizer.learning_rate
  _check(isinstance(lr, (int, float)) and lr > 0, "optimizer.learning_rate", lr, "a number > 0")
  _check(0 <= c.optimizer.momentum < 1, "optimizer.momentum", c.optimizer.momentum,
         "a number in [0, 1)")
  _check(c.optimizer.warmup_steps >= 0, "optimizer.warmup_steps", c.optimizer.warmup_steps,
         "an integer >= 0")
  _check(c.optimizer.decay_factor > 0, "optimizer.decay_factor", c.optimizer.decay_factor,
         "a number > 0 (the learning rate is multiplied by it)")
  _check(c.optimizer.decay_every_steps >= 0, "optimizer.decay_every_steps",
         c.optimizer.decay_every_steps, "an integer >= 0")
  _check(c.optimizer.schedule != "step" or c.optimizer.decay_every_steps > 0,
         "optimizer.decay_every_steps", c.optimizer.decay_every_steps,
         "an integer > 0 when optimizer.schedule=step")
  bounds = c.optimizer.decay_boundaries
  _check(isinstance(bounds, (tuple, list))
         and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bounds)
         and list(bounds) == sorted(set(bounds)), "optimizer.decay_boundaries", bounds,
         "increasing integer steps > 0, e.g. '(32000,48000)'")
  _check(c.optimizer.schedule != "piecewise" or len(bounds) > 0,
         "optimizer.decay_boundaries", bounds,
         "at least one step when optimizer.schedule=piecewise, e.g. '(32000,48000)'")
  _check(c.optimizer.weight_decay >= 0, "optimizer.weight_decay", c.optimizer.weight_decay,
         "a number >= 0 (0 = no decay)")
  _one_of(c, "optimizer.weight_decay_mask", optim.WEIGHT_DECAY_MASKS)
  _check(c.optimizer.clip_global_norm >= 0, "optimizer.clip_global_norm",
         c.optimizer.clip_global_norm, "a number >= 0 (0 = no clipping)")
  optim.check_optimizer(c.optimizer)  # last: it builds the optimizer from the keys above


def _validate_train(c) -> None:
  t = c.train
  _check(isinstance(t.batch_size, int) and t.batch_size > 0, "train.batch_size", t.batch_size,
         "an integer > 0")
  _check(t.num_steps >= 0, "train.num_steps", t.num_steps,
         "an integer >= 0 (0 = train.num_epochs decides)")
  _check(t.num_epochs >= 0, "train.num_epochs", t.num_epochs, "an integer >= 0")
  _check(t.num_epochs or t.num_steps, "train.num_epochs", t.num_epochs,
         "num_epochs > 0 or num_steps > 0")
  _one_of(c, "train.loop", LOOPS)
  for key in ("steps_per_call", "log_every_steps", "eval_every_steps", "eval_every_epochs",
              "checkpoint_every_steps"):
    _check(isinstance(t[key], int) and t[key] >= 0, f"train.{key}", t[key], "an integer >= 0")
  _check(isinstance(t.unroll, int) and t.unroll >= 1, "train.unroll", t.unroll,
         "an integer >= 1")
  _check(isinstance(t.num_devices, int) and t.num_devices >= 0, "train.num_devices",
         t.num_devices, "an integer >= 0 (0 = every visible device)")
  _check(t.eval_batch_size > 0, "train.eval_batch_size", t.eval_batch_size, "an integer > 0")
  _check(t.collapse_loss_factor >= 0, "train.collapse_loss_factor", t.collapse_loss_factor,
         "a number >= 0 (0 = no loss rule)")
  for key in ("collapse_accuracy", "collapse_trained_accuracy"):
    _check(0 <= t[key] <= 1, f"train.{key}", t[key], "a number in [0, 1]")
  stats = tuple(t.eval_statistics)
  _check(bool(stats) and len(set(stats)) == len(stats)
         and all(s in ("running", "population", "batch") for s in stats),
         "train.eval_statistics", stats,
         "distinct names among ('running', 'population', 'batch'), e.g. "
         "'(\"running\",\"population\")'")
  _check("population" not in stats or (c.model.norm in ("batch", "none", "layer", "group")
                                        and not models.is_user_model(c.model.name)),
         "train.eval_statistics", stats,
         f"no 'population' with model.norm={c.model.norm!r} or a user model (Algorithm 2's "
         "recomputation is built for the built-in networks with norm=batch and the norms "
         "without running statistics)")
  _check(isinstance(t.population_examples, int) and t.population_examples > 0,
         "train.population_examples", t.population_examples, "an integer > 0")
  _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints,
         "an integer >= 1")
  _check(t.checkpoint_min_interval_secs >= 0, "train.checkpoint_min_interval_secs",
         t.checkpoint_min_interval_secs, "a number of seconds >= 0")
  _check(t.eval_every_steps > 0 or t.eval_every_epochs > 0, "train.eval_every_epochs",
         t.eval_every_epochs, "> 0 (or set train.eval_every_steps)")
  check_profile_steps(t)


def check_profile_steps(t, total_steps: int | None = None) -> None:
  """`train.profile_steps`: () or (start, stop) with 0 <= start < stop <= the run's steps
  (`total_steps`, else train.num_steps where set: epochs need the data's size)."""
  steps = tuple(t.profile_steps)
  _check(steps == () or (len(steps) == 2 and all(
      isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_INT for s in steps)
                         and steps[0] < steps[1]),
         "train.profile_steps", steps,
         "() (no trace) or two step numbers (start, stop) with 0 <= start < stop, e.g. '(10,20)'")
  total = total_steps or t.num_steps
  if steps and total:
    _check(steps[1] <= total, "train.profile_steps", steps,
           f"a stop step within the run's {total} steps")


def _validate_analysis(c) -> None:
  a = c.analysis
  if not models.is_user_model(c.model.name):  # a user model's: checked when it is built
    names = models.pre_activation_names(c.model.name)
    _check(all(layer in names for layer in a.layers), "analysis.layers", tuple(a.layers),
           f"names among {names} for {c.model.name}")
  _check(all(isinstance(u, int) and u >= 0 for u in a.units), "analysis.units",
         tuple(a.units), "unit indices >= 0")
  _check(all(0 <= q <= 100 for q in a.percentiles), "analysis.percentiles",
         tuple(a.percentiles), "numbers in [0, 100]")
  _check(a.num_examples > 0, "analysis.num_examples", a.num_examples, "an integer > 0")


def _validate_distributed(c) -> None:
  d = c.distributed
  _one_of(c, "distributed.cluster_detection", distributed.CLUSTER_DETECTION)
  address = d.coordinator_address
  _check(not address or distributed.valid_address(address), "distributed.coordinator_address",
         address, "'host:port' of process 0 (e.g. 'localhost:12345' or '10.0.0.1:12345'), "
         "or '' for a single process")
  _check(d.num_processes >= 0, "distributed.num_processes", d.num_processes,
         "an integer >= 0 (0 = detected from the cluster)")
  _check(d.process_id >= -1, "distributed.process_id", d.process_id,
         "an integer >= 0, or -1 (detected from the cluster)")
  _check(d.num_processes == 0 or d.process_id < d.num_processes, "distributed.process_id",
         d.process_id, f"an integer in [0, {d.num_processes - 1}] "
         f"(distributed.num_processes={d.num_processes})")
  ids = tuple(d.local_device_ids)
  _check(all(isinstance(i, int) and i >= 0 for i in ids) and len(set(ids)) == len(ids),
         "distributed.local_device_ids", ids, "distinct device indices >= 0, or () for all")
  _check(d.initialization_timeout > 0, "distributed.initialization_timeout",
         d.initialization_timeout, "an integer > 0 (seconds)")
  _check(isinstance(d.heartbeat_timeout, int) and d.heartbeat_timeout > 0,
         "distributed.heartbeat_timeout", d.heartbeat_timeout, "an integer > 0 (seconds)")
  if not d.cluster_detection:
    # Without detection every value must be given: the same address and count
    # on every process, and each its own process_id.
    given = {"coordinator_address": (bool(address), address, "'host:port' of process 0"),
             "num_processes": (d.num_processes > 0, d.num_processes,
                               "the number of processes (> 0)"),
             "process_id": (d.process_id >= 0, d.process_id,
                            "this process's index (0, 1, ...)")}
    if any(ok for ok, _, _ in given.values()):
      for key, (ok, value, what) in given.items():
        _check(ok, f"distributed.{key}", value,
               f"{what}: a multi-process run sets distributed.coordinator_address, "
               "num_processes and process_id together (or distributed.cluster_detection="
               "'auto' on a cluster that provides them)")


def _validate_model_name(c) -> None:
  """A built-in network, or a user model that imports and builds (nothing compiled)."""
  name = c.model.name
  if not isinstance(name, str) or not models.is_user_model(name):
    _check(name in models.MODELS, "model.name", name,
           f"one of {models.MODELS}, or 'package.module:factory' for your own Flax model")
    return
  try:
    models.build_model(c.model, dtype=models.compute_dtype(c.train.half_precision))
  except user_models.UserModelError as e:
    if "half_precision" in str(e):
      raise ConfigError(f"config.train.half_precision=True with config.model.name={name!r}: "
                        f"{e}") from None
    raise ConfigError(f"config.model.name={name!r} is unusable: {e}") from None


def check_model_runs(c, num_train: int | None = None, num_test: int | None = None) -> None:
  """UnusableModelError when a user's model fails, traced as the run of `c` will use it
  (`bnlab.models.user.run_problem`: nothing computed); nothing for the built-in networks.

  At train.batch_size, and at the evaluations' batch size: train.eval_batch_size, at
  most the examples evaluated, `num_test` (and `num_train` with train.final_train_eval)
  once the data is loaded, before that data.num_test / data.num_train where set.
  """
  name = c.model.name
  spec = data_lib.spec_of(c.data)
  inputs = spec.input_spec(data_lib.normalized(c.data))
  if not models.is_user_model(name):
    if spec.name != data_lib.MNIST:
      _check_builtin_takes(c, inputs, spec)
    return
  module = models.build_model(c.model, dtype=models.compute_dtype(c.train.half_precision))
  e = c.train.eval_batch_size
  counts = [num_test or c.data.num_test]
  if c.data.validation_size:
    counts.append(c.data.validation_size)
  if c.train.final_train_eval:
    counts.append(num_train or c.data.num_train)
  problem = user_models.run_problem(module, c.train.batch_size,
                                    [min(e, n) if n else e for n in counts],
                                    "batch" in tuple(c.train.eval_statistics), inputs,
                                    spec.num_classes)
  if problem:
    raise UnusableModelError(f"config.model.name={name!r} is unusable: {problem}")


def _check_builtin_takes(c, inputs, spec) -> None:
  """A built-in network traced (nothing computed) on the images of `spec`: one line
  instead of a shape error from inside the compiled step (e.g. images too small)."""
  model = models.build_model(c.model, num_classes=spec.num_classes)
  x = jax.ShapeDtypeStruct(*inputs.batch(2))
  try:
    jax.eval_shape(lambda x: model.init(models.init_rngs(jax.random.key(0)), x, train=False), x)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(
        f"config.model.name={c.model.name!r} cannot take the "
        f"{'x'.join(map(str, spec.image_shape))} images of data.name={spec.name!r} ({user_models.reason(e)}); choose a model for "
        "images of that size") from None


def _validate_norm_variant(c) -> None:
  bn, norm = c.model.bn, c.model.norm
  _one_of(c, "model.bn.running_average", RUNNING_AVERAGES)
  _check(bn.running_average == "ema" or norm != "flax_batch", "model.bn.running_average",
         bn.running_average, "'ema' with model.norm=flax_batch")
  _check(isinstance(bn.ghost_size, int) and bn.ghost_size > 0, "model.bn.ghost_size",
         bn.ghost_size, "an integer > 0")
  if norm == "ghost":
    _check(c.train.batch_size % bn.ghost_size == 0, "model.bn.ghost_size", bn.ghost_size,
           f"a divisor of train.batch_size={c.train.batch_size}")
  _check(bn.renorm_r_max >= 1, "model.bn.renorm_r_max", bn.renorm_r_max, "a number >= 1")
  _check(bn.renorm_d_max >= 0, "model.bn.renorm_d_max", bn.renorm_d_max, "a number >= 0")
  _check(isinstance(bn.renorm_warmup_steps, int) and bn.renorm_warmup_steps >= 0,
         "model.bn.renorm_warmup_steps", bn.renorm_warmup_steps, "an integer >= 0")
  for key in ("renorm_r_max_steps", "renorm_d_max_steps"):
    _check(isinstance(bn[key], int) and bn[key] >= bn.renorm_warmup_steps, f"model.bn.{key}",
           bn[key], f"an integer >= model.bn.renorm_warmup_steps={bn.renorm_warmup_steps}")
  _check(bn.noise_shift_max >= 0, "model.bn.noise_shift_max", bn.noise_shift_max,
         "a number >= 0")
  _check(bn.noise_scale_max >= 1, "model.bn.noise_scale_max", bn.noise_scale_max,
         "a number >= 1")
  _one_of(c, "model.bn.statistics", BN_STATISTICS)
  _check(isinstance(bn.num_groups, int) and bn.num_groups > 0, "model.bn.num_groups",
         bn.num_groups, "an integer > 0")
  if norm == "group" and not models.is_user_model(c.model.name):
    features = models.normalized_features(c.model, data_lib.spec_of(c.data).image_shape[:2])
    _check(all(f % bn.num_groups == 0 for f in features), "model.bn.num_groups",
           bn.num_groups, f"a divisor of every normalized layer's features {features}")


def _check_keys(c, expected, prefix: str) -> None:
  """Unknown, missing and wrongly typed keys, against `base_config()`'s defaults."""
  for key in c.keys():
    if key not in expected:
      raise ConfigError(
          f"config.{prefix}{key} is not a known key; known keys here: "
          f"{sorted(expected.keys())}")
  for key in expected.keys():
    name = f"config.{prefix}{key}"
    if key not in c:
      raise ConfigError(f"{name} is missing; start config files from "
                        "bnlab.config.base_config() and change what you need")
    want, value = expected[key], c[key]
    if isinstance(want, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"{name} must be a section (ConfigDict), got {value!r}")
      if f"{prefix}{key}" not in FREE_FORM:
        _check_keys(value, want, f"{prefix}{key}.")
    elif isinstance(want, bool):
      _check(isinstance(value, bool), f"{prefix}{key}", value, "True or False")
    elif isinstance(want, (int, float)):
      ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
            and (isinstance(value, int) or not isinstance(want, int))
            and math.isfinite(value))
      kind = "an integer" if isinstance(want, int) else "a finite number"
      _check(ok, f"{prefix}{key}", value, kind)
      limit = MAX_SEED if f"{prefix}{key}" == "seed" else MAX_INT
      _check(not isinstance(value, int) or abs(value) <= limit, f"{prefix}{key}", value,
             f"{kind} of magnitude <= {limit}")
    elif isinstance(want, str):
      _check(isinstance(value, str), f"{prefix}{key}", value, "a string")
    elif isinstance(want, tuple):
      _check(isinstance(value, (tuple, list)), f"{prefix}{key}", value,
             "a tuple, e.g. '(1,2)'")
