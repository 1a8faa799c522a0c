"""Registration: the claims, rules, cells, seeds and config fixed, with time and commit, first.

The register stage writes `registration.json` before the first run trains. A later change
to anything a verdict reads is appended as an amendment that records whether results
existed then; nothing is written over. Each entry carries the sha256 of its own content and
of the entry before it, so an edited registration shows, and the report prints when and at
which commit each claim was fixed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os

from bnlab.study import files

FILE = "registration.json"
LEGACY = "claims_registered.json"  # an older format: the claims only, no time or commit
_PART = ("claims", "cells", "metrics", "measurements", "members", "config_sha256")


def _sha(value) -> str:
  text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
  return hashlib.sha256(text.encode()).hexdigest()


# The study config's presentation: changing it changes no number or verdict.
PRESENTATION = ("title", "labels", "figures", "tables", "notes")


def registered_part(study) -> dict:
  """What a registration fixes: claims, cells, metrics, measurements, the members (their
  seeds among their keys) and the sha256 of the study config (all but its presentation:
  the runs' config, data and grouping too) and members."""
  cfg = json.loads(json.dumps(study.config, default=str))
  members = [m["name"] for m in study.members]
  fixed = {k: v for k, v in cfg.items() if k not in PRESENTATION}
  return {"claims": cfg["claims"], "cells": cfg["cells"], "metrics": cfg["metrics"],
          "measurements": cfg["measurements"], "members": members,
          "config_sha256": _sha({"config": fixed, "members": study.members})}


def _results_exist(workdir: str) -> int:
  runs = os.path.join(workdir, "runs")
  if not os.path.isdir(runs):
    return 0
  return sum(os.path.exists(os.path.join(runs, n, "summary.json")) for n in os.listdir(runs))


def _entry(part: dict, workdir: str, previous: str | None) -> dict:
  from bnlab.engine import provenance  # pylint: disable=g-import-not-at-top
  entry = {**part, "at": datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec="seconds"), "code": provenance.code_version(),
           "finished_runs": _results_exist(workdir), "previous_sha256": previous}
  return {**entry, "sha256": _sha(entry)}


def _latest(reg: dict) -> dict:
  return (reg.get("amendments") or [reg["registered"]])[-1]


def register(study, workdir: str) -> str:
  """Registers `study` in `workdir` (first time), or appends an amendment when what it fixes
  changed since; returns what it did, in words."""
  path = os.path.join(workdir, FILE)
  part = registered_part(study)
  reg = files.read_json(path, None)
  if reg is None:
    files.write_json(path, {"format": 1, "registered": _entry(part, workdir, None),
                            "amendments": []})
    return "registered"
  latest = _latest(reg)
  if all(latest.get(k) == v for k, v in json.loads(json.dumps(part)).items()):
    return "unchanged"
  reg.setdefault("amendments", []).append(_entry(part, workdir, latest.get("sha256")))
  files.write_json(path, reg)
  return "amended"


def _altered(reg: dict) -> list[str]:
  """The entries whose content no longer matches their sha256, or whose chain is broken."""
  out, previous = [], None
  for i, e in enumerate([reg["registered"]] + list(reg.get("amendments") or [])):
    name = "the registration" if i == 0 else f"amendment {i}"
    body = {k: v for k, v in e.items() if k != "sha256"}
    if _sha(body) != e.get("sha256"):
      out.append(f"{name} changed after it was written (its sha256 no longer matches)")
    elif e.get("previous_sha256") != previous:
      out.append(f"the entry before {name} was replaced (the chain of sha256 is broken)")
    previous = e.get("sha256")
  return out


def problems(directory: str) -> list[str]:
  """Why `directory`'s registration cannot be trusted ([] when none is there to check)."""
  reg = files.read_json(os.path.join(directory, FILE), None)
  if reg is None:
    return []
  return [f"{FILE}: {why}" for why in _altered(reg)]


def _when(e: dict) -> str:
  code = e.get("code") or {}
  commit = (code.get("commit") or "unknown")[:12]
  dirty = " with uncommitted changes" if code.get("dirty") else ""
  done = e.get("finished_runs", 0)
  return (f"{e['at']} at commit {commit}{dirty}, "
          + (f"after {done} run(s) had finished" if done else "before any run had finished"))


def describe(workdir: str, claims: dict, stages: list[dict]) -> tuple[list[str], dict]:
  """(the report's registration lines, {claim: why it is marked}) for the current `claims`."""
  reg = files.read_json(os.path.join(workdir, FILE), None)
  if reg is None:
    legacy = os.path.exists(os.path.join(workdir, LEGACY))
    return ([f"No registration: {FILE} is missing, so nothing shows that these claims were "
             "fixed before the runs" + (f" ({LEGACY}, an older record of the claims without "
                                        "time, commit or hash, is not one)." if legacy else
                                        ".")],
            {name: "not registered" for name in claims})
  first = reg["registered"]
  lines = [f"Registered {_when(first)} ({len(first['claims'])} claim(s); "
           f"config sha256 {first['config_sha256'][:12]}; {FILE})."]
  altered = _altered(reg)
  if altered:
    lines.append(f"**{FILE} was edited after it was written ({'; '.join(altered)}): the "
                 "registration is void as evidence.**")
  started = [s["started"] for s in stages if s.get("started")]
  if started and min(started) < first["at"][:19]:
    lines.append(f"**A run stage began ({min(started)}) before the registration.**")
  marks: dict[str, str] = {}
  previous = first
  for i, e in enumerate(reg.get("amendments") or [], 1):
    changed = sorted(n for n in set(e["claims"]) | set(previous["claims"])
                     if e["claims"].get(n) != previous["claims"].get(n))
    others = [k for k in _PART[1:] if e.get(k) != previous.get(k)]
    lines.append(f"Amendment {i}: {_when(e)}: " + ", ".join(
        [f"claims {', '.join(changed)}"] * bool(changed) + [f"{', '.join(others)}"] * bool(others)
        or ["no change"]) + ".")
    for n in changed:
      marks[n] = (f"amended ({e['at']}, {'after' if e.get('finished_runs') else 'before'} "
                  "results existed); registered version: "
                  + (json.dumps(first["claims"][n], default=str) if n in first["claims"]
                     else "none (added)"))
    previous = e
  for n, spec in claims.items():
    if json.loads(json.dumps(spec, default=str)) != previous["claims"].get(n):
      marks[n] = "changed since its last registration, without an amendment (rerun the " \
                 "register stage to record it)"
  return lines, marks
