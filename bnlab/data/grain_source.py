"""A training split streamed through grain from its TFDS array_record files (`data.pipeline`).

Why: a dataset larger than the device's memory cannot be held there; grain reads,
decodes and standardizes batches in background threads while the device trains on
the previous ones. Why this order: the batch of step s of epoch e holds the examples
at `perm_e[(s mod steps_per_epoch) * batch_size:][:batch_size]`, the permutation
the device-resident path gathers with (`bnlab.engine.steps.permutation`), so a
streamed run sees the same batches, standardized by the same lookup table
(`normalize`), as a device-resident run of the same seed.

grain is an optional dependency (`pip install bnlab[grain]`), imported only here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os

import numpy as np

from bnlab.data import normalize
from bnlab.data import tfds_images
from bnlab.data.dataset import DataError, DataSpec

# Bytes of standardized batches one train call puts on the device at a time.
CHUNK_BYTES = 64 * 2**20


def import_grain():
  try:
    import grain  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise DataError(
        "data.pipeline=grain needs grain, which is not installed. Fix: pip install "
        "'bnlab[grain]' (or pip install grain), or --config.data.pipeline=device") from err
  return grain


class StreamedSplit:
  """The training split of TFDS dataset `spec.name`, read in batches through grain.

  `indices`: which stored examples form the split (`data.num_train`'s subset), in
  order; `stats`: the per-channel standardization, or None for raw uint8 images.
  """

  def __init__(self, spec: DataSpec, data_dir: str | None, indices: np.ndarray,
               stats: normalize.Stats | None, num_threads: int = 0):
    self.grain = import_grain()
    self.spec, self.data_dir = spec, data_dir
    self.indices = np.asarray(indices, np.int64)
    self.stats = stats
    self.table = None if stats is None else normalize.lookup_table(stats)
    builder = tfds_images.prepared_builder(spec.name, data_dir)
    self.image_key, self.label_key = tfds_images._keys(builder.info)  # pylint: disable=protected-access
    self.source = builder.as_data_source(tfds_images.TRAIN_SPLIT)
    self.info_path = os.path.join(str(builder.data_dir), "dataset_info.json")
    self.num_threads = num_threads or min(8, os.cpu_count() or 1)
    self._iterator = None
    self._position = None  # (epoch, next in-epoch step) the iterator yields next

  def subset(self, take) -> StreamedSplit:
    """The split of the examples at positions `take` (a slice or sorted indices)."""
    out = copy.copy(self)
    out.indices = self.indices[take]
    out._iterator = out._position = None  # pylint: disable=protected-access
    return out

  def __len__(self) -> int:
    return len(self.indices)

  @property
  def batch_dtype(self):
    return np.uint8 if self.stats is None else np.float32

  def identity(self) -> str:
    """What names the streamed split for a run's resume check, without reading it: the
    dataset's info (name, version, shard lengths and sizes) and the examples taken."""
    h = hashlib.sha256()
    with open(self.info_path, "rb") as f:
      info = json.load(f)
    h.update(json.dumps({k: info.get(k) for k in ("name", "version", "splits", "fileFormat")},
                        sort_keys=True).encode())
    h.update(self.indices.tobytes())
    return h.hexdigest()

  def read(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(images as the model takes them, int32 labels) of split positions `positions`."""
    images, labels = tfds_images.read_examples(
        self.source, self.indices[np.asarray(positions)], self.image_key, self.label_key)
    return normalize.standardize(images, self.stats, self.table), labels.astype(np.int32)

  def read_stored(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the stored uint8 images, labels as the loaded split types them) at split positions
    `positions`: examples held out of the stream (`data.validation_size`) and kept in
    memory, standardized on the device like the test split."""
    images, labels = tfds_images.read_examples(
        self.source, self.indices[np.asarray(positions)], self.image_key, self.label_key)
    return images, labels.astype(tfds_images.label_dtype(self.spec.num_classes))

  def _open(self, perm: np.ndarray, start: int, batch_size: int, epoch: int):
    steps = len(perm) // batch_size
    order = np.asarray(perm[start * batch_size: steps * batch_size])
    grain = self.grain
    dataset = (grain.MapDataset.source(order.reshape(-1, batch_size))
               .map(self.read)
               .to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads,
                                                  prefetch_buffer_size=2 * self.num_threads)))
    self._iterator = iter(dataset)
    self._position = (epoch, start)

  def batches(self, perm: np.ndarray, epoch: int, start: int, count: int, batch_size: int):
    """`count` batches from in-epoch step `start` of `epoch`, whose shuffle is `perm`:
    yields (images, labels) per step. Reading ahead continues between calls."""
    if self._position != (epoch, start):
      self._open(perm, start, batch_size, epoch)
    for k in range(count):
      images, labels = next(self._iterator)
      self._position = (epoch, start + k + 1)
      yield images, labels

  def in_order(self, batch_size: int):
    """The whole split in stored order, in chunks of at most `batch_size` examples (the
    last may be shorter): what an evaluation of the training set reads."""
    n = len(self)
    grain = self.grain
    starts = np.arange(0, n, batch_size)
    dataset = (grain.MapDataset.source(starts)
               .map(lambda s: self.read(np.arange(s, min(n, s + batch_size))))
               .to_iter_dataset(grain.ReadOptions(num_threads=self.num_threads,
                                                  prefetch_buffer_size=2 * self.num_threads)))
    yield from dataset

  def chunk_steps(self, batch_size: int) -> int:
    """Steps whose batches one train call stacks on the device at a time."""
    per_step = batch_size * (int(np.prod(self.spec.image_shape))
                             * np.dtype(self.batch_dtype).itemsize + 4)
    return max(1, CHUNK_BYTES // per_step)
