"""FailedMount Events of the operator's pods that wait in ContainerCreating.

The kubelet reports a volume it cannot mount (a missing ConfigMap or Secret, a claim that does not attach)
only in an Event, never in the pod's status, and the pod then changes no more: no pod watch event brings the
operator back. So the operator follows the FailedMount Events of the cluster (its namespaces) through one watch
that the API server filters by reason (k8s/watch.py: no request per pod), keeps the newest message of each of
its own pods while that pod waits, and has the pod's owner compute its status again (status/pods.py turns the
message into MountFailed).
"""

from __future__ import annotations

from typing import Any

from kubetune.controllers.context import Context, Key
from kubetune.status.pods import CREATING_REASONS

FIELDS = "reason=FailedMount,involvedObject.kind=Pod"
POD_INDEXES = ("training_pods", "prepare_pods", "server_pods")


def record(ctx: Context, event: dict[str, Any]) -> tuple[str, Key] | None:
    """Keep the message of a FailedMount Event about one of the operator's pods that waits for its volumes;
    returns (the pods' index, the owner's key) of that pod, None for any other pod."""
    involved = event.get("involvedObject") or {}
    uid = str(involved.get("uid") or "")
    found = _owner_of(ctx, uid)
    if found is None:
        return None
    index, key, pod = found
    if past_volumes(pod):
        return None  # its volumes are mounted since: that failure is history
    ctx.mount_failures[uid] = str(event.get("message") or "")
    return index, key


def forget_started(ctx: Context, pods: list[dict[str, Any]]) -> None:
    """Pods past their volumes (a container started, the pod ended or goes) no longer wait for one."""
    for pod in pods:
        if past_volumes(pod):
            ctx.mount_failures.pop(pod["metadata"]["uid"], None)


def past_volumes(pod: dict[str, Any]) -> bool:
    """The kubelet has mounted the pod's volumes (a container got further than ContainerCreating), or the pod
    ended or is being deleted. A pod that shows no container yet has not."""
    status = pod.get("status") or {}
    if status.get("phase") != "Pending" or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return True
    containers = [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]
    states = [c.get("state") or {} for c in containers]
    return any(set(s) - {"waiting"} or (s.get("waiting") or {}).get("reason") not in CREATING_REASONS for s in states)


def _owner_of(ctx: Context, uid: str) -> tuple[str, Key, dict[str, Any]] | None:
    for index in POD_INDEXES:
        for key, pods in list((ctx.indexes.get(index) or {}).items()):
            for pod in list(pods):
                if pod["metadata"]["uid"] == uid:
                    return index, key, pod
    return None
