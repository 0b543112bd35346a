"""FT: plain fine-tuning of the undefended classifier on the defender's reserved clean set (baselines.md 3.3), the
control every model-repair table needs: does a little clean training alone forget the backdoor?

From the undefended model (`inputs.model`, trained with `inputs.protocol` on the poisoned set) it trains with plain
cross-entropy on the reserve for `epochs`, with `optim` and the protocol's augmentation (stage ft_repair_<protocol>):
under FT-head only the head moves (the encoder stays the victim's), under FT-all the whole classifier. Defaults are
BackdoorBench's (config/defense/ft/config.yaml): 100 epochs, batch 256, SGD 0.01, momentum 0.9, weight decay 5e-4,
cosine schedule, on 5% clean data (config.baseline.clean_fraction). The batch is the smaller of `batch_size` and the
reserve, rounded down to a multiple of the devices.
"""

import jax
import ml_collections
import numpy as np

from jaxpurify import finetune, stages
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.errors import UserError

KIND = "training"
CLEAN_DATA = True


def batch_size(reserve: int, wanted: int, devices: int) -> int:
  """min(wanted, reserve) rounded down to a multiple of `devices`; 0 when the reserve cannot fill one batch."""
  return min(wanted, reserve) // devices * devices


def check(block, config, victim_counts: np.ndarray, reserve_counts: np.ndarray) -> None:
  """UserError when the reserve cannot fill one batch over the devices."""
  del config, victim_counts
  reserve, devices = int(reserve_counts.sum()), jax.device_count()
  if batch_size(reserve, block.batch_size, devices) == 0:
    raise UserError(f"FT fine-tunes on the reserved clean set, which holds {reserve} images, fewer than one batch "
                    f"over the {devices} devices; raise config.baseline.clean_fraction")


def train(inputs: Inputs, block, run):
  """The undefended classifier fine-tuned on the reserve -> (graphdef, final state, {})."""
  config, protocol, mesh = inputs.config, inputs.protocol, inputs.mesh
  stage = f"ft_repair_{protocol}"
  graphdef, undefended = inputs.model
  repair = ml_collections.ConfigDict({"optim": block.optim.to_dict(), "train": {
      **config.finetune[protocol].train.to_dict(), "epochs": block.epochs, "log_every": block.log_every,
      "batch_size": batch_size(len(inputs.reserve_labels), block.batch_size, jax.device_count())}})
  _, fresh, step, dataset, num_steps = finetune.finetune_training(
      config, protocol, inputs.encoder, inputs.reserve_images, inputs.reserve_labels, inputs.num_classes, mesh,
      block=repair)
  # a fresh optimiser on the undefended weights: its state depends on the shapes only
  state = fresh.replace(params=undefended.params, batch_stats=undefended.batch_stats)
  state = stages.trained(run, stage, state, num_steps, lambda: stages.train(
      run, stage, state, step, dataset.batch, repair.train, num_steps, mesh, config.seed),
                         {"examples": dataset.num_examples})
  return graphdef, state, {}
