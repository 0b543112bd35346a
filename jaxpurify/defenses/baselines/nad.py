"""NAD: Neural Attention Distillation (Li et al., ICLR 2021) of the undefended classifier on the defender's reserved
clean set (baselines.md 3.3).

1. Teacher: the undefended classifier fine-tuned with cross-entropy on the reserve for `teacher_epochs` (stage
   nad_teacher_<protocol>, `_repair.finetune_on_reserve`).
2. Student: the undefended classifier trained on the reserve for `epochs` with CE + Σ_k β_k · AT(student tap k,
   teacher tap k) (stage nad_student_<protocol>), AT = `losses.distillation.attention_transfer` (NAD's `AT(p)`:
   the per-sample L2-normalised map Σ_c |F_c|^p, squared differences averaged over batch and positions). The
   teacher is frozen in inference mode and sees the student's augmented images.
NAD's betas (500, 1000, 1000) weigh the three groups of its WideResNet; here they weigh the last three stages of
the ResNet, `taps` = layer2, layer3, layer4 (BackdoorBench's PreAct-ResNet18 reads layer3, layer4 and the pooled
1×1 map, whose normalised attention is 1 for any input: that term is ~0). Defaults are BackdoorBench's
(config/defense/nad/config.yaml, defense/nad.py): teacher 10 epochs, student 20 epochs, p = 2, SGD 0.01 (momentum
0.9, weight decay 5e-4) for both, constant over 20 epochs (its piecewise schedule drops only at epoch 20), batch 64
(the NAD paper's). The batch is the smaller of `batch_size` and the reserve, rounded down to a multiple of the
devices. quick uses batch 16: its reserve (70 images) is one batch of 64, so the 10 + 20 epochs were 10 + 20 steps
at a constant lr, after which BatchNorm's running statistics lagged the moving weights (teacher and student test
accuracy 43% and 34% with them, 98% and 91% with batch statistics); at 16 an epoch is 4 steps.

Under FT-head the encoder is frozen and the attention maps are the encoder's taps, so the AT terms have no gradient
path to anything that trains: NAD reduces to fine-tuning the head with CE for `epochs` (stage nad_student_ft_head),
and no teacher is trained.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from jaxpurify import augment, models, parallel, stages
from jaxpurify.data.device import DeviceDataset
from jaxpurify.defenses.baselines import _repair
from jaxpurify.defenses.baselines.inputs import Inputs
from jaxpurify.errors import UserError
from jaxpurify.losses import l2_normalize
from jaxpurify.losses.distillation import attention_transfer
from jaxpurify.train.state import TrainState, apply_gradients, make_optimizer

KIND = "training"
CLEAN_DATA = True


def check(block, config, victim_counts: np.ndarray, reserve_counts: np.ndarray) -> None:
  """UserError when the betas do not pair with the taps, a tap is not one of the encoder's, or the reserve cannot
  fill one batch over the devices."""
  del victim_counts
  if len(block.betas) != len(block.taps):
    raise UserError(f"config.baseline.nad.betas has {len(block.betas)} weights for {len(block.taps)} taps "
                    f"({', '.join(block.taps)}): give one per tap")
  _, known = models.describe(config.model, config.data.image_size)
  if missing := [tap for tap in block.taps if tap not in known]:
    raise UserError(f"config.baseline.nad.taps names {', '.join(missing)}, not taps of {config.model.name} (its "
                    f"taps: {', '.join(known)})")
  reserve, devices = int(reserve_counts.sum()), jax.device_count()
  if _repair.batch_size(reserve, block.batch_size, devices) == 0:
    raise UserError(f"NAD trains on the reserved clean set, which holds {reserve} images, fewer than one batch "
                    f"over the {devices} devices; raise config.baseline.clean_fraction")


def attention_loss(student_taps: dict, teacher_taps: dict, taps, betas, power: float) -> jax.Array:
  """Σ_k betas[k] · attention_transfer(student_taps[taps[k]], teacher_taps[taps[k]], power), a scalar; the taps
  are maps [B, H_k, W_k, C_k] by name (the teacher's get no gradient)."""
  return sum(beta * attention_transfer(student_taps[tap], teacher_taps[tap], power) for tap, beta in zip(taps, betas))


def make_student_step(graphdef, tx, augment_config, mean, std, taps, betas, power: float):
  """-> step(state, batch, key) -> (state, metrics): one NAD student step of a Classifier (FT-all: BatchNorm in
  training mode, dropout on), minimising CE + attention_loss; pure, jit it with the state donated.

  batch: 'image' uint8 [B, H, W, 3] and 'label' int32 [B] sharded along `data`, 'teacher' {'params',
  'batch_stats'} of the teacher Classifier (same graphdef), replicated; its backbone runs in inference mode on the
  same augmented images. metrics: loss, ce, at (the weighted attention sum), accuracy and the health norms.
  """
  mean, std = jnp.asarray(mean), jnp.asarray(std)

  def step(state: TrainState, batch, key):
    key = jax.random.fold_in(key, state.step)
    aug_key, drop_key = jax.random.split(key)
    images = augment.crop_flip(aug_key, batch["image"], augment_config.padding, augment_config.flip_prob)
    x = augment.normalize(augment.to_float(images), mean, std)
    teacher = nnx.merge(graphdef, batch["teacher"]["params"], batch["teacher"]["batch_stats"])
    _, teacher_taps = teacher.backbone(x, False)

    def loss_fn(params):
      model = nnx.merge(graphdef, params, state.batch_stats, copy=True)
      feature, student_taps = model.backbone(x, True)
      logits = model.head(l2_normalize(feature), rngs=drop_key)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      at = attention_loss(student_taps, teacher_taps, taps, betas, power)
      return ce + at, (ce, at, logits, nnx.state(model, nnx.BatchStat))

    (loss, (ce, at, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state, health = apply_gradients(state, tx, grads, batch_stats)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return state, {"loss": loss, "ce": ce, "at": at, "accuracy": accuracy, **health}

  return step


def student_phase(inputs: Inputs, block, run, start: TrainState, teacher: TrainState) -> TrainState:
  """The NAD student trained from `start` (a fresh optimiser state) against `teacher` on the whole reserve (stage
  nad_student_<protocol>) -> its final state."""
  config, mesh, stage = inputs.config, inputs.mesh, f"nad_student_{inputs.protocol}"
  graphdef = inputs.model[0]
  train = ml_collections.ConfigDict({
      **config.finetune[inputs.protocol].train.to_dict(), "epochs": block.epochs, "log_every": block.log_every,
      "batch_size": _repair.batch_size(len(inputs.reserve_labels), block.batch_size, jax.device_count())})
  dataset = DeviceDataset({"image": inputs.reserve_images, "label": inputs.reserve_labels.astype(np.int32)}, mesh,
                          train.batch_size, config.seed)
  num_steps = block.epochs * dataset.steps_per_epoch
  tx = make_optimizer(block.optim, num_steps, dataset.steps_per_epoch)
  state = jax.jit(lambda s: TrainState(jnp.zeros((), jnp.int32), s.params, s.batch_stats, tx.init(s.params)),
                  out_shardings=parallel.replicated(mesh))(start)
  step = jax.jit(make_student_step(graphdef, tx, config.finetune.augment, config.model.mean, config.model.std,
                                   tuple(block.taps), tuple(block.betas), block.power), donate_argnums=0)
  frozen = {"teacher": {"params": teacher.params, "batch_stats": teacher.batch_stats}}
  return stages.trained(run, stage, state, num_steps, lambda: stages.train(
      run, stage, state, step, lambda i: dataset.batch(i) | frozen, train, num_steps, mesh, config.seed),
                        {"examples": dataset.num_examples})


def train(inputs: Inputs, block, run):
  """NAD from the undefended classifier -> (graphdef, the student's final state, {'distilled_taps': the taps whose
  attention was distilled, none under FT-head})."""
  graphdef, undefended = inputs.model
  protocol = inputs.protocol
  if protocol == "ft_head":  # the AT terms cannot reach the head: plain CE on the head
    state = _repair.finetune_on_reserve(inputs, block, run, "nad_student_ft_head", undefended)
    return graphdef, state, {"distilled_taps": []}
  teacher_block = ml_collections.ConfigDict({**block.to_dict(), "epochs": block.teacher_epochs})
  teacher = _repair.finetune_on_reserve(inputs, teacher_block, run, f"nad_teacher_{protocol}", undefended)
  state = student_phase(inputs, block, run, undefended, teacher)
  return graphdef, state, {"distilled_taps": list(block.taps)}
