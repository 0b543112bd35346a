"""`load_split`: one split of a known data set, whole, as host numpy at the requested image size."""

import os

from jaxpurify.data import catalog, digits, tfds_source


def load_split(name: str, split: str, *, data_dir: str | os.PathLike | None = None,
               image_size: int = 32, mock: int = 0) -> catalog.ImageSplit:
  """images uint8 [N, image_size, image_size, 3], labels int32 [N].

  `data_dir`: where tfds data sets are prepared (default $JAXPURIFY_DATA_DIR, else ~/tensorflow_datasets).
  Unknown names or splits, and data sets not prepared there, raise UserError; with `mock` > 0 a data set not
  prepared is served by `mock` examples of tfds's mock data at its real feature specs (smoke runs).
  """
  spec = catalog.spec(name, split)
  if spec.prepared:
    images, labels = tfds_source.read_split(name, split, catalog.resolve_data_dir(data_dir), image_size, mock)
  else:
    images, labels = digits.load_digits(split, image_size)
  return catalog.ImageSplit(images, labels, spec.num_classes, name, split)


def ensure_available(name: str, split: str, *, data_dir: str | os.PathLike | None = None, mock: int = 0) -> None:
  """Raises UserError at once (no reading, no network) unless `load_split(name, split)` can succeed."""
  if catalog.spec(name, split).prepared:
    tfds_source.data_source(name, split, catalog.resolve_data_dir(data_dir), mock)


def num_examples(name: str, split: str, *, data_dir: str | os.PathLike | None = None, mock: int = 0) -> int:
  """The number of examples of a split, without reading its images (UserError as `ensure_available`)."""
  if catalog.spec(name, split).prepared:
    return len(tfds_source.data_source(name, split, catalog.resolve_data_dir(data_dir), mock))
  return len(digits.load_digits(split, 8)[1])
