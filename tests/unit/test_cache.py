"""The model and dataset cache (trainer/cache.py): keys, atomic entries, and which entries eviction takes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubetune.trainer.cache import MARKER, Cache, Entry, Limit, choose_evictions, entry_key


def test_keys_differ_by_uri_revision_and_content_and_are_stable() -> None:
    base = entry_key("s3://models/qwen")
    assert base == entry_key("s3://models/qwen")
    others = {
        entry_key("s3://models/qwen2"),
        entry_key("s3://models/qwen", "v2"),
        entry_key("s3://models/qwen", None, "etag-1"),
        entry_key("hf://models/qwen"),
    }
    assert base not in others and len(others) == 4
    assert base.startswith("s3-models-qwen-")  # readable in `ls`


def test_eviction_takes_least_recently_used_first_until_the_new_entry_fits() -> None:
    entries = [Entry("a", 40, last_used=1.0), Entry("b", 40, last_used=3.0), Entry("c", 40, last_used=2.0)]
    assert choose_evictions(entries, limit=100, incoming=20, keep=[], not_after=10.0) == ["a"]
    assert choose_evictions(entries, limit=90, incoming=20, keep=[], not_after=10.0) == ["a", "c"]
    assert choose_evictions(entries, limit=200, incoming=20, keep=[], not_after=10.0) == []


def test_eviction_never_takes_an_entry_in_use_or_used_after_the_step_started() -> None:
    entries = [Entry("a", 40, last_used=1.0), Entry("b", 40, last_used=3.0), Entry("c", 40, last_used=2.0)]
    # a is used by an unfinished job; b was used after the prepare step began (a job its report does not know yet).
    assert choose_evictions(entries, limit=50, incoming=0, keep=["a"], not_after=2.5) == ["c"]
    # Nothing may go: the cache stays above its limit rather than break a running job.
    assert choose_evictions(entries, limit=10, incoming=0, keep=["a", "b", "c"], not_after=10.0) == []


def test_an_entry_appears_only_complete(tmp_path: Path) -> None:
    cache = Cache(tmp_path)

    def killed(folder: Path) -> None:
        (folder / "model").mkdir()
        (folder / "model" / "half.safetensors").write_bytes(b"x" * 10)
        raise KeyboardInterrupt  # the pod killed mid-download

    with pytest.raises(KeyboardInterrupt):
        cache.fill("m", killed, {})
    assert cache.lookup("m") is None and not cache.path("m").exists()

    # A folder under entries/ without its marker is never used, and is replaced by a complete one.
    (cache.path("m") / "model").mkdir(parents=True)
    assert cache.lookup("m") is None
    entry = cache.fill("m", lambda folder: (folder / "config.json").write_text("{}"), {"uri": "s3://m"})
    assert not (entry / "model").exists()
    assert cache.lookup("m") == entry and (entry / MARKER).is_file()
    assert [e.key for e in cache.entries()] == ["m"]


def test_evict_removes_the_chosen_folders_and_stale_staging(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    for key in ("old", "new"):
        cache.fill(key, lambda folder: (folder / "w").write_bytes(b"x" * 100), {})
    os.utime(tmp_path / "used" / "old", (1.0, 1.0))
    assert cache.evict(limit=150, incoming=0, keep=[], not_after=1e12) == ["old"]
    assert cache.lookup("old") is None and cache.lookup("new") is not None
    left = tmp_path / "staging" / "m.dead"
    left.mkdir(parents=True)
    os.utime(left, (1.0, 1.0))
    assert cache.clean_staging(older_than=100.0) == ["m.dead"] and not left.exists()


def test_room_is_made_before_a_download_so_that_the_new_entry_fits(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    for key in ("oldest", "held", "recent"):
        cache.fill(key, lambda folder: (folder / "w").write_bytes(b"x" * 100), {})
    for key, used in (("oldest", 1.0), ("held", 2.0), ("recent", 3.0)):
        os.utime(tmp_path / "used" / key, (used, used))
    # 300 bytes in a cache of 350: a 100-byte download needs one entry gone first; "held" is in use.
    limited = Cache(tmp_path, Limit(size=350, keep=("held",), not_after=10.0))
    assert limited.make_room(100) == ["oldest"]
    assert sum(e.size for e in limited.entries()) + 100 <= 350
    # An entry the step itself uses is kept too, and without a limit nothing goes.
    assert limited.make_room(250, used=["recent"]) == []
    assert Cache(tmp_path).make_room(10**9) == [] and len(cache.entries()) == 2
