"""Device-resident data: uint8 images replicated on the mesh, batches gathered on device.

The order of examples is a pure function of (seed, epoch), so a resumed run sees the same batches.
"""

import functools

import jax
import numpy as np

from jaxpurify import parallel
from jaxpurify.errors import UserError


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
  """A permutation of range(n) determined by (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(n)


@functools.partial(jax.jit, static_argnames="out_sharding")
def _take(images, labels, index, out_sharding):
  """Rows `index` (sharded along `data`) of the replicated arrays, sharded like `index`."""
  return {"image": images.at[index].get(out_sharding=out_sharding),
          "label": labels.at[index].get(out_sharding=out_sharding)}


class DeviceDataset:
  """images uint8 [N, H, W, 3] and labels int32 [N] on the mesh; `batch(step)` -> a sharded batch dict.

  Batches are drawn without replacement, `N // batch_size` per epoch (the remainder is dropped, as
  `drop_last=True`), shuffled per epoch unless `shuffle=False`.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, mesh, batch_size: int, seed: int,
               shuffle: bool = True):
    parallel.check_global_batch(batch_size)
    if batch_size > len(images):
      raise UserError(f"batch size {batch_size} is larger than the {len(images)} examples; "
                               "lower config.train.batch_size")
    self.images, self.labels = parallel.put_replicated((images, labels.astype(np.int32)), mesh)
    self.mesh, self.batch_size, self.seed, self.shuffle = mesh, batch_size, seed, shuffle
    self.num_examples = len(images)
    self.steps_per_epoch = len(images) // batch_size
    self._order = (None, None)

  def indices(self, step: int) -> np.ndarray:
    epoch, i = divmod(step, self.steps_per_epoch)
    if self._order[0] != epoch:
      order = epoch_order(self.seed, epoch, self.num_examples) if self.shuffle else np.arange(self.num_examples)
      self._order = (epoch, order)
    return self._order[1][i * self.batch_size:(i + 1) * self.batch_size].astype(np.int32)

  def batch(self, step: int) -> dict:
    """{'image': uint8 [B, H, W, 3], 'label': int32 [B]}, both sharded along `data`."""
    index = parallel.put_batch(self.indices(step), self.mesh)
    return _take(self.images, self.labels, index, parallel.batch_sharded(self.mesh))
