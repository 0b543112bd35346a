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
import numpy as np

from jaxpurify.defenses.baselines import _repair
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.errors import UserError

KIND = "training"
CLEAN_DATA = True


def check(block, config, victim_counts: np.ndarray, reserve_counts: np.ndarray) -> None:
  """UserError when the reserve cannot fill one batch over the devices."""
  del config, victim_counts
  reserve, devices = int(reserve_counts.sum()), jax.device_count()
  if _repair.batch_size(reserve, block.batch_size, devices) == 0:
    raise UserError(f"FT fine-tunes on the reserved clean set, which holds {reserve} images, fewer than one batch "
                    f"over the {devices} devices; raise config.baseline.clean_fraction")


def train(inputs: Inputs, block, run):
  """The undefended classifier fine-tuned on the reserve -> (graphdef, final state, {})."""
  graphdef, undefended = inputs.model
  state = _repair.finetune_on_reserve(inputs, block, run, f"ft_repair_{inputs.protocol}", undefended)
  return graphdef, state, {}
