"""A run's records: metrics.jsonl keeps every record through torn and foreign lines, and
non-finite numbers are written as strict JSON. Each test opens a WorkDir directly.
"""

import glob
import json
import logging
import math
import os


from bnlab import sweep
from bnlab.sweep import results as sweep_results
from run_files import read_jsonl
from rundirs import open_workdir as _open, warnings_of as _warnings
from rundirs import strict_json as _strict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _metrics_lines(n):
  return [json.dumps({"step": i, "train_loss": 1.0 / i}) for i in range(1, n + 1)]


def test_damaged_middle_metrics_line_keeps_every_record(tmp_path, caplog):
  lines = _metrics_lines(31)
  lines[7] = lines[7][:13]  # line 8 torn, e.g. by another tool writing to the file
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
  with caplog.at_level(logging.WARNING):
    wd = _open(tmp_path)
  try:
    assert [r["step"] for r in wd.read_metrics()] == [i for i in range(1, 32) if i != 8]
    wd.truncate_metrics_after(1000)  # what a resume past every record does
  finally:
    wd.close()
  assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 30
  aside = glob.glob(str(tmp_path / "metrics.jsonl.damaged-*"))
  assert len(aside) == 1 and open(aside[0]).read() == lines[7] + "\n"
  assert any(str(tmp_path / "metrics.jsonl") in m and "line 8 " in m and "damaged" in m
             and aside[0] in m for m in _warnings(caplog))


def test_torn_last_metrics_line_is_dropped_with_a_warning_and_kept_aside(tmp_path, caplog):
  lines = _metrics_lines(5)
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "tra')
  with caplog.at_level(logging.WARNING):
    wd = _open(tmp_path)
  wd.close()
  assert (tmp_path / "metrics.jsonl").read_text() == "\n".join(lines) + "\n"
  aside = glob.glob(str(tmp_path / "metrics.jsonl.damaged-*"))
  assert len(aside) == 1 and open(aside[0]).read() == '{"step": 6, "tra\n'
  assert any("line 6 " in m and "cut off by a kill" in m for m in _warnings(caplog))


def test_foreign_and_undecodable_lines_are_kept_aside_too(tmp_path):
  lines = [ln.encode() for ln in _metrics_lines(4)]
  lines[1:1] = [b"[1, 2]", b'{"step": "3"}', b"\xff\xfe{"]
  (tmp_path / "metrics.jsonl").write_bytes(b"\n".join(lines) + b"\n")
  wd = _open(tmp_path)
  try:
    assert [r["step"] for r in wd.read_metrics()] == [1, 2, 3, 4]
  finally:
    wd.close()
  (aside,) = glob.glob(str(tmp_path / "metrics.jsonl.damaged-*"))
  assert open(aside, "rb").read() == b"[1, 2]\n{\"step\": \"3\"}\n\xff\xfe{\n"


def test_intact_metrics_are_not_rewritten(tmp_path):
  text = "\n".join(_metrics_lines(3)) + "\n"
  (tmp_path / "metrics.jsonl").write_text(text)
  before = os.stat(tmp_path / "metrics.jsonl").st_ino
  _open(tmp_path).close()
  assert os.stat(tmp_path / "metrics.jsonl").st_ino == before
  assert not glob.glob(str(tmp_path / "metrics.jsonl.*"))


def test_nonfinite_numbers_are_written_as_null_and_named(tmp_path):
  wd = _open(tmp_path)
  try:
    wd.write_metrics({"step": 2, "train_loss": math.nan, "test_accuracy": 0.5,
                      "layer/percentiles": [[0.0, math.inf], [-math.inf, 1.0]]})
    wd.write_metrics({"step": 4, "train_loss": math.inf, "test_accuracy": 0.98})
    wd.write_summary({"train_loss_before_divergence": -math.inf, "final_step": 4})
    records = wd.read_metrics()
    summary = wd.read_summary()
  finally:
    wd.close()
  first = _strict((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
  assert first["train_loss"] is None and first["nonfinite"]["train_loss"] == "NaN"
  assert first["layer/percentiles"] == [[0.0, None], [None, 1.0]]
  saved = _strict((tmp_path / "summary.json").read_text())
  assert saved["train_loss_before_divergence"] is None
  assert saved["nonfinite"] == {"train_loss_before_divergence": "-Infinity"}
  # bnlab's readers give the numbers back.
  assert math.isnan(records[0]["train_loss"]) and records[1]["train_loss"] == math.inf
  assert records[0]["layer/percentiles"] == [[0.0, math.inf], [-math.inf, 1.0]]
  assert "nonfinite" not in records[0]
  assert summary == {"train_loss_before_divergence": -math.inf, "final_step": 4}
  # The other readers of these files cope.
  swept = sweep_results.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert sweep.steps_to_accuracy(swept) == 4 and math.isnan(swept[0]["train_loss"])
  assert math.isnan(read_jsonl(tmp_path / "metrics.jsonl")[0]["train_loss"])


def test_old_bare_nan_records_still_read(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train_loss": NaN}\n')
  wd = _open(tmp_path)
  try:
    (record,) = wd.read_metrics()
    assert math.isnan(record["train_loss"])
    wd.truncate_metrics_after(5)
  finally:
    wd.close()
  assert _strict((tmp_path / "metrics.jsonl").read_text())["nonfinite"] == {
      "train_loss": "NaN"}
