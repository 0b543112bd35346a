"""Dataset-poisoning attacks by name: the checks, and the poisoned training set they make (their config blocks:
`defaults`).

An attack turns a clean labelled training set into the set a victim fine-tunes on (`PoisonedSet`) and gives the
test-time trigger (uint8 [B, H, W, 3] -> uint8, jittable) that measures its success. Attacks with an auxiliary
model (Label-Consistent, ISSBA, Input-aware) train it first: `AUXILIARY[name]` is the module with `training`,
`poison_images` and `test_trigger` (the threat harness runs the training as a resumable stage).

| name | labels | train-time transform | extra positions (labels kept) | test trigger |
|---|---|---|---|---|
| badnets | dirty | 3×3 white square, bottom-right | – | same |
| blended | dirty | α 0.2 blend with jaxpurify's noise pattern | – | same |
| trojan | dirty | 8×8 colour patch at rows/cols 21–28 | – | same |
| wanet | dirty | warp, k 4, s 0.5 | cross: warp + noise, cross_ratio 2 | warp |
| adaptive_blend | dirty | α 0.15 on half of 16 tiles | cover: same transform, cover_ratio 1 | full pattern, α 0.2 |
| sig | clean | δ 40, f 6 sinusoid | – | same |
| label_consistent | clean | PGD (ε 8/255) + 4-corner trigger | – | 4-corner trigger |
| issba | dirty | StegaStamp encoding of a fixed secret | – | same |
| input_aware | dirty | x + (G(x) − x) · M(x) | cross: another image's pattern | same as train |
"""

import json
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxpurify.data import ImageSplit
from jaxpurify.errors import UserError
from jaxpurify.pipeline import config_differences
from jaxpurify.poisoning import input_aware, issba, label_consistent, selection
from jaxpurify.poisoning.defaults import ATTACKS
from jaxpurify.triggers import dataset as transforms

PREFIX = "config.poison"
AUXILIARY = {"label_consistent": label_consistent, "issba": issba, "input_aware": input_aware}


class PoisonedSet(NamedTuple):
  """The training set a victim sees, and how it was made.

  images uint8 [N, H, W, 3] (poisoned and extra positions replaced), labels int64 [N] (as the victim sees them),
  true_labels int64 [N], poison int64 [P] and extra int64 [E] (sorted positions), arrays: the attack's own
  arrays (pattern, patch, warping grid...) by name.
  """
  images: np.ndarray
  labels: np.ndarray
  true_labels: np.ndarray
  poison: np.ndarray
  extra: np.ndarray
  arrays: dict


def check(block, image_size: int, labels: np.ndarray) -> None:
  """Fails with one line on a bad attack name, rate, target, pool or trigger size, before any training."""
  if block.attack not in ATTACKS:
    raise UserError(f"unknown dataset attack {block.attack!r}; set {PREFIX}.attack to one of {', '.join(ATTACKS)}")
  indices(block, labels)
  if block.attack in AUXILIARY:
    AUXILIARY[block.attack].check_config(block[block.attack], image_size)
  else:
    trigger = stateless_test_trigger(block, image_size)
    jax.eval_shape(trigger, jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8))
    train = _train_transform(block, image_size)
    jax.eval_shape(train, jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8), jax.random.key(0))


