"""Sweeps: lists of config overrides, run as member sub-directories of one work directory.

A sweep is a list of override dicts, built with small combinators:

  product(axis("model.norm", ["batch", "none"]),
          axis("optimizer.learning_rate", [0.01, 0.1]), seeds(3))

Keys are dotted config paths. A `Variant` value stands for a bundle of
overrides under a short label (e.g. a whole model config), see `variants`.

A sweep config file defines `get_config()` (the base run config) and
`get_sweep()`; run it with

  python -m bnlab.sweep --config=configs/sweeps/lr_sweep.py --workdir=DIR

Each member runs in `DIR/<name>` (its overrides, e.g.
`norm=none,learning_rate=0.01,seed=2`) exactly like `bnlab.main` would.
Members whose configs differ only in `seed`, constant learning rate,
`optimizer.momentum`, `model.bn.momentum`, `model.bn.epsilon` and the
initializer (`model.kernel_init`, `model.init_std`) train together as one vmapped
program (`bnlab.engine.train.train_group`, group checkpoints in `DIR/_groups/`), in
chunks of as many members as fit the device's memory (`--max_group_size`
caps them). Finished members are skipped on rerun (a member made
longer by a raised `train.num_steps` continues). `DIR/results.csv` and
`DIR/results.json` hold one row per member; `load_results(DIR)` reads them.

Precedence, lowest first: the config file's `get_config()`, each member's
overrides, then `--config.KEY=VALUE` on the command line, applied to every
member last: `--config.train.num_steps=100` makes every member 100 steps
long, even where the sweep sets `train.num_steps` per member (a warning names
such keys). Member names come from the sweep's overrides only.

Flags: `--dry_run` lists the members, their groups and whether each is done,
and trains nothing; `--only=PATTERN` runs only the members whose name
contains PATTERN, or matches it as a glob when it has `*`, `?` or `[`
(results.csv still lists every member); `--grouped=false` runs every member
alone; `--max_group_size=N` trains at most N members as one program;
`--num_workers=N` cuts the groups until there are N; `--launcher=ray`
(with `--ray_address`) trains each group as a Ray task; `--helpshort` lists
these flags. Any number of processes may run one sweep in one directory at
once, each training the groups it claims (docs/scale-out.md).
"""

from bnlab.sweep.cli import define_flags, dry_run_listing, load_config_file, main, run
from bnlab.sweep.combinators import (MAX_NAME, Variant, apply_overrides, axis, config_overrides,
                                     format_value, member_name, product, seeds, variants, zip_)
from bnlab.sweep.groups import (Member, group_members, plan, resolve_members, select,
                                 split_for_workers)
from bnlab.sweep.results import (RESULT_FIELDS, TARGET_ACCURACY, load_results, read_jsonl,
                                 records_cut_short, steps_to_accuracy, write_results)
from bnlab.sweep.runner import check_members_config, group_id, make_sweep_dir, run_sweep
