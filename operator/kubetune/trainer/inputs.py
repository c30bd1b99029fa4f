"""Where the trainer finds its inputs: URIs of the API turned into local paths, downloading when needed.

pvc:// and configmap:// are mounted by the operator (kubetune.storage.local_path); hf:// is downloaded with
huggingface_hub (token from $HF_TOKEN) and s3:// with boto3 (kubetune.s3, credentials from the location's `s3`
block), both into the cache root. An s3:// output is written to the cache root and uploaded from there
(trainer/remote.py); the newest complete checkpoint in it is downloaded before training resumes.

A download that fails transiently (a hub or S3 outage) is retried with back-off (trainer/retries.py) and then
fails with the retryable exit code (ModelUnavailable, ...); a definite answer (not found, no access) fails at
once with the permanent one (ModelNotFound, ...).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from kubetune import hf, s3, storage
from kubetune.api.v1alpha1 import PreparedInputs, TrainerConfig
from kubetune.trainer.data import DatasetReport, PreparedData, TokenStats, load_tokenizer, prepare
from kubetune.trainer.errors import (
    DATASET_INVALID,
    DATASET_UNAVAILABLE,
    INIT_ADAPTER_NOT_FOUND,
    INIT_ADAPTER_UNAVAILABLE,
    MODEL_NOT_FOUND,
    MODEL_UNAVAILABLE,
    TrainerFailure,
)
from kubetune.trainer.progress import log_event
from kubetune.trainer.records import is_split_file
from kubetune.trainer.remote import RemoteOutput
from kubetune.trainer.retries import RetriesExhausted, RetryPolicy, call_with_retries

T = TypeVar("T")
Progress = Callable[[int, int], None]
"""progress(done, total): bytes downloaded so far, of the total known so far."""


def hf_download(
    uri: str,
    repo_type: str,
    revision: str | None = None,
    commit: str | None = None,
    progress: Progress | None = None,
    split: str | None = None,
) -> Path:
    """Download hf://ORG/NAME[/FILE][@REV] (a whole model repository, one file, or the data files of a dataset
    repository, of `split` when given) and return its local path. `commit` (from hf.commit) pins the download to
    that commit instead of the revision; `progress(done, total)` bytes."""
    from huggingface_hub import HfApi, snapshot_download

    repo, file, written = hf.repo(uri)
    at = commit or written or revision
    wanted = [file] if file else None
    if repo_type == "dataset" and not file:
        # Only what the split's check reads (records.is_split_file), not the repository's other splits and files.
        listed = HfApi(token=hf.token()).list_repo_files(repo, repo_type="dataset", revision=at)
        wanted = [glob.escape(f) for f in listed if is_split_file(f, split)]
    snapshot = snapshot_download(
        repo_id=repo,
        repo_type=repo_type,
        revision=at,
        token=hf.token(),
        cache_dir=os.path.join(storage.local_path(f"hf://{repo}"), ".hub"),
        allow_patterns=wanted,
        tqdm_class=hf.progress_bars(progress) if progress else None,
    )
    return Path(snapshot, file) if file else Path(snapshot)


def s3_download(uri: str, access: s3.Access, progress: Progress | None = None) -> Path:
    """Download s3://BUCKET/KEY (an object, or every object under a prefix) into the cache root."""
    return s3.download(s3.client(access), uri, Path(storage.local_path(uri)), progress)


def fetch(
    uri: str,
    repo_type: str = "model",
    revision: str | None = None,
    access: s3.Access | None = None,
    commit: str | None = None,
    progress: Progress | None = None,
    split: str | None = None,
) -> Path:
    """The local path of `uri`, downloading hf:// (at `commit` when given; a dataset repository's files of `split`)
    and s3:// locations first (reporting the bytes to `progress`)."""
    if uri.startswith("hf://"):
        return hf_download(uri, repo_type, revision, commit, progress, split)
    if uri.startswith("s3://"):
        return s3_download(uri, access or s3.Access(), progress)
    return Path(storage.local_path(uri))


def fetch_or_fail(what: str, uri: str, reasons: tuple[str, str], fetch_once: Callable[[], T]) -> T:
    """fetch_once() with retries; TrainerFailure with reasons[0] (permanent) or reasons[1] (retryable)."""
    policy = RetryPolicy.from_env(os.environ)
    try:
        return call_with_retries(f"{what} {uri}", fetch_once, policy)
    except RetriesExhausted as err:
        message = f"cannot fetch {what} {uri}, {err}; the pod exits to be retried (backoffLimit)"
        raise TrainerFailure(reasons[1], message, retryable=True) from err
    except Exception as err:
        raise TrainerFailure(reasons[0], f"cannot fetch {what} {uri}: {err}") from err


def model_path(
    uri: str, revision: str | None = None, access: s3.Access | None = None, commit: str | None = None
) -> Path:
    """The base model's directory (config, weights, tokenizer; an hf:// model at `commit` when given);
    ModelNotFound when it is not there."""
    reasons = (MODEL_NOT_FOUND, MODEL_UNAVAILABLE)
    path = fetch_or_fail("base model", uri, reasons, lambda: fetch(uri, "model", revision, access, commit))
    if not (path / "config.json").is_file():
        raise TrainerFailure(MODEL_NOT_FOUND, f"base model {uri}: no config.json at {path}")
    return path


