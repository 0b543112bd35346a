"""Reading prepared tfds data sets (ArrayRecord) into host numpy; TensorFlow is never imported."""

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxpurify.data import gtsrb  # noqa: F401  (registers the `gtsrb` builder with tfds)
from jaxpurify.data.catalog import prepare_command
from jaxpurify.data.resize import resize_images
from jaxpurify.errors import UserError

CHUNK = 1024


def read_split(name: str, split: str, data_dir: str, image_size: int, mock: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """images uint8 [N, image_size, image_size, 3] and labels int32 [N] (-1 for `unlabelled`).

  Read in chunks and resized as they come, so a split is never held at its stored size. mock: see data_source.
  """
  source = data_source(name, split, data_dir, mock)
  n = len(source)
  images = np.empty((n, image_size, image_size, 3), np.uint8)
  labels = np.empty((n,), np.int32)
  for start in range(0, n, CHUNK):
    stop = min(start + CHUNK, n)
    examples = _get(source, list(range(start, stop)))
    images[start:stop] = resize_images(np.stack([ex["image"] for ex in examples]), image_size)
    labels[start:stop] = [ex["label"] for ex in examples]
  builder = tfds.builder(name, data_dir=data_dir)
  if mocked(builder, mock):
    # tfds draws mock labels uniformly at random; balanced instead, as the real CIFAR-10 and STL-10 are, so that a
    # clean-label attack finds its rate's share of target images (SIG, label-consistent: 10% of STL-10's 5,000)
    labels = np.arange(n, dtype=np.int32) % builder.info.features["label"].num_classes
  if split == "unlabelled":
    labels[:] = -1
  return images, labels


def _get(source, keys: list[int]) -> list[dict]:
  """source[keys]: one batched read, or one record at a time where `__getitems__` fails."""
  try:
    return source.__getitems__(keys)
  except TypeError:  # tfds.testing.mock_data's `__getitems__` misses an argument
    return [source[i] for i in keys]


def mocked(builder, mock: int) -> bool:
  """Whether `data_source` serves the builder's data set by mock data: asked for (`mock` > 0) and not prepared."""
  return bool(mock) and not (epath.Path(builder.data_dir) / "dataset_info.json").exists()


def data_source(name: str, split: str, data_dir: str, mock: int = 0):
  """The random-access tfds source of a prepared split; UserError (offline, fast) when it is not prepared.

  mock > 0: a split that is not prepared is served by tfds's mock data instead, `mock` examples generated from the
  data set's real feature specs (deterministic), for smoke runs at real shapes without the data.
  """
  builder = tfds.builder(name, data_dir=data_dir)
  if mocked(builder, mock):
    with tfds.testing.mock_data(num_examples=mock, policy=tfds.testing.MockPolicy.USE_CODE):
      return tfds.builder(name, data_dir=data_dir).as_data_source(split=split)
  try:
    return builder.as_data_source(split=split)
  except (NotImplementedError, ValueError) as err:  # no prepared files, or not in a random-access format
    fix = (f"run `{prepare_command(name, data_dir)}` once on a machine with internet"
           + ("" if name == "gtsrb" else " (needs `pip install tensorflow-cpu`)"))
    if not (epath.Path(builder.data_dir) / "dataset_info.json").exists():
      raise UserError(f"{name} is not prepared in {data_dir}: {fix}") from err
    raise UserError(f"{name} in {builder.data_dir} is not in array_record format: delete that folder and "
                    f"{fix}") from err
