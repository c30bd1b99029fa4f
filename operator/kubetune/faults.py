"""Crash points for failure tests.

`KUBETUNE_CRASH_AT=<point>[,<point>...]` makes the process die, as a SIGKILL would, the first time it reaches
one of the named points, e.g. `after-write:Job` (for any object) or `after-write:Job@team-a/sft` (for that one),
or the trainer's `after-checkpoint@8` (checkpoint-8 marked complete, not reported yet): the tests kill a process
between two requests on purpose instead of hoping that a kill lands there. Unset
(always, outside tests) a point costs a set lookup.
"""

from __future__ import annotations

import os
import signal

_CRASH_AT = frozenset(p for p in os.environ.get("KUBETUNE_CRASH_AT", "").split(",") if p)


def point(name: str, subject: str = "") -> None:
    """Die here when this point is armed, for any subject or for this one (NAMESPACE/NAME)."""
    if _CRASH_AT and (name in _CRASH_AT or f"{name}@{subject}" in _CRASH_AT):
        os.kill(os.getpid(), signal.SIGKILL)
