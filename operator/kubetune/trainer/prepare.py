"""`kubetune prepare --config FILE`: the prepare step of a FineTuneJob, in a CPU pod before any GPU is requested.

It fetches the base model and the dataset (into the cache claim when the pod mounts one: trainer/cache.py),
runs the trainer's own dataset check (every bad line by number and reason), tokenizes the records with the
model's chat template against maxSeqLength, stores the tokenized form (Arrow) in the cache, and reports
status.dataset through the job's status Role, the channel of the trainer's progress (trainer/progress.py).
Exit codes are the trainer's: 0 done, 3 a definite answer (DatasetInvalid, DatasetNotFound, ModelNotFound,
AccessDenied), 1 anything a retry may fix.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from kubetune import hf, s3, storage
from kubetune.api.v1alpha1 import TokenLengths, TrainerConfig
from kubetune.trainer import inputs
from kubetune.trainer.cache import Cache, Limit, entry_key
from kubetune.trainer.config import load_config
from kubetune.trainer.data import PreparedData, load_tokenizer, prepare
from kubetune.trainer.errors import (
    ACCESS_DENIED,
    DATASET_NOT_FOUND,
    DATASET_UNAVAILABLE,
    EXIT_RETRY,
    MODEL_NOT_FOUND,
    MODEL_UNAVAILABLE,
    TrainerFailure,
    report_failure,
)
from kubetune.trainer.progress import StatusReporter, log_event, status_patch, status_sender
from kubetune.trainer.retries import http_status

log = logging.getLogger("kubetune.prepare")
DENIED_MARKS = ("AccessDenied", "Forbidden", "GatedRepo", "Unauthorized")
Report = dict[str, Any]
HF_INPUTS = {
    "model": ("base model", MODEL_NOT_FOUND, MODEL_UNAVAILABLE),
    "dataset": ("dataset", DATASET_NOT_FOUND, DATASET_UNAVAILABLE),
}
"""An hf:// input's repository type: its name in messages, its reasons when not found or unavailable."""
T = TypeVar("T")


def denied(err: BaseException) -> bool:
    """Whether an error (or one of its causes) is a refusal of access rather than a missing object: the first
    HTTP status along the causes decides (401, 403), else a word of the error (S3's AccessDenied, ...). Not digits
    in a message: a URL's port may read 401."""
    seen: BaseException | None = err
    while seen is not None:
        status = http_status(seen)
        if status is not None:
            return status in (401, 403)
        if any(mark in f"{type(seen).__name__} {seen}" for mark in DENIED_MARKS):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def fetched(what: str, uri: str, not_found: str, unavailable: str, fetch_once: Callable[[], T]) -> T:
    """inputs.fetch_or_fail, with AccessDenied told apart from not found."""
    try:
        return inputs.fetch_or_fail(what, uri, (not_found, unavailable), fetch_once)
    except TrainerFailure as failure:
        if not failure.retryable and denied(failure):
            raise TrainerFailure(ACCESS_DENIED, failure.message) from failure
        raise


