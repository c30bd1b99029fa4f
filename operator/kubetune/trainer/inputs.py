"""Where the trainer finds its inputs: URIs of the API turned into local paths, downloading when needed.

pvc:// and configmap:// are mounted by the operator (kubetune.storage.local_path); hf:// is downloaded with
huggingface_hub (token from $HF_TOKEN) and s3:// with boto3, both into the cache root.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune import storage
from kubetune.api.v1alpha1 import TrainerConfig
from kubetune.trainer.data import DatasetReport, PreparedData, TokenStats, load_tokenizer, prepare
from kubetune.trainer.errors import (
    DATASET_INVALID,
    INIT_ADAPTER_NOT_FOUND,
    MODEL_NOT_FOUND,
    OUTPUT_UNSUPPORTED,
    TrainerFailure,
)


def is_remote(uri: str) -> bool:
    """True for locations that must be downloaded (hf://, s3://) rather than mounted."""
    return uri.startswith(("hf://", "s3://"))


def hf_download(uri: str, repo_type: str, revision: str | None = None) -> Path:
    """Download hf://ORG/NAME[/FILE][@REV] (a whole repo, or one file of it) and return its local path."""
    from huggingface_hub import snapshot_download

    loc = storage.parse(uri)
    org, _, rest = f"{loc.root}/{loc.path}".partition("/")
    name, _, file = rest.partition("/")
    repo = f"{org}/{name}"
    snapshot = snapshot_download(
        repo_id=repo,
        repo_type=repo_type,
        revision=loc.revision or revision,
        token=os.environ.get("HF_TOKEN") or None,
        cache_dir=os.path.join(storage.local_path(f"hf://{repo}"), ".hub"),
        allow_patterns=[file] if file else None,
    )
    return Path(snapshot, file) if file else Path(snapshot)


def s3_download(uri: str) -> Path:
    """Download s3://BUCKET/KEY (a file, or every object under a prefix) into the cache root."""
    try:
        import boto3
    except ImportError as err:
        raise RuntimeError(f"{uri}: s3:// needs boto3, which this trainer image does not have") from err
    loc = storage.parse(uri)
    dest = Path(storage.local_path(uri))
    bucket = boto3.resource("s3").Bucket(loc.root)
    objects = [o for o in bucket.objects.filter(Prefix=loc.path) if not o.key.endswith("/")]
    if len(objects) == 1 and objects[0].key == loc.path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        bucket.download_file(loc.path, str(dest))
        return dest
    for obj in objects:
        target = dest / os.path.relpath(obj.key, loc.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        bucket.download_file(obj.key, str(target))
    return dest


def fetch(uri: str, repo_type: str = "model", revision: str | None = None) -> Path:
    """The local path of `uri`, downloading hf:// and s3:// locations first."""
    if uri.startswith("hf://"):
        return hf_download(uri, repo_type, revision)
    if uri.startswith("s3://"):
        return s3_download(uri)
    return Path(storage.local_path(uri))


def model_path(uri: str, revision: str | None = None) -> Path:
    """The base model's directory (config, weights, tokenizer); ModelNotFound when it is not there."""
    try:
        path = fetch(uri, "model", revision)
    except Exception as err:
        raise TrainerFailure(MODEL_NOT_FOUND, f"cannot fetch base model {uri}: {err}") from err
    if not (path / "config.json").is_file():
        raise TrainerFailure(MODEL_NOT_FOUND, f"base model {uri}: no config.json at {path}")
    return path


def dataset_path(uri: str) -> Path:
    """The dataset's JSONL file; DatasetInvalid when it is not there."""
    try:
        path = fetch(uri, "dataset")
    except Exception as err:
        raise TrainerFailure(DATASET_INVALID, f"cannot fetch dataset {uri}: {err}") from err
    if not path.is_file():
        raise TrainerFailure(DATASET_INVALID, f"dataset {uri}: no file at {path}")
    return path


def init_adapter_path(uri: str) -> Path:
    """The adapter DPO starts from (fromFineTuneJob's output); InitAdapterNotFound when it is not there."""
    try:
        path = fetch(uri, "model")
    except Exception as err:
        raise TrainerFailure(INIT_ADAPTER_NOT_FOUND, f"cannot fetch adapter {uri}: {err}") from err
    if not (path / "adapter_config.json").is_file():
        raise TrainerFailure(INIT_ADAPTER_NOT_FOUND, f"adapter {uri}: no adapter_config.json at {path}")
    return path


def output_dir(uri: str) -> Path:
    """The directory the adapter and checkpoints are written to (mounted: pvc:// or a local path)."""
    if is_remote(uri):
        raise TrainerFailure(OUTPUT_UNSUPPORTED, f"output {uri}: this trainer writes to pvc:// outputs only")
    return Path(storage.local_path(uri))


@dataclass
class Inputs:
    """Everything resolved and checked before training: handed from the launcher to its workers on disk."""

    model_dir: Path
    output_dir: Path
    data: PreparedData
    init_adapter: Path | None = None

    def save(self, directory: Path) -> None:
        from datasets import Dataset

        for name, examples in (("train", self.data.train), ("validation", self.data.validation)):
            if examples:  # an empty Dataset cannot be loaded back
                Dataset.from_list(examples).save_to_disk(str(directory / name))
        paths = {"modelDir": str(self.model_dir), "outputDir": str(self.output_dir)}
        if self.init_adapter:
            paths["initAdapter"] = str(self.init_adapter)
        (directory / "inputs.json").write_text(json.dumps({**paths, "report": self.data.report.to_dict()}))

    @classmethod
    def load(cls, directory: Path) -> Inputs:
        from datasets import load_from_disk

        def examples(name: str) -> list[dict[str, Any]]:
            path = directory / name
            return load_from_disk(str(path)).to_list() if path.exists() else []

        meta = json.loads((directory / "inputs.json").read_text())
        report = meta["report"]
        data = PreparedData(
            train=examples("train"),
            validation=examples("validation"),
            report=DatasetReport(**{**report, "tokens": TokenStats(**report["tokens"])}),
        )
        init = meta.get("initAdapter")
        return cls(Path(meta["modelDir"]), Path(meta["outputDir"]), data, Path(init) if init else None)


def stage(config: TrainerConfig) -> Inputs:
    """Fetch the model (and DPO's starting adapter), then read, check and tokenize the dataset."""
    spec = config.spec
    output = output_dir(spec.output.uri)
    model_dir = model_path(spec.base_model.uri, config.base_model_revision)
    init = init_adapter_path(config.init_adapter_uri) if config.init_adapter_uri else None
    tokenizer = load_tokenizer(model_dir)
    data = prepare(
        tokenizer,
        dataset_path(spec.dataset.uri),
        spec.method,
        spec.dataset.format,
        spec.hyperparameters.max_seq_length,
        spec.dataset.validation_split,
        spec.hyperparameters.seed,
    )
    return Inputs(model_dir, output, data, init)
