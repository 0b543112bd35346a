"""Data sets as whole host-memory splits: `load_split(name, split)` -> `ImageSplit`.

Known names are the keys of `DATASETS`; real data sets are prepared once with
`python -m jaxpurify.data.prepare`.
"""

from jaxpurify.data.catalog import DATASETS, DatasetSpec, ImageSplit, num_classes
from jaxpurify.data.loading import ensure_available, load_split, num_examples

__all__ = ["DATASETS", "DatasetSpec", "ImageSplit", "ensure_available", "load_split", "num_classes", "num_examples"]
