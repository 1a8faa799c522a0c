"""PyTorch peers of the benchmark: the same models and SGD, eager and as one CUDA graph.

Imported by experiments/benchmark.py; torch is needed only to run the peers.
  - PyTorch eager: one Python-driven `step` per batch, batches gathered from
    tensors resident on the device: a CUDA GPU when torch sees one, else the
    CPU with all its threads (BNLAB_TORCH_THREADS overrides);
  - PyTorch CUDA graph (CUDA only): the same `step` (forward, backward,
    `SGD.step()`) captured once with `torch.cuda.graph` on static input
    tensors, after a warm-up on a side stream as PyTorch's CUDA-graph docs
    require; per step the batch is gathered into the static inputs
    (`index_select(out=...)`) and the graph replayed.
On CUDA, TF32 is allowed for matmuls and convolutions: JAX's default float32
precision on these GPUs.
"""

from __future__ import annotations

import os

import numpy as np

EAGER, GRAPH = "PyTorch eager", "PyTorch CUDA graph"


def import_torch():
  """The torch module, or None when it is not installed."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return torch


def graph_skip_reason(torch) -> str | None:
  """Why the CUDA-graph peer cannot run here; None when it can."""
  if torch is None:
    return "torch not installed"
  if not torch.cuda.is_available():
    return "no CUDA"
  return None


def columns(torch) -> list[str]:
  """The PyTorch columns of the table: eager always, the CUDA graph where it can run."""
  return [EAGER] + ([GRAPH] if graph_skip_reason(torch) is None else [])


def threads() -> int:
  """CPU threads of the eager peer on the CPU."""
  return int(os.environ.get("BNLAB_TORCH_THREADS", os.cpu_count() or 1))


def build_model(torch, model_name: str, norm: str):
  """The seed CNN or the paper MLP in torch.nn, initialised from seed 0, in train mode."""
  tnn = torch.nn
  torch.manual_seed(0)
  if model_name == "seed_cnn":
    layers = [tnn.Conv2d(1, 32, 3), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Conv2d(32, 64, 3),
              tnn.ReLU(), tnn.Flatten()]
    if norm == "batch":
      layers.append(tnn.BatchNorm1d(7744, eps=1e-3, momentum=0.01))
    layers += [tnn.Linear(7744, 64), tnn.ReLU(), tnn.Linear(64, 10)]
  else:
    layers = [tnn.Flatten()]
    for fan_in in (784, 100, 100):
      layers += [tnn.Linear(fan_in, 100, bias=False), tnn.BatchNorm1d(100), tnn.Sigmoid()]
    layers.append(tnn.Linear(100, 10))
  return tnn.Sequential(*layers).train()


def make_step(model, opt, loss_fn):
  """`step(x, y)`: one SGD step, the body both peers run (eager, or captured once).

  Gradients are set to None first, so in a capture `backward()` allocates them
  from the graph's private pool and each replay writes them afresh.
  """

  def step(x, y):
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()
    return loss

  return step


def batch_indices(perm, i: int, batch: int):
  """Indices of batch `i`: a window of the permutation, as in every runner of the benchmark."""
  return perm[(i * batch) % (len(perm) - batch):][:batch]


def eager_run(step, x_all, y_all, perm, batch: int, sync):
  """`run(n)`: n eager steps on batches gathered from the resident data, then `sync()`."""

  def run(n):
    for i in range(n):
      idx = batch_indices(perm, i, batch)
      step(x_all[idx], y_all[idx])
    sync()

  return run


def graph_run(torch, step, x_all, y_all, perm, batch: int, warmup: int = 3):
  """`run(n)`: n replays of `step` captured in a CUDA graph, each on a batch copied in."""
  static_x, static_y = x_all[:batch].clone(), y_all[:batch].clone()

  def load(i):
    idx = batch_indices(perm, i, batch)
    torch.index_select(x_all, 0, idx, out=static_x)
    torch.index_select(y_all, 0, idx, out=static_y)

  load(0)
  side = torch.cuda.Stream()
  side.wait_stream(torch.cuda.current_stream())
  with torch.cuda.stream(side):
    for _ in range(warmup):
      step(static_x, static_y)
  torch.cuda.current_stream().wait_stream(side)
  graph = torch.cuda.CUDAGraph()
  with torch.cuda.graph(graph):
    step(static_x, static_y)

  def run(n):
    for i in range(n):
      load(i)
      graph.replay()
    torch.cuda.synchronize()

  return run


def runners(model_name: str, norm: str, batch: int, images, labels) -> dict:
  """{column: `run(n)`, or the note its cell shows} for each of `columns(torch)`.

  Each runner trains its own model from the same initialisation with SGD at
  lr 0.01; both share the data, resident on the device.
  """
  torch = import_torch()
  if torch is None:
    return {EAGER: "not installed"}
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  if cuda:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
  else:
    torch.set_num_threads(threads())
  x = images[:, None] if model_name == "seed_cnn" else images
  x_all = torch.from_numpy(x.astype(np.float32) / 255.0).to(device)
  y_all = torch.from_numpy(labels.astype(np.int64)).to(device)
  torch.manual_seed(0)
  perm = torch.randperm(len(y_all), device=device)

  def new_step():
    model = build_model(torch, model_name, norm).to(device)
    return make_step(model, torch.optim.SGD(model.parameters(), lr=0.01),
                     torch.nn.CrossEntropyLoss())

  sync = torch.cuda.synchronize if cuda else (lambda: None)
  runs = {EAGER: eager_run(new_step(), x_all, y_all, perm, batch, sync)}
  if GRAPH in columns(torch):
    try:
      runs[GRAPH] = graph_run(torch, new_step(), x_all, y_all, perm, batch)
    except RuntimeError as e:  # a capture that fails leaves the other columns standing
      print(f"{GRAPH} ({model_name}, batch {batch}): capture failed: {e}", flush=True)
      runs[GRAPH] = "capture failed"
  return runs
