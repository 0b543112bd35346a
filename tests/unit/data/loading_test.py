"""load_split: real loading code under tfds mock data, embedded digits, and fast one-line user errors."""

import importlib.util
import os
import sys
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds
from absl.testing import absltest, parameterized

from jaxpurify import data
from jaxpurify.data import catalog, prepare
from jaxpurify.errors import UserError


class MockedTfdsTest(parameterized.TestCase):
  """The real reading path on tfds's mock data (no files, no network, no TF)."""

  @parameterized.parameters(
      ("cifar10", "train"), ("cifar10", "test"), ("svhn_cropped", "train"), ("svhn_cropped", "test"),
      ("stl10", "train"), ("stl10", "test"), ("gtsrb", "train"))
  def test_labelled_split(self, name, split):
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
      got = data.load_split(name, split, data_dir="/nonexistent")
    self.assertEqual(got.images.shape, (5, 32, 32, 3))  # stl10 is stored at 96x96
    self.assertEqual(got.images.dtype, np.uint8)
    self.assertEqual(got.labels.dtype, np.int32)
    self.assertTrue(np.all((got.labels >= 0) & (got.labels < got.num_classes)))
    self.assertEqual((got.name, got.split, got.num_classes), (name, split, data.num_classes(name)))
    self.assertNotIn("tensorflow", sys.modules)

  def test_stl10_unlabelled(self):
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
      got = data.load_split("stl10", "unlabelled")
    self.assertEqual(got.images.shape, (3, 32, 32, 3))
    np.testing.assert_array_equal(got.labels, [-1, -1, -1])

  def test_other_image_size(self):
    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
      got = data.load_split("cifar10", "train", image_size=48)
    self.assertEqual(got.images.shape, (2, 48, 48, 3))


class MockForSmokeTest(absltest.TestCase):
  """`mock`: a data set that is not prepared is served by tfds mock data at its real feature specs."""

  def test_unprepared_split_is_mocked_with_the_asked_count(self):
    with tempfile.TemporaryDirectory() as empty:
      data.ensure_available("gtsrb", "train", data_dir=empty, mock=6)
      self.assertEqual(data.num_examples("gtsrb", "train", data_dir=empty, mock=6), 6)
      got = data.load_split("gtsrb", "train", data_dir=empty, mock=6)
      again = data.load_split("gtsrb", "train", data_dir=empty, mock=6)
      with self.assertRaisesRegex(UserError, "gtsrb is not prepared"):
        data.ensure_available("gtsrb", "train", data_dir=empty)
    self.assertEqual(got.images.shape, (6, 32, 32, 3))
    np.testing.assert_array_equal(got.labels, np.arange(6))  # balanced over the 43 classes, not drawn at random
    np.testing.assert_array_equal(got.images, again.images)  # deterministic
    self.assertNotIn("tensorflow", sys.modules)


class DigitsTest(absltest.TestCase):

  def test_counts_stratified_and_deterministic(self):
    train, test = data.load_split("digits", "train"), data.load_split("digits", "test")
    self.assertEqual((len(train.labels), len(test.labels)), (1437, 360))
    self.assertEqual(train.images.shape, (1437, 32, 32, 3))
    counts = [np.bincount(s.labels, minlength=10) / len(s.labels) for s in (train, test)]
    np.testing.assert_allclose(counts[0], counts[1], atol=0.01)
    again = data.load_split("digits", "test")
    np.testing.assert_array_equal(again.images, test.images)
    np.testing.assert_array_equal(again.labels, test.labels)

  def test_each_load_is_the_callers_own_copy(self):
    """The split is built once per process; a caller writing into its images changes no later load."""
    first = data.load_split("digits", "train")
    kept = first.images.copy()
    first.images[:] = 0
    first.labels[:] = -1
    again = data.load_split("digits", "train")
    np.testing.assert_array_equal(again.images, kept)
    self.assertGreaterEqual(again.labels.min(), 0)

  def test_pixels(self):
    got = data.load_split("digits", "train", image_size=8)
    self.assertEqual(got.images.dtype, np.uint8)
    self.assertEqual((got.images.min(), got.images.max()), (0, 255))
    np.testing.assert_array_equal(got.images[..., 0], got.images[..., 2])  # grey, as RGB


class CatalogTest(absltest.TestCase):

  def test_names_and_classes(self):
    self.assertEqual(set(data.DATASETS), {"cifar10", "stl10", "svhn_cropped", "gtsrb", "digits"})
    self.assertEqual(data.num_classes("gtsrb"), 43)

  def test_unknown_name_or_split(self):
    with self.assertRaisesRegex(UserError, "known data sets: cifar10, stl10"):
      data.load_split("mnist", "train")
    with self.assertRaisesRegex(UserError, "its splits: train, test$"):
      data.load_split("cifar10", "unlabelled")

  def test_data_dir_from_environment(self):
    with absltest.mock.patch.dict(os.environ, {catalog.DATA_DIR_ENV: "/data/tfds"}):
      self.assertEqual(catalog.resolve_data_dir(None), "/data/tfds")
    with absltest.mock.patch.dict(os.environ, clear=True):
      self.assertEqual(catalog.resolve_data_dir(None), os.path.expanduser("~/tensorflow_datasets"))


class NotPreparedTest(parameterized.TestCase):

  @parameterized.parameters("cifar10", "stl10", "svhn_cropped", "gtsrb")
  def test_fast_one_line_error_with_the_command(self, name):
    with tempfile.TemporaryDirectory() as data_dir:
      start = time.monotonic()
      with self.assertRaises(UserError) as caught:
        data.load_split(name, "test", data_dir=data_dir)
      self.assertLess(time.monotonic() - start, 1.0)
      self.assertEqual(os.listdir(data_dir), [])
    message = str(caught.exception)
    self.assertNotIn("\n", message)
    self.assertIn(f"{name} is not prepared in {data_dir}", message)
    self.assertIn(f"`python -m jaxpurify.data.prepare {name} --data_dir {data_dir}`", message)
    self.assertEqual("tensorflow-cpu" in message, name != "gtsrb")

  def test_prepare_without_tensorflow_says_how(self):
    with absltest.mock.patch.object(importlib.util, "find_spec", return_value=None):
      with self.assertRaisesRegex(UserError, "pip install tensorflow-cpu"):
        prepare.prepare("cifar10", "/nonexistent")

  def test_prepare_digits_is_a_no_op(self):
    self.assertIn("nothing to prepare", prepare.prepare("digits", "/nonexistent"))


if __name__ == "__main__":
  absltest.main()
