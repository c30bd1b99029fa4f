"""One look at the replicas' adapters (adapters/replicas.py) through a fake ReplicaClient: what is asked, loaded,
prepared and recorded, without HTTP."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetune.adapters import Action, Adapter, Failure, Replica, ReplicaReport
from kubetune.adapters.replicas import Outcome, Prepared, Server, sync

R1, R2 = Replica("srv-a", "127.1.0.5:8001"), Replica("srv-b", "127.1.0.6:8001")
SERVER = Server("hf://Qwen/Qwen2.5-7B", max_lora_rank=64)
JOB_ADAPTER = Adapter("sql", "pvc://adapters/sql/adapter", "fromFineTuneJob/sql")
BY_URI = Adapter("ext", "pvc://adapters/ext", "uri")


@dataclass
class FakeReplicas:
    """Replicas that hold `loaded` (pod -> name -> path) and record every call; vLLM refuses `refused` names."""

    loaded: dict[str, dict[str, str] | None]
    prepared: dict[str, Prepared] = field(default_factory=dict)
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)
    calls: list[tuple[str, str, str]] = field(default_factory=list)

    def report(self, replica: Replica) -> ReplicaReport:
        self.calls.append(("report", replica.pod, ""))
        loaded = self.loaded[replica.pod]
        if loaded is None:
            return ReplicaReport(replica, None, "connection refused")
        return ReplicaReport(replica, dict(loaded))

    def perform(self, action: Action) -> Outcome:
        self.calls.append((action.verb, action.replica.pod, action.adapter))
        if action.verb == "load" and action.adapter in self.refused:
            return Outcome(action, *self.refused[action.adapter])
        held = self.loaded[action.replica.pod]
        assert held is not None
        if action.verb == "load":
            held[action.adapter] = action.path
        else:
            held.pop(action.adapter, None)
        return Outcome(action, 200, "")

    def prepare(self, replica: Replica, adapter: Adapter) -> Prepared:
        self.calls.append(("prepare", replica.pod, adapter.name))
        return self.prepared.get(adapter.name, Prepared(200))


def loads(fake: FakeReplicas) -> list[tuple[str, str, str]]:
    return [c for c in fake.calls if c[0] in ("load", "unload", "prepare")]


def test_each_replica_gets_what_it_lacks_and_loses_what_is_not_served() -> None:
    fake = FakeReplicas({"srv-a": {"old": "/x"}, "srv-b": {"sql": JOB_ADAPTER.path}})
    synced = sync(fake, SERVER, [JOB_ADAPTER], [R1, R2], {})
    assert loads(fake) == [("unload", "srv-a", "old"), ("load", "srv-a", "sql")]
    # The replica that changed is asked again; the other one's first answer stands.
    assert [r.loaded for r in synced.reports] == [{"sql": JOB_ADAPTER.path}, {"sql": JOB_ADAPTER.path}]
    assert [c for c in fake.calls if c[0] == "report"].count(("report", "srv-a", "")) == 2
    assert [o.ok for o in synced.outcomes] == [True, True] and synced.failures == {}


def test_a_refusal_of_the_fetcher_or_of_the_files_never_reaches_vllm() -> None:
    missing = Adapter("gone", "s3://bucket/gone", "uri")
    fake = FakeReplicas(
        {"srv-a": {}},
        prepared={
            "gone": Prepared(404, reason="AdapterNotFound", message="no object under s3://bucket/gone"),
            "ext": Prepared(200, {"base_model_name_or_path": "Qwen/Qwen2.5-7B", "r": 128}),
        },
    )
    synced = sync(fake, SERVER, [missing, BY_URI], [R1], {})
    assert loads(fake) == [("prepare", "srv-a", "gone"), ("prepare", "srv-a", "ext")]
    assert {n: (f.reason, f.attempts) for n, f in synced.failures.items()} == {
        "gone": ("AdapterNotFound", 1),
        "ext": ("AdapterRankTooLarge", 1),
    }
    assert "128" in synced.failures["ext"].message


def test_a_job_adapter_on_a_volume_is_loaded_without_the_fetcher() -> None:
    fake = FakeReplicas({"srv-a": {}}, refused={"sql": (400, "Loading lora sql failed: No adapter found for /mnt")})
    synced = sync(fake, SERVER, [JOB_ADAPTER], [R1], {})
    assert loads(fake) == [("load", "srv-a", "sql")]
    assert synced.failures["sql"].reason == "AdapterNotFound"


def test_a_refused_load_waits_and_a_removed_adapters_refusal_is_forgotten() -> None:
    waiting = Failure(JOB_ADAPTER.path, "AdapterLoadFailed", "busy", at=0.0, retry_at=float("inf"))
    removed = Failure("/gone", "AdapterNotFound", "gone", at=0.0, retry_at=float("inf"))
    fake = FakeReplicas({"srv-a": {}})
    synced = sync(fake, SERVER, [JOB_ADAPTER], [R1], {"sql": waiting, "removed": removed})
    assert loads(fake) == []
    assert synced.failures == {"sql": waiting}


def test_an_unreachable_replica_is_asked_again_next_time_not_counted_as_a_refusal() -> None:
    fake = FakeReplicas({"srv-a": None, "srv-b": {}})
    synced = sync(fake, SERVER, [JOB_ADAPTER], [R1, R2], {})
    assert loads(fake) == [("load", "srv-b", "sql")]
    assert synced.reports[0].loaded is None and synced.failures == {}


def test_no_replica_no_call() -> None:
    fake = FakeReplicas({})
    synced: Any = sync(fake, SERVER, [JOB_ADAPTER], [], {})
    assert (synced.reports, synced.outcomes, fake.calls) == ([], [], [])
