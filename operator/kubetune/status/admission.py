"""Admission of a FineTuneJob: can it start now? (pure functions over what the operator read)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.api.v1alpha1 import FineTuneJob
from kubetune.storage import join


@dataclass(frozen=True)
class Blocked:
    """The job cannot start yet: a condition reason and message, and whether waiting can help."""

    reason: str
    message: str
    retry: bool = True


@dataclass(frozen=True)
class Admitted:
    """The job can start; `init_adapter_uri` is the SFT adapter a DPO job starts from."""

    init_adapter_uri: str | None = None


def check_reference(ftj: FineTuneJob, referenced: dict[str, Any] | None) -> Admitted | Blocked:
    """Whether spec.fromFineTuneJob can be honoured, given the referenced object (None if missing)."""
    ref = ftj.spec.from_fine_tune_job
    if ref is None:
        return Admitted()
    if ref == ftj.metadata.name:
        return Blocked("InvalidReference", "fromFineTuneJob names this FineTuneJob itself", retry=False)
    if referenced is None:
        return Blocked(
            "WaitingForFineTuneJob",
            f"fromFineTuneJob {ref} does not exist yet; this job starts once it exists and has succeeded",
        )
    ref_spec = referenced.get("spec") or {}
    if ref_spec.get("method", "SFT") != "SFT":
        return Blocked(
            "InvalidReference",
            f"fromFineTuneJob {ref} is a {ref_spec.get('method')} job; DPO starts from an SFT job",
            retry=False,
        )
    if ref_spec.get("baseModel", {}).get("uri") != ftj.spec.base_model.uri:
        return Blocked(
            "InvalidReference",
            f"fromFineTuneJob {ref} trained on {ref_spec.get('baseModel', {}).get('uri')}, "
            f"not on {ftj.spec.base_model.uri}",
            retry=False,
        )
    status = referenced.get("status") or {}
    state = status.get("state") or "Pending"
    if state != "Succeeded":
        return Blocked(
            "WaitingForFineTuneJob",
            f"fromFineTuneJob {ref} has not succeeded yet (state {state}); this job starts once it has",
        )
    adapter_uri = (status.get("adapter") or {}).get("uri") or join(ref_spec.get("output", {}).get("uri", ""), "adapter")
    return Admitted(init_adapter_uri=adapter_uri)
