"""Stages that experiments share: self-supervised pre-training, the clean encoder, encoder attacks and
frozen-encoder evaluation.

Each stage owns `workdir/<stage>/`; a finished stage (done.json) is loaded, not recomputed.
"""

import time

import jax
import numpy as np
from flax import nnx

from jaxpurify import data, encoders, evaluation, parallel, timing, triggers
from jaxpurify.attacks import encoder_finetune, references
from jaxpurify.data.device import DeviceDataset
from jaxpurify.encoders import Encoder
from jaxpurify.ssl import METHODS
from jaxpurify.train import checkpoint
from jaxpurify.train.loop import run_steps
from jaxpurify.train.state import create_state, make_optimizer


def load_data(config, name: str, split: str) -> data.ImageSplit:
  """A split as config.data says (data_dir, image_size, mock data for smoke runs)."""
  return data.load_split(name, split, data_dir=config.data.data_dir or None, image_size=config.data.image_size,
                         mock=config.data.mock_examples)


def load_evaluation(config, name: str, split: str) -> data.ImageSplit:
  """A split an evaluation reads: `load_data`, its first config.limits.max_eval_examples examples when set."""
  full, cap = load_data(config, name, split), config.limits.max_eval_examples
  if not cap or len(full.labels) <= cap:
    return full
  return data.ImageSplit(full.images[:cap], full.labels[:cap], full.num_classes, full.name, full.split)


def capped_steps(config, num_steps: int) -> int:
  """A training stage's steps: `num_steps`, at most config.limits.max_steps when set (smoke runs)."""
  cap = config.limits.max_steps
  return min(num_steps, cap) if cap else num_steps


