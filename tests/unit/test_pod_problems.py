"""What keeps a pod's containers from starting, from pods shaped as a kubelet writes them (status/pods.py)."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.status.pods import Problem, creating_since, ended, last_line, waiting_problem

SCHEDULED = {"type": "PodScheduled", "status": "True", "lastTransitionTime": "2026-12-07T10:00:00Z"}


def pod(*waiting: tuple[str, str], init: tuple[str, str] | None = None, uid: str = "p1") -> dict[str, Any]:
    def status(name: str, reason: str, message: str) -> dict[str, Any]:
        state = {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        return {"name": name, "image": "ghcr.io/kubetune/trainer:0.1.0", "state": state}

    body: dict[str, Any] = {
        "metadata": {"name": "sft-0-abcde", "uid": uid, "creationTimestamp": "2026-12-07T09:59:59Z"},
        "status": {
            "phase": "Pending",
            "conditions": [SCHEDULED],
            "containerStatuses": [status("trainer", r, m) for r, m in waiting],
        },
    }
    if init:
        body["status"]["initContainerStatuses"] = [status("model", *init)]
    return body


@pytest.mark.parametrize(
    "waiting, reason, words",
    [
        (("ErrImagePull", 'failed to pull and unpack image "x": not found'), "ImagePullBackOff", "not found"),
        (("ImagePullBackOff", 'Back-off pulling image "x"'), "ImagePullBackOff", "Back-off"),
        (("InvalidImageName", 'Failed to apply default image tag "X:"'), "ImagePullBackOff", "default image tag"),
        (("CreateContainerConfigError", 'secret "wandb" not found'), "MissingSecret", 'secret "wandb"'),
        (("CreateContainerConfigError", "couldn't find key token in Secret team-a/hf"), "MissingSecret", "key token"),
        (("CreateContainerConfigError", 'configmap "env" not found'), "MissingConfigMap", 'configmap "env"'),
        (
            ("CreateContainerConfigError", "container has runAsNonRoot and image will run as root"),
            "CreateContainerConfigError",
            "runAsNonRoot",
        ),
        (("CreateContainerError", "context deadline exceeded"), "CreateContainerError", "deadline"),
    ],
)
def test_a_waiting_reason_becomes_a_condition_reason(waiting: tuple[str, str], reason: str, words: str) -> None:
    problem = waiting_problem(pod(waiting), {})
    assert problem is not None and problem.reason == reason, problem
    assert problem.message.startswith("pod sft-0-abcde, container trainer: ") and words in problem.message


def test_an_init_container_that_cannot_start_is_named() -> None:
    problem = waiting_problem(pod(("PodInitializing", ""), init=("ErrImagePull", "unauthorized")), {})
    pulling = "pod sft-0-abcde, container model: cannot pull image ghcr.io/kubetune/trainer:0.1.0"
    assert problem == Problem("ImagePullBackOff", f"{pulling}: unauthorized")


def test_a_failed_mount_counts_only_while_the_pod_sets_up_its_containers() -> None:
    failures = {"p1": 'MountVolume.SetUp failed for volume "config" : configmap "chats" not found'}
    creating = pod(("ContainerCreating", ""))
    assert waiting_problem(creating, failures) == Problem("MissingConfigMap", f"pod sft-0-abcde: {failures['p1']}")
    claim = {"p1": "Unable to attach or mount volumes: timed out waiting for the condition"}
    assert waiting_problem(creating, claim) == Problem("MountFailed", f"pod sft-0-abcde: {claim['p1']}")
    assert waiting_problem(pod(("ContainerCreating", "")), {}) is None
    running = pod()
    running["status"] |= {"phase": "Running", "containerStatuses": [{"name": "trainer", "state": {"running": {}}}]}
    assert waiting_problem(running, failures) is None


def test_creating_since_is_the_scheduling_time_of_a_pod_that_sets_up() -> None:
    since = creating_since(pod(("ContainerCreating", "")))
    assert since is not None and since.isoformat() == "2026-12-07T10:00:00+00:00"
    assert creating_since(pod(("CreateContainerConfigError", "x"))) is None  # stuck for another reason
    deleted = pod(("ContainerCreating", ""))
    deleted["metadata"]["deletionTimestamp"] = "2026-12-07T10:01:00Z"
    assert creating_since(deleted) is None


def test_how_a_container_ended() -> None:
    assert ended({"exitCode": 137, "reason": "Error"}) == "exited with code 137 (Error, killed by SIGKILL)"
    assert ended({"exitCode": 143}) == "exited with code 143 (killed by SIGTERM)"
    assert ended({"exitCode": 1, "reason": "Error"}) == "exited with code 1 (Error)"
    assert ended({"exitCode": 255}) == "exited with code 255"  # no signal 127
    assert last_line("Traceback ...\n  File x\nRuntimeError: boom\n\n") == "RuntimeError: boom"
