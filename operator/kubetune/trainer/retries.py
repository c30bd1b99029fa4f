"""Transient failures while fetching inputs (a hub or S3 outage) told apart from permanent ones, and retried.

Permanent: a definite answer from the server (404 not found, 401/403 no access, a gated repository, any other
4xx but 408 and 429) and every error not recognised as transient (a malformed URI, missing credentials):
retrying cannot help, so the trainer fails at once (exit 3). Transient: connection errors and timeouts, HTTP
408, 429 and 5xx, S3's throttling and internal-error codes. These are retried in the pod with exponential
back-off (`RetryPolicy`, from the environment), and when they outlast the retries the trainer exits with the
retryable code, so that the Job's backoffLimit applies.

The exception and its causes are looked at: huggingface_hub reports a 503 as a LocalEntryNotFoundError raised
from the HTTP error, and kubetune.s3 wraps botocore's errors in S3Error. Library classes are looked up by
import, lazily: this module itself needs neither huggingface_hub nor boto3.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, TypeVar

from kubetune.trainer.errors import CONFIG_INVALID, TrainerFailure
from kubetune.trainer.progress import format_eta, log_event

T = TypeVar("T")

TRANSIENT_STATUS = frozenset({408, 429})
"""Besides every 5xx: request timeout and too many requests."""
TRANSIENT_S3_CODES = frozenset(
    {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling", "ThrottlingException"}
)
# (module, class) of transport failures: the request never got a definite answer.
_TRANSPORT_CLASSES = (
    ("httpx2", "TransportError"),  # huggingface_hub >= 2 (ConnectError, TimeoutException, RemoteProtocolError)
    ("httpx", "TransportError"),  # huggingface_hub 1.x
    ("requests", "ConnectionError"),  # huggingface_hub < 1
    ("requests", "Timeout"),
    ("botocore.exceptions", "ConnectionError"),  # EndpointConnectionError, ConnectTimeoutError
    ("botocore.exceptions", "HTTPClientError"),  # ReadTimeoutError, ConnectionClosedError, ResponseStreamingError
    ("boto3.exceptions", "RetriesExceededError"),  # s3transfer gave up on a broken download stream
    ("s3transfer.exceptions", "RetriesExceededError"),
    ("huggingface_hub.errors", "XetDownloadError"),
)
_PERMANENT_CLASSES = (("huggingface_hub.errors", "OfflineModeIsEnabled"),)  # HF_HUB_OFFLINE=1: a setting


@cache
def _classes(names: tuple[tuple[str, str], ...]) -> tuple[type[BaseException], ...]:
    found = []
    for module, name in names:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


def _chain(err: BaseException) -> Iterator[BaseException]:
    """The error and what caused it, outermost first."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def http_status(err: BaseException) -> int | None:
    """The HTTP status of a server's answer carried by `err` (huggingface_hub's or botocore's errors), or None."""
    response: Any = getattr(err, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    else:  # httpx / requests responses
        status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _s3_code(err: BaseException) -> str:
    response: Any = getattr(err, "response", None)
    return str((response.get("Error") or {}).get("Code", "")) if isinstance(response, dict) else ""


def is_transient(err: BaseException) -> bool:
    """Whether a later attempt may succeed: the first definite signal along the error's causes decides."""
    for cause in _chain(err):
        if isinstance(cause, _classes(_PERMANENT_CLASSES)):
            return False
        if _s3_code(cause) in TRANSIENT_S3_CODES:
            return True
        status = http_status(cause)
        if status is not None:
            return status >= 500 or status in TRANSIENT_STATUS
        if isinstance(cause, (ConnectionError, TimeoutError, *_classes(_TRANSPORT_CLASSES))):
            return True
    return False


def summary(err: BaseException) -> str:
    """The first line of the error's message (huggingface_hub's run over several), or its class name."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(err).__name__


@dataclass(frozen=True)
class RetryPolicy:
    """How a transient failure is retried: `attempts` tries in all, waiting `first_delay` seconds after the
    first failure and twice as long after each further one, never more than `max_delay`."""

    attempts: int = 6
    first_delay: float = 5.0
    max_delay: float = 60.0

    ENV = {
        "attempts": "KUBETUNE_FETCH_ATTEMPTS",
        "first_delay": "KUBETUNE_FETCH_RETRY_DELAY_SECONDS",
        "max_delay": "KUBETUNE_FETCH_MAX_DELAY_SECONDS",
    }

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RetryPolicy:
        """The defaults, each overridden by its environment variable (spec.env); ConfigInvalid when one is not
        a number (attempts: a whole number of at least 1; delays: seconds, at least 0)."""
        values: dict[str, Any] = {}
        for field, var in cls.ENV.items():
            if not (text := env.get(var, "").strip()):
                continue
            try:
                value = int(text) if field == "attempts" else float(text)
            except ValueError:
                value = -1
            if value < (1 if field == "attempts" else 0):
                kind = "a whole number of at least 1" if field == "attempts" else "a number of seconds"
                raise TrainerFailure(CONFIG_INVALID, f"{var} must be {kind}, got {text!r}")
            values[field] = value
        return cls(**values)

    def delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failure."""
        return float(min(self.max_delay, self.first_delay * 2 ** (failures - 1)))


class RetriesExhausted(Exception):
    """A transient failure that lasted through every attempt; its cause is the last error."""

    def __init__(self, attempts: int, seconds: float, last: BaseException) -> None:
        super().__init__(f"still failing after {attempts} attempt(s) over {format_eta(seconds)}: {summary(last)}")
        self.attempts = attempts
        self.last = last


def call_with_retries(
    what: str, fetch: Callable[[], T], policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep
) -> T:
    """fetch(), tried again after transient failures (a `fetch-retry` event each time). A permanent failure is
    raised at once as it is; RetriesExhausted (from the last error) when the attempts are used up."""
    started = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return fetch()
        except Exception as err:
            if not is_transient(err):
                raise
            if attempt == policy.attempts:
                raise RetriesExhausted(attempt, time.monotonic() - started, err) from err
            delay = policy.delay(attempt)
            log_event(
                "fetch-retry",
                what=what,
                attempt=attempt,
                attempts=policy.attempts,
                retryInSeconds=delay,
                error=summary(err),
            )
            sleep(delay)
    raise AssertionError("unreachable: the last attempt returns or raises")