def content_digest(path: Path) -> str:
    """sha256 of a file, or of a folder's files with their names (read in blocks: files may be large)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(file.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with file.open("rb") as data:
            for block in iter(lambda: data.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def size_text(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class Preparer:
    """One prepare run: the config, the cache (or none), and the status reporter."""

    def __init__(self, config: TrainerConfig, reporter: StatusReporter) -> None:
        self.config = config
        self.reporter = reporter
        self.started = time.time()
        self.cache = Cache(Path(config.cache.root), cache_limit(config, self.started)) if config.cache else None
        self.commits: dict[str, str] = {}
        """"model" and "dataset": the commit sha an hf:// input's revision named when this run resolved it."""

    def send(self, dataset: Report) -> None:
        patch = status_patch({"dataset": {"inputsHash": self.config.inputs_hash or "", **dataset}}, self.config.job.uid)
        self.reporter.submit(patch)

    def progress(self, what: str) -> Callable[[int, int], None]:
        def report(done: int, total: int) -> None:
            self.send({"downloaded": f"{what}: {size_text(done)} of {size_text(total)}"})

        return report

    def model_dir(self) -> tuple[Path, str]:
        """The base model's folder, and its cache entry key ("" when not cached)."""
        spec = self.config.spec
        uri, revision = spec.base_model.uri, self.config.base_model_revision
        access = s3.Access.of(spec.base_model.s3)
        reasons = (MODEL_NOT_FOUND, MODEL_UNAVAILABLE)
        scheme = storage.parse(uri).scheme
        commit = self.hf_commit("model", uri, revision) if scheme == "hf" else None
        if self.cache is None or scheme not in ("s3", "hf"):
            self.send({"downloaded": f"base model {uri}: fetching"} if scheme in ("s3", "hf") else {})
            path = fetched("base model", uri, *reasons, lambda: inputs.fetch(uri, "model", revision, access, commit))
            return path, ""
        key = entry_key(storage.cache_uri(uri), commit or revision)
        entry = self.cache.lookup(key)
        if entry is None:
            log_event("cache-miss", what="base model", uri=uri, key=key)
            self.make_room(self.download_size(uri, access))

            def write(folder: Path) -> None:
                fetched("base model", uri, *reasons, lambda: self.download_model(uri, commit, access, folder))

            entry = self.cache.fill(key, write, {"uri": uri, "revision": commit or revision or ""})
        else:
            log_event("cache-hit", what="base model", uri=uri, key=key)
        return entry / "model", key

    def download_size(self, uri: str, access: s3.Access) -> int:
        """The bytes a download of the base model will add: the S3 listing's sizes; 0 (unknown) for hf://."""
        if not uri.startswith("s3://") or self.cache is None or self.cache.limit is None:
            return 0
        client = s3.client(access)
        sizes = fetched("base model", uri, MODEL_NOT_FOUND, MODEL_UNAVAILABLE, lambda: s3.list_keys(client, uri))
        return sum(sizes.values())

    def make_room(self, incoming: int, used: tuple[str, ...] = ()) -> None:
        """Evict before a download, so that the new entry fits, and after the step (docs/cache.md)."""
        assert self.cache is not None
        for key in self.cache.make_room(incoming, used):
            log_event("cache-evicted", key=key, incoming=incoming)

    def download_model(self, uri: str, commit: str | None, access: s3.Access, folder: Path) -> Path:
        if uri.startswith("s3://"):
            return s3.download(s3.client(access), uri, folder / "model", self.progress(f"base model {uri}"))
        return hf.download_model(uri, commit, folder / "model", self.progress(f"base model {uri}"))

    def hf_commit(self, what: str, uri: str, revision: str | None = None) -> str:
        """The commit sha an hf:// input's revision names now (one request; ModelNotFound, DatasetNotFound or
        AccessDenied when the hub says so), kept for the report."""
        if what not in self.commits:
            label, not_found, unavailable = HF_INPUTS[what]

            def resolve() -> str:
                return hf.commit(uri, what, revision)

            self.commits[what] = fetched(label, uri, not_found, unavailable, resolve)
            log_event("hf-revision", what=label, uri=uri, commit=self.commits[what])
        return self.commits[what]

    def content_tag(self) -> str:
        """What identifies the dataset's content without reading it where possible (S3 ETags)."""
        spec = self.config.spec
        uri = spec.dataset.uri
        scheme = storage.parse(uri).scheme
        if scheme == "s3":
            access = s3.Access.of(spec.dataset.s3)
            client = s3.client(access)
            return fetched("dataset", uri, DATASET_NOT_FOUND, DATASET_UNAVAILABLE, lambda: s3.content_tag(client, uri))
        if scheme in ("pvc", "configmap"):
            path = Path(storage.local_path(uri))
            if not path.exists():
                raise TrainerFailure(DATASET_NOT_FOUND, f"dataset {uri}: nothing at {path}")
            return content_digest(path)
        return self.hf_commit("dataset", uri)  # hf://: the commit names the content

    def data(self, model_dir: Path, model_key: str) -> tuple[PreparedData, Path | None]:
        """The checked, tokenized dataset, and its cache entry (None without a cache)."""
        spec = self.config.spec
        hp = spec.hyperparameters
        if self.cache is None:
            # Only the report is kept; the tokenized examples go to a scratch folder, not to memory.
            with tempfile.TemporaryDirectory(prefix="kubetune-prepare-") as scratch:
                return self.check(model_dir, Path(scratch)), None
        params = [self.content_tag(), model_key or spec.base_model.uri, spec.method.value, spec.dataset.format.value]
        params += [spec.dataset.split or ""]
        params += [str(hp.max_seq_length), str(spec.dataset.validation_split), str(hp.seed)]
        key = entry_key(storage.cache_uri(spec.dataset.uri), None, "|".join(params))
        entry = self.cache.lookup(key)
        if entry is not None:
            log_event("cache-hit", what="prepared dataset", uri=spec.dataset.uri, key=key)
            return inputs.load_data(entry), entry
        log_event("cache-miss", what="prepared dataset", uri=spec.dataset.uri, key=key)
        self.make_room(0, (model_key,))

        def write(folder: Path) -> None:
            inputs.save_data(self.check(model_dir, folder), folder)

        entry = self.cache.fill(key, write, {"uri": spec.dataset.uri})
        return inputs.load_data(entry), entry

    def check(self, model_dir: Path, into: Path) -> PreparedData:
        """The dataset fetched, checked and tokenized, its examples written under `into` as they come."""
        spec = self.config.spec
        access = s3.Access.of(spec.dataset.s3)
        uri = spec.dataset.uri
        commit = self.hf_commit("dataset", uri) if storage.parse(uri).scheme == "hf" else None
        reasons = (DATASET_NOT_FOUND, DATASET_UNAVAILABLE)
        progress = self.progress(f"dataset {uri}")

        def download() -> Path:
            return inputs.fetch(
                uri, "dataset", access=access, commit=commit, progress=progress, split=spec.dataset.split
            )

        path = fetched("dataset", uri, *reasons, download)
        if not path.exists():
            raise TrainerFailure(DATASET_NOT_FOUND, f"dataset {uri}: nothing at {path}")
        hp = spec.hyperparameters
        tokenizer = load_tokenizer(model_dir)
        data = spec.dataset
        return prepare(
            tokenizer,
            path,
            spec.method,
            data.format,
            hp.max_seq_length,
            data.validation_split,
            hp.seed,
            data.split,
            into,
        )

    def run(self) -> Report:
        check_credentials(self.config)
        model_dir, model_key = self.model_dir()
        if not (model_dir / "config.json").is_file():
            raise TrainerFailure(MODEL_NOT_FOUND, f"base model {self.config.spec.base_model.uri}: no config.json")
        data, entry = self.data(model_dir, model_key)
        self.tidy_cache([k for k in (model_key, entry.name if entry else "") if k])
        report = data.report
        return {
            "records": report.records,
            "tokens": report.tokens.total,
            "tokenLengths": TokenLengths(
                p50=report.tokens.p50,
                p95=report.tokens.p95,
                max=report.tokens.max,
                mean=report.tokens.trained_mean,
                weighted=report.tokens.weighted,
                pair_fill=report.tokens.pair_fill,
            ).to_wire(),
            "truncated": report.truncated,
            "dropped": report.dropped,
            "checkedAt": datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
            "cache": str(entry) if entry else "",
            "modelCache": str(model_dir) if model_key else "",
            "modelRevision": self.commits.get("model", ""),
            "datasetRevision": self.commits.get("dataset", ""),
            "downloaded": "",
            "error": None,
        }

    def tidy_cache(self, used: list[str]) -> None:
        """Remove staging folders of killed runs, then evict beyond the size limit (docs/cache.md)."""
        settings = self.config.cache
        if self.cache is None or settings is None:
            return
        for name in self.cache.clean_staging(self.started - settings.idle_seconds):
            log_event("cache-staging-removed", folder=name)
        self.make_room(0, tuple(used))


