"""Conditions in the Kubernetes convention, as plain dicts (the wire form the status patch carries)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

Conditions = list[dict[str, Any]]


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def get(conditions: Conditions, type_: str) -> dict[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def true_condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    """A copy of the object's condition of this type when its status is True (a Job's Complete, say), else None."""
    cond = get((obj.get("status") or {}).get("conditions") or [], type_)
    return dict(cond) if cond is not None and cond.get("status") == "True" else None


def is_true(conditions: Conditions, type_: str) -> bool:
    cond = get(conditions, type_)
    return cond is not None and cond.get("status") == "True"


def set_condition(
    conditions: Conditions,
    type_: str,
    status: bool | str,
    reason: str,
    message: str = "",
    *,
    generation: int | None = None,
    now: str | None = None,
) -> Conditions:
    """A copy of `conditions` with `type_` set. lastTransitionTime changes only when status does."""
    status_text = status if isinstance(status, str) else ("True" if status else "False")
    old = get(conditions, type_)
    transition = old["lastTransitionTime"] if old and old.get("status") == status_text else (now or now_iso())
    new = {
        "type": type_,
        "status": status_text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": transition,
    }
    if generation is not None:
        new["observedGeneration"] = generation
    return (
        [c for c in conditions if c.get("type") != type_] + [new]
        if old is None
        else [new if c.get("type") == type_ else c for c in conditions]
    )


def remove(conditions: Conditions, type_: str) -> Conditions:
    return [c for c in conditions if c.get("type") != type_]
