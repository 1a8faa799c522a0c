"""Any TFDS image-classification dataset by name (`data.name`), read without TensorFlow.

Why TFDS' array_record data sources: they give random access to a prepared dataset's
examples with numpy and PIL alone, so bnlab reads what a user prepared with `tfds build
NAME --file_format=array_record` (which needs TensorFlow once, to build) and never
TensorFlow itself. The shape, channels and classes come from the dataset's info
(`features["image"].shape`, `features["label"].num_classes`), read before any example,
so a wrong name or an unprepared dataset fails before anything compiles.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from bnlab.data.dataset import DIR_FLAG, DataError, DataSpec, check_array_record, make_dataset
from bnlab.errors import one_line

NAME_FLAG = "--config.data.name"
TRAIN_SPLIT = "train"
TEST_SPLITS = ("test", "validation")  # the first the dataset has is evaluated
READ_CHUNK = 4096  # examples decoded per read: bounds the decoded dicts held at once


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise DataError(f"data.name: importing tensorflow_datasets failed ({one_line(err, None)}). "
                    "Fix: pip install tensorflow-datasets") from err
  return tfds


def tfds_dir(data_dir: str | None = None) -> str:
  """The TFDS data dir a dataset by name is read from: `data.dir`, else TFDS' own
  default ($TFDS_DATA_DIR, else ~/tensorflow_datasets), where `tfds build` writes."""
  if data_dir:
    return os.path.abspath(os.path.expanduser(data_dir))
  return os.path.expanduser(_import_tfds().core.constants.DATA_DIR)


def _build_command(name: str, root: str) -> str:
  return f"tfds build {name} --file_format=array_record --data_dir={root}"


def prepared_builder(name: str, data_dir: str | None = None):
  """The TFDS builder of `name` prepared in array_record format in the data dir; else
  DataError (one line) saying where TFDS looked and how to prepare it."""
  tfds = _import_tfds()
  root = tfds_dir(data_dir)
  try:
    builder = tfds.builder(name, data_dir=root)
  except tfds.core.registered.DatasetNotFoundError:
    raise DataError(
        f"data.name={name!r} is not a TFDS dataset: TFDS has no builder of that name and "
        f"none is prepared in {root}. Fix: a name from tfds.list_builders() (e.g. cifar10, "
        f"fashion_mnist), or {DIR_FLAG}=the data dir where you prepared it") from None
  except Exception as err:  # pylint: disable=broad-except  (TFDS raises many types)
    raise DataError(f"data.name={name!r}: TFDS cannot open it in {root} "
                    f"({one_line(err, None)}). Fix: {_build_command(name, root)}") from err
  if not builder.is_prepared():
    raise DataError(
        f"data.name={name!r} is not prepared in {root} (TFDS looked for "
        f"{builder.data_dir}). Fix: {_build_command(name, root)} (building needs TensorFlow "
        f"once; reading does not), or {DIR_FLAG}=the data dir that holds it")
  check_array_record(builder, f"data.name={name!r} in {builder.data_dir}",
                     _build_command(name, root))
  return builder


def _keys(info) -> tuple[str, str]:
  keys = info.supervised_keys
  if isinstance(keys, tuple) and len(keys) == 2 and all(isinstance(k, str) for k in keys):
    return keys
  return "image", "label"


@functools.cache
def describe(name: str, data_dir: str | None = None) -> DataSpec:
  """`name`'s shape, classes and split sizes from its TFDS info; DataError (one line) for
  an unknown, unprepared or non-image dataset. Cached: validation and training ask alike."""
  builder = prepared_builder(name, data_dir)
  info = builder.info
  image_key, label_key = _keys(info)
  features = info.features
  keys = tuple(features.keys()) if hasattr(features, "keys") else ()
  where = f"data.name={name!r} ({builder.data_dir})"
  if image_key not in keys or label_key not in keys:
    raise DataError(
        f"{where} is not an image-classification dataset: bnlab needs features {image_key!r} "
        f"and {label_key!r}, it has {list(keys)}. Fix: name a dataset of labelled images")
  image, label = features[image_key], features[label_key]
  shape = tuple(getattr(image, "shape", ()) or ())
  try:  # np_dtype: TFDS' `dtype` is TensorFlow's, and imports it
    dtype = np.dtype(image.np_dtype)
  except Exception:  # pylint: disable=broad-except  (a nested feature has no one dtype)
    dtype = None
  if len(shape) != 3 or dtype != np.uint8:
    raise DataError(
        f"{where} is not an image dataset bnlab trains on: {image_key!r} is {dtype}"
        f"{list(shape)}, bnlab takes uint8 images (height, width, channels). Fix: name a "
        "dataset of uint8 images")
  if any(d is None for d in shape):
    raise DataError(
        f"{where} has images of varying size {shape}; bnlab takes images of one fixed size "
        "(height, width, channels). Fix: name a dataset of fixed-size images (e.g. cifar10)")
  num_classes = getattr(label, "num_classes", None)
  if not isinstance(num_classes, int) or num_classes < 2:
    raise DataError(
        f"{where}: {label_key!r} is not a class label (tfds.features.ClassLabel with its "
        "number of classes). Fix: name an image-classification dataset")
  splits = info.splits
  test = next((s for s in TEST_SPLITS if s in splits), None)
  if TRAIN_SPLIT not in splits or test is None:
    raise DataError(f"{where} has splits {list(splits.keys())}; bnlab needs 'train' and one of "
                    f"{TEST_SPLITS}. Fix: prepare those splits")
  return DataSpec(name=name, image_shape=shape, num_classes=num_classes,
                  num_train=splits[TRAIN_SPLIT].num_examples,
                  num_test=splits[test].num_examples, test_split=test,
                  where=str(builder.data_dir))


def data_source(name: str, split: str, data_dir: str | None = None):
  """TFDS' random-access array_record source of `split` (examples decoded on access)."""
  return prepared_builder(name, data_dir).as_data_source(split)


