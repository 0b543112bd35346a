"""Prepare data sets once, on a machine with internet, as ArrayRecord files that training reads without TF.

  python -m jaxpurify.data.prepare NAME [NAME ...] [--data_dir DIR] [--manual_dir DIR]

cifar10, stl10 and svhn_cropped use their official tfds builders, which read the raw files through
TensorFlow (`pip install tensorflow-cpu`, for this step only); gtsrb uses jaxpurify's builder (no TF);
digits is embedded and needs nothing.
"""

import argparse
import importlib.util
import sys

import tensorflow_datasets as tfds

from jaxpurify.data import catalog, gtsrb  # noqa: F401  (gtsrb registers its builder with tfds)
from jaxpurify.errors import UserError

NEEDS_TF = ("cifar10", "stl10", "svhn_cropped")


def prepare(name: str, data_dir: str, manual_dir: str | None = None) -> str:
  """Downloads and writes `name` under data_dir as array_record; returns what was done, in one line."""
  if not catalog.spec(name).prepared:
    return f"{name} is embedded in jaxpurify: nothing to prepare"
  if name in NEEDS_TF and importlib.util.find_spec("tensorflow") is None:
    raise UserError(f"preparing {name} needs TensorFlow: `pip install tensorflow-cpu` (for this step only; "
                    "training does not use it)")
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, try_download_gcs=False))
  return f"{name} is prepared in {builder.data_dir}"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(prog="python -m jaxpurify.data.prepare",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("names", nargs="+", metavar="NAME", help=f"one of: {', '.join(catalog.DATASETS)}")
  parser.add_argument("--data_dir", help=f"default: ${catalog.DATA_DIR_ENV}, else ~/tensorflow_datasets")
  parser.add_argument("--manual_dir", help="archives already downloaded (gtsrb: the official .zip files)")
  args = parser.parse_args(argv)
  data_dir = catalog.resolve_data_dir(args.data_dir)
  try:
    for name in args.names:
      catalog.spec(name)
    for name in args.names:
      print(prepare(name, data_dir, args.manual_dir))
  except UserError as err:
    sys.exit(f"error: {err}")


if __name__ == "__main__":
  main()
