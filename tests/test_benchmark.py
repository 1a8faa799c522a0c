"""experiments/benchmark.py end to end at a tiny scale (random data, no network, no peers needed)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_prints_and_writes_its_table(tmp_path):
  out = tmp_path / "benchmark.md"
  proc = subprocess.run(
      [sys.executable, "experiments/benchmark.py", "--data=random", "--reps=1",
       "--steps_scale=0.02", "--forms=scan", "--sweep_steps=0", "--split_steps=20",
       "--keras=", f"--out={out}"],
      cwd=ROOT, capture_output=True, text=True, check=False, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = out.read_text()
  assert text.startswith("Platform: ")
  rows = [line for line in text.splitlines() if line.startswith("| ")]
  head = [c.strip() for c in rows[0].strip("|").split("|")]
  assert head[:4] == ["case", "batch", "Flax loop", "PyTorch eager"]
  assert head.index("bnlab auto (form)") == 4 + ("PyTorch CUDA graph" in head)
  cases = [r.split(" | ")[0].strip("| ") + f" b{r.split(' | ')[1]}" for r in rows[1:]]
  assert cases == ["seed CNN + BN b32", "seed CNN, no BN b32", "seed CNN + BN b128",
                   "seed CNN, no BN b128", "paper MLP + BN b60"]
  for row in rows[1:]:
    cells = dict(zip(head, (c.strip() for c in row.strip("|").split("|"))))
    assert len(cells) == len(head) == len(row.strip("|").split("|")), row
    assert float(cells["Flax loop"].replace(",", "")) > 0
    assert float(cells["bnlab auto (form)"].split()[0].replace(",", "")) > 0
    assert cells["vs Flax loop"].endswith("x")
  assert "BN's cost in the seed CNN, batch 32" in text
  assert "Paper MLP floor" in text
  assert "Where a run's time goes: paper MLP, 20 steps through `train_and_evaluate`" in text


# -- the pieces, without timing anything ---------------------------------------------------

import contextlib  # noqa: E402
import types  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import benchmark  # noqa: E402
import torch_peer  # noqa: E402

FULL_SPLIT = {"total": 7.3, "startup": 0.8, "compile": 0.9, "train": 4.8, "evaluate": 0.5,
              "checkpoint": 0.2, "log": 0.1}


def test_split_line_names_every_part_and_the_ratio_to_the_train_steps():
  text = benchmark.split_text(50_000, 7.4, {"time": FULL_SPLIT, "wall_time": 7.3}, 625_000.0)
  assert "50,000 steps" in text and "wall 7.4 s" in text
  assert "**1.54x** its train steps (4.8 s; target <= 1.3x)" in text
  assert "at the table's bnlab rate the steps take 4.8 s" in text
  for part in ("startup 0.80 s", "compile 0.90 s", "train 4.80 s", "evaluate 0.50 s",
               "checkpoint 0.20 s", "log 0.10 s", "other 0.00 s", "total 7.3 s"):
    assert part in text, part
  assert "missing" not in text


def test_split_line_takes_other_from_the_summary_and_keeps_unknown_parts():
  split = dict(FULL_SPLIT, other=0.3, host_sync=0.1)
  text = benchmark.split_text(1000, 7.0, {"time": split}, None)
  assert "host_sync 0.10 s" in text and "other 0.30 s" in text
  assert "table's" not in text


def test_split_line_without_the_split_says_so_and_uses_the_table_rate():
  text = benchmark.split_text(50_000, 14.9, {"wall_time": 14.3}, 625_000.0)
  assert "the split is missing" in text and "wall_time 14.3 s" in text
  assert "**3.10x** its steps at the table's bnlab rate (4.8 s" in text
  text = benchmark.split_text(500, 2.0, {}, None)
  assert "the split is missing (summary.json has no 'time')" in text and "x**" not in text


def test_fastest_peer_is_taken_over_the_columns_that_ran():
  peers = {"PyTorch eager": 30_000.0, "PyTorch CUDA graph": 450_000.0,
           "Keras jax": "not installed"}
  assert benchmark.fastest(peers) == ("PyTorch CUDA graph", 450_000.0)
  assert benchmark.ratio_cell(900_000.0, peers, name_it=True) == "2.00x (PyTorch CUDA graph)"
  assert benchmark.ratio_cell(900_000.0, {"PyTorch eager": "not installed"}, True) == "-"
  assert benchmark.fastest({"a": "capture failed", "b": 5.0}) == ("b", 5.0)
  assert benchmark.fastest({}) is None
  assert [benchmark.peer_cell(v) for v in peers.values()] == ["30,000", "450,000",
                                                              "not installed"]


def test_table_head_has_one_column_per_peer():
  head, sep = benchmark.table_head([torch_peer.EAGER, torch_peer.GRAPH, "Keras jax"], ["scan"])
  assert head.startswith("| case | batch | Flax loop | PyTorch eager | PyTorch CUDA graph | "
                         "Keras jax | bnlab auto (form) | vs Flax loop | vs PyTorch | "
                         "vs fastest peer | bnlab scan |")
  assert sep.count("---") == head.count("|") - 1


def test_extra_columns_are_headed_in_order_and_apply_only_where_their_setting_exists():
  extras = benchmark.extra_columns(["5"], ["gemm", "im2col"])
  assert extras == [("unroll 5", {"unroll": 5}), ("conv gemm", {"conv": "gemm"}),
                    ("conv im2col", {"conv": "im2col"})]
  head, _ = benchmark.table_head([torch_peer.EAGER], [], extras)
  assert head.endswith("| bnlab unroll 5 (vs fastest peer) | bnlab conv gemm (vs fastest peer) "
                       "| bnlab conv im2col (vs fastest peer) |")
  assert benchmark.column_applies({"conv": "gemm"}, "seed_cnn", scanned=True)
  assert not benchmark.column_applies({"conv": "gemm"}, "paper_mlp", scanned=True)
  assert benchmark.column_applies({"unroll": 5}, "paper_mlp", scanned=True)
  assert not benchmark.column_applies({"unroll": 5}, "seed_cnn", scanned=False)


def test_sweep_line_reports_the_big_sweep_against_the_24():
  r = {"members": 24, "steps": 10_000, "grouped_s": 10.0, "solo_s": 250.0, "ratio": 25.0,
       "grouped_warm_s": 5.0, "warm_ratio": 50.0, "worst_accuracy_gap": 0.0}
  big = {"members": 240, "steps": 10_000, "groups": 3, "grouped_s": 25.0, "failed": 0}
  text = benchmark.sweep_text(r, big)
  assert "**25.0x**" in text and "in 3 group(s)" in text and "**2.50x** the 24 grouped" in text
  assert "compilation cache 5.0 s, **50.0x**" in text
  assert "failed" not in text
  assert "failed" in benchmark.sweep_text(r, dict(big, failed=2))
  assert "240" not in benchmark.sweep_text(r, None)


def _fake_torch(cuda: bool):
  return types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: cuda))


def test_cuda_graph_peer_is_skipped_with_a_reason_without_torch_or_cuda():
  assert torch_peer.graph_skip_reason(None) == "torch not installed"
  assert torch_peer.graph_skip_reason(_fake_torch(False)) == "no CUDA"
  assert torch_peer.graph_skip_reason(_fake_torch(True)) is None
  assert torch_peer.columns(_fake_torch(False)) == [torch_peer.EAGER]
  assert torch_peer.columns(_fake_torch(True)) == [torch_peer.EAGER, torch_peer.GRAPH]
  if torch_peer.import_torch() is None:
    assert torch_peer.runners("paper_mlp", "batch", 60, None, None) == {
        torch_peer.EAGER: "not installed"}


class _Arr(np.ndarray):
  def clone(self):
    return self.copy()


class _RecordingTorch:
  """The few torch calls `graph_run` makes, recording what runs on which stream."""

  def __init__(self):
    self.events, self.capturing = [], False
    outer = self

    class Stream:
      def __init__(self, name="side"):
        self.name = name

      def wait_stream(self, other):
        outer.events.append((f"{self.name} waits for {other.name}",))

    class CUDAGraph:
      def replay(self):
        outer.events.append(("replay",) + tuple(a.copy() for a in outer.captured))

    default = Stream("default")
    self.stream = default

    @contextlib.contextmanager
    def stream(s):
      self.stream = s
      yield
      self.stream = default

    @contextlib.contextmanager
    def graph(g):
      assert isinstance(g, CUDAGraph)
      self.capturing = True
      yield
      self.capturing = False

    self.cuda = types.SimpleNamespace(
        Stream=Stream, CUDAGraph=CUDAGraph, stream=stream, graph=graph,
        current_stream=lambda: self.stream, synchronize=lambda: outer.events.append(("sync",)))

  def index_select(self, x, dim, idx, out):
    assert dim == 0
    np.take(x, idx, axis=0, out=out)

  def step(self, x, y):
    if self.capturing:
      self.captured = (x, y)  # the static tensors the graph reads on replay
      self.events.append(("capture",))
    else:
      self.events.append(("eager on", self.stream.name))


def test_graph_runner_warms_up_on_a_side_stream_captures_once_and_copies_each_batch_in():
  fake = _RecordingTorch()
  x_all = np.arange(40, dtype=np.float32).reshape(20, 2).view(_Arr)
  y_all = np.arange(20).view(_Arr)
  perm = np.random.default_rng(0).permutation(20)
  run = torch_peer.graph_run(fake, fake.step, x_all, y_all, perm, batch=4)
  assert fake.events == [("side waits for default",)] + [("eager on", "side")] * 3 + [
      ("default waits for side",), ("capture",)]
  del fake.events[:]
  run(3)
  seen = fake.events  # each replay with the batch it trains on
  assert [e[0] for e in seen] == ["replay"] * 3 + ["sync"]
  for i, (_, x, y) in enumerate(seen[:3]):
    idx = torch_peer.batch_indices(perm, i, 4)
    np.testing.assert_array_equal(x, x_all[idx])
    np.testing.assert_array_equal(y, y_all[idx])


def test_eager_runner_runs_the_same_step_on_gathered_batches():
  calls, synced = [], []
  x_all, y_all = np.arange(20) * 10, np.arange(20)
  perm = np.arange(20)[::-1]
  run = torch_peer.eager_run(lambda x, y: calls.append((x, y)), x_all, y_all, perm, 4,
                             lambda: synced.append(True))
  run(2)
  assert synced == [True] and len(calls) == 2
  np.testing.assert_array_equal(calls[1][1], perm[4:8])
  np.testing.assert_array_equal(calls[1][0], perm[4:8] * 10)


def test_step_sets_gradients_to_none_before_the_forward_pass():
  log = []
  opt = types.SimpleNamespace(zero_grad=lambda set_to_none: log.append(("zero", set_to_none)),
                              step=lambda: log.append(("step",)))
  loss = types.SimpleNamespace(backward=lambda: log.append(("backward",)))
  step = torch_peer.make_step(lambda x: log.append(("forward", x)) or x,
                              opt, lambda out, y: loss)
  assert step("x", "y") is loss
  assert log == [("zero", True), ("forward", "x"), ("backward",), ("step",)]
