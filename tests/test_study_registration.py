"""Registration: written before training, amended (never overwritten), and an edit detected."""

import json
import os

from bnlab import study
from bnlab.study import registration


def make_study(statement="BN is above.", margin=0.0):
  cfg = json.loads(json.dumps(study.base_config().to_dict()))
  cfg["cells"] = ["norm"]
  cfg["metrics"] = {"acc": ["summary", "test_accuracy"]}
  cfg["claims"] = {"above": {"statement": statement, "rule": "paired_interval", "metric": "acc",
                             "a": "norm=bn", "b": "norm=none", "margin": margin,
                             "primary": True}}
  members = [{"name": f"norm={n},seed={s}", "key": {"norm": n, "seed": s}}
             for n in ("bn", "none") for s in range(3)]
  return study.Study("configs/studies/x.py", "", "", cfg, members)


def test_registration_before_any_run_is_described_with_time_and_commit(tmp_path):
  wd = str(tmp_path)
  s = make_study()
  assert registration.register(s, wd) == "registered"
  assert registration.register(s, wd) == "unchanged"
  reg = json.load(open(os.path.join(wd, registration.FILE)))
  first = reg["registered"]
  assert first["claims"] == s.config["claims"] and first["finished_runs"] == 0
  assert first["members"] == [m["name"] for m in s.members] and reg["amendments"] == []
  lines, marks = registration.describe(wd, s.config["claims"], [])
  assert lines[0].startswith(f"Registered {first['at']} at commit ")
  assert "before any run had finished" in lines[0] and marks == {}
  assert registration.problems(wd) == []


def test_a_changed_claim_is_an_amendment_marked_with_both_versions(tmp_path):
  wd = str(tmp_path)
  registration.register(make_study(), wd)
  os.makedirs(os.path.join(wd, "runs", "r"))
  open(os.path.join(wd, "runs", "r", "summary.json"), "w").write("{}")  # a result exists
  changed = make_study(margin=0.01)
  assert registration.register(changed, wd) == "amended"
  reg = json.load(open(os.path.join(wd, registration.FILE)))
  assert reg["registered"]["claims"]["above"]["margin"] == 0.0  # the original is kept
  [amendment] = reg["amendments"]
  assert amendment["finished_runs"] == 1
  assert amendment["previous_sha256"] == reg["registered"]["sha256"]
  lines, marks = registration.describe(wd, changed.config["claims"], [])
  assert lines[1].startswith("Amendment 1: ") and "after 1 run(s) had finished" in lines[1]
  assert "claims above" in lines[1]
  assert marks["above"].startswith("amended (") and "after results existed" in marks["above"]
  assert '"margin": 0.0' in marks["above"]  # the registered version, beside the current one
  assert registration.problems(wd) == []


def test_a_claim_edited_without_registering_is_marked(tmp_path):
  wd = str(tmp_path)
  registration.register(make_study(), wd)
  edited = make_study(statement="BN is far above.")
  _, marks = registration.describe(wd, edited.config["claims"], [])
  assert "without an amendment" in marks["above"]


def test_an_edited_registration_is_detected(tmp_path):
  wd = str(tmp_path)
  registration.register(make_study(), wd)
  path = os.path.join(wd, registration.FILE)
  reg = json.load(open(path))
  reg["registered"]["claims"]["above"]["margin"] = 0.02  # rewritten to fit a result
  json.dump(reg, open(path, "w"))
  assert registration.problems(wd) == [
      f"{registration.FILE}: the registration changed after it was written (its sha256 no "
      "longer matches)"]
  lines, _ = registration.describe(wd, reg["registered"]["claims"], [])
  assert any("was edited after it was written" in line for line in lines)
  # An edit re-hashed to hide it breaks the chain to the amendment after it.
  os.remove(path)
  registration.register(make_study(), wd)
  registration.register(make_study(margin=0.03), wd)
  reg = json.load(open(path))
  reg["registered"]["claims"]["above"]["margin"] = 0.05
  body = {k: v for k, v in reg["registered"].items() if k != "sha256"}
  reg["registered"]["sha256"] = registration._sha(body)
  json.dump(reg, open(path, "w"))
  assert registration.problems(wd) == [
      f"{registration.FILE}: the entry before amendment 1 was replaced (the chain of sha256 "
      "is broken)"]


def test_no_registration_and_a_late_one_are_said(tmp_path):
  wd = str(tmp_path)
  claims = make_study().config["claims"]
  lines, marks = registration.describe(wd, claims, [])
  assert lines[0].startswith("No registration: registration.json is missing")
  assert marks == {"above": "not registered"}
  registration.register(make_study(), wd)
  lines, _ = registration.describe(wd, claims, [{"started": "2000-01-01T00:00:00"}])
  assert any("before the registration" in line for line in lines)
