"""Stages that several experiments share: self-supervised pre-training and frozen-encoder evaluation.

Each stage owns `workdir/<stage>/`; a finished stage (done.json) is loaded, not recomputed.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpurify import augment, data, evaluation, parallel
from jaxpurify.data.device import DeviceDataset
from jaxpurify.ssl import METHODS
from jaxpurify.train import checkpoint
from jaxpurify.train.loop import run_steps
from jaxpurify.train.state import create_state, make_optimizer


def load_data(config, name: str, split: str) -> data.ImageSplit:
  return data.load_split(name, split, data_dir=config.data.data_dir or None, image_size=config.data.image_size)


def pretrain_ssl(run, stage: str, config, mesh):
  """Self-supervised pre-training (config.pretrain) on config.data; returns (graphdef, TrainState)."""
  method, train = METHODS[config.pretrain.method], config.pretrain.train
  split = load_data(config, config.data.name, config.data.split)
  dataset = DeviceDataset({"image": split.images}, mesh, train.batch_size, config.seed)
  num_steps = train.epochs * dataset.steps_per_epoch
  tx = make_optimizer(config.pretrain.optim, num_steps)
  graphdef, state = create_state(lambda: method.build_model(config), tx, mesh,
                                 lambda s: method.init_extra(config, s))
  stage_dir = run.stage_dir(stage)
  if run.done(stage):
    return graphdef, checkpoint.load_latest(f"{stage_dir}/ckpt", state)
  step = jax.jit(method.make_step(graphdef, tx, config), donate_argnums=0)
  key = jax.device_put(jax.random.key(config.seed), parallel.replicated(mesh))
  state = run_steps(stage_dir, stage, state, step, dataset.batch, key, num_steps=num_steps,
                    log_every=train.log_every, checkpoint_every=train.checkpoint_every,
                    keep=train.keep_checkpoints, images_per_step=train.batch_size)
  run.finish(stage, {"steps": num_steps, "examples": dataset.num_examples})
  return graphdef, state


def feature_fn(graphdef, state, model_config):
  """A jitted uint8 [B, H, W, 3] -> backbone feature [B, D] in inference mode."""
  mean, std = jnp.asarray(model_config.mean), jnp.asarray(model_config.std)

  @jax.jit
  def encode(params, batch_stats, images):
    model = nnx.merge(graphdef, params, batch_stats)
    feature, _ = model.backbone(augment.normalize(augment.to_float(images), mean, std), train=False)
    return feature

  return lambda images: encode(state.params, state.batch_stats, images)


def evaluate_encoders(run, stage: str, encoders: dict, config, mesh) -> dict[str, dict]:
  """encoders: {row name: (graphdef, state)} -> {'name/dataset': {'acc': ..., 'acc_knn': ...}}.

  The main protocol (config.evaluate.protocol) gives `acc`; each monitor adds `acc_<monitor>`.
  """
  if (record := run.done(stage)) is not None:
    return record["evaluations"]
  ev = config.evaluate
  key = jax.random.key(config.seed)
  evaluations = {}
  for dataset in ev.datasets:
    train, test = load_data(config, dataset, "train"), load_data(config, dataset, "test")
    for name, (graphdef, state) in encoders.items():
      encode = feature_fn(graphdef, state, config.model)
      train_feats = evaluation.extract_features(encode, train.images, ev.batch_size, mesh)
      test_feats = evaluation.extract_features(encode, test.images, ev.batch_size, mesh)
      row = {}
      for protocol in (ev.protocol, *ev.monitors):
        result = evaluation.evaluate(protocol, train_feats, train.labels, test_feats, test.labels,
                                     train.num_classes, key, mesh=mesh, **ev[protocol].to_dict())
        result.pop("loss", None)  # the head's training loss is not a result
        row.update(result if protocol == ev.protocol else {f"acc_{protocol}": result["acc"]})
      evaluations[f"{name}/{dataset}"] = row
  run.finish(stage, {"evaluations": evaluations})
  return evaluations
