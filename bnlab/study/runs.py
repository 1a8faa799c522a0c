"""A study's runs: each member's files read back, checked against the study, and reduced to rows.

Only files are read, so a finished run reads the same however and wherever it trained.
"""

from __future__ import annotations

import json
import os

from bnlab import config as config_lib
from bnlab import sweep
from bnlab.study import config as study_config
from bnlab.study import files
from bnlab.study import metrics as metrics_lib


def read_run(path: str, name: str, key: dict, configured: dict | None = None) -> metrics_lib.Run:
  """A member's files: config.json (its checkpoints' copy where they carry one),
  metrics.jsonl, summary.json (those that exist).

  A finished run is left out (`Run.error`) when its records end before its last
  step, or when its config differs from `configured` (the study's config of
  this member, flattened) in a key other than the resume-safe ones. A damaged
  summary.json or config.json is a WorkDirError naming it and the fix.
  """
  from bnlab.rundir import checkpoints  # pylint: disable=g-import-not-at-top
  records = sweep.read_jsonl(os.path.join(path, "metrics.jsonl"))
  summary, cfg = (files.read_json(os.path.join(path, f), None)
                  for f in ("summary.json", "config.json"))
  # The config the run's checkpoints carry is the one it trained with (config.json may
  # have been edited to match a changed study; `bnlab.rundir.identity`).
  cfg = checkpoints.newest_record(os.path.join(path, "checkpoints"), "config") or cfg
  error = summary and (sweep.records_cut_short(path, summary, records)
                       or _configured_otherwise(path, cfg, configured, summary))
  if error:
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.warning("Run %s is left out: %s", name, error)
  return metrics_lib.Run(name, path, key, cfg, records, None if error else summary,
                         error=error or None)


def _configured_otherwise(path: str, ran: dict | None, configured: dict | None,
                          summary: dict) -> str | None:
  """Why a run's config is not the study's config of it (resume-safe keys aside), with the
  fix that situation has.

  Only a run the study makes longer (on a schedule that allows it) is fixed by the run
  stage; a run stage with a shorter run, or one of another config, ends in the same state
  (a run cannot be shortened or changed), so the message must not send the user there.
  """
  if ran is None or configured is None:
    return None
  ran = config_lib.flatten(ran)
  changed = [k for k in config_lib.changed_keys(ran, configured)
             if k not in config_lib.RESUME_SAFE_KEYS]
  if not changed:
    return None
  k = changed[0]
  more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
  name = os.path.basename(path)
  what = (f"{os.path.join(path, 'config.json')} differs from the study's config of this run "
          f"in {k} ({ran[k]!r} -> {configured.get(k)!r}){more}")
  refused, reason = config_lib.resume_refusal(ran, configured)
  if not refused:  # only the length changed (LENGTH_KEYS)
    ran_steps, steps = _length(ran, summary), _length(configured, summary)
    if ran_steps is not None and steps is not None and steps < ran_steps:
      return (f"{what}: the study now asks for {steps} steps, but the run trained "
              f"{ran_steps}, and a run can be made longer, not shorter; give the study "
              f"its runs' length back (train.num_steps={ran_steps} in its run.overrides or "
              f"arguments), or use a new --workdir (or move runs/{name} aside) to train "
              f"them at {steps} steps")
    return (f"{what}: run the study without --stage=report to train it on to the study's "
            "length (a longer run continues from its last checkpoint)")
  if reason:  # a length the learning rate schedule is spread over
    return f"{what}: {reason}"
  return (f"{what}: it ran as another study; use a new --workdir for the changed study, or "
          f"move runs/{name} aside to train it again as configured")


def _length(flat: dict, summary: dict) -> int | None:
  """The steps a flattened config trains (None where its epochs' length is unknown)."""
  steps, epochs = flat.get("train.num_steps"), flat.get("train.num_epochs")
  if steps:
    return steps
  spe = summary.get("steps_per_epoch")
  return epochs * spe if isinstance(epochs, int) and isinstance(spe, int) else None


def member_configs(study: study_config.Study) -> dict[str, dict]:
  """{member name: its config as the study gives it now, flattened}; {} if it cannot be
  built here (the study's run config file is missing), with a warning."""
  if study.sweep is None:
    return {}
  try:
    members = sweep.resolve_members(study.base_run_config(), study.sweep)
  except (config_lib.ConfigError, OSError) as e:
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.warning("The runs' configs are not compared with the study's: %s", e)
    return {}
  return {m.name: config_lib.flatten(json.loads(m.cfg.to_json_best_effort()))
          for m in members}


def collect(study: study_config.Study, workdir: str) -> list[metrics_lib.Run]:
  """Every member's files, with its measurements and metrics."""
  runs_dir = os.path.join(workdir, "runs")
  cfg, configured = study.config, member_configs(study)
  return [metrics_lib.evaluate_metrics(
      read_run(os.path.join(runs_dir, m["name"]), m["name"], m["key"], configured.get(m["name"])),
      cfg["metrics"], cfg["measurements"]) for m in study.members]


def result_rows(runs: list[metrics_lib.Run], errors: dict) -> list[dict]:
  """One row per run: name, status, its overrides, its metric values."""
  rows = []
  for r in runs:
    error = r.error or errors.get(r.name)
    status = ("unfinished" if r.summary is None else
              "diverged" if r.summary.get("diverged") else "done")
    if r.summary is None and error:
      status = "failed"
    rows.append({"name": r.name, "status": status, **r.key, **r.values,
                 "wall_time": (r.summary or {}).get("wall_time"), "error": error,
                 "n_test": n_test(r), "per_image": r.per_image})
  return rows


def n_test(run: metrics_lib.Run) -> int:
  """How many test images the run's accuracies are measured on."""
  for v in run.per_image.values():
    text = v if isinstance(v, str) else v[-1][1] if v else ""
    if text:
      return int(text.partition(":")[0])
  return ((run.cfg or {}).get("data", {}).get("num_test")
          or 10_000)  # 0: MNIST's whole test set
