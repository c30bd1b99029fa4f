"""Failures the trainer reports to the operator, and the exit codes that carry them.

A known configuration problem (bad dataset, missing model) exits with EXIT_CONFIG after writing
`{"reason", "message"}` to the termination log: the Job's podFailurePolicy fails the run at once, without
retries. Anything else exits with EXIT_RETRY, and the retried pod resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import sys

EXIT_OK = 0
EXIT_RETRY = 1
EXIT_CONFIG = 3
EXIT_TERMINATED = 143

TERMINATION_LOG = "/dev/termination-log"

DATASET_INVALID = "DatasetInvalid"
MODEL_NOT_FOUND = "ModelNotFound"
INIT_ADAPTER_NOT_FOUND = "InitAdapterNotFound"
CONFIG_INVALID = "ConfigInvalid"


class TrainerFailure(Exception):
    """A configuration problem that retrying cannot fix: reported with a CamelCase reason, exit code 3."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def termination_log_path() -> str:
    """Where Kubernetes picks up the termination message ($KUBETUNE_TERMINATION_LOG overrides it)."""
    return os.environ.get("KUBETUNE_TERMINATION_LOG", TERMINATION_LOG)


def report_failure(failure: TrainerFailure) -> int:
    """Write the failure to the termination log (or only print it when that fails) and return exit code 3."""
    # Kubernetes keeps at most 4096 bytes of the termination message.
    text = json.dumps({"reason": failure.reason, "message": failure.message[:3500]})
    print(json.dumps({"event": "failed", "reason": failure.reason, "message": failure.message}), flush=True)
    try:
        with open(termination_log_path(), "w", encoding="utf-8") as log:
            log.write(text)
    except OSError as err:
        print(f"kubetune: cannot write the termination log: {err}", file=sys.stderr, flush=True)
    return EXIT_CONFIG
