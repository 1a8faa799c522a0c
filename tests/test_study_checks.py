"""A study config is checked whole, against its sweep's members, before anything trains.

Each case is a small in-memory config and member list: a wrong name, value or type in a
claim, figure, table or `cells` is one ConfigError naming the config key and what exists,
where before it passed `validate` and failed (or, worse, judged wrongly) in the report.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest

from bnlab import study
from bnlab import sweep
from bnlab.errors import ConfigError
from bnlab.study import checks
from bnlab.study import measurements  # noqa: F401  (registers selected_value)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDIES = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "configs", "studies"))
                 if f.endswith(".py"))
RATES = (0.001, 0.01, 0.1, 1.0, 3.0)
SWEEP = sweep.product(sweep.axis("model.norm", ["batch", "none"]),
                      sweep.axis("optimizer.learning_rate", RATES), sweep.seeds(3))
AT = "model.norm={},optimizer.learning_rate=0.01"


def keyed(members):
  return [{"name": sweep.member_name(m), "key": dict(m)} for m in members]


def make_study(members=SWEEP, **claim):
  """A valid study: BN vs no BN at 5 rates x 3 seeds, one claim (changed by `claim`), one
  figure and one table."""
  cfg = json.loads(json.dumps(study.base_config().to_dict()))
  cfg["cells"] = ["model.norm", "optimizer.learning_rate"]
  cfg["metrics"] = {"acc": ["summary", "test_accuracy"], "curve": ["series", "test_accuracy"],
                    "diverged": ["diverged"]}
  cfg["claims"] = {"small_rates": {
      "statement": "BN is above at lr 0.01.", "rule": "paired_interval", "metric": "acc",
      "a": AT.format("batch"), "b": AT.format("none"), **claim}}
  cfg["figures"] = {"final": {"kind": "final_vs", "metric": "acc",
                              "x": "optimizer.learning_rate", "hue": ["model.norm"],
                              "logx": True}}
  cfg["tables"] = {"final": {"metrics": ["acc"], "by": ["optimizer.learning_rate"],
                             "across": "model.norm"}}
  return study.Study("configs/studies/x.py", "", "", cfg, keyed(members), members)


def check(s):
  study.check_study(s.config, s.members)


def fails(s, message):
  with pytest.raises(ConfigError, match=message) as e:
    check(s)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_a_valid_study_passes():
  check(make_study())
  check(make_study(higher=False, each=["optimizer.learning_rate"], a="model.norm=batch",
                   b="model.norm=none"))


# -- parameter types ------------------------------------------------------------------------


def test_a_string_where_a_rule_takes_a_bool_is_an_error():
  # `higher: "false"` was read as true and flipped the verdict.
  assert fails(make_study(higher="false"), "higher") == (
      "study config claims.small_rates.higher='false' is a str; rule 'paired_interval' takes "
      "True or False for higher")


@pytest.mark.parametrize("param, value, message", [
    ("metric", 3, "is an int; rule 'paired_interval' takes a string for metric"),
    ("margin", "0.01", "is a str; rule 'paired_interval' takes a number for margin"),
    ("margin", True, "is a bool; rule 'paired_interval' takes a number for margin"),
    ("from_step", 1.5, "is a float; rule 'paired_interval' takes an integer for from_step"),
    ("from_step", -1, "is out of range; rule 'paired_interval' takes from_step >= 0"),
    ("margin", float("nan"), "is not finite; rule 'paired_interval' takes a finite number"),
])
def test_claim_parameters_have_their_signatures_types(param, value, message):
  fails(make_study(**{param: value}), f"claims.small_rates.{param}=.* {message}")


def test_types_are_read_from_annotations_as_strings():
  def fn(cells, flag: bool, name: str, n: int, scale: float, maybe: float | None = None,
         words=(), free=None):
    del cells, flag, name, n, scale, maybe, words, free
  params = inspect.signature(fn).parameters
  assert isinstance(params["maybe"].annotation, str)  # `from __future__ import annotations`
  ok = {"flag": False, "name": "a", "n": 2, "scale": 1, "maybe": None, "words": ("a",),
        "free": object()}
  checks.check_params("study config claims.c", "rule 'fn'", fn, 1, ok)
  for name, value, word in (("maybe", "1", "a number or None"), ("words", "abc", "a tuple"),
                            ("n", True, "an integer"), ("flag", 0, "True or False")):
    with pytest.raises(ConfigError, match=f"claims.c.{name}=.* takes {word} for {name}$"):
      checks.check_params("study config claims.c", "rule 'fn'", fn, 1, {**ok, name: value})


def test_a_list_parameter_given_as_one_string_is_an_error():
  # ("model") is a string: judge would read each of its letters as a key.
  fails(make_study(each="optimizer.learning_rate", a="model.norm=batch", b="model.norm=none"),
        r"claims.small_rates.each='optimizer.learning_rate' is a str; a claim takes a tuple of "
        "strings")
  s = make_study()
  s.config["claims"]["small_rates"].update(rule="same_verdict", metrics="acc")
  del s.config["claims"]["small_rates"]["metric"]
  fails(s, "claims.small_rates.metrics='acc' is a str; rule 'same_verdict' takes a tuple of "
           "strings")


def test_figure_and_table_parameters_have_their_types():
  s = make_study()
  s.config["figures"]["final"]["logx"] = "true"
  fails(s, "figures.final.logx='true' is a str; figure kind 'final_vs' takes True or False")
  s = make_study()
  s.config["figures"]["final"]["hue"] = "model.norm"
  fails(s, "figures.final.hue='model.norm' is a str; figure kind 'final_vs' takes a tuple")
  s = make_study()
  s.config["tables"]["final"]["by"] = "optimizer.learning_rate"
  fails(s, "tables.final.by='optimizer.learning_rate' is a str; a table takes a tuple")


# -- names: metrics, cell keys, values ----------------------------------------------------


def test_a_claim_naming_a_value_no_member_has_is_an_error():
  # optimizer.learning_rate=1.0 shows as 1: the claim was inconclusive ("missing").
  assert fails(make_study(a="model.norm=batch,optimizer.learning_rate=1.0"), "no cell") == (
      "study config claims.small_rates.a: no cell has optimizer.learning_rate=1.0; its values "
      "are 0.001, 0.01, 0.1, 1, 3")
  check(make_study(a="model.norm=batch,optimizer.learning_rate=1"))
  fails(make_study(b="model.norm=nobn,optimizer.learning_rate=0.01"),
        "claims.small_rates.b: no cell has model.norm=nobn; its values are batch, none$")


def test_a_claim_naming_a_key_that_is_not_a_cell_key_is_an_error():
  fails(make_study(a="model.nrom=batch"),
        "claims.small_rates.a: no cell key 'model.nrom'; the cell keys are model.norm, "
        "optimizer.learning_rate$")
  fails(make_study(a="seed=0,model.norm=batch"),
        "claims.small_rates.a: seed is a member key but not one of cells")
  fails(make_study(a="model.norm"), r"claims.small_rates.a: 'model.norm' in 'model.norm' is not "
                                    "key=value")


def test_values_that_exist_but_not_together_are_an_error():
  members = [m for m in SWEEP if not (m["model.norm"] == "none"
                                      and m["optimizer.learning_rate"] == 0.01)]
  fails(make_study(members), "claims.small_rates.b: no cell has model.norm=none,"
                             "optimizer.learning_rate=0.01: each value exists, but not together")


@pytest.mark.parametrize("where, change, message", [
    ("claims", {"each": ["learning_rate"], "a": "model.norm=batch", "b": "model.norm=none"},
     "claims.small_rates.each: no cell key 'learning_rate'"),
    ("claims", {"rule": "wins_above_best", "along": "lr", "treat": "model.norm=batch",
                "base": "model.norm=none", "fails": "diverged", "trains": "diverged"},
     "claims.small_rates.along: no cell key 'lr'"),
    ("figures", {"x": "learning_rate"}, "figures.final.x: no cell key 'learning_rate'"),
    ("figures", {"hue": ["norm"]}, "figures.final.hue: no cell key 'norm'"),
    ("figures", {"panels": ["seed"]}, "figures.final.panels: seed is a member key but not one"),
    ("figures", {"metric": "accuracy"}, r"figures.final: unknown metrics \['accuracy'\]"),
    ("tables", {"by": ["model"]}, "tables.final.by: no cell key 'model'"),
    ("tables", {"across": "norm"}, "tables.final.across: no cell key 'norm'"),
    ("tables", {"metrics": ["acc", "loss"]}, r"tables.final: unknown metrics \['loss'\]"),
    ("tables", {"acros": "model.norm"}, r"tables.final: unknown keys \['acros'\]"),
])
def test_every_name_a_claim_figure_or_table_uses_exists(where, change, message):
  s = make_study()
  entry = s.config[where][next(iter(s.config[where]))]
  if where == "claims" and "rule" in change:
    for k in ("metric", "a", "b"):
      entry.pop(k)
    change = {**change, "metric": "acc"}
  entry.update(change)
  fails(s, message)


def test_figure_where_strings_are_checked():
  s = make_study()
  s.config["figures"]["units"] = {"kind": "unit_percentiles", "metric": "curve",
                                  "rows": [AT.format("batch"), AT.format("nobn")]}
  fails(s, r"figures.units.rows\[1\]: no cell has model.norm=nobn")
  s = make_study()
  s.config["figures"]["diff"] = {"kind": "paired_difference", "metric": "curve",
                                 "a": AT.format("batch"), "b": "optimizer.learning_rate=0.3"}
  fails(s, "figures.diff.b: no cell has optimizer.learning_rate=0.3")


def test_an_expected_value_or_seed_no_member_has_is_an_error():
  s = make_study()
  s.config["claims"]["selected"] = {
      "statement": "s", "rule": "selected_value", "metric": "acc",
      "along": "optimizer.learning_rate", "where": "model.norm=none", "expected": 2.0}
  fails(s, r"claims.selected.expected: no cell has optimizer.learning_rate=2 \(2.0\)")
  s.config["claims"]["selected"].update(expected=1, seed=7)
  fails(s, "claims.selected.seed: no member has seed 7; the seeds are 0, 1, 2$")
  s.config["claims"]["selected"]["seed"] = 2
  check(s)


# -- cells ----------------------------------------------------------------------------------


def test_a_misspelled_cells_key_is_an_error():
  # It pooled BN and no-BN runs into one cell.
  s = make_study()
  s.config["cells"] = ["model.nrom", "optimizer.learning_rate"]
  fails(s, "study config cells: no member has the key 'model.nrom'; the members' keys are "
           "model.norm, optimizer.learning_rate, seed$")


def test_cells_that_leave_out_a_swept_key_are_an_error():
  # A paired rule paired two runs with the same partner.
  s = make_study(a="model.norm=batch", b="model.norm=none")
  s.config["cells"] = ["model.norm"]
  s.config["tables"]["final"]["by"] = []
  s.config["figures"]["final"]["x"] = "model.norm"
  s.config["figures"]["final"]["hue"] = []
  fails(s, "study config cells leave out optimizer.learning_rate: members "
           "norm=batch,learning_rate=0.001,seed=0 and norm=batch,learning_rate=0.01,seed=0 "
           r"differ in it but fall in one cell \(model.norm=batch\)")


def test_a_key_that_follows_from_the_cells_need_not_be_one():
  # small_batches: the ghost batch size follows from the batch size.
  members = [{**m, "model.bn.ghost_size": min(16, int(100 * m["optimizer.learning_rate"]))}
             for m in SWEEP]
  check(make_study(members))


def test_two_runs_of_one_cell_with_the_same_seed_are_an_error():
  s = make_study(a="model.norm=batch", b="model.norm=none")
  s.config.update(cells=["model.norm"], pooled=["optimizer.learning_rate"])
  s.config["tables"]["final"]["by"] = []
  s.config["figures"]["final"]["x"] = "model.norm"
  s.config["figures"]["final"]["hue"] = []
  fails(s, "study config cells: members norm=batch,learning_rate=0.001,seed=0 and "
           r"norm=batch,learning_rate=0.01,seed=0 fall in one cell \(model.norm=batch\) with "
           "the same seed 0, so a paired rule would pair a run with two partners; add "
           "'optimizer.learning_rate' to cells$")
  # Pooled on purpose: each run of a cell has its own seed.
  members = sweep.product(sweep.axis("model.norm", ["batch", "none"]), sweep.zip_(
      sweep.seeds(3), sweep.axis("data.seed", [10, 11, 12])))
  s = make_study(members, a="model.norm=batch", b="model.norm=none")
  s.config.update(cells=["model.norm"], tables={}, figures={})
  fails(s, "cells leave out data.seed")
  s.config["pooled"] = ["data.seed"]
  check(s)
  s.config["pooled"] = ["seed"]
  fails(s, "study config pooled: 'seed' is not a member key outside cells")


# -- a reduced sweep, the study configs, the command line ----------------------------------


def test_a_reduced_sweep_may_lack_cells_of_the_whole_one():
  s = make_study([m for m in SWEEP if m["optimizer.learning_rate"] in (0.1, 1.0)])
  with pytest.raises(ConfigError, match="no cell has optimizer.learning_rate=0.01"):
    checks.against_members(s.config, s.members)
  absent = checks.against_members(s.config, s.members, keyed(SWEEP))
  assert absent == [("claims.small_rates.a", AT.format("batch")),
                    ("claims.small_rates.b", AT.format("none"))]
  s.config["claims"]["small_rates"]["a"] = "model.norm=batch,optimizer.learning_rate=1.0"
  with pytest.raises(ConfigError, match="its values are 0.001, 0.01, 0.1, 1, 3$"):
    checks.against_members(s.config, s.members, keyed(SWEEP))


def write_config(path, claim_a, cells='("model.norm", "optimizer.learning_rate")'):
  path.write_text(f'''
from bnlab import study
from bnlab import sweep


def get_config(arg=None):
  s = study.base_config()
  s.cells = {cells}
  s.metrics = {{"acc": ("summary", "test_accuracy")}}
  s.claims = {{"c": {{"statement": "s", "rule": "paired_interval", "metric": "acc",
                    "a": "{claim_a}", "b": "model.norm=none,optimizer.learning_rate=0.01"}}}}
  return s


def get_sweep(arg=None):
  rates = (0.1, 1.0) if arg == "runlocal" else {RATES}
  return sweep.product(sweep.axis("model.norm", ["batch", "none"]),
                       sweep.axis("optimizer.learning_rate", rates), sweep.seeds(2))
''')
  return str(path)


def test_from_file_checks_against_the_members(tmp_path):
  path = write_config(tmp_path / "s.py", "model.norm=batch,optimizer.learning_rate=0.01")
  module = sweep.load_config_file(path)
  assert len(study.Study.from_file(path, "", module.get_config()).members) == 20
  assert len(study.Study.from_file(path, "runlocal", module.get_config()).members) == 8
  path = write_config(tmp_path / "t.py", "model.norm=batch,optimizer.learning_rate=1.0")
  with pytest.raises(ConfigError, match="claims.c.a: no cell has optimizer.learning_rate=1.0"):
    study.Study.from_file(path, "runlocal", sweep.load_config_file(path).get_config())


@pytest.mark.parametrize("name", STUDIES)
def test_the_study_configs_pass(name):
  path = os.path.join("configs", "studies", f"{name}.py")
  module = sweep.load_config_file(os.path.join(ROOT, path))
  cwd = os.getcwd()
  os.chdir(ROOT)
  try:
    for arg in ("", "runlocal"):
      assert study.Study.from_file(path, arg, module.get_config(arg or None)).members
  finally:
    os.chdir(cwd)


def test_a_broken_config_is_one_error_line_and_nothing_is_written(tmp_path):
  path = write_config(tmp_path / "s.py", "model.norm=batch,optimizer.learning_rate=0.01",
                      cells='("model.nrom", "optimizer.learning_rate")')
  p = subprocess.run([sys.executable, "-m", "bnlab.study", f"--config={path}",
                      f"--workdir={tmp_path / 'wd'}"], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  lines = [line for line in p.stderr.splitlines() if line.strip()]
  assert p.returncode == 2 and lines == [
      "error: study config cells: no member has the key 'model.nrom'; the members' keys are "
      "model.norm, optimizer.learning_rate, seed"], p.stderr
  assert not os.path.exists(tmp_path / "wd")


def test_a_claims_within_names_cells_that_exist():
  """`within` keeps a claim's `each` to some cells; each where-string in it is checked."""
  s = make_study(each=["optimizer.learning_rate"], a="model.norm=batch", b="model.norm=none",
                 within=("optimizer.learning_rate=0.01", "optimizer.learning_rate=1"))
  study.validate(s.config)
  check(s)
  verdicts = study.judge(s.config["claims"], [])  # no cells: no group to judge
  assert verdicts == []
  s.config["claims"]["small_rates"]["within"] = ("optimizer.learning_rate=0.3",)
  fails(s, r"claims.small_rates.within\[0\]: no cell has optimizer.learning_rate=0.3")
  s.config["claims"]["small_rates"]["within"] = 3
  with pytest.raises(ConfigError, match="within=3: give the cells"):
    study.validate(s.config)
