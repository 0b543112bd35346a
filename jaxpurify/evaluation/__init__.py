"""Downstream evaluation of a frozen encoder on cached features: kNN, BadEncoder MLP head, linear probe."""

from jaxpurify.evaluation.features import apply_batched, extract_features
from jaxpurify.evaluation.knn import knn_predict
from jaxpurify.evaluation.linear import LinearProbe, fit_linear, train_linear
from jaxpurify.evaluation.loop import predict, train_head
from jaxpurify.evaluation.metrics import backdoor_metrics
from jaxpurify.evaluation.mlp import MLPHead, fit_mlp, train_mlp
from jaxpurify.evaluation.protocols import PROTOCOLS, evaluate

__all__ = [
    "PROTOCOLS", "LinearProbe", "MLPHead", "apply_batched", "backdoor_metrics", "evaluate", "extract_features", "fit_linear",
    "fit_mlp", "knn_predict", "predict", "train_head", "train_linear", "train_mlp",
]
