"""Every number of a config checked against its range before anything runs: one table of rules by key name.

A rule applies to every key of that name anywhere in the config (`epochs` in `pretrain.train`, in
`finetune.ft_all.train`, ...), and to each element of a tuple value (`tcore.expand.iters`). Unset (None) values are
skipped: they mean "the default". The experiments' own `check` adds what depends on the data (a batch no larger than
the examples it draws from) and on the names the code knows.
"""

import math
import re

import jax

from jaxpurify.errors import UserError

# (key-name pattern, test, what the test asks); the first matching rule decides.
_RULES = [
    # the pre-training poisoning attacks (configs/ssl_backdoor.py, configs/corruptencoder.py)
    (r"object_threshold", lambda v: _int(v) and 0 <= v <= 255, "an integer in 0..255"),
    (r"train_location|test_location|object_marginal|trigger_marginal", lambda v: _real(v) and 0 <= v <= 1,
     "in [0, 1]"),
    (r"area_ratio", lambda v: _real(v) and v >= 1, "a number of at least 1"),
    (r"poison_rate", lambda v: _real(v) and 0 < v <= 1, "in (0, 1]"),
    (r"warmup_epochs|every_epochs|l2_await|l2_ramp|max_steps|max_eval_examples|mock_examples|fixed_point_iters",
     lambda v: _int(v) and v >= 0, "an integer of at least 0"),
    (r".*epochs|.*batch_size|log_every|checkpoint_every|keep_checkpoints|steps_per_stage|seeds_per_class|"
     r"num_references|chunk_rows|steps|iters|secret_length|num_projections|k|pieces|queue_size|patch_size|size|window|"
     r"dims|max_dims|blends|inner_steps|em_iters|mlp_hidden|mi_hidden|batch_factor|min_marked|pgd_steps|rounds",
     lambda v: _int(v) and v >= 1, "an integer of at least 1"),
    (r".*_fraction|fraction|prune_step|rate|poison_ratio|pratio|cover_ratio|ratios|per_class_cap|conf_threshold|"
     r"schedule",
     lambda v: _real(v) and 0 < v <= 1, "in (0, 1]"),
    (r".*_quantile", lambda v: _real(v) and 0 < v < 1, "in (0, 1)"),
    (r".*_prob|dropout|acc_tol|l2_start_accuracy|mask_density|alpha|test_alpha|amplitude|test_amplitude",
     lambda v: _real(v) and 0 <= v <= 1, "in [0, 1]"),
    (r"momentum|ema|max_acc_drop", lambda v: _real(v) and 0 <= v < 1, "in [0, 1)"),
    (r"lr|.*_lr|lrs|threshold_step|power|temperature|t|eps|epsilon|step_size|u|u_grid|magnitude|frequency|s|"
     r"que_alpha|.*threshold|outlyingness|flooding|threshold_eps",
     lambda v: _real(v) and v > 0, "a number above 0"),
    (r"weight_decay|mi_weight_decay|lambda1|lambda2|lambda_div|lambda_norm|clone_weight|base_weight|momentum_weight|"
     r"cost|cost_1|bce_weight|l2_weight|grid_rescale|delta|cross_ratio",
     lambda v: _real(v) and v >= 0, "a number of at least 0"),
]
_COMPILED = [(re.compile(f"(?:{pattern})"), test, what) for pattern, test, what in _RULES]


