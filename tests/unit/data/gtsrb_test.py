"""The GTSRB builder builds offline from tiny archives in the official layout and reads back without TF."""

import io
import os
import sys
import tempfile
import zipfile

import numpy as np
from absl.testing import absltest
from PIL import Image

from jaxpurify.data import gtsrb, load_split, prepare

# (class id, width, height) per image; every image has one colour that encodes its position.
TRAIN = [(0, 29, 31), (0, 45, 40), (1, 64, 50), (1, 32, 32), (2, 15, 20)]
TEST = [(2, 40, 33), (0, 25, 25), (1, 70, 61)]
TRAIN_CSV_HEADER = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"


def colour(split: str, index: int) -> tuple[int, int, int]:
  return (200 if split == "train" else 50, 10 * index, 255 - 7 * index)


def ppm(split: str, index: int, width: int, height: int) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", (width, height), colour(split, index)).save(buffer, format="PPM")
  return buffer.getvalue()


def csv_text(rows: list[str], with_class: bool = True) -> str:
  header = TRAIN_CSV_HEADER if with_class else TRAIN_CSV_HEADER.rsplit(";", 1)[0]
  return "\r\n".join([header, *rows]) + "\r\n"


def write_archives(manual_dir: str) -> None:
  """The three official zips, with GTSRB's folder layout and semicolon-separated GT csv files."""
  with zipfile.ZipFile(f"{manual_dir}/{gtsrb.ARCHIVES['train']}", "w") as archive:
    archive.writestr("GTSRB/Readme-Images.txt", "readme")
    for class_id in sorted({c for c, _, _ in TRAIN}):
      folder = f"GTSRB/Final_Training/Images/{class_id:05d}"
      rows = []
      for i, (c, w, h) in enumerate(TRAIN):
        if c == class_id:
          name = f"00000_{i:05d}.ppm"  # track 0 in every class: file names repeat across folders
          archive.writestr(f"{folder}/{name}", ppm("train", i, w, h))
          rows.append(f"{name};{w};{h};1;1;{w - 2};{h - 2};{c}")
      archive.writestr(f"{folder}/GT-{class_id:05d}.csv", csv_text(rows))
  with zipfile.ZipFile(f"{manual_dir}/{gtsrb.ARCHIVES['test']}", "w") as archive:
    rows = []
    for i, (c, w, h) in enumerate(TEST):
      archive.writestr(f"GTSRB/Final_Test/Images/{i:05d}.ppm", ppm("test", i, w, h))
      rows.append(f"{i:05d}.ppm;{w};{h};1;1;{w - 2};{h - 2};{c}")
    archive.writestr("GTSRB/Final_Test/Images/GT-final_test.test.csv",
                     csv_text([r.rsplit(";", 1)[0] for r in rows], with_class=False))
  with zipfile.ZipFile(f"{manual_dir}/{gtsrb.ARCHIVES['test_labels']}", "w") as archive:
    archive.writestr("GT-final_test.csv", csv_text(rows))


class GtsrbTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    root = cls.enterClassContext(tempfile.TemporaryDirectory())
    manual_dir, cls.data_dir = os.path.join(root, "manual"), os.path.join(root, "data")
    os.mkdir(manual_dir)
    write_archives(manual_dir)
    prepare.main(["gtsrb", "--data_dir", cls.data_dir, "--manual_dir", manual_dir])

  def test_reads_back_exact_labels_and_32x32_colours(self):
    for split, table in (("train", TRAIN), ("test", TEST)):
      data = load_split("gtsrb", split, data_dir=self.data_dir)
      self.assertEqual(data.images.shape, (len(table), 32, 32, 3))
      self.assertEqual(data.images.dtype, np.uint8)
      self.assertEqual(data.labels.dtype, np.int32)
      self.assertEqual(data.num_classes, 43)
      expected = {colour(split, i): c for i, (c, _, _) in enumerate(table)}
      got = {}
      for image, label in zip(data.images, data.labels):
        pixels = np.unique(image.reshape(-1, 3), axis=0)
        self.assertLen(pixels, 1)  # a constant-colour image stays that colour after resizing
        got[tuple(int(v) for v in pixels[0])] = int(label)
      self.assertEqual(got, expected)

  def test_reads_without_tensorflow(self):
    load_split("gtsrb", "test", data_dir=self.data_dir)
    self.assertNotIn("tensorflow", sys.modules)


if __name__ == "__main__":
  absltest.main()
