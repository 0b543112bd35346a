"""The data sets jaxpurify knows, the `ImageSplit` they load into, and where prepared data lives."""

import dataclasses
import os
import types

import numpy as np

from jaxpurify.errors import UserError

DATA_DIR_ENV = "JAXPURIFY_DATA_DIR"
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # the input normalisation of every CIFAR-trained encoder here
CIFAR10_STD = (0.2023, 0.1994, 0.2010)


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSplit:
  """One split held in host memory: images uint8 [N, H, W, 3], labels int32 [N] (-1 when unlabelled)."""
  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str
  split: str


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """num_classes, the split names, and whether the data set is read from prepared tfds files."""
  num_classes: int
  splits: tuple[str, ...]
  prepared: bool = True


DATASETS = types.MappingProxyType({
    "cifar10": DatasetSpec(10, ("train", "test")),
    "stl10": DatasetSpec(10, ("train", "test", "unlabelled")),
    "svhn_cropped": DatasetSpec(10, ("train", "test")),
    "gtsrb": DatasetSpec(43, ("train", "test")),
    "digits": DatasetSpec(10, ("train", "test"), prepared=False),
})


# The published number of examples per split (tfds' counts), for cost plans made before the data is prepared.
SPLIT_SIZES = types.MappingProxyType({
    ("cifar10", "train"): 50_000, ("cifar10", "test"): 10_000,
    ("stl10", "train"): 5_000, ("stl10", "test"): 8_000, ("stl10", "unlabelled"): 100_000,
    ("svhn_cropped", "train"): 73_257, ("svhn_cropped", "test"): 26_032,
    ("gtsrb", "train"): 26_640, ("gtsrb", "test"): 12_630,
    ("digits", "train"): 1_437, ("digits", "test"): 360,
})


def split_size(name: str, split: str) -> int:
  """The published number of examples of a split (UserError for an unknown data set or split)."""
  spec(name, split)
  return SPLIT_SIZES[(name, split)]


def spec(name: str, split: str | None = None) -> DatasetSpec:
  """The spec of `name`; UserError naming the known data sets (and splits, when `split` is given)."""
  if name not in DATASETS:
    raise UserError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}")
  found = DATASETS[name]
  if split is not None and split not in found.splits:
    raise UserError(f"{name} has no split {split!r}; its splits: {', '.join(found.splits)}")
  return found


def num_classes(name: str) -> int:
  return spec(name).num_classes


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
  """`data_dir`, else $JAXPURIFY_DATA_DIR, else ~/tensorflow_datasets (user-expanded)."""
  chosen = data_dir or os.environ.get(DATA_DIR_ENV) or "~/tensorflow_datasets"
  return os.path.expanduser(os.fspath(chosen))


def prepare_command(name: str, data_dir: str) -> str:
  return f"python -m jaxpurify.data.prepare {name} --data_dir {data_dir}"