def _int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _real(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _leaves(node, prefix: str = ""):
  """(dotted key, value) of every leaf of a ConfigDict (or dict)."""
  for key, value in node.items():
    if hasattr(value, "items"):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def check_ranges(config) -> None:
  """UserError naming the first key whose value (or an element of it) breaks its rule."""
  for key, value in _leaves(config):
    name = key.rpartition(".")[2]
    rule = next(((test, what) for pattern, test, what in _COMPILED if pattern.fullmatch(name)), None)
    if rule is None or value is None or isinstance(value, str):
      continue
    test, what = rule
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if not test(item):
        shown = f"{value!r}" if item is value else f"{value!r} (element {item!r})"
        raise UserError(f"config.{key} must be {what}, got {shown}; fix --config.{key}")


def check_optimizers(config) -> None:
  """Every optimiser block (a group with `name` and `lr`) names a known optimiser and schedule."""
  from jaxpurify.train.state import OPTIMIZERS, SCHEDULES  # pylint: disable=g-import-not-at-top
  leaves = dict(_leaves(config))
  for key, value in leaves.items():
    group, _, name = key.rpartition(".")
    if name == "name" and f"{group}.lr" in leaves and value not in OPTIMIZERS:
      raise UserError(f"unknown optimizer {value!r}; set config.{key} to one of {', '.join(OPTIMIZERS)}")
    if name == "schedule" and isinstance(value, str) and value not in SCHEDULES:
      raise UserError(f"unknown learning-rate schedule {value!r}; set config.{key} to one of {', '.join(SCHEDULES)}")


def check_dtypes(config) -> None:
  """Every model block's compute dtype (`<...>.dtype`) is one models.DTYPES names."""
  from jaxpurify.models import DTYPES  # pylint: disable=g-import-not-at-top
  for key, value in _leaves(config):
    if key.rpartition(".")[2] == "dtype" and value not in DTYPES:
      raise UserError(f"unknown compute dtype {value!r}; set config.{key} to one of {', '.join(DTYPES)}")


def check_vits(config) -> None:
  """Every ViT options block (`<...>.vit`, beside a model's `name`): a patch of at least 1 that divides
  vit.image_size and a known pooling, checked whatever the model; where the model is a ViT, an image size equal
  to the data's (config.data.image_size)."""
  from jaxpurify.models import is_vit  # pylint: disable=g-import-not-at-top
  from jaxpurify.models.vit import POOLS  # pylint: disable=g-import-not-at-top
  leaves = dict(_leaves(config))
  data_size = leaves.get("data.image_size")
  for key, patch in leaves.items():
    if not (key == "vit.patch" or key.endswith(".vit.patch")):
      continue
    prefix = key[:-len("vit.patch")]
    size, pool = leaves[f"{prefix}vit.image_size"], leaves[f"{prefix}vit.pool"]
    if not _int(patch) or patch < 1 or not _int(size) or size < 1 or size % patch:
      raise UserError(f"config.{prefix}vit.patch={patch!r} does not divide config.{prefix}vit.image_size={size!r}; "
                      f"set the patch to a divisor of the image size")
    if pool not in POOLS:
      raise UserError(f"unknown ViT pooling {pool!r}; set config.{prefix}vit.pool to one of {', '.join(POOLS)}")
    name = leaves.get(f"{prefix}name")
    if isinstance(name, str) and is_vit(name) and data_size is not None and size != data_size:
      raise UserError(f"config.{prefix}vit.image_size={size} differs from config.data.image_size={data_size}; set "
                      f"--config.{prefix}vit.image_size={data_size}")


def check_train_batches(config) -> None:
  """Every training block's batch (`<...>.train.batch_size`) and the evaluation's split evenly over the devices."""
  devices = jax.device_count()
  for key, value in _leaves(config):
    if re.fullmatch(r"(.*\.)?train\.batch_size|evaluate\.batch_size", key) and value % devices:
      raise UserError(f"config.{key}={value} is not divisible by the {devices} devices; set it to a multiple of "
                      f"{devices}")


def check_fits(config, key: str, num_examples: int, what: str) -> None:
  """UserError when the batch at dotted `key` is larger than the `num_examples` it draws from (`what`)."""
  value = config
  for part in key.split("."):
    value = value[part]
  if value > num_examples:
    raise UserError(f"config.{key}={value} is larger than the {num_examples} {what} it draws batches from; set it "
                    f"to at most {num_examples}")


def check(config) -> None:
  """The rules above, the optimisers, the compute dtypes, the ViT options and the device split of every batch."""
  check_ranges(config)
  check_optimizers(config)
  check_dtypes(config)
  check_vits(config)
  check_train_batches(config)
