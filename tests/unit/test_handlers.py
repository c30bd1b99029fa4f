"""The kopf handlers' one convention: coroutines that dismiss on the event loop what changes nothing and run a
controller on a worker thread; a FineTuneJob's success reaches the servers by one route."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest

from kubetune.config import OperatorConfig
from kubetune.controllers import serving, training
from kubetune.controllers.context import INDEXES, Context
from kubetune.handlers import modelserver
from kubetune.k8s.status_writer import StatusWriter


class NoKube:
    """Any API request fails the test."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the API was used ({name})")


@pytest.fixture
def ctx() -> Context:
    kube: Any = NoKube()
    return Context(kube=kube, config=OperatorConfig(), status=StatusWriter(kube))


def event(kind: str, type_: str, version: str = "7", **status: Any) -> dict[str, Any]:
    meta = {"name": "x", "namespace": "ns", "uid": "u-1", "resourceVersion": version}
    return {"type": type_, "object": {"kind": kind, "metadata": meta, "status": status}}


def run(handler: Any, ctx: Context, raw: dict[str, Any]) -> None:
    indexes: dict[str, Any] = {name: {} for name in INDEXES}
    asyncio.run(handler(event=raw, memo=kopf.Memo(context=ctx), **indexes))


def test_a_modelservers_own_status_patch_shown_back_is_dismissed(ctx: Context, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(serving, "reconcile", lambda _ctx, key: calls.append(key))
    ctx.status._versions["u-1"] = "7"  # the resourceVersion the operator's last status patch produced
    run(modelserver.server_changed, ctx, event("ModelServer", "MODIFIED", "7"))
    assert calls == []
    run(modelserver.server_changed, ctx, event("ModelServer", "MODIFIED", "8"))  # someone else changed it
    assert calls == [("ns", "x")]


def test_only_a_success_or_a_deletion_of_a_finetunejob_reaches_the_servers(
    ctx: Context, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached: list[str] = []
    monkeypatch.setattr(serving, "reconcile_servers_using", lambda _ctx, ftj: reached.append(ftj["status"]["state"]))
    for state in ("Pending", "Running", "Failed", "Succeeded"):
        run(modelserver.finetunejob_for_servers, ctx, event("FineTuneJob", "MODIFIED", state=state))
    run(modelserver.finetunejob_for_servers, ctx, event("FineTuneJob", "DELETED", state="Running"))
    assert reached == ["Succeeded", "Running"]


def test_the_finetunejob_controller_leaves_the_servers_to_the_watch_event(ctx: Context) -> None:
    later: list[tuple[Any, ...]] = []
    ctx.later = lambda delay, work, *args: later.append((work, *args))  # type: ignore[method-assign]
    server = {"metadata": {"name": "qwen", "namespace": "ns"}, "spec": {"adapters": [{"fromFineTuneJob": "sft"}]}}
    ctx.indexes = {"finetunejobs_waiting": {("ns", "sft"): ["dpo"]}, "modelservers": {("ns", "qwen"): [server]}}
    training._after_success(ctx, ("ns", "sft"))
    assert later == [(training.reconcile, ctx, ("ns", "dpo"), True)]
