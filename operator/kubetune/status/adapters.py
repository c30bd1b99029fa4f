"""Which adapters a ModelServer serves, and where each one stands (pure functions)."""

from __future__ import annotations

from typing import Any

from kubetune.api.v1alpha1 import LabelSelector, ModelServer
from kubetune.render.modelserver import ResolvedAdapter
from kubetune.status.modelserver import AdapterView
from kubetune.storage import join


def _adapter_uri(ftj: dict[str, Any]) -> str:
    status = ftj.get("status") or {}
    output = ((ftj.get("spec") or {}).get("output") or {}).get("uri", "")
    return str((status.get("adapter") or {}).get("uri") or join(output, "adapter"))


def _succeeded(ftj: dict[str, Any]) -> bool:
    return (ftj.get("status") or {}).get("state") == "Succeeded"


def resolve(
    server: ModelServer, finetunejobs: dict[str, dict[str, Any]]
) -> tuple[list[ResolvedAdapter], list[AdapterView]]:
    """Adapters ready to serve, and a view of every declared or selected adapter.

    `finetunejobs` maps name -> object for the FineTuneJobs in the server's namespace.
    """
    resolved: list[ResolvedAdapter] = []
    views: list[AdapterView] = []
    for entry in server.spec.adapters:
        if entry.uri:
            resolved.append(ResolvedAdapter(entry.name, entry.uri))
            views.append(AdapterView(entry.name, "uri", entry.uri))
            continue
        ref = str(entry.from_fine_tune_job)
        source = f"fromFineTuneJob/{ref}"
        ftj = finetunejobs.get(ref)
        if ftj is None:
            views.append(
                AdapterView(
                    entry.name,
                    source,
                    state="Pending",
                    reason="WaitingForFineTuneJob",
                    message=f"FineTuneJob {ref} does not exist",
                )
            )
        elif not _succeeded(ftj):
            state = (ftj.get("status") or {}).get("state") or "Pending"
            views.append(
                AdapterView(
                    entry.name,
                    source,
                    state="Pending",
                    reason="WaitingForFineTuneJob",
                    message=f"FineTuneJob {ref} has not succeeded yet (state {state})",
                )
            )
        else:
            uri = _adapter_uri(ftj)
            resolved.append(ResolvedAdapter(entry.name, uri))
            views.append(AdapterView(entry.name, source, uri))
    selector = server.spec.adapter_selector
    if selector is not None:
        taken = {v.name for v in views}
        for name, ftj in sorted(finetunejobs.items()):
            labels = (ftj.get("metadata") or {}).get("labels") or {}
            if name in taken or not _succeeded(ftj) or not selector.matches(labels):
                continue
            uri = _adapter_uri(ftj)
            resolved.append(ResolvedAdapter(name, uri))
            views.append(AdapterView(name, f"adapterSelector/{name}", uri))
    return resolved, views


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector in wire form selects an object with `labels`."""
    return LabelSelector.model_validate(selector).matches(labels)


def with_replica_state(views: list[AdapterView], ready_replicas: int) -> list[AdapterView]:
    """Adapters passed at start-up are loaded on every ready replica."""
    out = []
    for v in views:
        if v.state == "Pending" and v.reason:
            out.append(v)
        elif ready_replicas > 0:
            out.append(AdapterView(v.name, v.source, v.uri, "Loaded", "", "", ready_replicas))
        else:
            out.append(AdapterView(v.name, v.source, v.uri, "Pending", "ServerNotReady", "no ready replica yet", 0))
    return out
