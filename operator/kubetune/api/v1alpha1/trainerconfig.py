"""The trainer's configuration: what the operator renders into the training pods' ConfigMap.

It is the FineTuneJob's spec and resolved plan plus what the operator looked up (the job's identity,
the adapter of fromFineTuneJob), so the trainer needs no API access to start.
"""

from __future__ import annotations

from pydantic import Field

from kubetune.api.v1alpha1.base import KubeModel
from kubetune.api.v1alpha1.finetunejob import FineTuneJobSpec, Plan

METRICS_PORT = 9400
"""Where rank 0 of the trainer serves Prometheus metrics (the pod's `metrics` port; docs/metrics.md)."""


class JobIdentity(KubeModel):
    """The FineTuneJob the trainer works for (its status is where progress goes)."""

    name: str
    """FineTuneJob name."""
    namespace: str
    """FineTuneJob namespace."""
    uid: str = ""
    """FineTuneJob UID: progress reports for another object with the same name are refused."""


class PreparedInputs(KubeModel):
    """Paths inside the training pod (under the read-only cache mount) of what the prepare step cached."""

    model_dir: str = ""
    """The base model's folder; empty: fetched by the training pod as without a cache."""
    dataset_dir: str = ""
    """The tokenized dataset (Arrow, `train/`, `validation/`, `inputs.json`); empty: no cache, the training pod
    fetches and tokenizes the dataset itself."""
    model_revision: str = ""
    """The commit an hf:// base model's revision named when the prepare step resolved it: training pods without a
    cache fetch that commit, so that a branch moved meanwhile does not change what they train on."""
    dataset_revision: str = ""
    """The same for an hf:// dataset."""


class CacheSettings(KubeModel):
    """The model and dataset cache as the prepare step sees it."""

    root: str
    """Where the cache claim is mounted (read-write) in the prepare pod."""
    size_limit_bytes: int | None = None
    """Evict least recently used entries beyond this size; no limit when unset."""
    keep: list[str] = Field(default_factory=list)
    """Entries in use by unfinished FineTuneJobs: never evicted."""
    idle_seconds: float = 3600.0
    """Only entries unused for this long before the prepare step started may be evicted."""


class TrainerConfig(KubeModel):
    """Everything `kubetune train --config FILE` needs."""

    job: JobIdentity
    """Which FineTuneJob this is."""
    spec: FineTuneJobSpec
    """The FineTuneJob's spec as admitted."""
    plan: Plan
    """The resolved plan: every `auto` of spec.distributed decided."""
    init_adapter_uri: str | None = None
    """DPO: the adapter of spec.fromFineTuneJob that training starts from."""
    base_model_revision: str | None = None
    """Revision of an hf:// base model (the part after @), recorded in the adapter's metadata."""
    prepared: PreparedInputs | None = None
    """Where the prepare step left the inputs in the cache claim (the training pods mount it read-only)."""
    cache: CacheSettings | None = None
    """The prepare step's cache: where it is and what must not be evicted (set only in the prepare pod)."""
    inputs_hash: str | None = None
    """The prepare step's inputs hash (status.dataset.inputsHash; set only in the prepare pod)."""
    progress_interval_seconds: float = Field(default=5.0, gt=0)
    """How often rank 0 reports progress to the FineTuneJob's status."""
