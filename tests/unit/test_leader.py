"""Who may hold the operator's Lease (controllers/leader.py `claim`): counted on this replica's own clock."""

from __future__ import annotations

from typing import Any

from kubetune.controllers.leader import Observed, claim


def lease(holder: str, renewed: str = "2026-12-07T10:00:00.000000Z", transitions: int = 1) -> dict[str, Any]:
    spec = {"holderIdentity": holder, "leaseDurationSeconds": 10, "renewTime": renewed}
    spec |= {"acquireTime": "2026-12-07T09:00:00.000000Z", "leaseTransitions": transitions}
    return {"kind": "Lease", "metadata": {"name": "kubetune-operator", "resourceVersion": "7"}, "spec": spec}


def test_no_lease_yet_is_taken() -> None:
    wanted = claim(None, "a", 10, Observed(), now=100.0)
    assert wanted is not None and wanted["spec"]["holderIdentity"] == "a" and wanted["spec"]["leaseTransitions"] == 1


def test_a_lease_another_replica_renews_is_left_alone() -> None:
    seen = Observed()
    assert claim(lease("b", "t1"), "a", 10, seen, now=100.0) is None
    assert claim(lease("b", "t2"), "a", 10, seen, now=109.0) is None  # renewed meanwhile
    assert claim(lease("b", "t2"), "a", 10, seen, now=118.9) is None  # 9.9 s since it last changed


def test_a_lease_not_renewed_for_its_duration_is_taken_over() -> None:
    seen = Observed()
    assert claim(lease("b", "t1", transitions=3), "a", 10, seen, now=100.0) is None
    wanted = claim(lease("b", "t1", transitions=3), "a", 10, seen, now=110.0)
    assert wanted is not None and wanted["spec"]["holderIdentity"] == "a"
    assert wanted["spec"]["leaseTransitions"] == 4 and wanted["metadata"]["resourceVersion"] == "7"


def test_the_holder_renews_and_a_given_up_lease_is_taken_at_once() -> None:
    renewal = claim(lease("a"), "a", 10, Observed(), now=100.0)
    assert renewal is not None and renewal["spec"]["acquireTime"] == "2026-12-07T09:00:00.000000Z"
    assert renewal["spec"]["leaseTransitions"] == 1 and renewal["spec"]["renewTime"] != "2026-12-07T10:00:00.000000Z"
    released = claim(lease(""), "b", 10, Observed(), now=100.0)
    assert released is not None and released["spec"]["holderIdentity"] == "b"
