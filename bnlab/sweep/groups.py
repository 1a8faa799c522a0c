"""A sweep's members: resolved and validated, selected by `--only`, grouped to train together.

`plan` is all of it, before anything trains, so `--dry_run` and `run_sweep`
see the same members in the same groups.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from typing import Any, Sequence

from bnlab import config as config_lib
from bnlab.sweep.combinators import Variant, apply_overrides, member_name


@dataclasses.dataclass
class Member:
  """One run of a sweep: its overrides, directory name and resolved config.

  `unusable`: why its model cannot train as its config runs it (its check's
  UnusableModelError, one line), or None. Such a member is not trained and is
  recorded failed with that line; the others train.
  """

  index: int
  name: str
  overrides: dict
  cfg: Any
  unusable: str | None = None


def resolve_members(base, sweep: Sequence[dict], overrides: dict | None = None
                    ) -> list[Member]:
  """The sweep's members with their resolved configs, all validated first.

  `overrides` (dotted keys, e.g. the command line's) are applied to every
  member after its own, so they win. Raises ConfigError naming the member and
  the key at the first problem, except for a model that fails when traced at
  the member's batch sizes (`config.check_model_runs`, validate's last check):
  that member gets `unusable`, since another member (another batch size or
  model) may train.
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
    unusable = None
    try:
      config_lib.validate(cfg)
    except config_lib.UnusableModelError as e:
      unusable = f"{type(e).__name__}: {' '.join(str(e).split())}"
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"{where}: {e}") from None
    resolved = json.dumps(json.loads(cfg.to_json_best_effort()), sort_keys=True)
    if resolved in same:  # e.g. the same overrides in another order: one run, twice
      j = same[resolved]
      raise config_lib.ConfigError(
          f"{where} has the same config as member {j} ({members[j].name}): the two would be "
          "one run counted twice; remove one")
    same[resolved] = i
    members.append(Member(i, name, dict(member_overrides), cfg, unusable))
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
                  max_group_size: int | None = None,
                  num_workers: int | None = None) -> list[list[Member]]:
  """Members that can train together (`bnlab.engine.members.group_key`), in sweep order.

  Members whose model does not gain from grouping here (`bnlab.engine.members.grouping_helps`)
  run alone, as do members whose data streams (`members.streams`: one run, one device) and
  each `unusable` member (its model is neither traced nor sized).
  A group larger than `max_group_size` members (None or 0: as many as fit the
  device's memory, `bnlab.engine.members.group_capacity`) trains in the
  fewest near-equal chunks, each its own group; the same sweep on the same
  device (or with the same `max_group_size`) always chunks alike. With
  `num_workers`, groups are cut further (`split_for_workers`) until there are
  at least that many, so each worker gets one.
  """
  from bnlab.engine import members as members_lib  # pylint: disable=g-import-not-at-top
  if not grouped:
    return [[m] for m in members]
  groups: dict[str, list[Member]] = {}
  for m in members:
    solo = (m.unusable or members_lib.streams(m.cfg)
            or not members_lib.grouping_helps(m.cfg))
    key = f"solo {m.index}" if solo else members_lib.group_key(m.cfg)
    groups.setdefault(key, []).append(m)
  counts = []
  for group in groups.values():
    capacity = max_group_size or (
        len(group) if len(group) == 1
        else members_lib.group_capacity(group[0].cfg, wanted=len(group)))
    counts.append(len(members_lib.chunks(group, capacity)))
  counts = split_for_workers([len(g) for g in groups.values()], counts, num_workers or 0)
  out = []
  for group, n in zip(groups.values(), counts):  # as `chunks` cuts, into n
    out.extend(group[i * len(group) // n:(i + 1) * len(group) // n] for i in range(n))
  return out


def split_for_workers(sizes: list[int], counts: list[int], workers: int) -> list[int]:
  """How many chunks to cut each group of `sizes` into (now `counts`) so that there are at
  least `workers` chunks, or every chunk is one member.

  One more chunk at a time goes to the group with the largest chunks (the first such
  group on a tie), so a sweep cut for N workers is always cut alike, and each chunk
  stays as large as N workers allow: a vmapped member costs little more than a solo
  run's step, so a group larger than that spreads nothing.
  """
  counts = list(counts)
  while sum(counts) < workers:
    largest = max(range(len(sizes)), key=lambda j: (math.ceil(sizes[j] / counts[j]), -j))
    if math.ceil(sizes[largest] / counts[largest]) <= 1:
      break
    counts[largest] += 1
  return counts


def plan(base, sweep: Sequence[dict], grouped: bool = True, overrides: dict | None = None,
         only: str | None = None, max_group_size: int | None = None,
         num_workers: int | None = None) -> tuple[list[Member], list[list[Member]]]:
  """(every member, the groups of the selected members) of a sweep, nothing trained."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  members = resolve_members(base, sweep, overrides)
  clash = sorted(set(overrides or {}) & set().union(*(_expanded_keys(m.overrides)
                                                      for m in members)))
  if clash:
    logging.warning("The command line sets %s in every member, over the sweep's own values",
                    ", ".join(clash))
  for m in members:
    if m.unusable:
      logging.warning("Sweep member %s will not train: %s", m.name, m.unusable)
  return members, group_members(select(members, only), grouped, max_group_size, num_workers)
