"""Context.entries: a worker thread goes through a copy of kopf's index, which the event loop changes meanwhile."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from kubetune.config import OperatorConfig
from kubetune.controllers.context import Context
from kubetune.k8s.status_writer import StatusWriter


class ChangingIndex(Mapping[Any, list[dict[str, Any]]]):
    """A live index that gets a new key while it is gone through the first `changes` times, as kopf's does when
    a watch event arrives during a worker's look."""

    def __init__(self, items: dict[Any, list[dict[str, Any]]], changes: int) -> None:
        self.items_now = items
        self.changes = changes
        self.added = 0

    def __iter__(self) -> Iterator[Any]:
        for key in self.items_now:
            if self.changes:
                self.changes -= 1
                self.added += 1
                self.items_now[("bench", f"job-new-{self.added}")] = [{"metadata": {"name": "new"}}]
            yield key

    def __getitem__(self, key: Any) -> list[dict[str, Any]]:
        return self.items_now[key]

    def __len__(self) -> int:
        return len(self.items_now)


def test_entries_copies_the_index_again_when_it_changed_under_the_copy() -> None:
    index = ChangingIndex({("bench", "job-0000"): [{"metadata": {"name": "job-0000"}}]}, changes=2)
    ctx = Context(kube=None, config=OperatorConfig(), status=StatusWriter(None))  # type: ignore[arg-type]
    ctx.indexes = {"finetunejobs": index}

    entries = ctx.entries("finetunejobs")

    # Going through the live mapping fails the way the admissions failed; the copy is whole and consistent.
    assert sorted(key for key, _ in entries) == sorted(index.items_now)
    assert len(entries) == 3 and index.changes == 0
    index.changes = 1
    try:
        list(index.items())
    except RuntimeError as err:
        assert "changed size during iteration" in str(err)
    else:
        raise AssertionError("the live index did not fail while it changed")