def indices(block, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(poison positions [P], extra positions [E]) of `block` on training labels [N]: deterministic in block.seed."""
  attack = ATTACKS[block.attack]
  poison = selection.poison_indices(labels, block.rate, block.target, seed=block.seed, convention=block.convention,
                                    clean_label=attack.clean_label, exclude_target=block.exclude_target)
  if not attack.extra:
    return poison, np.zeros(0, np.int64)
  ratio = block[block.attack].get("cross_ratio", block[block.attack].get("cover_ratio"))
  return poison, selection.cross_indices(len(labels), poison, ratio, seed=block.seed + 1)


def _arrays(block, image_size: int) -> dict:
  """The fixed arrays a stateless attack uses (to be saved with the run)."""
  name, settings = block.attack, block[block.attack]
  if name in ("blended", "adaptive_blend"):
    return {"pattern": transforms.blend_pattern(image_size, settings.pattern_seed)}
  if name == "trojan":
    return {"patch": transforms.trojan_patch(settings.patch_seed, settings.patch_size)}
  if name == "wanet":
    return {"grid": np.asarray(transforms.wanet_grid(jax.random.key(settings.grid_seed), settings.k, image_size))}
  return {}


def _train_transform(block, image_size: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """(uint8 images [B, H, W, 3], key) -> the training-time poisoned images, for the stateless attacks."""
  name, s, arrays = block.attack, block[block.attack], _arrays(block, image_size)
  if name == "adaptive_blend":
    return lambda x, key: transforms.adaptive_blend(x, arrays["pattern"], key, s.pieces, s.masked_fraction, s.alpha)
  test = stateless_test_trigger(block, image_size)
  return lambda x, key: test(x)


def stateless_test_trigger(block, image_size: int) -> Callable[[jax.Array], jax.Array]:
  """The test-time trigger of an attack without an auxiliary model: uint8 [B, H, W, 3] -> uint8."""
  name, s, arrays = block.attack, block[block.attack], _arrays(block, image_size)
  if name == "badnets":
    return lambda x: transforms.badnets(x, s.size, s.value)
  if name == "blended":
    return lambda x: transforms.blended(x, arrays["pattern"], s.alpha)
  if name == "trojan":
    return lambda x: transforms.trojan(x, arrays["patch"])
  if name == "wanet":
    return lambda x: transforms.wanet(x, arrays["grid"], s.s, s.grid_rescale)
  if name == "adaptive_blend":
    return lambda x: transforms.blended(x, arrays["pattern"], s.test_alpha)
  if name == "sig":
    return lambda x: transforms.sig(x, s.delta, s.frequency)
  raise ValueError(f"{name!r} has an auxiliary model; use AUXILIARY[{name!r}].test_trigger")


def test_trigger(block, image_size: int, aux_state=None) -> Callable[[jax.Array], jax.Array]:
  """The attack's test-time trigger; attacks with an auxiliary model need its trained state."""
  if block.attack in AUXILIARY:
    return AUXILIARY[block.attack].test_trigger(block[block.attack], aux_state)
  return stateless_test_trigger(block, image_size)


def poison(block, images: np.ndarray, labels: np.ndarray, mesh, aux_state=None) -> PoisonedSet:
  """The poisoned training set: uint8 images [N, H, W, 3], labels int [N] -> PoisonedSet (deterministic)."""
  name, attack = block.attack, ATTACKS[block.attack]
  poison_at, extra_at = indices(block, labels)
  image_size = images.shape[1]
  key = jax.random.key(block.seed)
  out, new_labels = images.copy(), np.asarray(labels, np.int64).copy()
  if name in AUXILIARY:
    module, settings = AUXILIARY[name], block[name]
    arrays = {}
    if len(poison_at):
      out[poison_at] = module.poison_images(settings, aux_state, images[poison_at], labels[poison_at],
                                            jax.random.fold_in(key, 0), mesh)
    if len(extra_at):  # Input-aware cross samples: the pattern of another training image, label kept
      sources = np.random.default_rng(block.seed + 2).permutation(len(images))[:len(extra_at)]
      out[extra_at] = np.asarray(jax.jit(lambda x, y: module.apply_pattern(settings, aux_state, x, y))(
          images[extra_at], images[sources]))
  else:
    arrays = _arrays(block, image_size)
    train = jax.jit(_train_transform(block, image_size))
    if len(poison_at):
      out[poison_at] = np.asarray(train(images[poison_at], jax.random.fold_in(key, 0)))
    if len(extra_at):
      if name == "wanet":
        s = block.wanet
        cross = jax.jit(lambda x, k: transforms.wanet(x, arrays["grid"], s.s, s.grid_rescale, cross_key=k))
        out[extra_at] = np.asarray(cross(images[extra_at], jax.random.fold_in(key, 1)))
      else:  # Adaptive-Blend cover samples: the poison's transform
        out[extra_at] = np.asarray(train(images[extra_at], jax.random.fold_in(key, 1)))
  if not attack.clean_label:
    new_labels[poison_at] = block.target
  return PoisonedSet(out, new_labels, np.asarray(labels, np.int64), poison_at, extra_at, arrays)


def save(path: str, poisoned: PoisonedSet, block) -> None:
  """Writes the poisoned set, its positions, the attack's arrays and settings to `path` (.npz)."""
  np.savez_compressed(path, images=poisoned.images, labels=poisoned.labels, true_labels=poisoned.true_labels,
                      poison=poisoned.poison, extra=poisoned.extra, config=np.asarray(block.to_json()),
                      **{f"array_{k}": v for k, v in poisoned.arrays.items()})


def load(path: str, train: ImageSplit | None = None, block=None) -> tuple[PoisonedSet, ml_collections.ConfigDict]:
  """(PoisonedSet, the config.poison block that made it) from a file written by `save`, e.g.
  `<workdir>/poison/poisoned_train.npz`.

  Checked on load (UserError naming the file and what to do): a readable archive with every array, uint8 images
  [N, H, W, 3], integer labels within the classes and positions within the set; against `train` (the clean
  training split it was made from) the same N, image size and classes; against `block` (config.poison) the same
  settings.
  """
  fix = f"delete {os.path.dirname(path) or '.'} (the poison stage's folder) and re-run to make the poisoned set again"
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k.removeprefix("array_"): f[k] for k in f.files if k.startswith("array_")}
      poisoned = PoisonedSet(f["images"], f["labels"], f["true_labels"], f["poison"], f["extra"], arrays)
      saved = ml_collections.ConfigDict(json.loads(str(f["config"])))
  except Exception as err:  # numpy and zipfile raise many types for a damaged or foreign file
    raise UserError(f"{path} cannot be read as a poisoned set ({type(err).__name__}); {fix}") from None
  images, labels = poisoned.images, poisoned.labels
  n = len(images)
  problem = None
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
    problem = f"images are {images.dtype} {images.shape}, not uint8 [N, H, W, 3]"
  elif any(not np.issubdtype(a.dtype, np.integer) for a in (labels, poisoned.true_labels, poisoned.poison,
                                                              poisoned.extra)):
    problem = "labels or positions are not integers"
  elif len(labels) != n or len(poisoned.true_labels) != n:
    problem = f"{len(labels)} labels for {n} images"
  elif any(len(a) and (a.min() < 0 or a.max() >= n) for a in (poisoned.poison, poisoned.extra)):
    problem = f"poison positions outside its {n} images"
  elif train is not None and (n, images.shape[1]) != (len(train.labels), train.images.shape[1]):
    problem = (f"{n} images of size {images.shape[1]}, but {train.name} train has {len(train.labels)} of size "
               f"{train.images.shape[1]}")
  elif train is not None and len(labels) and (labels.min() < 0 or labels.max() >= train.num_classes):
    problem = f"labels outside {train.name}'s {train.num_classes} classes"
  elif block is not None and config_differences(json.loads(saved.to_json()), json.loads(block.to_json())):
    problem = "settings that differ from config.poison"
  if problem is not None:
    raise UserError(f"{path} holds {problem}; {fix}")
  return poisoned, saved
