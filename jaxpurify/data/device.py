"""Device-resident data: named arrays (uint8 images, labels, cached features) replicated on the mesh,
batches gathered on device.

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
def _take(arrays, index, out_sharding):
  """Rows `index` (sharded along `data`) of each replicated array, sharded like `index`."""
  return {name: array.at[index].get(out_sharding=out_sharding) for name, array in arrays.items()}


class DeviceDataset:
  """Named arrays [N, ...] on the mesh, e.g. {'image': uint8 [N, H, W, 3], 'label': int32 [N]};
  `batch(step)` -> the same names, rows of one batch, sharded along `data`.

  Arrays may be numpy (copied to every device) or jax arrays already on the mesh. Batches are drawn
  without replacement, `N // batch_size` per epoch (the remainder is dropped, as `drop_last=True`),
  shuffled per epoch unless `shuffle=False`.
  """

  def __init__(self, arrays: dict, mesh, batch_size: int, seed: int, shuffle: bool = True):
    parallel.check_global_batch(batch_size)
    sizes = {name: len(array) for name, array in arrays.items()}
    if len(set(sizes.values())) != 1:
      raise ValueError(f"arrays of different lengths: {sizes}")
    self.num_examples = next(iter(sizes.values()))
    if batch_size > self.num_examples:
      raise UserError(f"a batch of {batch_size} is larger than the {self.num_examples} examples it is drawn from; "
                      "lower that stage's batch_size in the config")
    host = {k: v for k, v in arrays.items() if isinstance(v, np.ndarray)}
    self.arrays = {**arrays, **parallel.put_replicated(host, mesh)}
    self.mesh, self.batch_size, self.seed, self.shuffle = mesh, batch_size, seed, shuffle
    self.steps_per_epoch = self.num_examples // batch_size
    self._order = (None, None)

  def indices(self, step: int) -> np.ndarray:
    epoch, i = divmod(step, self.steps_per_epoch)
    if self._order[0] != epoch:
      order = epoch_order(self.seed, epoch, self.num_examples) if self.shuffle else np.arange(self.num_examples)
      self._order = (epoch, order)
    return self._order[1][i * self.batch_size:(i + 1) * self.batch_size].astype(np.int32)

  def batch(self, step: int) -> dict:
    """{name: rows [B, ...]} sharded along `data`."""
    index = parallel.put_batch(self.indices(step), self.mesh)
    return _take(self.arrays, index, parallel.batch_sharded(self.mesh))
