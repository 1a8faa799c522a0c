"""The published data: every verdict recomputed from results/NAME alone, with numpy only."""

import gzip
import json
import os

import numpy as np
import pytest

from bnlab import study
from bnlab.rundir import per_image
from bnlab.study import published
from bnlab.study import registration
from test_study_registration import make_study

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "results")


def rows_with_images(seed=0):
  """Six runs (bn, none x 3 seeds) with a test accuracy, its per-image results and a series."""
  rng = np.random.default_rng(seed)
  rows = []
  for norm, p in (("bn", 0.9), ("none", 0.8)):
    for s in range(3):
      bits = rng.random(200) < p
      rows.append({"name": f"norm={norm},seed={s}", "status": "done", "norm": norm, "seed": s,
                   "acc": float(bits.mean()), "unused": [[0, 1.0]], "n_test": 200,
                   "per_image": {"acc": per_image.encode(bits)}})
  return rows


def test_the_data_holds_what_the_claims_read_and_judges_as_the_report():
  s = make_study()
  data = published.data_of(rows_with_images(), s.config, s.members)
  assert data["metrics"] == {"acc": ["summary", "test_accuracy"]}
  assert set(data["rows"][0]) == {"name", "status", "norm", "seed", "acc", "n_test", "per_image"}
  [v] = published.verdicts(s.config, data)
  assert v["numbers"]["noise"] == "per-image, paired" and v["primary"]
  assert v["corrected"] in study.VERDICTS and v["family"] == 1


def publish(tmp_path, rows=None):
  s = make_study()
  out = str(tmp_path)
  data = published.data_of(rows or rows_with_images(), s.config, s.members)
  published.write(os.path.join(out, published.DATA), data)
  json.dump(s.to_json(), open(os.path.join(out, "study.json"), "w"))
  verdicts = published.normal(published.verdicts(s.config, data))
  json.dump(verdicts, open(os.path.join(out, "claims.json"), "w"))
  registration.register(s, out)
  return out, verdicts


def test_verify_recomputes_every_verdict_and_names_a_difference(tmp_path):
  out, verdicts = publish(tmp_path)
  assert published.verify(out) == (1, [])
  verdicts[0]["numbers"]["difference"] += 0.01  # a number edited after the fact
  json.dump(verdicts, open(os.path.join(out, "claims.json"), "w"))
  checked, problems = published.verify(out)
  assert checked == 1 and len(problems) == 1
  assert problems[0].startswith("above (all): numbers published ")


def test_verify_fails_on_edited_data_and_a_missing_file(tmp_path):
  out, _ = publish(tmp_path)
  path = os.path.join(out, published.DATA)
  data = published.read(path)
  data["rows"][0]["acc"] = 0.99
  published.write(path, data)
  assert any("numbers published" in p for p in published.verify(out)[1])
  os.remove(path)
  assert published.verify(out) == (0, [f"{out} has no data.json.gz: publish the study with "
                                       "--out"])


def test_the_same_data_writes_the_same_bytes(tmp_path):
  s = make_study()
  data = published.data_of(rows_with_images(), s.config, s.members)
  a, b = str(tmp_path / "a.json.gz"), str(tmp_path / "b.json.gz")
  published.write(a, data)
  published.write(b, data)
  assert open(a, "rb").read() == open(b, "rb").read()


def numpy_paired_interval(data: dict, a: dict, b: dict):
  """An outsider's recomputation of one paired_interval verdict, with numpy and the json,
  gzip and base64 modules only (the README shows it): runs paired by seed, per-image noise."""
  import base64
  from scipy import stats  # only for the t quantile; a table would do

  def bits(text):
    n, _, b64 = text.partition(":")
    raw = np.frombuffer(base64.b64decode(b64), np.uint8)
    return np.unpackbits(raw, bitorder="little")[:int(n)].astype(float)
  pick = lambda want: {r["seed"]: r for r in data["rows"]  # noqa: E731
                       if all(r.get(k) == v for k, v in want.items())}
  ra, rb = pick(a), pick(b)
  seeds = sorted(set(ra) & set(rb))
  d = np.array([ra[s]["acc"] - rb[s]["acc"] for s in seeds])
  per = np.mean([bits(ra[s]["per_image"]["acc"]) - bits(rb[s]["per_image"]["acc"])
                 for s in seeds], axis=0)
  se_seed = d.std(ddof=1) / np.sqrt(len(d))
  se_image = per.std(ddof=1) / np.sqrt(per.size)
  se = np.hypot(se_seed, se_image)
  df = se ** 4 * (len(d) - 1) / se_seed ** 4
  half = stats.t.ppf(0.975, df) * se
  return d.mean(), [d.mean() - half, d.mean() + half]


def test_an_outsider_recomputes_a_verdict_with_numpy(tmp_path):
  out, verdicts = publish(tmp_path)
  with gzip.open(os.path.join(out, published.DATA), "rt") as f:
    data = json.load(f)
  mean, interval = numpy_paired_interval(data, {"norm": "bn"}, {"norm": "none"})
  assert verdicts[0]["numbers"]["difference"] == pytest.approx(mean, rel=1e-12)
  assert verdicts[0]["numbers"]["interval"] == pytest.approx(interval, rel=1e-9)


def _published_dirs():
  return sorted(d for d in os.listdir(RESULTS) if os.path.isdir(os.path.join(RESULTS, d))
                and os.path.exists(os.path.join(RESULTS, d, "report.md")))


@pytest.mark.parametrize("name", _published_dirs())
def test_every_published_study_verifies_or_says_it_predates_publishing(name):
  """A results/NAME with data.json.gz recomputes to its claims.json; one without must say
  in its report that it was made before the data were published (no registration)."""
  directory = os.path.join(RESULTS, name)
  if os.path.exists(os.path.join(directory, published.DATA)):
    checked, problems = published.verify(directory)
    assert checked > 0 and problems == []
  else:
    text = open(os.path.join(directory, "report.md")).read()
    assert "## Registration" not in text and "data.json.gz" not in text


def test_the_readmes_recomputation_gives_the_published_verdict(capsys, monkeypatch):
  """The README's numpy-only recomputation of one Figure 1 verdict, run from the repository
  root, prints the report's difference and interval."""
  text = open(os.path.join(ROOT, "README.md")).read()
  code = text.split("**Recompute a verdict yourself**", 1)[1]
  code = code.split("```python no-run\n", 1)[1].split("```", 1)[0]
  monkeypatch.chdir(ROOT)
  exec(compile(code, "README.md", "exec"), {})  # pylint: disable=exec-used
  printed = capsys.readouterr().out
  [v] = [v for v in json.load(open(os.path.join(RESULTS, "paper_figure1", "claims.json")))
         if v["claim"] == "bn_final_above" and v["where"].endswith("learning_rate=0.1")]
  n = v["numbers"]
  from scipy import stats
  assert stats.t.ppf(0.975, n["df"]) == pytest.approx(1.9944, abs=1e-4)  # the README's table value
  lo, hi = n["interval"]
  assert printed.strip() == (f"df {n['df']:.1f}: {100 * n['difference']:+.2f} points "
                             f"[{100 * lo:.2f}, {100 * hi:.2f}]")
