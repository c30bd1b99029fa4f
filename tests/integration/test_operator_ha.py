"""Two operator replicas with leader election: one reconciles, the other takes over when it is killed or stops,
and nothing is done twice or undone on the way (controllers/leader.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, watch
from tests.integration.support import Api, OperatorProcess, simulated_ftj, wait_for

FTJ = "FineTuneJob"
LEASE = "kubetune-ha-test"
ORDER = {None: 0, "Pending": 1, "Running": 2, "Succeeded": 3}


class Recorder:
    """Every state each FineTuneJob showed and every training Job uid, in the order the watch streams tell."""

    def __init__(self, api: Api, namespace: str) -> None:
        self.states: dict[str, list[tuple[float, str | None]]] = {}
        self.jobs: dict[str, set[str]] = {}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._watch_jobs, args=(api, namespace), daemon=True),
            threading.Thread(target=self._watch_finetunejobs, args=(api, namespace), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _watch_finetunejobs(self, api: Api, namespace: str) -> None:
        custom = client.CustomObjectsApi(api.kube.api)
        args = ("kubetune.io", "v1alpha1", namespace, "finetunejobs")
        stream = watch.Watch().stream(custom.list_namespaced_custom_object, *args, timeout_seconds=600)
        for event in stream:
            obj = event["object"]
            state = (obj.get("status") or {}).get("state")
            seen = self.states.setdefault(obj["metadata"]["name"], [])
            if not seen or seen[-1][1] != state:
                seen.append((time.monotonic(), state))
            if self._stop.is_set():
                return

    def _watch_jobs(self, api: Api, namespace: str) -> None:
        batch = client.BatchV1Api(api.kube.api)
        for event in watch.Watch().stream(batch.list_namespaced_job, namespace, timeout_seconds=600):
            job = event["object"]
            owner = (job.metadata.labels or {}).get("kubetune.io/finetunejob")
            if owner:
                self.jobs.setdefault(owner, set()).add(job.metadata.uid)
            if self._stop.is_set():
                return

    def first_change_after(self, moment: float) -> float | None:
        times = [t for changes in self.states.values() for t, _ in changes if t > moment]
        return min(times) if times else None

    def stop(self) -> None:
        self._stop.set()


@pytest.fixture
def replicas(api: Api, operator: OperatorProcess, tmp_path: Path) -> Iterator[list[OperatorProcess]]:
    """Two operators electing a leader; the session's operator stands aside meanwhile."""
    operator.stop()
    procs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        procs.append(OperatorProcess(operator.kubeconfig, tmp_path / name, operator.config))
    election = ["--leader-election", "--lease", LEASE, "--lease-namespace", "default"]
    try:
        for name, proc in zip(("a", "b"), procs, strict=True):
            proc.start(*election, "--identity", name)
        yield procs
    finally:
        for proc in procs:
            proc.stop()
        api.kubectl("delete", "lease", LEASE, "-n", "default", check=False)
        operator.start()


def holder(api: Api) -> str:
    lease = api.kubectl("get", "lease", LEASE, "-n", "default", "-o", "yaml", check=False).stdout
    return str(((yaml.safe_load(lease) or {}).get("spec") or {}).get("holderIdentity") or "")


def test_the_standby_takes_over_from_a_killed_leader_and_nothing_is_done_twice(
    api: Api, replicas: list[OperatorProcess]
) -> None:
    leader = wait_for(lambda: holder(api), 30, "a leader")
    active, standby = (replicas[0], replicas[1]) if leader == "a" else (replicas[1], replicas[0])
    ns = api.create_namespace()
    recorder = Recorder(api, ns)
    try:
        names = [f"ha-{i:03d}" for i in range(100)]
        api.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([simulated_ftj(n, ns, run_seconds=1) for n in names]))
        time.sleep(1.5)  # admissions in flight
        killed_at = time.monotonic()
        active.kill()

        def all_succeeded() -> bool:
            return all((recorder.states.get(n) or [(0, None)])[-1][1] == "Succeeded" for n in names)

        wait_for(all_succeeded, 300, "every job to succeed", interval=1)
        assert holder(api) != leader
        acted = recorder.first_change_after(killed_at + 0.5)  # what the old leader wrote before dying settles first
        assert acted is not None
        print(f"\nthe standby acted {acted - killed_at:.1f} s after the leader was killed")
        assert standby.proc is not None and standby.proc.poll() is None
        # Never two Jobs for one FineTuneJob, never a status that goes back.
        assert {n: len(uids) for n, uids in recorder.jobs.items() if len(uids) != 1} == {}
        assert len(recorder.jobs) == 100
        for name, changes in recorder.states.items():
            ranks = [ORDER[state] for _, state in changes]
            assert ranks == sorted(ranks), (name, changes)
    finally:
        recorder.stop()
        api.kube.delete("Namespace", "", ns)


def test_a_leader_that_stops_hands_over_at_once(api: Api, replicas: list[OperatorProcess]) -> None:
    leader = wait_for(lambda: holder(api), 30, "a leader")
    active, standby = (replicas[0], replicas[1]) if leader == "a" else (replicas[1], replicas[0])
    stopped_at = time.monotonic()
    active.stop()  # SIGTERM, as a rolling update does: the Lease is given up
    new = wait_for(lambda: (h := holder(api)) and h != leader and h, 15, "the standby to take the Lease")
    print(f"\nthe standby took the Lease {time.monotonic() - stopped_at:.1f} s after SIGTERM to the leader")
    ns = api.create_namespace()
    try:
        api.apply(simulated_ftj("after", ns, run_seconds=1))
        api.wait_state(FTJ, ns, "after", "Succeeded", 60)
        assert standby.logs().count(f"{new} holds lease") == 1
    finally:
        api.kube.delete("Namespace", "", ns)


def test_only_one_replica_leads(api: Api, replicas: list[OperatorProcess]) -> None:
    leader = wait_for(lambda: holder(api), 30, "a leader")
    time.sleep(3)  # renewals
    assert holder(api) == leader
    logs: dict[str, Any] = {p.log_dir.name: p.logs() for p in replicas}
    assert sum(f"{name} holds lease" in text for name, text in logs.items()) == 1, logs
