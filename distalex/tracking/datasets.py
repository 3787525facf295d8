"""The training and validation shards as the run's MLflow dataset inputs.

Each split is one dataset: its name (the shard folder and the split), the shard spec and the
``_info.json`` it was read with as its source, a digest of that ``_info.json`` (it lists every shard
with its sample count, so another set of shards gets another digest), and the counts as its profile.
The MLflow run page shows them under "Datasets", with the context "training" or "validation".
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from distalex.data.info import read_info
from distalex.data.read import read_bytes

if TYPE_CHECKING:
    from mlflow.entities import DatasetInput

    from distalex.config import DataConfig

SOURCE_TYPE = "webdataset"
DIGEST_CHARS = 32
"""MLflow stores at most 36 characters of a digest."""
SPLITS = (("train", "train_shards", "training"), ("val", "val_shards", "validation"))


def info_digest(location: str) -> str:
    """The first DIGEST_CHARS hex digits of the SHA-256 of an ``_info.json``."""
    return hashlib.sha256(read_bytes(location)).hexdigest()[:DIGEST_CHARS]


def shard_datasets(data: DataConfig) -> list[DatasetInput]:
    """The run's two dataset inputs (``data.train_shards``, ``data.val_shards``). Raises DataError
    when a split's ``_info.json`` cannot be read."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    for split, key, context in SPLITS:
        spec = getattr(data, key)
        info = read_info(spec, data.info)
        folder = "/".join(info.root.rstrip("/").split("/")[-2:]) or info.root  # e.g. demo/shards
        source = {"uri": spec, "info": info.location, "key": f"data.{key}"}
        listed = info.splits.get(split)
        profile = {"classes": info.num_classes}
        if listed is not None:
            profile.update(samples=listed.count, shards=len(listed.shards))
        dataset = Dataset(name=f"{folder}/{split}", digest=info_digest(info.location), source_type=SOURCE_TYPE,
                          source=json.dumps(source), profile=json.dumps(profile))
        inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
    return inputs
