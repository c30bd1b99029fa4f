"""`kubetune engine ARGS...`: vLLM's OpenAI server (`python3 -m vllm.entrypoints.openai.api_server ARGS`), whose
error, when it fails, becomes the container's termination message.

The kubelet's FallbackToLogsOnError keeps the last 2048 bytes of the log, and vLLM's root cause is rarely in
them: a failed engine process prints its error, then the API server prints a traceback of its own that ends in
"Engine core initialization failed. See root cause above". So this wrapper passes vLLM's output through
unchanged, remembers the error lines (`error_lines`), and on a failed exit writes them to the termination log,
where the operator reads them (status/engine.py names the reason: InvalidEngineArgs, OutOfMemory,
MaxModelLenTooLarge, EngineFailed). Signals are passed on to vLLM, so a pod's shutdown drains as before.

Before vLLM starts, the model's config.json (on a volume, or the Hub's copy of an hf model) is read and the
tensor-parallel size and maxModelLen checked against it (planner/engine.py, the same check and messages as
the operator's for the models it knows): a server vLLM would refuse after loading for minutes is refused in
seconds, as TensorParallelSizeInvalid or MaxModelLenTooLarge, without starting vLLM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Any

from kubetune.planner.engine import EngineRefusal, limits_from_config, refusal, refusal_text

VLLM_SERVER = "vllm.entrypoints.openai.api_server"
# What the kubelet keeps of a termination message (4096 bytes); leave room for a multi-byte character.
MESSAGE_LIMIT = 4000
TAIL_LINES = 400
# The exit code of a server refused before vLLM started (sysexits' EX_CONFIG).
EXIT_REFUSED = 78

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


def last_value(argv: list[str], *flags: str) -> str | None:
    """The value of the last of `flags` in vLLM's arguments (`--flag VALUE` or `--flag=VALUE`): later ones win."""
    found = None
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name in flags:
            found = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return found


def _integer(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None  # vLLM's own spellings ("32k", "auto"): its check


def model_config(model: str, revision: str | None) -> tuple[dict[str, Any], str] | None:
    """The config.json of vLLM's --model and where it was read: the model's folder, or the Hub's copy of an
    ORG/NAME model (what vLLM reads first, too). None when there is none to read."""
    folder = Path(model)
    path: str | Path = folder / "config.json"
    if not folder.is_dir():
        if folder.is_absolute() or model.count("/") != 1:
            return None
        try:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(model, "config.json", revision=revision)
        except Exception as err:  # offline, gated, no such model: vLLM will say so
            print(f"kubetune engine: config.json of {model} not read before vLLM starts: {err}", file=sys.stderr)
            return None
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return (config, str(path)) if isinstance(config, dict) else None


def preflight(argv: list[str], environ: dict[str, str] | None = None) -> EngineRefusal | None:
    """Why vLLM would refuse these arguments for the model's config.json (its --hf-overrides applied), or None."""
    env = os.environ if environ is None else environ
    model = last_value(argv, "--model")
    found = model_config(model, last_value(argv, "--revision")) if model else None
    if model is None or found is None:
        return None
    config, source = found
    try:
        overrides = json.loads(last_value(argv, "--hf-overrides") or "{}")
    except ValueError:
        overrides = {}
    if isinstance(overrides, dict):
        config = {**config, **overrides}
    limits = limits_from_config(config, Path(model).name or model)
    size = _integer(last_value(argv, "--tensor-parallel-size", "-tp")) or 1
    wanted = _integer(last_value(argv, "--max-model-len"))
    context = None if env.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "").lower() in ("1", "true") else limits.context
    refused = refusal(limits, size, wanted, context)
    return EngineRefusal(refused.reason, f"{refused.message} (config.json: {source})") if refused else None


def main(argv: list[str]) -> int:
    """Run vLLM with `argv`, unless the model's config.json shows that it would refuse them; its exit code is
    ours. `--help` alone describes this wrapper without starting vLLM (whose GPU build cannot even print its help
    without a GPU: the image builds check the command with it)."""
    if argv in (["--help"], ["-h"]):
        print((__doc__ or "").split("\n\n")[0])
        print(f"vLLM's own options: python3 -m {VLLM_SERVER} --help")
        return 0
    if (refused := preflight(argv)) is not None:
        text = refusal_text(refused)
        print(text, file=sys.stderr)
        write_termination_message(text)
        return EXIT_REFUSED
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
        write_termination_message(termination_message(error_lines([*errors[:20], *tail])))
    return code if code >= 0 else 128 - code


def write_termination_message(message: str) -> None:
    path = Path(os.environ.get("KUBETUNE_TERMINATION_LOG", "/dev/termination-log"))
    try:
        path.write_text(message)
    except OSError as err:
        print(f"kubetune engine: cannot write the termination message to {path}: {err}", file=sys.stderr)