def read_examples(source, indices, image_key: str, label_key: str):
  """(images uint8, labels int64) of `source`'s examples at `indices`, in that order."""
  examples = source.__getitems__(list(indices))
  images = np.stack([np.asarray(e[image_key], np.uint8) for e in examples])
  labels = np.asarray([int(e[label_key]) for e in examples], np.int64)
  return images, labels


def label_dtype(num_classes: int):
  return np.uint8 if num_classes <= 256 else np.int32


def read_split(name: str, split: str, data_dir: str | None, spec: DataSpec):
  """A whole split as (images (N, H, W, C) uint8, labels), checked against `spec`."""
  builder = prepared_builder(name, data_dir)
  image_key, label_key = _keys(builder.info)
  where = f"data.name={name!r} split {split!r} ({builder.data_dir})"
  fix = f"rebuild it: {_build_command(name, tfds_dir(data_dir))}"
  try:
    source = builder.as_data_source(split)
    n = len(source)
    images = np.empty((n, *spec.image_shape), np.uint8)
    labels = np.empty((n,), np.int64)
    for start in range(0, n, READ_CHUNK):
      stop = min(n, start + READ_CHUNK)
      images[start:stop], labels[start:stop] = read_examples(
          source, range(start, stop), image_key, label_key)
  except Exception as err:  # pylint: disable=broad-except  (TFDS raises many types)
    raise DataError(f"{where}: cannot read it ({one_line(err, None)}). Fix: {fix}") from err
  if n and (labels.min() < 0 or labels.max() >= spec.num_classes):
    raise DataError(f"{where}: labels outside [0, {spec.num_classes - 1}]. Fix: {fix}")
  return images, labels.astype(label_dtype(spec.num_classes))


def load_by_name(name: str, data_dir: str | None = None):
  """`name`'s train split and test split (or validation, `DataSpec.test_split`) as a
  `Dataset` of (N, H, W, C) uint8 images in TFDS' stored order."""
  spec = describe(name, data_dir)
  train_images, train_labels = read_split(name, TRAIN_SPLIT, data_dir, spec)
  test_images, test_labels = read_split(name, spec.test_split, data_dir, spec)
  arrays = {"train_images": train_images, "train_labels": train_labels,
            "test_images": test_images, "test_labels": test_labels}
  return make_dataset(arrays, f"tfds:{name}", False, name=name, num_classes=spec.num_classes)
