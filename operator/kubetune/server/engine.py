"""`kubetune engine ARGS...`: vLLM's OpenAI server (`python3 -m vllm.entrypoints.openai.api_server ARGS`), whose
error, when it fails, becomes the container's termination message.

The kubelet's FallbackToLogsOnError keeps the last 2048 bytes of the log, and vLLM's root cause is rarely in
them: a failed engine process prints its error, then the API server prints a traceback of its own that ends in
"Engine core initialization failed. See root cause above". So this wrapper passes vLLM's output through
unchanged, remembers the error lines (`error_lines`), and on a failed exit writes them to the termination log,
where the operator reads them (status/engine.py names the reason: InvalidEngineArgs, OutOfMemory,
MaxModelLenTooLarge, EngineFailed). Signals are passed on to vLLM, so a pod's shutdown drains as before.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from types import FrameType

VLLM_SERVER = "vllm.entrypoints.openai.api_server"
# What the kubelet keeps of a termination message (4096 bytes); leave room for a multi-byte character.
MESSAGE_LIMIT = 4000
TAIL_LINES = 400

# vLLM's log prefix: "(EngineCore pid=7) ERROR 12-07 03:58:13 [core.py:1510] ".
_PREFIX = re.compile(r"^(\([^)]*pid=\d+\) )?((DEBUG|INFO|WARNING|ERROR|CRITICAL) [\d-]+ [\d:.]+ \[[^\]]*\] )?")
_ERROR = re.compile(
    r"^[\w.]*(Error|Exception)(\[[^\]]*\])?: \S"  # a Python exception: "ValueError: ..."
    r"|^\S+: error: "  # argparse: "api_server.py: error: unrecognized arguments: --x"
    r"|^\s*Value error, "  # pydantic's reason inside "1 validation error for ModelConfig"
    r"|out of memory",
    re.IGNORECASE,
)


def error_lines(output: Iterable[str], keep: int = 6) -> list[str]:
    """The distinct error lines of vLLM's output, first to last (at most `keep`: the first ones, which hold the
    root cause, and the very last); the output's last lines when it has none."""
    lines = [_PREFIX.sub("", line.rstrip()) for line in output]
    found: list[str] = []
    for line in lines:
        text = line.strip()
        if _ERROR.search(line) and text not in found:
            found.append(text)
    if not found:
        return [line for line in lines if line.strip()][-keep:]
    return found if len(found) <= keep else [*found[: keep - 1], found[-1]]


def termination_message(lines: list[str]) -> str:
    text = "\n".join(lines)
    return text if len(text.encode()) <= MESSAGE_LIMIT else text.encode()[-MESSAGE_LIMIT:].decode(errors="ignore")


def main(argv: list[str]) -> int:
    """Run vLLM with `argv`; its exit code is ours."""
    child = subprocess.Popen(
        [sys.executable, "-m", VLLM_SERVER, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=0,
    )

    def pass_on(signum: int, _: FrameType | None) -> None:
        child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, pass_on)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    errors: list[str] = []
    assert child.stdout is not None
    for raw in iter(child.stdout.readline, b""):
        sys.stdout.buffer.write(raw)
        sys.stdout.buffer.flush()
        line = raw.decode(errors="replace")
        tail.append(line)
        if _ERROR.search(_PREFIX.sub("", line)):
            errors.append(line)  # kept apart: a long traceback must not push the root cause out of the tail
    code = child.wait()
    if code != 0:
        message = termination_message(error_lines([*errors[:20], *tail]))
        path = Path(os.environ.get("KUBETUNE_TERMINATION_LOG", "/dev/termination-log"))
        try:
            path.write_text(message)
        except OSError as err:
            print(f"kubetune engine: cannot write the termination message to {path}: {err}", file=sys.stderr)
    return code if code >= 0 else 128 - code
