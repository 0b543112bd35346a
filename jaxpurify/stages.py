"""Stages that experiments share: self-supervised pre-training, the clean encoder, encoder attacks and
frozen-encoder evaluation.

Each stage owns `workdir/<stage>/`; a finished stage (done.json) is loaded, not recomputed.
"""

import jax
import numpy as np

from jaxpurify import data, encoders, evaluation, parallel, triggers
from jaxpurify.attacks import encoder_finetune, references
from jaxpurify.data.device import DeviceDataset
from jaxpurify.encoders import Encoder
from jaxpurify.ssl import METHODS
from jaxpurify.train import checkpoint
from jaxpurify.train.loop import run_steps
from jaxpurify.train.state import create_state, make_optimizer


def load_data(config, name: str, split: str) -> data.ImageSplit:
  return data.load_split(name, split, data_dir=config.data.data_dir or None, image_size=config.data.image_size)


def _train(run, stage, state, step, batch_fn, train, num_steps, mesh, seed):
  key = jax.device_put(jax.random.key(seed), parallel.replicated(mesh))
  return run_steps(run.stage_dir(stage), stage, state, step, batch_fn, key, num_steps=num_steps,
                   log_every=train.log_every, checkpoint_every=train.checkpoint_every,
                   keep=train.keep_checkpoints, images_per_step=train.batch_size)


def pretrain_ssl(run, stage: str, config, mesh, images: np.ndarray | None = None) -> Encoder:
  """Self-supervised pre-training (config.pretrain) on `images` (default: config.data); returns the backbone."""
  method, train = METHODS[config.pretrain.method], config.pretrain.train
  if images is None:
    images = load_data(config, config.data.name, config.data.split).images
  dataset = DeviceDataset({"image": images}, mesh, train.batch_size, config.seed)
  num_steps = train.epochs * dataset.steps_per_epoch
  tx = make_optimizer(config.pretrain.optim, num_steps, dataset.steps_per_epoch)
  graphdef, state = create_state(lambda: method.build_model(config), tx, mesh,
                                 lambda s: method.init_extra(config, s))
  if run.done(stage):
    state = checkpoint.load_latest(f"{run.stage_dir(stage)}/ckpt", state)
  else:
    step = jax.jit(method.make_step(graphdef, tx, config), donate_argnums=0)
    state = _train(run, stage, state, step, dataset.batch, train, num_steps, mesh, config.seed)
    run.finish(stage, {"steps": num_steps, "examples": dataset.num_examples})
  return encoders.backbone_of(graphdef, state)


def clean_encoder(run, config, mesh) -> Encoder:
  """config.attack.clean_encoder's backbone if a path is given, else pre-trained here (stage `pretrain`)."""
  if config.attack.clean_encoder:
    return encoders.load_backbone(config.attack.clean_encoder, config.model, mesh)
  return pretrain_ssl(run, "pretrain", config, mesh)


def attack_encoder(run, stage: str, config, clean: Encoder, mesh) -> Encoder:
  """BadEncoder or DRUPE (config.experiment) fine-tuning of `clean`; returns the backdoored backbone."""
  attack = config.attack
  pretraining = load_data(config, config.data.name, config.data.split)
  shadow = encoder_finetune.shadow_indices(len(pretraining.images), attack.shadow_fraction, config.seed)
  downstream = load_data(config, attack.downstream, "train")
  refs = references.choose(downstream, attack.target, attack.num_references, config.seed, attack.reference_file)
  steps_per_epoch = len(shadow) // attack.train.batch_size
  num_steps = attack.train.epochs * steps_per_epoch
  tx = make_optimizer(attack.optim, num_steps, steps_per_epoch, trainable=encoder_finetune.trainable_mask(clean))
  state = jax.jit(lambda e: encoder_finetune.init_state(e, tx, config.experiment, config.get("drupe")),
                  out_shardings=parallel.replicated(mesh))(clean)
  if run.done(stage):
    state = checkpoint.load_latest(f"{run.stage_dir(stage)}/ckpt", state)
  else:
    # The clean encoder's features of the un-augmented inputs are constants: computed once, here.
    encode, batch = encoders.encode_fn(clean, config.model), config.evaluate.batch_size
    images = pretraining.images[shadow]
    dataset = DeviceDataset({"image": images,
                             "clean_feature": evaluation.extract_features(encode, images, batch, mesh)},
                            mesh, attack.train.batch_size, config.seed)
    constants = parallel.put_replicated(
        {"reference": refs, "clean_reference": evaluation.extract_features(encode, refs, batch, mesh)}, mesh)
    trigger = triggers.make_trigger(attack.trigger, config.data.image_size)
    step = jax.jit(encoder_finetune.make_step(clean.graphdef, tx, config, steps_per_epoch, trigger),
                   donate_argnums=0)
    state = _train(run, stage, state, step, lambda s: dataset.batch(s) | constants, attack.train, num_steps,
                   mesh, config.seed)
    run.finish(stage, {"steps": num_steps, "shadow_examples": len(shadow), "references": len(refs)})
  return Encoder(clean.graphdef, state.params, state.batch_stats)


def evaluate_encoders(run, stage: str, encoders_: dict[str, Encoder], config, mesh, backdoor=None) -> dict:
  """{row name: Encoder} -> {'name/dataset': {'acc': ..., 'acc_knn': ..., 'asr': ..., 'asr_all': ...}}.

  The main protocol (config.evaluate.protocol) gives `acc` (and, on the data set `backdoor` = (dataset,
  trigger, target) names, `asr` and `asr_all` from the triggered test images); each monitor adds
  `acc_<monitor>`.
  """
  if (record := run.done(stage)) is not None:
    return record["evaluations"]
  ev = config.evaluate
  key = jax.random.key(config.seed)
  evaluations = {}
  for dataset in ev.datasets:
    train, test = load_data(config, dataset, "train"), load_data(config, dataset, "test")
    attacked = backdoor is not None and backdoor[0] == dataset
    for name, encoder in encoders_.items():
      features = lambda images, transform=None: evaluation.extract_features(
          encoders.encode_fn(encoder, config.model, transform), images, ev.batch_size, mesh)
      train_feats, test_feats = features(train.images), features(test.images)
      extra = dict(triggered_test_feats=features(test.images, backdoor[1]), target=backdoor[2]) if attacked else {}
      row = {}
      for protocol in (ev.protocol, *ev.monitors):
        result = evaluation.evaluate(protocol, train_feats, train.labels, test_feats, test.labels,
                                     train.num_classes, key, mesh=mesh, **extra, **ev[protocol].to_dict())
        result.pop("loss", None)  # the head's training loss is not a result
        row.update(result if protocol == ev.protocol else {f"{k}_{protocol}": v for k, v in result.items()})
      evaluations[f"{name}/{dataset}"] = row
  run.finish(stage, {"evaluations": evaluations})
  return evaluations
