"""Several processes (hosts) training one data-parallel run: `jax.distributed`.

The config section `distributed` says whether this process is one of several;
`initialize` then calls `jax.distributed.initialize` (before any JAX
computation), after which `jax.devices()` lists the devices of every process
and one jitted program runs over all of them. Every process executes the same
code on the same data: the data and the train state are replicated on every
device, each device computes on its part of the global batch, and reductions
over the batch (BN's statistics included) are global, exactly as with several
devices in one process.

Who does what: every process loads the data, trains, evaluates and calls the
checkpoint manager (orbax coordinates the processes; for replicated arrays
process 0 writes the files); only process 0 (the primary) holds the work
directory's lock and writes config.json, metrics.jsonl, TensorBoard events and
summary.json. The work directory must be one directory that every process sees
(one machine, or a shared file system).

A failure in one process must not leave the others waiting forever in a
collective: the steps that can fail on one process only (opening the work
directory, loading the data) run through `together`, which tells every
process whether all succeeded, so all stop with a one-line error.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import time
from typing import Any, Callable, TypeVar

import jax
import numpy as np

from bnlab.errors import ConfigError, one_line

T = TypeVar("T")

# jax.distributed's cluster auto-detection methods (jax/_src/clusters/): Open MPI,
# SLURM, mpi4py (opt-in), Cloud TPU VMs on GCE and GKE.
CLUSTER_DETECTION = ("", "auto", "ompi", "slurm", "mpi4py", "gcetpu", "gketpu")


class DistributedError(RuntimeError):
  """The processes of a multi-process run cannot work together; says why and the fix."""


def requested(dcfg) -> bool:
  """Whether the `distributed` config section asks for `jax.distributed.initialize`."""
  return bool(dcfg.coordinator_address or dcfg.cluster_detection)


def initialize(dcfg) -> bool:
  """`jax.distributed.initialize` as the `distributed` section says; True if distributed.

  Does nothing for a single-process config, or when JAX's distributed system
  is already up (initialized by this function or by the caller). Must run
  before any JAX computation; `train.train_and_evaluate` (so `bnlab.main`)
  calls it first thing.
  """
  if jax.distributed.is_initialized():
    return True
  if not requested(dcfg):
    return False
  kwargs: dict[str, Any] = {"initialization_timeout": int(dcfg.initialization_timeout),
                            "heartbeat_timeout_seconds": int(dcfg.heartbeat_timeout)}
  if dcfg.coordinator_address:
    kwargs["coordinator_address"] = dcfg.coordinator_address
  if dcfg.num_processes > 0:
    kwargs["num_processes"] = int(dcfg.num_processes)
  if dcfg.process_id >= 0:
    kwargs["process_id"] = int(dcfg.process_id)
  if dcfg.local_device_ids:
    kwargs["local_device_ids"] = [int(i) for i in dcfg.local_device_ids]
  if dcfg.cluster_detection not in ("", "auto"):
    kwargs["cluster_detection_method"] = dcfg.cluster_detection
  elif not dcfg.cluster_detection:
    kwargs["cluster_detection_method"] = "deactivate"
  shown = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
  if dcfg.coordinator_address and dcfg.process_id == 0:
    _check_port_free(dcfg.coordinator_address)
  elif dcfg.coordinator_address and dcfg.process_id > 0:
    _wait_for_coordinator(dcfg.coordinator_address, int(dcfg.initialization_timeout))
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as e:  # pylint: disable=broad-except
    detail = one_line(e, 300)
    if "must be called before" in detail:
      fix = ("call bnlab.engine.distributed.initialize(config.distributed) at the start of your "
             "script, before any JAX computation (train.train_and_evaluate does)")
    else:
      fix = ("check config.distributed.* (every process needs the same coordinator_address "
             "host:port, reachable from all of them, the same num_processes and its own "
             "process_id), and that process 0 is running")
    raise DistributedError(
        f"jax.distributed.initialize({shown}) failed ({type(e).__name__}: {detail}); {fix}"
    ) from None
  return True


def _check_port_free(address: str) -> None:
  """Process 0 serves the coordinator on every interface at the address's port.

  jaxlib 0.10 crashes (segfault) when that port is taken, so look first.
  """
  port = int(address.rsplit(":", 1)[1])
  family = socket.AF_INET6 if socket.has_dualstack_ipv6() else socket.AF_INET
  try:
    with socket.socket(family, socket.SOCK_STREAM) as s:
      s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
      if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
      s.bind(("", port))
  except OSError as e:
    raise DistributedError(
        f"port {port} of config.distributed.coordinator_address={address!r} is in use on "
        f"this host (process 0 serves the coordinator there: {e.strerror or e}); choose a "
        "free port, the same for every process") from None


def _wait_for_coordinator(address: str, timeout: int) -> None:
  """Waits up to `timeout` s until process 0's coordinator accepts connections.

  jaxlib aborts the process (a C++ stack, no Python exception) when the
  coordinator does not answer in time, so look first.
  """
  host, port = address.rsplit(":", 1)
  host = host[1:-1] if host.startswith("[") else host
  deadline = time.monotonic() + timeout
  while True:
    try:
      with socket.create_connection((host, int(port)),
                                    timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
        return
    except socket.gaierror as e:
      raise DistributedError(
          f"the host of config.distributed.coordinator_address={address!r} cannot be resolved "
          f"({e.strerror or e}); set it to process 0's host:port, the same for every "
          "process") from None
    except OSError as e:
      if time.monotonic() >= deadline:
        raise DistributedError(
            f"the coordinator at config.distributed.coordinator_address={address!r} did not "
            f"answer within {timeout} s ({e.strerror or type(e).__name__}); start process 0 "
            "(it serves the coordinator), check that address and port (the same for every "
            "process) and the firewall, or raise config.distributed.initialization_timeout"
        ) from None
      time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def process_count() -> int:
  """Processes in this run (1 unless `jax.distributed` is up; never starts a backend then)."""
  return jax.process_count() if jax.distributed.is_initialized() else 1


def is_primary() -> bool:
  """Whether this process writes the run's records (process 0, or the only one)."""
  return process_count() == 1 or jax.process_index() == 0


