"""`digits`: scikit-learn's 1,797 real 8x8 handwritten digits, embedded (no download), as RGB images."""

import functools

import numpy as np

from jaxpurify.data.resize import resize_images

TEST_FRACTION = 0.2
SPLIT_SEED = 0


def load_digits(split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """images uint8 [N, image_size, image_size, 3] (0-255, bilinear upsampling), labels int32 [N]: the caller's own
  copies (a run reads each split a dozen times; it is built once per process).

  Train and test are a fixed stratified 80/20 split (1,437 / 360).
  """
  images, labels = _built(split, image_size)
  return images.copy(), labels.copy()


@functools.lru_cache(maxsize=8)
def _built(split: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  from sklearn import (  # here: 1.5 s to import, only digits needs it
    datasets,
    model_selection,
  )

  digits = datasets.load_digits()
  train, test = model_selection.train_test_split(np.arange(len(digits.images)), test_size=TEST_FRACTION,
                                                 stratify=digits.target, random_state=SPLIT_SEED)
  keep = train if split == "train" else test
  grey = np.round(digits.images[keep] * (255 / 16)).astype(np.uint8)
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  return resize_images(rgb, image_size), digits.target[keep].astype(np.int32)
