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
`--helpshort` lists these flags.
"""

from __future__ import annotations

import csv
import dataclasses
import fnmatch
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import sys
import time
from typing import Any, Iterable, Sequence

import ml_collections

from bnlab import config as config_lib

TARGET_ACCURACY = 0.97
# Longer member names are cut, and end with a hash of the whole name (distinct).
MAX_NAME = 200
RESULT_FIELDS = ("test_accuracy", "test_loss", "train_loss", "diverged", "diverged_at_step",
                 "steps_to_97", "final_step", "wall_time")


# -- combinators ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Variant:
  """A labelled bundle of overrides, used as one value of a sweep key."""

  label: str
  overrides: dict

  def __str__(self) -> str:
    return self.label


def axis(key: str, values: Iterable) -> list[dict]:
  """One member per value: [{key: v} for v in values]."""
  return [{key: v} for v in values]


def product(*sweeps: Sequence[dict]) -> list[dict]:
  """Every combination, the last sweep varying fastest; later keys win."""
  out = []
  for combo in itertools.product(*sweeps):
    merged = {}
    for d in combo:
      merged.update(d)
    out.append(merged)
  return out


def zip_(*sweeps: Sequence[dict]) -> list[dict]:
  """Members side by side: the i-th member merges the i-th of each sweep."""
  lengths = [len(s) for s in sweeps]
  if len(set(lengths)) > 1:
    raise ValueError(f"zip_ needs sweeps of equal length; got lengths {lengths}")
  return [dict(kv for d in members for kv in d.items()) for members in zip(*sweeps)]


def seeds(n: int) -> list[dict]:
  """`n` seeds: axis("seed", range(n))."""
  return axis("seed", range(n))


def variants(key: str, bundles: dict[str, dict]) -> list[dict]:
  """One member per labelled bundle of overrides: {key: Variant(label, overrides)}."""
  return axis(key, [Variant(label, dict(o)) for label, o in bundles.items()])


def config_overrides(cfg, base=None) -> dict[str, Any]:
  """The dotted keys where `cfg` differs from `base` (default: `base_config()`)."""
  base = config_lib.base_config() if base is None else base
  a, b = config_lib.flatten(cfg.to_dict()), config_lib.flatten(base.to_dict())
  return {k: v for k, v in a.items() if b.get(k, object()) != v}


def load_config_file(path: str):
  """The module of a config file, imported from its path (independent of cwd)."""
  name = "bnlab_cfg_" + re.sub(r"\W", "_", os.path.abspath(path))
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None:
    raise config_lib.ConfigError(f"config file {path!r} cannot be imported")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# -- members --------------------------------------------------------------------

@dataclasses.dataclass
class Member:
  """One run of a sweep: its overrides, directory name and resolved config."""

  index: int
  name: str
  overrides: dict
  cfg: Any


def _format_value(v) -> str:
  if isinstance(v, Variant):
    return v.label
  if isinstance(v, bool):
    return str(v).lower()
  if isinstance(v, float):
    s = f"{v:g}"
    return s if float(s) == v else repr(v)
  if isinstance(v, (tuple, list)):
    return "-".join(_format_value(x) for x in v)
  return str(v)


def member_name(overrides: dict) -> str:
  """A readable directory name: `key=value` pairs in order, keys by their last part.

  A `Variant` shows as its label; a last part shared by two keys stays dotted.
  """
  if not overrides:
    return "base"
  lasts = [k.rsplit(".", 1)[-1] for k in overrides]
  parts = []
  for key, last, value in zip(overrides, lasts, overrides.values()):
    if isinstance(value, Variant):
      parts.append(value.label)
    else:
      shown = last if lasts.count(last) == 1 else key
      parts.append(f"{shown}={_format_value(value)}")
  name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))
  if len(name) > MAX_NAME:  # a directory name holds at most 255 bytes
    digest = hashlib.sha1(",".join(parts).encode()).hexdigest()[:12]
    name = f"{name[:MAX_NAME - 18]},hash={digest}"
  return name


def apply_overrides(base, overrides: dict, where: str = "sweep member"):
  """A copy of `base` with `overrides` (dotted keys; `Variant`s expanded) set."""
  cfg = base.copy_and_resolve_references()
  items = []
  for key, value in overrides.items():
    if isinstance(value, Variant):
      items.extend(value.overrides.items())
    else:
      items.append((key, value))
  for key, value in items:
    *path, last = key.split(".")
    node = cfg
    try:
      for part in path:
        node = node[part]
      if not isinstance(node, ml_collections.ConfigDict) or last not in node:
        raise KeyError(key)
      if isinstance(node[last], tuple) and isinstance(value, list):
        value = tuple(value)
      node[last] = value
    except (KeyError, AttributeError):
      raise config_lib.ConfigError(
          f"{where}: {key!r} is not a key of the config (keys and defaults are in "
          "bnlab/config.py)") from None
    except (TypeError, ValueError) as e:
      raise config_lib.ConfigError(f"{where}: bad value {value!r} for {key!r}: {e}") from None
  return cfg


def resolve_members(base, sweep: Sequence[dict], overrides: dict | None = None
                    ) -> list[Member]:
  """The sweep's members with their resolved configs, all validated first.

  `overrides` (dotted keys, e.g. the command line's) are applied to every
  member after its own, so they win. Raises ConfigError naming the member and
  the key at the first problem.
  """
  if not sweep:
    raise config_lib.ConfigError("the sweep has no members")
  members, seen, same = [], {}, {}
  for i, member_overrides in enumerate(sweep):
    if not isinstance(member_overrides, dict):
      raise config_lib.ConfigError(
          f"sweep member {i} is {type(member_overrides).__name__} "
          f"{' '.join(repr(member_overrides).split())[:80]}, not a dict of overrides; "
          "get_sweep() must return a list of dicts such as {'optimizer.learning_rate': 0.1}")
    name = member_name(member_overrides)
    where = f"sweep member {i} ({name})"
    if name in seen:
      j = seen[name]
      if repr(sweep[j]) == repr(member_overrides):
        raise config_lib.ConfigError(
            f"{where} has the same name as member {j}: it repeats its overrides; remove one")
      raise config_lib.ConfigError(
          f"sweep members {j} and {i} both get the directory name {name!r} (their values "
          f"differ only in characters a directory name cannot hold, which become '_': "
          f"{sweep[j]!r} and {member_overrides!r}); give one of them other values, or "
          "labels with sweep.Variant")
    seen[name] = i
    cfg = apply_overrides(base, member_overrides, where)
    if overrides:
      cfg = apply_overrides(cfg, overrides, "command line")
    try:
      config_lib.validate(cfg)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"{where}: {e}") from None
    resolved = json.dumps(json.loads(cfg.to_json_best_effort()), sort_keys=True)
    if resolved in same:  # e.g. the same overrides in another order: one run, twice
      j = same[resolved]
      raise config_lib.ConfigError(
          f"{where} has the same config as member {j} ({members[j].name}): the two would be "
          "one run counted twice; remove one")
    same[resolved] = i
    members.append(Member(i, name, dict(member_overrides), cfg))
  return members


def _expanded_keys(overrides: dict) -> set[str]:
  keys = set()
  for key, value in overrides.items():
    keys.update(value.overrides if isinstance(value, Variant) else (key,))
  return keys


def select(members: Sequence[Member], only: str | None) -> list[Member]:
  """The members `--only` names: a substring of their name, or a glob (with * ? [)."""
  if not only:
    return list(members)
  if any(c in only for c in "*?["):
    chosen = [m for m in members if fnmatch.fnmatchcase(m.name, only)]
  else:
    chosen = [m for m in members if only in m.name]
  if not chosen:
    names = ", ".join(m.name for m in members[:5]) + (", ..." if len(members) > 5 else "")
    raise config_lib.ConfigError(
        f"--only={only!r} matches none of the {len(members)} members ({names}); give a part "
        "of a member's name, or a glob such as '*seed=0'")
  return chosen


def group_members(members: Sequence[Member], grouped: bool = True,
                  max_group_size: int | None = None) -> list[list[Member]]:
  """Members that can train together (`bnlab.engine.members.group_key`), in sweep order.

  Members whose model does not gain from grouping here (`bnlab.engine.members.grouping_helps`)
  run alone. A group larger than `max_group_size` members (None or 0: as many
  as fit the device's memory, `bnlab.engine.members.group_capacity`) trains in the
  fewest near-equal chunks, each its own group; the same sweep on the same
  device (or with the same `max_group_size`) always chunks alike.
  """
  from bnlab.engine import members as members_lib  # pylint: disable=g-import-not-at-top
  if not grouped:
    return [[m] for m in members]
  groups: dict[str, list[Member]] = {}
  for m in members:
    key = (members_lib.group_key(m.cfg) if members_lib.grouping_helps(m.cfg)
           else f"solo {m.index}")
    groups.setdefault(key, []).append(m)
  out = []
  for group in groups.values():
    capacity = max_group_size or (
        len(group) if len(group) == 1
        else members_lib.group_capacity(group[0].cfg, wanted=len(group)))
    out.extend(members_lib.chunks(group, capacity))
  return out


def _group_id(group: Sequence[Member]) -> str:
  """The group's directory name: its members and configs, less what may change on resume.

  So a group resumes in the same directory after its length (or another key of
  `config.RESUME_SAFE_KEYS`) changed; its config check decides whether it may.
  """
  changeable = config_lib.RESUME_SAFE_KEYS + config_lib.LENGTH_KEYS
  parts = []
  for m in group:
    flat = config_lib.flatten(json.loads(m.cfg.to_json_best_effort()))
    parts.append([m.name, {k: v for k, v in sorted(flat.items()) if k not in changeable}])
  return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:12]


# -- running ----------------------------------------------------------------------

def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split()) or type(e).__name__
  return f"{type(e).__name__}: {text}"[:2000]


def plan(base, sweep: Sequence[dict], grouped: bool = True, overrides: dict | None = None,
         only: str | None = None, max_group_size: int | None = None
         ) -> tuple[list[Member], list[list[Member]]]:
  """(every member, the groups of the selected members) of a sweep, nothing trained."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  members = resolve_members(base, sweep, overrides)
  clash = sorted(set(overrides or {}) & set().union(*(_expanded_keys(m.overrides)
                                                      for m in members)))
  if clash:
    logging.warning("The command line sets %s in every member, over the sweep's own values",
                    ", ".join(clash))
  return members, group_members(select(members, only), grouped, max_group_size)


def run_sweep(base, sweep: Sequence[dict], workdir: str, grouped: bool = True,
              overrides: dict | None = None, only: str | None = None,
              max_group_size: int | None = None) -> list[dict]:
  """Runs (or resumes) every member of `sweep` over `base`; returns the result rows.

  Every member is validated before anything trains. A member that raises is
  recorded as failed (its error on one line) and the others go on.
  `overrides` win over the members' own (see the module docstring); `only`
  selects the members to run (`select`); `max_group_size` caps a group's
  members (`group_members`; default: what fits the device's memory). The rows
  cover every member.
  """
  from absl import logging  # pylint: disable=g-import-not-at-top
  from bnlab.engine import train  # pylint: disable=g-import-not-at-top
  from bnlab.rundir import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  members, groups = plan(base, sweep, grouped, overrides, only, max_group_size)
  make_sweep_dir(workdir)
  lock_path = os.path.join(workdir, ".sweep-lock")
  lock = workdir_lib.acquire_lock(lock_path, os.path.abspath(workdir), "sweep directory")
  try:
    check_members_config(members, workdir)
    return _run_groups(members, groups, workdir)
  finally:
    workdir_lib.release_lock(lock_path, lock)


def make_sweep_dir(workdir: str) -> None:
  """Creates the sweep's directory; WorkDirError (one line) when it cannot be."""
  from bnlab.rundir import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if not isinstance(workdir, str) or not workdir.strip():
    raise workdir_lib.WorkDirError(
        f"the work directory is empty ({workdir!r}); give one with --workdir=DIR")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise workdir_lib.WorkDirError(
        f"--workdir={workdir} is a file, not a directory; choose another --workdir")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise workdir_lib.WorkDirError(
        f"sweep directory {workdir} cannot be created ({e.strerror or e}); "
        "choose another --workdir") from None


def check_members_config(members: Sequence[Member], workdir: str) -> None:
  """ConfigError when a member's directory holds a run of another config than its own now.

  A finished member would otherwise be reported done with the results of the
  old config (the sweep file or its base config changed since).
  """
  stale = []
  for m in members:
    d = os.path.join(workdir, m.name)
    try:
      ran = os.path.exists(os.path.join(d, "summary.json")) or any(
          n.isdigit() for n in os.listdir(os.path.join(d, "checkpoints")))
    except OSError:
      ran = False
    if not ran:
      continue
    try:
      with open(os.path.join(d, "config.json")) as f:
        old = json.load(f)
      a = config_lib.flatten(old)
    except (OSError, ValueError, AttributeError):
      continue  # training the member reports it
    b = config_lib.flatten(json.loads(m.cfg.to_json_best_effort()))
    refused, _ = config_lib.resume_refusal(a, b)
    if refused:
      k = refused[0]
      stale.append(f"{m.name} ({k}: {a.get(k)!r} -> {b.get(k)!r})")
  if stale:
    raise config_lib.ConfigError(
        f"{len(stale)} member(s) in {workdir} ran with another config than the sweep gives "
        f"them now (the sweep or its base config changed): {'; '.join(stale[:3])}"
        f"{'; ...' if len(stale) > 3 else ''}; use a new --workdir for the changed sweep, "
        "or move those members' directories aside to rerun them")


def _run_groups(members: Sequence[Member], groups, workdir: str) -> list[dict]:
  """Trains the groups (the sweep's lock held); the rows of every member."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from bnlab.engine import train  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from bnlab.engine import members as members_lib  # pylint: disable=g-import-not-at-top
  errors: dict[str, str] = {}
  datasets: dict[str, Any] = {}
  programs = None  # what the compiled programs in memory were made for
  logging.info("Sweep of %d members, %d selected in %d groups, in %s", len(members),
               sum(len(g) for g in groups), len(groups), workdir)
  for group in groups:
    dirs = [os.path.join(workdir, m.name) for m in group]
    if all(train.is_complete(m.cfg, d) for m, d in zip(group, dirs)):
      continue
    # A group whose programs differ from the last one's (another model, or
    # group size) first drops the compiled programs in memory: a long sweep's
    # compiled code, and its memory mappings, would otherwise grow without
    # bound (XLA:CPU maps every executable; Linux allows ~65,000 mappings).
    # The persistent compilation cache makes a program needed again cheap;
    # runs of one model one after another keep theirs.
    made_for = (members_lib.group_key(group[0].cfg), len(group))
    if programs not in (None, made_for):
      jax.clear_caches()
    programs = made_for
    start = time.perf_counter()
    try:
      data_key = json.dumps(group[0].cfg.data.to_dict(), sort_keys=True) + str(
          group[0].cfg.train.batch_size)
      if data_key not in datasets:
        datasets.clear()
        datasets[data_key] = train.load_data(group[0].cfg)
      data = datasets[data_key]
      if len(group) == 1:
        train.train_and_evaluate(group[0].cfg, dirs[0], data)
      else:
        train.train_group([m.cfg for m in group], dirs,
                          os.path.join(workdir, "_groups", _group_id(group)), data)
    except Exception as e:  # pylint: disable=broad-except
      message = _one_line(e)
      # A member that finished before keeps its results.
      failed = [m for m, d in zip(group, dirs) if not train.is_complete(m.cfg, d)]
      logging.error("Sweep members %s failed: %s", [m.name for m in failed], message)
      for m in failed:
        errors[m.name] = message
    logging.info("Finished %d member(s) in %.1f s", len(group), time.perf_counter() - start)
  rows = [_result_row(m, os.path.join(workdir, m.name), errors.get(m.name)) for m in members]
  write_results(workdir, rows)
  return rows


def steps_to_accuracy(records: Iterable[dict], target: float = TARGET_ACCURACY):
  """The first step whose test accuracy is >= `target`, or None."""
  for r in records:
    if r.get("test_accuracy") is not None and r["test_accuracy"] >= target:
      return r["step"]
  return None


def records_cut_short(path: str, summary: dict, records: list[dict]) -> str | None:
  """Why a finished run's records in `path` cannot be read as its history, or None.

  A run's last record is at the step it finished (or stopped) at, summary.json's
  `final_step`; records ending before it were cut short, replaced or removed.
  """
  final = summary.get("final_step")
  last = records[-1].get("step") if records else None
  if final is None or last == final:
    return None
  metrics = os.path.join(path, "metrics.jsonl")
  if records and last > final:
    return (f"{metrics} goes on to step {last}, past the step {final} the run finished at "
            "(summary.json): a longer run was started there and stopped; rerun it with "
            "that length to finish it")
  held = f"ends at step {last}" if records else "holds no records"
  return (f"{metrics} {held}, but the run finished at step {final} (summary.json): its "
          "records were cut short or replaced; put them back, or move the run's directory "
          "aside and rerun to train it again")


def _read_jsonl(path: str) -> list[dict]:
  """The records of a metrics.jsonl, NaN/inf restored (stored as null: bnlab.rundir.workdir)."""
  from bnlab.rundir import workdir  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(workdir.decode_nonfinite(json.loads(line)))
      except json.JSONDecodeError:
        break
  return out


def _result_row(m: Member, path: str, error: str | None) -> dict:
  row: dict[str, Any] = {"name": m.name}
  for key, value in m.overrides.items():
    row[key] = _format_value(value) if isinstance(value, Variant) else value
  summary = None
  summary_path = os.path.join(path, "summary.json")
  if os.path.exists(summary_path):
    from bnlab.rundir import workdir  # pylint: disable=g-import-not-at-top
    try:
      summary = workdir.read_summary_file(summary_path)
    except workdir.WorkDirError as e:
      error = error or str(e)
  records = _read_jsonl(os.path.join(path, "metrics.jsonl"))
  if summary is not None:
    error = error or records_cut_short(path, summary, records)
  if error is not None or summary is None:
    row["status"] = "failed" if error else "unfinished"
    row.update({k: None for k in RESULT_FIELDS})
  else:
    row["status"] = "diverged" if summary.get("diverged") else "done"
    for key in RESULT_FIELDS:
      value = summary.get(key)
      row[key] = None if isinstance(value, float) and not math.isfinite(value) else value
    row["steps_to_97"] = steps_to_accuracy(records)
  row["error"] = error
  return row


def write_results(workdir: str, rows: list[dict]) -> None:
  """`results.json` (a list of rows) and `results.csv` (empty cells for None)."""
  columns: list[str] = []
  for row in rows:
    columns.extend(k for k in row if k not in columns)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(rows, f, indent=1)
    f.write("\n")
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})


def load_results(workdir: str) -> list[dict]:
  """The rows of a sweep's results.json."""
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


# -- command line -------------------------------------------------------------------

def dry_run_listing(members: Sequence[Member], groups: Sequence[Sequence[Member]],
                    workdir: str) -> tuple[str, dict]:
  """(a table, a JSON-able object) of the selected members: group, name, status."""
  from bnlab.engine import train  # pylint: disable=g-import-not-at-top
  group_of = {m.name: i for i, g in enumerate(groups) for m in g}
  entries = []
  for m in members:
    if m.name not in group_of:
      continue
    done = train.is_complete(m.cfg, os.path.join(workdir, m.name))
    entries.append({"name": m.name, "group": group_of[m.name],
                    "status": "done" if done else "to train",
                    "overrides": {k: _format_value(v) if isinstance(v, Variant) else v
                                  for k, v in m.overrides.items()}})
  width = max(len("member"), *(len(e["name"]) for e in entries))
  lines = [f"{'group':>5}  {'member':<{width}}  status"]
  lines += [f"{e['group']:>5}  {e['name']:<{width}}  {e['status']}" for e in entries]
  listing = {"members": len(members), "selected": len(entries), "groups": len(groups),
             "to_train": sum(e["status"] == "to train" for e in entries), "list": entries}
  return "\n".join(lines), listing


def main(argv):
  """`python -m bnlab.sweep`: --config (a sweep file), --workdir, --grouped, --max_group_size,
  --dry_run, --only."""
  from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from bnlab.engine import backend  # pylint: disable=g-import-not-at-top
  from bnlab import data as data_lib  # pylint: disable=g-import-not-at-top
  from bnlab import main as main_lib  # pylint: disable=g-import-not-at-top
  from bnlab.rundir import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir_lib.quiet_library_logs()
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
          f"{path}: get_sweep() failed ({_one_line(e)[:300]}); fix the sweep file (it must "
          "return a list of override dicts)") from None
    # The command line's --config.KEY values, applied to every member last.
    overrides = dict(config_flags.get_override_values(f["config"]))
    backend.configure_run(base)  # before JAX starts
    if f.dry_run:
      members, groups = plan(base, sweep, f.grouped, overrides, f.only, f.max_group_size)
      if os.path.isdir(f.workdir or ""):
        check_members_config(members, f.workdir)
      table, listing = dry_run_listing(members, groups, f.workdir)
      print(table)
      print(json.dumps(listing))
      return
    rows = run_sweep(base, sweep, f.workdir, grouped=f.grouped,
                     overrides=overrides, only=f.only, max_group_size=f.max_group_size)
  except (config_lib.ConfigError, data_lib.DataError, workdir_lib.WorkDirError,
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
  flags.DEFINE_string("only", None,
                      "Run only the members whose name contains this text, or matches it as "
                      "a glob (with * ? [), e.g. --only='*seed=0'.")


def run():
  """The entry point; --config and --workdir are bnlab.main's."""
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from bnlab import main as main_lib  # pylint: disable=g-import-not-at-top
  define_flags()
  # --helpshort lists the key flags of the program run (sys.argv[0]): these.
  for name in ("config", "workdir", "grouped", "max_group_size", "dry_run", "only"):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])
  app.run(main, flags_parser=main_lib.parse_flags)
