"""Failures the trainer reports to the operator, and the exit codes that carry them.

A known configuration problem (bad dataset, missing model) exits with EXIT_CONFIG after writing
`{"reason", "message"}` to the termination log: the Job's podFailurePolicy fails the run at once, without
retries. An input that stayed unreachable through the in-pod retries (a hub or S3 outage) writes its reason
the same way but exits with EXIT_RETRY, as does anything else: the Job retries the pod (backoffLimit), the
retried pod resumes from the latest checkpoint, and when the retries run out the operator shows the last
pod's reason and message in the Failed condition.
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
DATASET_NOT_FOUND = "DatasetNotFound"
ACCESS_DENIED = "AccessDenied"
INIT_ADAPTER_NOT_FOUND = "InitAdapterNotFound"
CONFIG_INVALID = "ConfigInvalid"
MODEL_UNAVAILABLE = "ModelUnavailable"
DATASET_UNAVAILABLE = "DatasetUnavailable"
INIT_ADAPTER_UNAVAILABLE = "InitAdapterUnavailable"


class TrainerFailure(Exception):
    """A failure reported with a CamelCase reason: a configuration problem that retrying cannot fix (exit code
    3), or with `retryable` one that a later pod may not meet (exit code 1)."""

    def __init__(self, reason: str, message: str, retryable: bool = False) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.retryable = retryable

    @property
    def exit_code(self) -> int:
        return EXIT_RETRY if self.retryable else EXIT_CONFIG


def termination_log_path() -> str:
    """Where Kubernetes picks up the termination message ($KUBETUNE_TERMINATION_LOG overrides it)."""
    return os.environ.get("KUBETUNE_TERMINATION_LOG", TERMINATION_LOG)


def report_failure(failure: TrainerFailure) -> int:
    """Write the failure to the termination log (or only print it when that fails) and return its exit code."""
    # Kubernetes keeps at most 4096 bytes of the termination message.
    text = json.dumps({"reason": failure.reason, "message": failure.message[:3500]})
    event = {"event": "failed", "reason": failure.reason, "message": failure.message, "retryable": failure.retryable}
    print(json.dumps(event), flush=True)
    try:
        with open(termination_log_path(), "w", encoding="utf-8") as log:
            log.write(text)
    except OSError as err:
        print(f"kubetune: cannot write the termination log: {err}", file=sys.stderr, flush=True)
    return failure.exit_code