def mesh_devices(num_devices: int) -> list:
  """The devices of a data-parallel mesh of `num_devices` (0: all) over every process.

  With several processes each contributes the same number of its own devices
  (every process must own a part of the mesh to take part in the steps).
  """
  devices = jax.devices()
  n = len(devices) if num_devices == 0 else num_devices
  if n > len(devices):
    raise ConfigError(
        f"config.train.num_devices={num_devices} but only {len(devices)} "
        f"{jax.default_backend()} devices are visible; lower it (0 = all)")
  procs = jax.process_count()
  if procs == 1:
    return devices[:n]
  per_process = [[d for d in devices if d.process_index == p] for p in range(procs)]
  fewest = min(len(p) for p in per_process)
  if n % procs or n // procs > fewest:
    raise ConfigError(
        f"config.train.num_devices={num_devices} cannot be split evenly over the {procs} "
        f"processes of this run (at least {fewest} devices each); set 0 (all "
        f"{len(devices)} devices) or a multiple of {procs} up to {fewest * procs}")
  return [d for p in per_process for d in p[:n // procs]]


def replicate(tree, mesh):
  """`tree` (host or device arrays, equal on every process) replicated on `mesh`.

  `mesh=None`: on the default device. With several processes the mesh has
  devices this process cannot address; each process fills its own from its
  copy of the values (`jax.make_array_from_process_local_data`), so no data
  crosses between processes.
  """
  if mesh is None:
    return jax.device_put(tree)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x), np.shape(x)),
      tree)


def _gather(row: np.ndarray) -> np.ndarray:
  """Every process's `row` (same shape everywhere), stacked by process index."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(row))


def together(what: str, fn: Callable[[], T],
             fingerprint: Callable[[T], bytes] | None = None,
             differs: str = "", primary_first: bool = False) -> T:
  """`fn()` on every process; raises on all of them if it failed on any.

  A process whose `fn` raised re-raises its own error; the others raise
  DistributedError naming it. With `fingerprint`, the bytes it returns for
  the result must be equal on every process (e.g. the data loaded), else
  every process raises DistributedError: "process(es) [...] `differs`". With
  `primary_first`, process 0 runs `fn` before the others start theirs (it
  fills shared caches once). Single process: just `fn()`.
  """
  if process_count() == 1:
    return fn()
  me = jax.process_index()

  def attempt():
    try:
      return fn(), None
    except Exception as e:  # pylint: disable=broad-except
      return None, e

  result, error = None, None
  if primary_first:
    if me == 0:
      result, error = attempt()
    _agree(what, error, me, {0})
    if me != 0:
      result, error = attempt()
  else:
    result, error = attempt()
  digest = b""
  if error is None and fingerprint is not None:
    try:
      digest = hashlib.sha256(fingerprint(result)).digest()
    except Exception as e:  # pylint: disable=broad-except
      error = e
  statuses = _agree(what, error, me, None, digest)
  digests = statuses[:, 1:]
  if fingerprint is not None:
    differ = [p for p in range(len(digests)) if not np.array_equal(digests[p], digests[0])]
    if differ:
      raise DistributedError(f"process(es) {differ} of {len(digests)} {differs}")
  return result


def _agree(what: str, error: BaseException | None, me: int, among: set[int] | None,
           digest: bytes = b"") -> np.ndarray:
  """Exchanges (ok, digest) with every process; raises if a process in `among` failed."""
  row = np.zeros(33, np.uint8)
  row[0] = error is None
  if digest:
    row[1:] = np.frombuffer(digest, np.uint8)
  statuses = _gather(row)
  if error is not None:
    raise error
  failed = [p for p in range(statuses.shape[0])
            if (among is None or p in among) and not statuses[p, 0]]
  if failed:
    raise DistributedError(
        f"process(es) {failed} of {statuses.shape[0]} failed while {what} (their own "
        f"error is in their output); process {me} stops too. Fix that error and rerun")
  return statuses


def agreed_max(value: int) -> int:
  """The largest of every process's `value` (a small non-negative int; single process: it)."""
  if process_count() == 1:
    return value
  return int(_gather(np.asarray([value], np.int32)).max())


def barrier(name: str) -> None:
  """Waits until every process gets here (single process: returns at once)."""
  if process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def config_fingerprint(cfg) -> bytes:
  """The config's bytes without the `distributed` section (it differs per process)."""
  d = json.loads(cfg.to_json_best_effort())
  d.pop("distributed", None)
  return json.dumps(d, sort_keys=True).encode()


def data_fingerprint(ds) -> bytes:
  """The bytes of a dataset's four arrays (shapes, dtypes and values), and of its held-out
  validation examples where it has them."""
  h = hashlib.sha256()
  held = () if getattr(ds, "val_images", None) is None else (ds.val_images, ds.val_labels)
  for a in (ds.train_images, ds.train_labels, ds.test_images, ds.test_labels, *held):
    a = np.ascontiguousarray(a)
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(a.tobytes())
  return h.digest()


_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def valid_address(address: str) -> bool:
  """Whether `address` is host:port (host a name, IPv4 or [IPv6]; port 1..65535)."""
  m = _ADDRESS.match(address)
  return bool(m) and 0 < int(m.group(2)) < 65536