def dataset_path(
    uri: str, access: s3.Access | None = None, commit: str | None = None, split: str | None = None
) -> Path:
    """The dataset's file, or its folder of files (a repository, a prefix; an hf:// one at `commit` when given,
    only its files of `split`); DatasetInvalid when neither is there."""
    reasons = (DATASET_INVALID, DATASET_UNAVAILABLE)
    path = fetch_or_fail(
        "dataset", uri, reasons, lambda: fetch(uri, "dataset", access=access, commit=commit, split=split)
    )
    if not path.exists():
        raise TrainerFailure(DATASET_INVALID, f"dataset {uri}: nothing at {path}")
    return path


def init_adapter_path(uri: str, access: s3.Access | None = None) -> Path:
    """The adapter DPO starts from (fromFineTuneJob's output); InitAdapterNotFound when it is not there."""
    reasons = (INIT_ADAPTER_NOT_FOUND, INIT_ADAPTER_UNAVAILABLE)
    path = fetch_or_fail("adapter", uri, reasons, lambda: fetch(uri, "model", access=access))
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
        paths = {"modelDir": str(self.model_dir), "outputDir": str(self.output_dir)}
        if self.init_adapter:
            paths["initAdapter"] = str(self.init_adapter)
        save_data(self.data, directory, paths)

    @classmethod
    def load(cls, directory: Path) -> Inputs:
        meta = json.loads((directory / "inputs.json").read_text())
        init = meta.get("initAdapter")
        return cls(Path(meta["modelDir"]), Path(meta["outputDir"]), load_data(directory), Path(init) if init else None)


def save_data(data: PreparedData, directory: Path, extra: dict[str, str] | None = None) -> None:
    """The tokenized examples as Arrow (`train/`, `validation/`) and the report (`inputs.json`): the prepare
    step's cache entry, and the launcher's hand-over to its workers."""
    from datasets import Dataset

    for name, examples in (("train", data.train), ("validation", data.validation)):
        target = directory / name
        if isinstance(examples, list):
            if examples:  # an empty Dataset cannot be loaded back
                Dataset.from_list(examples).save_to_disk(str(target))
        elif not target.exists():  # a datasets.Dataset: prepare(into=directory) may have written it there already
            examples.save_to_disk(str(target))
    (directory / "inputs.json").write_text(json.dumps({**(extra or {}), "report": data.report.to_dict()}))


def load_data(directory: Path) -> PreparedData:
    """What `save_data` wrote, as datasets.Dataset objects over the Arrow files (memory-mapped, not read whole)."""
    from datasets import disable_caching, load_from_disk

    if not os.access(directory, os.W_OK):
        # The cache is mounted read-only in training pods: TRL's map() results go to a temporary folder instead of
        # beside the Arrow files.
        disable_caching()

    def examples(name: str) -> Any:
        path = directory / name
        return load_from_disk(str(path)) if path.exists() else []

    report = json.loads((directory / "inputs.json").read_text())["report"]
    return PreparedData(
        train=examples("train"),
        validation=examples("validation"),
        report=DatasetReport(**{**report, "tokens": TokenStats(**report["tokens"])}),
    )


def stage(config: TrainerConfig) -> Inputs:
    """Fetch the model (and DPO's starting adapter), then read, check and tokenize the dataset."""
    spec = config.spec
    output = output_dir(spec.output.uri)
    remote = RemoteOutput.of(spec.output)
    if remote is not None:
        restored = remote.restore_latest(output / "checkpoints", clean=os.environ.get("NODE_RANK", "0") == "0")
        if restored is not None:
            log_event("checkpoint-downloaded", step=restored, uri=remote.checkpoint_uri(restored))
    prepared = config.prepared or PreparedInputs()
    if prepared.model_dir:
        model_dir = Path(prepared.model_dir)  # the prepare step's cache entry (read-only mount)
    else:
        # Without a cache, the commit the prepare step checked the data with (a branch may have moved since).
        access = s3.Access.of(spec.base_model.s3)
        commit = prepared.model_revision or None
        model_dir = model_path(spec.base_model.uri, config.base_model_revision, access, commit)
    # DPO's starting adapter is another job's output: read with this job's output credentials.
    init = init_adapter_path(config.init_adapter_uri, s3.Access.of(spec.output.s3)) if config.init_adapter_uri else None
    if prepared.dataset_dir:
        log_event("prepared-inputs", modelDir=str(model_dir), datasetDir=prepared.dataset_dir)
        return Inputs(model_dir, output, load_data(Path(prepared.dataset_dir)), init)
    tokenizer = load_tokenizer(model_dir)
    data = prepare(
        tokenizer,
        dataset_path(
            spec.dataset.uri, s3.Access.of(spec.dataset.s3), prepared.dataset_revision or None, spec.dataset.split
        ),
        spec.method,
        spec.dataset.format,
        spec.hyperparameters.max_seq_length,
        spec.dataset.validation_split,
        spec.hyperparameters.seed,
        spec.dataset.split,
    )
    return Inputs(model_dir, output, data, init)
