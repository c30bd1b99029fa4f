"""Where the trainer finds its inputs: URIs of the API turned into local paths, downloading when needed.

pvc:// and configmap:// are mounted by the operator (kubetune.storage.local_path); hf:// is downloaded with
huggingface_hub (token from $HF_TOKEN) and s3:// with boto3 (kubetune.s3, credentials from the location's `s3`
block), both into the cache root. An s3:// output is written to the cache root and uploaded from there
(trainer/remote.py); the newest complete checkpoint in it is downloaded before training resumes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune import s3, storage
from kubetune.api.v1alpha1 import TrainerConfig
from kubetune.trainer.data import DatasetReport, PreparedData, TokenStats, load_tokenizer, prepare
from kubetune.trainer.errors import DATASET_INVALID, INIT_ADAPTER_NOT_FOUND, MODEL_NOT_FOUND, TrainerFailure
from kubetune.trainer.progress import log_event
from kubetune.trainer.remote import RemoteOutput


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


def s3_download(uri: str, access: s3.Access) -> Path:
    """Download s3://BUCKET/KEY (an object, or every object under a prefix) into the cache root."""
    return s3.download(s3.client(access), uri, Path(storage.local_path(uri)))


def fetch(uri: str, repo_type: str = "model", revision: str | None = None, access: s3.Access | None = None) -> Path:
    """The local path of `uri`, downloading hf:// and s3:// locations first."""
    if uri.startswith("hf://"):
        return hf_download(uri, repo_type, revision)
    if uri.startswith("s3://"):
        return s3_download(uri, access or s3.Access())
    return Path(storage.local_path(uri))


def model_path(uri: str, revision: str | None = None, access: s3.Access | None = None) -> Path:
    """The base model's directory (config, weights, tokenizer); ModelNotFound when it is not there."""
    try:
        path = fetch(uri, "model", revision, access)
    except Exception as err:
        raise TrainerFailure(MODEL_NOT_FOUND, f"cannot fetch base model {uri}: {err}") from err
    if not (path / "config.json").is_file():
        raise TrainerFailure(MODEL_NOT_FOUND, f"base model {uri}: no config.json at {path}")
    return path


def dataset_path(uri: str, access: s3.Access | None = None) -> Path:
    """The dataset's JSONL file; DatasetInvalid when it is not there."""
    try:
        path = fetch(uri, "dataset", access=access)
    except Exception as err:
        raise TrainerFailure(DATASET_INVALID, f"cannot fetch dataset {uri}: {err}") from err
    if not path.is_file():
        raise TrainerFailure(DATASET_INVALID, f"dataset {uri}: no file at {path}")
    return path


def init_adapter_path(uri: str, access: s3.Access | None = None) -> Path:
    """The adapter DPO starts from (fromFineTuneJob's output); InitAdapterNotFound when it is not there."""
    try:
        path = fetch(uri, "model", access=access)
    except Exception as err:
        raise TrainerFailure(INIT_ADAPTER_NOT_FOUND, f"cannot fetch adapter {uri}: {err}") from err
    if not (path / "adapter_config.json").is_file():
        raise TrainerFailure(INIT_ADAPTER_NOT_FOUND, f"adapter {uri}: no adapter_config.json at {path}")
    return path


def output_dir(uri: str) -> Path:
    """The directory the adapter and checkpoints are written to: the mount of a pvc:// output, the local
    staging folder (in the cache root) of an s3:// one."""
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
    remote = RemoteOutput.of(spec.output)
    if remote is not None:
        restored = remote.restore_latest(output / "checkpoints", clean=os.environ.get("NODE_RANK", "0") == "0")
        if restored is not None:
            log_event("checkpoint-downloaded", step=restored, uri=remote.checkpoint_uri(restored))
    model_dir = model_path(spec.base_model.uri, config.base_model_revision, s3.Access.of(spec.base_model.s3))
    # DPO's starting adapter is another job's output: read with this job's output credentials.
    init = init_adapter_path(config.init_adapter_uri, s3.Access.of(spec.output.s3)) if config.init_adapter_uri else None
    tokenizer = load_tokenizer(model_dir)
    data = prepare(
        tokenizer,
        dataset_path(spec.dataset.uri, s3.Access.of(spec.dataset.s3)),
        spec.method,
        spec.dataset.format,
        spec.hyperparameters.max_seq_length,
        spec.dataset.validation_split,
        spec.hyperparameters.seed,
    )
    return Inputs(model_dir, output, data, init)
