"""experiments/benchmark.py end to end at a tiny scale (random data, no network, no peers needed)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_prints_and_writes_its_table(tmp_path):
  out = tmp_path / "benchmark.md"
  proc = subprocess.run(
      [sys.executable, "experiments/benchmark.py", "--data=random", "--reps=1",
       "--steps_scale=0.02", "--forms=scan", "--sweep_steps=0", "--keras=", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, check=False, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = out.read_text()
  assert text.startswith("Platform: ")
  rows = [line for line in text.splitlines() if line.startswith("| ")]
  assert rows[0].startswith("| case | batch | Flax loop | PyTorch eager | bnlab auto (form)")
  cases = [r.split(" | ")[0].strip("| ") + f" b{r.split(' | ')[1]}" for r in rows[1:]]
  assert cases == ["seed CNN + BN b32", "seed CNN, no BN b32", "seed CNN + BN b128",
                   "seed CNN, no BN b128", "paper MLP + BN b60"]
  for row in rows[1:]:
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert len(cells) == len(rows[0].strip("|").split("|")), row
    assert float(cells[2].replace(",", "")) > 0 and float(cells[4].split()[0].replace(",", "")) > 0
    assert cells[5].endswith("x")  # bnlab vs the Flax loop
  assert "BN's cost in the seed CNN, batch 32" in text
  assert "Paper MLP floor" in text
