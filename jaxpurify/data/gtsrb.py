"""GTSRB (German Traffic Sign Recognition Benchmark) as a tfds builder, from the official archives.

43 classes; 39,209 train and 12,630 test images, each resized whole to 32x32 (as in the backdoor
literature). Written as array_record with a `Tensor` image feature, so building and reading need no TF.
"""

import csv
import io
import posixpath
import zipfile

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from jaxpurify.data.resize import resize_images

URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
ARCHIVES = {
    "train": "GTSRB_Final_Training_Images.zip",
    "test": "GTSRB_Final_Test_Images.zip",
    "test_labels": "GTSRB_Final_Test_GT.zip",
}
TEST_IMAGE_DIR = "GTSRB/Final_Test/Images"
IMAGE_SIZE = 32
NUM_CLASSES = 43


class Gtsrb(tfds.core.GeneratorBasedBuilder):
  """GTSRB official train and test sets, whole images at 32x32."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Official train and test sets, whole images resized to 32x32."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (f"Optional: put {', '.join(ARCHIVES.values())} (from {URL}) in manual_dir "
                                  "to skip their download.")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://benchmark.ini.rub.de/gtsrb_dataset.html",
    )

  def _split_generators(self, dl_manager):
    paths = _archive_paths(dl_manager)
    return {
        "train": self._generate_examples(paths["train"], paths["train"]),
        "test": self._generate_examples(paths["test"], paths["test_labels"], TEST_IMAGE_DIR),
    }

  def _generate_examples(self, images_zip, labels_zip, image_dir=None):
    """Every .ppm of `images_zip`, labelled from the ClassId column of the GT csv files in `labels_zip`."""
    with zipfile.ZipFile(labels_zip) as archive:
      labels = _read_labels(archive, image_dir)
    with zipfile.ZipFile(images_zip) as archive:
      for path in archive.namelist():
        if path.endswith(".ppm"):
          if path not in labels:
            raise ValueError(f"{images_zip}: {path} has no ClassId in {labels_zip}")
          yield path, {"image": _decode(archive.read(path)), "label": labels[path]}


def _archive_paths(dl_manager) -> dict:
  """Archives found in manual_dir, the others downloaded from the official host."""
  try:
    manual_dir = dl_manager.manual_dir
  except AssertionError:  # tfds' way of saying that manual_dir is missing or empty
    manual_dir = None
  found = {key: manual_dir / name for key, name in ARCHIVES.items()
           if manual_dir is not None and (manual_dir / name).exists()}
  missing = {key: URL + name for key, name in ARCHIVES.items() if key not in found}
  return {**found, **dl_manager.download(missing)}


def _read_labels(archive: zipfile.ZipFile, image_dir: str | None) -> dict[str, int]:
  """{image path: ClassId} from the GT-*.csv files that have a ClassId column.

  Filenames are relative to the csv's folder, or to `image_dir` when given.
  """
  labels = {}
  for path in archive.namelist():
    if posixpath.basename(path).startswith("GT-") and path.endswith(".csv"):
      text = io.TextIOWrapper(archive.open(path), encoding="utf-8-sig", newline="")
      rows = csv.DictReader(text, delimiter=";")
      folder = posixpath.dirname(path) if image_dir is None else image_dir
      labels.update({posixpath.join(folder, row["Filename"]): int(row["ClassId"])
                     for row in rows if row.get("ClassId")})
  return labels


def _decode(data: bytes) -> np.ndarray:
  """PPM bytes -> uint8 [32, 32, 3]."""
  image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  return resize_images(image[None], IMAGE_SIZE)[0]