def cache_limit(config: TrainerConfig, started: float) -> Limit | None:
    """The cache's size limit for a step that started at `started`: the operator's list of entries in use, and
    nothing used within the idle time before the step (docs/cache.md)."""
    settings = config.cache
    if settings is None or settings.size_limit_bytes is None:
        return None
    return Limit(settings.size_limit_bytes, tuple(settings.keep), started - settings.idle_seconds)


def check_credentials(config: TrainerConfig) -> None:
    """AccessDenied, naming the Secret, when a Secret the spec names is missing (the prepare pod mounts them
    optionally: a training pod would wait for it without a word)."""
    spec = config.spec
    for what, location in (("base model", spec.base_model), ("dataset", spec.dataset)):
        secret = location.s3.secret_name if location.s3 else None
        folder = Path(storage.s3_secret_dir(secret)) if secret else None
        if folder is not None and not (folder / "AWS_ACCESS_KEY_ID").is_file():
            message = f"{what} {location.uri}: the Secret {secret} (s3.secretName) is missing"
            raise TrainerFailure(ACCESS_DENIED, f"{message} or lacks AWS_ACCESS_KEY_ID")
        ref = location.secret_ref
        if ref is not None and location.uri.startswith("hf://") and not os.environ.get("HF_TOKEN"):
            message = f"{what} {location.uri}: the Secret {ref.name} (key {ref.key}, secretRef) is missing"
            raise TrainerFailure(ACCESS_DENIED, message)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kubetune prepare", description="Fetch, check and cache a job's inputs.")
    parser.add_argument("--config", required=True, type=Path, help="TrainerConfig, YAML or JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    reporter: StatusReporter | None = None
    try:
        config = load_config(args.config)
        reporter = StatusReporter(status_sender(config.job), interval=2.0)
        preparer = Preparer(config, reporter)
        try:
            report = preparer.run()
        except TrainerFailure as failure:
            preparer.send({"downloaded": "", "error": {"reason": failure.reason, "message": failure.message[:3500]}})
            raise
        preparer.send(report)
        log_event("prepared", **report)
        return 0
    except TrainerFailure as failure:
        return report_failure(failure)
    except Exception:
        traceback.print_exc()
        return EXIT_RETRY
    finally:
        if reporter is not None:
            reporter.close()
