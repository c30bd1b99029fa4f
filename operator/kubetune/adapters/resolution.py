"""Which adapters a ModelServer serves, where they are, and which cannot be served yet (pure functions).

The spec's adapters (by uri, or from a named FineTuneJob) and the Succeeded FineTuneJobs its adapterSelector
matches become the `Adapter`s to load once the checks pass (`checks.check_adapter`); the others get a view
that says why not. The locations and Secrets of every adapter, present and future, go into the server's pods
when they are created, so that a later adapter needs no restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetune.adapters.checks import check_adapter
from kubetune.adapters.sync import Adapter, Failure, ReplicaReport, adapter_states
from kubetune.api.v1alpha1 import LabelSelector, ModelServer
from kubetune.status.modelserver import AdapterView
from kubetune.storage import Access, join


@dataclass(frozen=True)
class Resolution:
    """The adapters of one ModelServer as the operator sees them now."""

    serve: list[Adapter] = field(default_factory=list)
    """Adapters to load: their source is ready and the checks passed."""
    settled: dict[str, AdapterView] = field(default_factory=dict)
    """Adapters that wait for their FineTuneJob or were refused, by name."""
    names: list[str] = field(default_factory=list)
    """Every adapter name in status order: spec.adapters first, then the selected FineTuneJobs by name."""
    locations: list[str] = field(default_factory=list)
    """Where every adapter is or will be, so that the pods can see them before they exist (no restart later)."""
    secrets: list[str] = field(default_factory=list)
    """The Secrets of s3:// adapters, present and future, for the fetcher to mount."""

    def views(self, reports: list[ReplicaReport], failures: dict[str, Failure]) -> list[AdapterView]:
        """Every adapter's view, the served ones with their state on the replicas."""
        served = {v.name: v for v in adapter_states(self.serve, reports, failures)}
        return [served.get(name) or self.settled[name] for name in self.names]


def _output_adapter_uri(ftj: dict[str, Any]) -> str:
    output = ((ftj.get("spec") or {}).get("output") or {}).get("uri", "")
    return join(output, "adapter") if output else ""


def _output_access(ftj: dict[str, Any]) -> Access:
    return Access.of(((ftj.get("spec") or {}).get("output") or {}).get("s3"))


def _adapter_of(name: str, source: str, ftj: dict[str, Any]) -> Adapter:
    reported = (ftj.get("status") or {}).get("adapter") or {}
    return Adapter(
        name,
        str(reported.get("uri") or _output_adapter_uri(ftj)),
        source,
        base_model=str(reported.get("baseModel") or ""),
        rank=int(reported.get("rank") or 0),
        target_modules=tuple(reported.get("targetModules") or ()),
        s3=_output_access(ftj),
    )


def _succeeded(ftj: dict[str, Any]) -> bool:
    return (ftj.get("status") or {}).get("state") == "Succeeded"


def resolve(server: ModelServer, finetunejobs: dict[str, dict[str, Any]]) -> Resolution:
    """The adapters of `server`; `finetunejobs` maps name -> object for the FineTuneJobs in its namespace."""
    candidates: list[Adapter] = []
    settled: dict[str, AdapterView] = {}
    locations: list[str] = []
    secrets: list[str] = []
    for entry in server.spec.adapters:
        if entry.uri:
            candidates.append(Adapter(entry.name, entry.uri, "uri", s3=Access.of(entry.s3)))
            continue
        ref = str(entry.from_fine_tune_job)
        source = f"fromFineTuneJob/{ref}"
        ftj = finetunejobs.get(ref)
        if ftj is not None and (location := _output_adapter_uri(ftj)):
            locations.append(location)
            secrets.append(_output_access(ftj).secret_name)
        if ftj is None:
            settled[entry.name] = _waiting(entry.name, source, f"FineTuneJob {ref} does not exist")
        elif not _succeeded(ftj):
            state = (ftj.get("status") or {}).get("state") or "Pending"
            settled[entry.name] = _waiting(
                entry.name, source, f"FineTuneJob {ref} has not succeeded yet (state {state})"
            )
        else:
            candidates.append(_adapter_of(entry.name, source, ftj))
    selector = server.spec.adapter_selector
    if selector is not None:
        declared = {a.name for a in server.spec.adapters}
        for name, ftj in sorted(finetunejobs.items()):
            labels = (ftj.get("metadata") or {}).get("labels") or {}
            if name in declared or not selector.matches(labels):
                continue
            if location := _output_adapter_uri(ftj):
                locations.append(location)
                secrets.append(_output_access(ftj).secret_name)
            if _succeeded(ftj):
                candidates.append(_adapter_of(name, f"adapterSelector/{name}", ftj))
    serve = []
    for adapter in candidates:
        locations.append(adapter.uri)
        secrets.append(adapter.s3.secret_name)
        refusal = check_adapter(adapter, server.spec.base_model.uri, server.spec.max_lora_rank)
        if refusal is None:
            serve.append(adapter)
        else:
            settled[adapter.name] = AdapterView(
                adapter.name, adapter.source, adapter.uri, "Failed", refusal.reason, refusal.message
            )
    names = [a.name for a in server.spec.adapters] + sorted(
        {a.name for a in candidates} - {a.name for a in server.spec.adapters}
    )
    return Resolution(serve, settled, names, sorted(set(locations)), sorted(set(secrets) - {""}))


def _waiting(name: str, source: str, message: str) -> AdapterView:
    return AdapterView(name, source, state="Pending", reason="WaitingForFineTuneJob", message=message)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector in wire form selects an object with `labels`."""
    return LabelSelector.model_validate(selector).matches(labels)
