"""Kueue's Workloads of the training Jobs, followed by the operator's own watch (k8s/watch.py), not by kopf.

A queued training Job's status comes from its Workload's conditions (status/finetunejob.py `queue_outcome`).
kopf would serve Workloads only if its discovery scan found Kueue's CRD; installed after the operator started,
the CRD can be missed by the one scan its creation starts (the API server lists the new kind a moment later),
and then no queued job would ever show Kueue's reasons. The watch here asks for Workloads until the API server
serves them, so Kueue may come before or after the operator.
"""

from __future__ import annotations

import threading
from typing import Any

from kubetune.controllers import training
from kubetune.controllers.context import WORKLOADS_INDEX, Context, Key
from kubetune.k8s import watch


def job_of(workload: dict[str, Any]) -> tuple[str, str] | None:
    """(name, uid) of the Job a Workload stands for, or None when its controller is no Job."""
    for ref in workload.get("metadata", {}).get("ownerReferences") or []:
        if ref.get("kind") == "Job" and ref.get("apiVersion") == "batch/v1" and ref.get("controller"):
            return str(ref["name"]), str(ref["uid"])
    return None


def entry(workload: dict[str, Any]) -> tuple[Key, dict[str, Any]] | None:
    """The index entry of a Workload: (namespace, its Job's name) and its `view`; None when it stands for no Job."""
    found = job_of(workload)
    if found is None:
        return None
    return (str(workload["metadata"].get("namespace") or ""), found[0]), view(workload, found[1])


def view(workload: dict[str, Any], job_uid: str) -> dict[str, Any]:
    """What the status needs of a Workload: its name, its Job's uid and its conditions."""
    meta = workload.get("metadata", {})
    conditions = list((workload.get("status") or {}).get("conditions") or [])
    name = {"name": meta.get("name"), "uid": meta.get("uid")}
    return {"metadata": name, "jobUid": job_uid, "status": {"conditions": conditions}}


class Workloads:
    """The Workloads of Jobs by (namespace, Job name), as the watch last showed them; each change has the
    FineTuneJob of that name look at its status again."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.by_job: dict[Key, list[dict[str, Any]]] = {}
        self._lock = threading.Lock()

    def changed(self, workload: dict[str, Any]) -> None:
        if (found := entry(workload)) is None:
            return
        key, seen = found
        with self._lock:
            self.by_job[key] = [seen]
        self._look_again(key)

    def deleted(self, workload: dict[str, Any]) -> None:
        if (found := entry(workload)) is None:
            return
        key, _ = found
        with self._lock:
            gone = self.by_job.pop(key, None)
        if gone is not None:
            self._look_again(key)

    def listed(self, workloads: list[dict[str, Any]]) -> None:
        """A new listing: it holds every Workload there is (any other was deleted meanwhile)."""
        fresh = {key: [seen] for key, seen in filter(None, map(entry, workloads))}
        with self._lock:  # changed in place: readers hold this very dict (Context.indexes)
            before = dict(self.by_job)
            for key in before.keys() - fresh.keys():
                del self.by_job[key]
            self.by_job.update(fresh)
        for key in before.keys() | fresh.keys():
            if before.get(key) != fresh.get(key):
                self._look_again(key)

    def _look_again(self, key: Key) -> None:
        if "finetunejobs" in self.ctx.indexes:  # else the handlers have not started: each job's first look reads it
            self.ctx.later(0, training.workload_changed, self.ctx, key)


def follow(ctx: Context, namespaces: list[str]) -> Workloads:
    """Start following the Workloads of the operator's namespaces (the whole cluster when none is given)."""
    workloads = Workloads(ctx)
    ctx.own_indexes[WORKLOADS_INDEX] = workloads.by_job
    follower = watch.Follower(workloads.changed, workloads.deleted, workloads.listed)
    watch.start(ctx.kube, "Workload", namespaces, {}, follower)
    return workloads
