"""The four reference pipelines, one per experiment: a map-style dataset over the JAX bench's synthetic uint8 images
whose items are torchvision's per-image transforms (PIL), as the official data sets build them, and the eager
training step the official loop runs on a batch. `BUILDERS[config.experiment](config, device)` -> Pipeline."""

import copy
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset
from torchvision import transforms

from benchmarks.torch_reference import losses, models
from jaxpurify import triggers
from jaxpurify.data import synthetic
from jaxpurify.defenses.distill import step as distill_step
from jaxpurify.defenses.distill import training

NUM_CLASSES = 10  # the JAX bench's fine-tuning head (jaxpurify/experiments/threat.py)


class Pipeline(NamedTuple):
  """dataset: items are tuples of tensors, the step's arguments without the batch axis. step(*batch on the device):
  one optimiser update. batch_size: the global batch of the config's JAX step."""
  dataset: Dataset
  batch_size: int
  step: Callable


class _Images(Dataset):
  """uint8 images [N, H, W, 3] and the per-image transform its items apply."""

  def __init__(self, images: np.ndarray, transform):
    self.images, self.transform = images, transform

  def __len__(self):
    return len(self.images)


class Views(_Images):
  """Item i: two draws of the transform, each [3, H, W] (the official CIFAR10Pair)."""

  def __getitem__(self, index):
    image = Image.fromarray(self.images[index])
    return self.transform(image), self.transform(image)


class Labelled(_Images):
  """Item i: (transform(image i) [3, H, W], label i)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, transform):
    super().__init__(images, transform)
    self.labels = labels

  def __getitem__(self, index):
    return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


class Shadow(_Images):
  """BadEncoder's shadow set (the official BadEncoderDataset). Item i: shadow image and its triggered copy [3, H, W],
  the R references [R, 3, H, W] (all through the plain `transform`), one `augment` draw of each reference."""

  def __init__(self, images: np.ndarray, triggered: np.ndarray, references: np.ndarray, transform, augment):
    super().__init__(images, transform)
    self.triggered, self.references, self.augment = triggered, references, augment

  def __getitem__(self, index):
    refs = [Image.fromarray(r) for r in self.references]
    return (self.transform(Image.fromarray(self.images[index])),
            self.transform(Image.fromarray(self.triggered[index])),
            torch.stack([self.transform(r) for r in refs]), torch.stack([self.augment(r) for r in refs]))


def _images(batch_size: int, size: int) -> np.ndarray:
  """The JAX bench's synthetic set: BENCH_BATCHES batches of uint8 noise [N, size, size, 3]."""
  return synthetic.images(synthetic.BENCH_BATCHES * batch_size, size)


def _tensor(model) -> list:
  """ToTensor, then Normalize with the encoder's input statistics (config.model.mean, std)."""
  return [transforms.ToTensor(), transforms.Normalize(tuple(model.mean), tuple(model.std))]


def _color(aug) -> list:
  """HFlip, RandomApply(ColorJitter), RandomGrayscale of an augment block (flip_prob, jitter, jitter_prob,
  gray_prob): BadEncoder's finetune transform before its tensor part."""
  return [transforms.RandomHorizontalFlip(aug.flip_prob),
          transforms.RandomApply([transforms.ColorJitter(*aug.jitter)], p=aug.jitter_prob),
          transforms.RandomGrayscale(aug.gray_prob)]


def simclr_transform(aug, model, size: int) -> transforms.Compose:
  """SimCLR's view: RandomResizedCrop(size, crop_scale, crop_ratio), then `_color`, ToTensor, Normalize."""
  crop = transforms.RandomResizedCrop(size, scale=tuple(aug.crop_scale), ratio=tuple(aug.crop_ratio))
  return transforms.Compose([crop, *_color(aug), *_tensor(model)])


def _optimizer(optim, params) -> torch.optim.Optimizer:
  """An optim block's Adam or SGD, weight decay coupled (torch's); its base lr (a schedule costs nothing per step)."""
  if optim.name == "adam":
    return torch.optim.Adam(params, lr=optim.lr, weight_decay=optim.weight_decay)
  return torch.optim.SGD(params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)


