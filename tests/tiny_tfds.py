"""Tiny TFDS image-classification datasets written by the tests, in array_record, without
TensorFlow: TFDS' own `GeneratorBasedBuilder` with `tfds.features.Image` (PNG, encoded
from PIL images, as cifar10 stores them) and `ClassLabel`, so bnlab reads them exactly
as it reads a dataset a user prepared with `tfds build`.

Each class's images carry a bright patch at the class's position (and, in colour, the
class's colour), plus noise: learnable in a few steps. The builders live in this
importable module because TFDS registers a builder by its class (their info is built with
`tfds.core.DatasetInfo`: TFDS' metadata lookup needs a package, which tests/ is not).
"""

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

tfds.disable_progress_bar()


def make_arrays(shape, num_classes: int, num_train: int, num_test: int, seed: int = 0):
  """(train_images, train_labels, test_images, test_labels), images uint8 of `shape`."""
  rng = np.random.default_rng(seed)
  h, w, c = shape

  def draw(n):
    labels = rng.integers(0, num_classes, n).astype(np.int64)
    images = rng.integers(0, 80, (n, h, w, c)).astype(np.uint8)
    for i, label in enumerate(labels):
      r, q = divmod(int(label) % 16, 4)
      colour = 255 - (int(label) // 16) * 30
      images[i, r * h // 4: r * h // 4 + h // 4, q * w // 4: q * w // 4 + w // 4,
             int(label) % c] = colour
    return images, labels

  return (*draw(num_train), *draw(num_test))


class _Tiny(tfds.core.GeneratorBasedBuilder):
  """A tiny dataset of `SHAPE` uint8 images in `NUM_CLASSES` classes."""

  VERSION = tfds.core.Version("1.0.0")
  SHAPE = (16, 16, 1)
  NUM_CLASSES = 10
  NUM_TRAIN, NUM_TEST = 96, 40
  TEST_SPLIT = "test"

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=self.SHAPE),
            "label": tfds.features.ClassLabel(num_classes=self.NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        disable_shuffling=True,
    )

  def arrays(self):
    return make_arrays(self.SHAPE, self.NUM_CLASSES, self.NUM_TRAIN, self.NUM_TEST,
                       seed=self.NUM_CLASSES * 7 + self.SHAPE[-1])

  def _split_generators(self, dl_manager):
    del dl_manager
    train_x, train_y, test_x, test_y = self.arrays()
    return {"train": self._generate_examples(train_x, train_y),
            self.TEST_SPLIT: self._generate_examples(test_x, test_y)}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
      yield i, {"image": pil, "label": int(label)}


class TinyGrey10(_Tiny):
  """Grey 16x16 images, 10 classes."""


class TinyColour100(_Tiny):
  """Colour 12x12 images, 100 classes; a validation split instead of test."""
  SHAPE = (12, 12, 3)
  NUM_CLASSES = 100
  NUM_TRAIN, NUM_TEST = 200, 50
  TEST_SPLIT = "validation"


class TinyColour10(_Tiny):
  """Colour 16x16 images, 10 classes."""
  SHAPE = (16, 16, 3)
  NUM_TRAIN, NUM_TEST = 160, 40


class TinyDots(_Tiny):
  """Grey 6x6 images: too small for a crop with padding 4, or for the seed CNN."""
  SHAPE = (6, 6, 1)
  NUM_TRAIN, NUM_TEST = 20, 10


class TinyVectors(tfds.core.GeneratorBasedBuilder):
  """Not images: 8-number vectors with a class label."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            "features": tfds.features.Tensor(shape=(8,), dtype=np.float32),
            "label": tfds.features.ClassLabel(num_classes=3),
        }),
        supervised_keys=("features", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(8), "test": self._generate_examples(4)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"features": np.full((8,), i, np.float32), "label": i % 3}


BUILDERS = {"tiny_grey10": TinyGrey10, "tiny_colour100": TinyColour100,
            "tiny_colour10": TinyColour10, "tiny_dots": TinyDots, "tiny_vectors": TinyVectors}


def prepare(name: str, data_dir: str, file_format: str = "array_record"):
  """Writes dataset `name` into `data_dir`; returns its builder (its arrays: `.arrays()`)."""
  builder = BUILDERS[name](data_dir=str(data_dir), file_format=file_format)
  builder.download_and_prepare()
  return builder
