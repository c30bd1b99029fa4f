"""Writes the API server refused wait twice as long before each new try, up to five minutes."""

from __future__ import annotations

from kubetune.controllers.context import BACKOFF_MAX_S, RETRY_API_ERROR_S, Backoff


def test_each_refusal_in_a_row_doubles_the_wait_up_to_the_limit() -> None:
    backoff = Backoff()
    waits = [backoff.refused("u1", "ApplyFailed", "quota", now=100.0).retry_at - 100.0 for _ in range(9)]
    assert waits[:4] == [RETRY_API_ERROR_S, 2 * RETRY_API_ERROR_S, 4 * RETRY_API_ERROR_S, 8 * RETRY_API_ERROR_S]
    assert waits[-1] == BACKOFF_MAX_S == 300.0


def test_a_write_waits_for_its_back_off_and_a_success_forgets_it() -> None:
    backoff = Backoff()
    assert backoff.due("u1", now=0.0) and backoff.refusal("u1") is None
    refusal = backoff.refused("u1", "NameConflict", "Role x-trainer already exists", now=10.0)
    assert backoff.refusal("u1") == refusal
    assert not backoff.due("u1", now=14.9) and backoff.due("u1", now=15.0)
    assert backoff.due("u2", now=11.0)  # other objects are not held back
    backoff.succeeded("u1")
    assert backoff.refusal("u1") is None
    assert backoff.refused("u1", "ApplyFailed", "again", now=20.0).attempts == 1  # a new series