def _update(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
  optimizer.zero_grad()
  loss.backward()
  optimizer.step()


def simclr(config, device) -> Pipeline:
  """SimCLR pre-training (config.pretrain), as BadEncoder's `pretraining_encoder.py`: both views through the model
  in training mode, NT-Xent, the optimiser."""
  pre, size = config.pretrain, config.data.image_size
  model = models.SSLModel(config.model, pre.head).to(device).train()
  optimizer = _optimizer(pre.optim, model.parameters())

  def step(x1, x2):
    _, z1, _ = model(x1)
    _, z2, _ = model(x2)
    _update(optimizer, losses.nt_xent(z1, z2, pre.simclr.temperature))

  views = Views(_images(pre.train.batch_size, size), simclr_transform(pre.augment, config.model, size))
  return Pipeline(views, pre.train.batch_size, step)


def badencoder(config, device) -> Pipeline:
  """BadEncoder's fine-tuning (config.attack), as `badencoder.py`: the clean encoder (inference mode, no gradient) on
  the shadow images and references every step, the backdoored copy on the triggered, shadow, reference and
  augmented-reference batches, BatchNorm in inference mode with its affine parameters frozen; the optimiser on the
  backbone's other parameters."""
  attack, size = config.attack, config.data.image_size
  clean = models.ResNet(config.model.name, config.model.width).to(device).eval().requires_grad_(False)
  backdoored = copy.deepcopy(clean).requires_grad_(True)
  for module in backdoored.modules():
    if isinstance(module, nn.BatchNorm2d):
      module.requires_grad_(False)
  optimizer = _optimizer(attack.optim, [p for p in backdoored.parameters() if p.requires_grad])

  def step(shadow, triggered, refs, refs_aug):
    each = range(refs.shape[1])
    with torch.no_grad():
      c_shadow, c_ref = clean(shadow)[0], torch.stack([clean(refs[:, r])[0] for r in each])
    embed = lambda x: backdoored(x)[0]
    loss, _ = losses.badencoder_loss(embed(triggered), embed(shadow), c_shadow,
                                     torch.stack([embed(refs[:, r]) for r in each]),
                                     torch.stack([embed(refs_aug[:, r]) for r in each]), c_ref,
                                     attack.lambda1, attack.lambda2)
    _update(optimizer, loss)

  images = _images(attack.train.batch_size, size)
  triggered = np.asarray(triggers.make_trigger(attack.trigger, size)(images))
  augment = transforms.Compose([*_color(attack.augment), *_tensor(config.model)])
  shadow = Shadow(images, triggered, synthetic.images(attack.num_references, size),
                  transforms.Compose(_tensor(config.model)), augment)
  return Pipeline(shadow, attack.train.batch_size, step)


def distill(config, device) -> Pipeline:
  """The distillation step (config.defense, loss 'at'), as the defense's `distillation.py`: the student's NT-Xent on
  two views plus each tap's weight times AT against the frozen teacher (inference mode, no gradient) on view 1, plus
  the clone term if weighted; the optimiser on the student. One forward per view and network (the official loop
  repeats view 1's through both)."""
  defense, ssl, size = config.defense, config.defense.ssl, config.data.image_size
  student = models.SSLModel(training.student_model(config), ssl.head).to(device).train()
  arch = training.teacher_model(config)
  teacher = models.ResNet(arch.name, arch.width).to(device).eval().requires_grad_(False)
  weights, clone = distill_step.loss_weights(defense.loss, distill_step.loss_taps(defense.loss,
                                                                                   student.backbone.tap_names))
  optimizer = _optimizer(ssl.optim, student.parameters())

  def step(x1, x2):
    h1, z1, taps1 = student(x1)
    _, z2, _ = student(x2)
    with torch.no_grad():
      h_teacher, taps_teacher = teacher(x1)
    loss = losses.nt_xent(z1, z2, ssl.simclr.temperature)
    for tap, weight in weights.items():
      if weight:
        loss = loss + weight * losses.attention_transfer(taps1[tap], taps_teacher[tap])
    if clone:
      loss = loss + clone * losses.feature_clone(h1, h_teacher)
    _update(optimizer, loss)

  views = Views(_images(ssl.train.batch_size, size), simclr_transform(ssl.augment, config.model, size))
  return Pipeline(views, ssl.train.batch_size, step)


def ft_all(config, device) -> Pipeline:
  """FT-all (config.finetune.ft_all): encoder and MLP head in training mode, cross-entropy on images through
  RandomCrop(padding) and RandomHorizontalFlip, the optimiser on everything."""
  ft, size = config.finetune, config.data.image_size
  model = models.Classifier(config.model, NUM_CLASSES, ft.head).to(device).train()
  optimizer = _optimizer(ft.ft_all.optim, model.parameters())

  def step(x, labels):
    _update(optimizer, F.cross_entropy(model(x), labels))

  images = _images(ft.ft_all.train.batch_size, size)
  transform = transforms.Compose([transforms.RandomCrop(size, padding=ft.augment.padding),
                                  transforms.RandomHorizontalFlip(ft.augment.flip_prob), *_tensor(config.model)])
  return Pipeline(Labelled(images, synthetic.labels(len(images), NUM_CLASSES), transform),
                  ft.ft_all.train.batch_size, step)


BUILDERS = {"pretrain": simclr, "encoder_attack": badencoder, "distill": distill, "threat": ft_all}
