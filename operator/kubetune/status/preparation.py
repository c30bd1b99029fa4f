"""Where a FineTuneJob's prepare step stands (pure): from its Job and the report the prepare pod wrote into
status.dataset. The controller writes the training Job only after `look` says succeeded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kubetune.api.v1alpha1 import PreparedInputs
from kubetune.status.conditions import true_condition

ANNOTATION_SPEC_HASH = "kubetune.io/spec-hash"  # the prepare Job carries its inputs hash (render/prepare.py)
StepState = Literal["absent", "stale", "running", "succeeded", "failed"]
# Reasons the prepare pod reports for inputs that no retry can fix (trainer/errors.py).
DEFINITE_REASONS = ("DatasetInvalid", "DatasetNotFound", "ModelNotFound", "AccessDenied", "ConfigInvalid")


@dataclass(frozen=True)
class PrepareStep:
    state: StepState
    reason: str
    message: str


def report_for(dataset: dict[str, Any] | None, digest: str) -> dict[str, Any]:
    """status.dataset when it was written for these inputs, else {}."""
    return dict(dataset) if dataset and dataset.get("inputsHash") == digest else {}


def summary(report: dict[str, Any]) -> str:
    """E.g. "120 records, 9,840 tokens (p50 80, p95 150, max 310 per record), 3 truncated at maxSeqLength; prepared
    at /var/cache/..."."""
    if not report:
        return "the prepare step succeeded (it sent no report)"
    text = f"{report.get('records', 0)} records, {report.get('tokens', 0):,} tokens"
    if lengths := report.get("tokenLengths"):
        p50, p95, longest = (lengths.get(k, 0) for k in ("p50", "p95", "max"))
        text += f" (p50 {p50:,}, p95 {p95:,}, max {longest:,} per record)"
    text += f", {report.get('truncated', 0)} truncated at maxSeqLength"
    if report.get("dropped"):
        text += f", {report['dropped']} dropped (prompt fills maxSeqLength)"
    return text + (f"; prepared at {report['cache']}" if report.get("cache") else "")


def look(job: dict[str, Any] | None, dataset: dict[str, Any] | None, digest: str) -> PrepareStep:
    """The prepare step of inputs `digest`, from its Job (None: not written) and status.dataset."""
    if job is None:
        return PrepareStep("absent", "Preparing", "the prepare pod is being created")
    if (job.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_SPEC_HASH) != digest:
        return PrepareStep("stale", "Preparing", "the inputs changed: the prepare step runs again")
    report = report_for(dataset, digest)
    if true_condition(job, "Complete") is not None:
        return PrepareStep("succeeded", "DatasetChecked", summary(report))
    error = report.get("error") or {}
    if true_condition(job, "Failed") is not None:
        if error.get("reason"):
            return PrepareStep("failed", str(error["reason"]), str(error.get("message", "")))
        cond = true_condition(job, "Failed") or {}
        return PrepareStep("failed", "PrepareFailed", f"the prepare Job failed: {cond.get('message', '')}".strip())
    if report.get("downloaded"):
        return PrepareStep("running", "Downloading", str(report["downloaded"]))
    return PrepareStep("running", "Preparing", "fetching the base model and the dataset, checking the dataset")


def prepared_inputs(dataset: dict[str, Any] | None, digest: str) -> PreparedInputs | None:
    """Where the training pods find the cached inputs (without a cache they fetch them themselves) and the base
    model's resolved commit; None before the prepare step reported."""
    report = report_for(dataset, digest)
    fields = ("modelCache", "cache", "modelRevision", "datasetRevision")
    if report.get("error") or not any(report.get(f) for f in fields):
        return None
    return PreparedInputs(
        model_dir=str(report.get("modelCache") or ""),
        dataset_dir=str(report.get("cache") or ""),
        model_revision=str(report.get("modelRevision") or ""),
        dataset_revision=str(report.get("datasetRevision") or ""),
    )


def entries_in_use(datasets: list[dict[str, Any] | None]) -> list[str]:
    """Cache folders named by the reports of unfinished jobs: the prepare step never evicts them."""
    paths = [str(p) for d in datasets if d for p in (d.get("cache"), d.get("modelCache")) if p]
    # ROOT/entries/KEY[/model]: the folder right under entries/ is the entry.
    return sorted({p.split("/entries/", 1)[1].split("/")[0] for p in paths if "/entries/" in p})