def capped_epochs(max_steps: int, epochs: int, steps_per_epoch: int) -> int:
  """The whole epochs of a loop that is not a `train` stage: `epochs`, or under a step cap (config.limits.max_steps
  of a smoke run; 0 = none) as few as reach it, at least one."""
  return min(epochs, max(1, -(-max_steps // steps_per_epoch))) if max_steps else epochs


def train(run, stage, state, step, batch_fn, train_config, num_steps, mesh, seed, after_step=None):
  """`run_steps` in the stage's folder with the run key of `seed` and the logging of `train_config`."""
  key = jax.device_put(jax.random.key(seed), parallel.replicated(mesh))
  return run_steps(run.stage_dir(stage), stage, state, step, batch_fn, key,
                   num_steps=capped_steps(run.config, num_steps), log_every=train_config.log_every,
                   checkpoint_every=train_config.checkpoint_every, keep=train_config.keep_checkpoints,
                   images_per_step=train_config.batch_size, after_step=after_step)


def trained(run, stage: str, state, num_steps: int, train_fn, record: dict | None = None):
  """The final state of a training stage: restored at exactly the step its done.json records when the stage is
  finished, else `train_fn()` (-> the state after `num_steps` steps) and the stage marked done with `record`."""
  if (done := run.done(stage)) is not None:
    return checkpoint.load_step(f"{run.stage_dir(stage)}/ckpt", done["steps"], state, stage)
  state = train_fn()
  run.finish(stage, {"steps": capped_steps(run.config, num_steps), **(record or {})})
  return state


def pretrain_ssl(run, stage: str, config, mesh, images: np.ndarray | None = None) -> Encoder:
  """Self-supervised pre-training (config.pretrain) on `images` (default: config.data); returns the backbone."""
  if images is None:
    images = load_data(config, config.data.name, config.data.split).images
  return encoders.backbone_of(*ssl_stage(run, stage, config, images, mesh))


def ssl_stage(run, stage: str, config, images: np.ndarray, mesh, init_backbone: Encoder | None = None):
  """config.pretrain's method on uint8 `images` [N, H, W, 3], from `init_backbone` if given (a fresh head);
  -> (graphdef, final TrainState), trained here or loaded when the stage is finished."""
  graphdef, state, step, dataset, num_steps = ssl_training(config, images, mesh, init_backbone)
  state = trained(run, stage, state, num_steps, lambda: train(
      run, stage, state, step, dataset.batch, config.pretrain.train, num_steps, mesh, config.seed),
                  {"examples": dataset.num_examples})
  return graphdef, state


def ssl_training(config, images: np.ndarray, mesh, init_backbone: Encoder | None = None):
  """-> (graphdef, state at step 0, jitted donating step, DeviceDataset, number of steps) of config.pretrain's
  method on uint8 `images` [N, H, W, 3]; the backbone starts from `init_backbone` when given."""
  method, train = METHODS[config.pretrain.method], config.pretrain.train
  dataset = DeviceDataset({"image": images}, mesh, train.batch_size, config.seed)
  num_steps = train.epochs * dataset.steps_per_epoch
  tx = make_optimizer(config.pretrain.optim, num_steps, dataset.steps_per_epoch)
  init_extra = lambda s: method.init_extra(config, s)
  graphdef, state = create_state(lambda: method.build_model(config), tx, mesh, init_extra)
  if init_backbone is not None:
    state = jax.jit(lambda s, b: with_backbone(graphdef, s, b, init_extra),
                    out_shardings=parallel.replicated(mesh))(state, init_backbone)
  step = jax.jit(method.make_step(graphdef, tx, config), donate_argnums=0)
  return graphdef, state, step, dataset, num_steps


def with_backbone(graphdef, state, backbone: Encoder, init_extra):
  """The state at step 0 with `backbone`'s arrays in place of the model's `.backbone` (extra recomputed)."""
  model = nnx.merge(graphdef, state.params, state.batch_stats)
  nnx.update(model.backbone, backbone.params, backbone.batch_stats)
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  state = state.replace(params=params, batch_stats=batch_stats)
  return state.replace(extra=init_extra(state))


def clean_encoder(run, config, mesh, path: str, field: str = "config.attack.clean_encoder") -> Encoder:
  """The backbone of the run at `path` (config `field`) if given, else pre-trained here (stage `pretrain`)."""
  if path:
    return encoders.load_backbone(path, config.model, mesh, field=field)
  return pretrain_ssl(run, "pretrain", config, mesh)


def attack_encoder(run, stage: str, config, clean: Encoder, mesh, trigger=None) -> Encoder:
  """BadEncoder or DRUPE (config.attack.mode) fine-tuning of `clean`; returns the backdoored backbone.

  trigger: uint8 [B, H, W, 3] -> uint8, jittable; default config.attack.trigger's."""
  attack = config.attack
  pretraining = load_data(config, config.data.name, config.data.split)
  shadow = encoder_finetune.shadow_indices(len(pretraining.images), attack.shadow_fraction, config.seed)
  downstream = load_data(config, attack.downstream, "train")
  refs = references.choose(downstream, attack.target, attack.num_references, config.seed, attack.reference_file,
                           reference_features(config, clean, mesh))
  state, step, num_steps = attack_training(config, clean, len(shadow), mesh, trigger)
  state = trained(run, stage, state, num_steps, lambda: train(
      run, stage, state, step, attack_batches(config, clean, pretraining.images[shadow], refs, mesh), attack.train,
      num_steps, mesh, config.seed), {"shadow_examples": len(shadow), "references": len(refs)})
  return Encoder(clean.graphdef, state.params, state.batch_stats)


def reference_features(config, clean: Encoder, mesh):
  """The clean encoder's features (uint8 [N, H, W, 3] -> [N, D]) when config.attack.reference_choice is 'typical',
  else None (references drawn with the seed)."""
  if config.attack.reference_choice != "typical":
    return None
  encode = encoders.encode_fn(clean, config.model)
  return lambda images: evaluation.extract_features(encode, images, config.evaluate.batch_size, mesh)


def attack_training(config, clean: Encoder, num_shadow: int, mesh, trigger=None):
  """-> (state at step 0, jitted donating step, number of steps) of BadEncoder/DRUPE on `num_shadow` images,
  with `trigger` (default config.attack.trigger's)."""
  attack = config.attack
  steps_per_epoch = num_shadow // attack.train.batch_size
  num_steps = attack.train.epochs * steps_per_epoch
  tx = make_optimizer(attack.optim, num_steps, steps_per_epoch, trainable=encoder_finetune.trainable_mask(clean))
  state = jax.jit(lambda e: encoder_finetune.init_state(e, tx, config.attack.mode, config.get("drupe")),
                  out_shardings=parallel.replicated(mesh))(clean)
  trigger = trigger or triggers.make_trigger(attack.trigger, config.data.image_size)
  step = jax.jit(encoder_finetune.make_step(clean.graphdef, tx, config, steps_per_epoch, trigger), donate_argnums=0)
  return state, step, num_steps


def attack_batches(config, clean: Encoder, shadow: np.ndarray, refs: np.ndarray, mesh):
  """-> batch_fn(step) for the attack step: shadow images uint8 [N, H, W, 3] with the clean encoder's features
  (constants: computed once, here) and the references uint8 [R, H, W, 3] with theirs, replicated."""
  encode, batch = encoders.encode_fn(clean, config.model), config.evaluate.batch_size
  dataset = DeviceDataset({"image": shadow, "clean_feature": evaluation.extract_features(encode, shadow, batch, mesh)},
                          mesh, config.attack.train.batch_size, config.seed)
  constants = parallel.put_replicated(
      {"reference": refs, "clean_reference": evaluation.extract_features(encode, refs, batch, mesh)}, mesh)
  return lambda step: dataset.batch(step) | constants


def evaluate_encoders(run, stage: str, encoders_: dict[str, Encoder], config, mesh, backdoor=None) -> dict:
  """{row name: Encoder} -> {'name/dataset': {'acc': ..., 'acc_knn': ..., 'asr': ..., 'asr_all': ...}}.

  The main protocol (config.evaluate.protocol) gives `acc` (and, on the data set `backdoor` = (dataset,
  trigger, target) names, `asr` and `asr_all` from the triggered test images); each monitor adds
  `acc_<monitor>`.
  """
  if (record := run.done(stage)) is not None:
    return record["evaluations"]
  tick = time.perf_counter()
  ev = config.evaluate
  evaluations = {}
  for dataset in ev.datasets:
    train, test = load_evaluation(config, dataset, "train"), load_evaluation(config, dataset, "test")
    attacked = backdoor if backdoor is not None and backdoor[0] == dataset else None
    for name, encoder in encoders_.items():
      evaluations[f"{name}/{dataset}"] = encoder_metrics(encoder, config, train, test, (ev.protocol, *ev.monitors),
                                                         mesh, attacked)
  run.finish(stage, {"evaluations": evaluations})
  timing.record(stage, evaluate_s=time.perf_counter() - tick)
  if jax.process_index() == 0:
    print(f"{stage}: {len(encoders_)} encoder(s) on {', '.join(ev.datasets)}, {time.perf_counter() - tick:.1f} s",
          flush=True)
  return evaluations


def encoder_metrics(encoder: Encoder, config, train: data.ImageSplit, test: data.ImageSplit, protocols, mesh,
                    backdoor=None) -> dict:
  """acc (and asr, asr_all with `backdoor` = (dataset, trigger, target)) of the first protocol on the frozen
  encoder's features of `train` and `test`; the other protocols' under `<metric>_<protocol>`. A smoke run's step
  cap (config.limits.max_steps) caps the heads' epochs (`capped_epochs`)."""
  ev = config.evaluate
  features = lambda images, transform=None: evaluation.extract_features(
      encoders.encode_fn(encoder, config.model, transform), images, ev.batch_size, mesh)
  train_feats, test_feats = features(train.images), features(test.images)
  extra = dict(triggered_test_feats=features(test.images, backdoor[1]), target=backdoor[2]) if backdoor else {}
  row = {}
  for protocol in protocols:
    kwargs = ev[protocol].to_dict()
    if "epochs" in kwargs:  # a trained head: under a smoke cap, as few whole epochs as reach it
      kwargs["epochs"] = capped_epochs(config.limits.max_steps, kwargs["epochs"],
                                       -(-len(train.labels) // kwargs["batch_size"]))
    result = evaluation.evaluate(protocol, train_feats, train.labels, test_feats, test.labels, train.num_classes,
                                 jax.random.key(config.seed), mesh=mesh, **extra, **kwargs)
    result.pop("loss", None)  # the head's training loss is not a result
    row.update(result if protocol == protocols[0] else {f"{k}_{protocol}": v for k, v in result.items()})
  return row
