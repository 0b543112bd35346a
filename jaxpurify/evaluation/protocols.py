"""One entry point: fit a downstream protocol on cached features, report clean accuracy and ASR."""

import jax

from jaxpurify.errors import UserError
from jaxpurify.evaluation.knn import knn_predict
from jaxpurify.evaluation.linear import train_linear
from jaxpurify.evaluation.loop import predict
from jaxpurify.evaluation.metrics import backdoor_metrics
from jaxpurify.evaluation.mlp import train_mlp

_TRAINERS = {"mlp": train_mlp, "linear": train_linear}
PROTOCOLS = ("mlp", "linear", "knn")


def evaluate(protocol: str, train_feats, train_labels, test_feats, test_labels, num_classes: int,
             key: jax.Array, *, triggered_test_feats=None, target: int | None = None,
             mesh: jax.sharding.Mesh | None = None, **protocol_kwargs) -> dict[str, float]:
  """`backdoor_metrics` of one protocol, fitted once on train features [N, D] and labels [N].

  protocol: 'mlp' (BadEncoder MLP head), 'linear' (linear probe) or 'knn' (weighted kNN, no fitting).
  `protocol_kwargs` go to `train_mlp`, `train_linear` or `knn_predict` (k, t, chunk_size). The same
  fitted head labels the clean test features [M, D] and `triggered_test_feats` [M, D] (the same test images
  with the trigger, in order); trained heads also report the last epoch's mean train `loss`.
  """
  if protocol not in PROTOCOLS:
    raise UserError(f"unknown evaluation protocol {protocol!r}; use one of {', '.join(PROTOCOLS)}")
  if protocol == "knn":
    extra = {}

    def label(feats):
      return knn_predict(train_feats, train_labels, feats, num_classes, mesh=mesh, **protocol_kwargs)
  else:
    head, losses = _TRAINERS[protocol](train_feats, train_labels, num_classes, key, mesh=mesh, **protocol_kwargs)
    extra = {"loss": float(losses[-1])}

    def label(feats):
      return predict(head, feats, mesh)
  pred_triggered = None if triggered_test_feats is None else label(triggered_test_feats)
  return backdoor_metrics(label(test_feats), test_labels, pred_triggered, target) | extra
