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
    progress_interval_seconds: float = Field(default=5.0, gt=0)
    """How often rank 0 reports progress to the FineTuneJob's status."""
