"""`python -m bnlab.sweep`: its flags, reading the sweep file, and `--dry_run`'s listing.

The usage text absl prints for `--help` is the package's docstring
(`bnlab/sweep/__init__.py`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from typing import Sequence

from bnlab import config as config_lib
from bnlab.sweep.combinators import Variant, format_value
from bnlab.sweep.groups import Member, plan
from bnlab.sweep.runner import check_members_config, error_line, planned_status, run_sweep


def load_config_file(path: str):
  """The module of a config file, imported from its path (independent of cwd)."""
  name = "bnlab_cfg_" + re.sub(r"\W", "_", os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:
    raise config_lib.ConfigError(f"config file {path!r} cannot be imported")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def dry_run_listing(members: Sequence[Member], groups: Sequence[Sequence[Member]],
                    workdir: str) -> tuple[str, dict]:
  """(a table, a JSON-able object) of the selected members: group, name, status.

  The status is the one the sweep would record now (`planned_status`): "to train",
  "done", "diverged" or "failed" (with its "error": a member whose model fails its
  check, or a finished one whose records were cut short).
  """
  group_of = {m.name: i for i, g in enumerate(groups) for m in g}
  entries = []
  for m in members:
    if m.name not in group_of:
      continue
    status, error = planned_status(m, os.path.join(workdir, m.name))
    entry = {"name": m.name, "group": group_of[m.name], "status": status,
             "overrides": {k: format_value(v) if isinstance(v, Variant) else v
                           for k, v in m.overrides.items()}}
    if error:
      entry["error"] = error
    entries.append(entry)
  width = max(len("member"), *(len(e["name"]) for e in entries))
  lines = [f"{'group':>5}  {'member':<{width}}  status"]
  lines += [f"{e['group']:>5}  {e['name']:<{width}}  {e['status']}"
            + (f" ({e['error']})" if "error" in e else "") for e in entries]
  listing = {"members": len(members), "selected": len(entries), "groups": len(groups),
             "to_train": sum(e["status"] == "to train" for e in entries),
             "failed": sum(e["status"] == "failed" for e in entries), "list": entries}
  return "\n".join(lines), listing


def main(argv):
  """`python -m bnlab.sweep`: --config (a sweep file), --workdir, --grouped, --max_group_size,
  --num_workers, --launcher, --ray_address, --dry_run, --only."""
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from bnlab.engine import backend  # pylint: disable=g-import-not-at-top
  from bnlab import data as data_lib  # pylint: disable=g-import-not-at-top
  from bnlab import main as main_lib  # pylint: disable=g-import-not-at-top
  from bnlab.rundir import errors as rundir_errors  # pylint: disable=g-import-not-at-top
  from bnlab.rundir import logs as rundir_logs  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  rundir_logs.quiet_library_logs()
  f = flags.FLAGS
  path = f["config"].config_filename
  try:
    base = main_lib.loaded_config()
    module = load_config_file(path)
    if not hasattr(module, "get_sweep"):
      raise config_lib.ConfigError(f"{path} defines no get_sweep()")
    try:
      sweep = module.get_sweep()
      sweep = list(sweep)
    except Exception as e:  # pylint: disable=broad-except
      raise config_lib.ConfigError(
          f"{path}: get_sweep() failed ({error_line(e)[:300]}); fix the sweep file (it must "
          "return a list of override dicts)") from None
    # The command line's --config.KEY values, applied to every member last.
    overrides = {**config_flags.get_override_values(f["config"]), **main_lib.FREE_FORM_VALUES}
    backend.configure_run(base)  # before JAX starts
    if f.dry_run:
      members, groups = plan(base, sweep, f.grouped, overrides, f.only, f.max_group_size,
                             f.num_workers)
      if os.path.isdir(f.workdir or ""):
        check_members_config(members, f.workdir)
      table, listing = dry_run_listing(members, groups, f.workdir)
      print(table)
      print(json.dumps(listing))
      return
    rows = run_sweep(base, sweep, f.workdir, grouped=f.grouped,
                     overrides=overrides, only=f.only, max_group_size=f.max_group_size,
                     num_workers=f.num_workers, launcher=f.launcher,
                     ray_address=f.ray_address)
  except (config_lib.ConfigError, data_lib.DataError, rundir_errors.WorkDirError,
          backend.BackendError) as e:
    if logging.get_verbosity() >= logging.DEBUG:
      raise
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt as e:
    if logging.get_verbosity() >= logging.DEBUG:
      raise
    main_lib.interrupted(e)
  counts: dict[str, int] = {}
  for r in rows:
    counts[r["status"]] = counts.get(r["status"], 0) + 1
  print(json.dumps({"members": len(rows), **counts,
                    "results": os.path.join(f.workdir, "results.csv")}))


def define_flags() -> None:
  """The sweep's own flags (--config and --workdir are bnlab.main's)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_bool(
      "grouped", True, "Train members that differ only in seed, learning rate or momenta as "
      "one program.")
  flags.DEFINE_bool("dry_run", False,
                    "List the members, their groups and status (a table, then one JSON line); "
                    "train nothing.")
  flags.DEFINE_integer("max_group_size", 0,
                       "Train at most this many members as one program (0: as many as fit "
                       "the device's memory); larger groups train in chunks.", lower_bound=0)
  define_scale_flags()
  flags.DEFINE_string("only", None,
                      "Run only the members whose name contains this text, or matches it as "
                      "a glob (with * ? [), e.g. --only='*seed=0'.")


def define_scale_flags() -> None:
  """The flags that spread a sweep (or a study's runs) over workers, shared with bnlab.study."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_integer("num_workers", 0,
                       "Cut the groups until there are at least this many, one per worker "
                       "(0: as large as memory allows). Every worker of a directory needs "
                       "the same value.", lower_bound=0)
  flags.DEFINE_enum("launcher", "local", ["local", "ray"],
                    "local: train here, the groups that no other worker on the directory "
                    "has claimed; ray: each group a Ray task (pip install 'bnlab[ray]').")
  flags.DEFINE_string("ray_address", "",
                      "With --launcher=ray: the cluster, auto or HOST:PORT (empty: start a "
                      "local Ray).")


def run():
  """The entry point; --config and --workdir are bnlab.main's."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from bnlab import main as main_lib  # pylint: disable=g-import-not-at-top
  define_flags()
  # --helpshort lists the key flags of the program run (sys.argv[0]): these.
  for name in ("config", "workdir", "grouped", "max_group_size", "num_workers", "launcher",
               "ray_address", "dry_run", "only"):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
  app.run(main, flags_parser=main_lib.parse_flags)
