"""Which existing objects the operator may write over: only those its owner controls (k8s/children.py)."""

from __future__ import annotations

from typing import Any

from kubetune.k8s.children import Controller, Seen, conflict, seen

OWNER = {"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "name": "sft", "uid": "u-sft", "controller": True}


def role(**meta: Any) -> dict[str, Any]:
    return {"kind": "Role", "metadata": {"name": "sft-trainer", "namespace": "team-a", **meta}}


def test_an_object_its_owner_controls_may_be_written() -> None:
    assert conflict(role(ownerReferences=[OWNER]), Seen("r1", Controller("FineTuneJob", "sft", "u-sft"))) is None


def test_an_object_without_a_controller_is_someone_elses() -> None:
    refused = conflict(role(ownerReferences=[OWNER]), Seen("r1", None))
    assert refused is not None and refused.kind == "Role" and refused.name == "sft-trainer"
    assert refused.message.startswith("Role sft-trainer already exists and is controlled by no controller, not by")
    assert "FineTuneJob sft" in refused.message and "give the FineTuneJob another name" in refused.message


def test_an_object_of_a_namesake_that_was_deleted_and_created_again_is_not_ours() -> None:
    # Same kind and name, another uid: a FineTuneJob of the same name from before is another owner.
    old = Seen("r1", Controller("FineTuneJob", "sft", "u-old"))
    refused = conflict(role(ownerReferences=[OWNER]), old)
    assert refused is not None and "controlled by FineTuneJob sft, not by FineTuneJob sft" in refused.message


def test_seen_reads_uid_controller_and_field_managers() -> None:
    body = role(
        uid="r1",
        ownerReferences=[{**OWNER, "controller": False}, {**OWNER, "kind": "ModelServer", "uid": "u-ms"}],
        managedFields=[
            {"manager": "kubetune-operator", "operation": "Update"},
            {"manager": "kube-controller-manager", "operation": "Update", "subresource": "status"},
        ],
    )
    got = seen(body)
    assert got.uid == "r1" and got.controller == Controller("ModelServer", "sft", "u-ms")
    assert got.created_entry("kubetune-operator") == 0  # created by POST, never applied since
    assert got.created_entry("someone-else") is None


def test_an_object_applied_once_needs_no_renamed_entry() -> None:
    managers = (("kubetune-operator", "Update"), ("kubetune-operator", "Apply"))
    assert Seen("r1", None, managers).created_entry("kubetune-operator") is None


def test_an_ownerless_object_is_the_operators_only_with_its_label_and_no_controller() -> None:
    # A namespace's trainer access (kubetune-trainer) has no owner: kubetune's own carries its managed-by label.
    access = {"kind": "Role", "metadata": {"name": "kubetune-trainer", "namespace": "team-a"}}
    assert conflict(access, Seen("r1", None, managed=True)) is None
    refused = conflict(access, Seen("r1", None, managed=False))
    assert refused is not None
    assert refused.message.startswith("Role kubetune-trainer already exists and is not kubetune's")
    assert conflict(access, Seen("r1", Controller("FineTuneJob", "sft", "u-sft"), managed=True)) is not None
    assert seen({"metadata": {"uid": "r1", "labels": {"app.kubernetes.io/managed-by": "kubetune-operator"}}}).managed
