"""The `kubetune` command. Each subcommand imports its own layer lazily, so `kubetune operator` never
imports the trainer's or the server's dependencies."""

from __future__ import annotations

import sys
from collections.abc import Callable


def _crds(argv: list[str]) -> int:
    from kubetune import crdgen

    return crdgen.main(argv)


def _validate(argv: list[str]) -> int:
    from kubetune.validate import main

    return main(argv)


def _operator(argv: list[str]) -> int:
    from kubetune.handlers.main import run

    return run(argv)


def _dev(argv: list[str]) -> int:
    from kubetune.dev.__main__ import main

    return main(argv)


def _train(argv: list[str]) -> int:
    from kubetune.trainer.main import main

    return main(argv)


def _prepare(argv: list[str]) -> int:
    from kubetune.trainer.prepare import main

    return main(argv)


def _ui(argv: list[str]) -> int:
    from kubetune.server.ui import main

    return main(argv)


def _fetcher(argv: list[str]) -> int:
    from kubetune.server.fetcher import main

    return main(argv)


def _engine(argv: list[str]) -> int:
    from kubetune.server.engine import main

    return main(argv)


def _plan(argv: list[str]) -> int:
    from kubetune.planner.cli import main

    return main(argv)


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "operator": (_operator, "run the operator (kopf) against the current kubeconfig"),
    "crds": (_crds, "write the CustomResourceDefinitions generated from the API models"),
    "validate": (_validate, "check FineTuneJob/ModelServer manifests and JSONL datasets offline"),
    "plan": (_plan, "plan a training run: ZeRO stage, offload, micro-batch, memory per GPU"),
    "prepare": (_prepare, "fetch, check and cache a FineTuneJob's inputs (its CPU prepare pod)"),
    "train": (_train, "run the trainer (inside a training pod)"),
    "ui": (_ui, "the Gradio chat page of a ModelServer (beside the server pods)"),
    "engine": (_engine, "vLLM's OpenAI server, its error written as the container's termination message"),
    "fetcher": (_fetcher, "the adapter fetcher beside vLLM: pvc:// and s3:// adapters for runtime loading"),
    "dev": (_dev, "the local cluster: up, down, status, logs, build, demo"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: kubetune COMMAND [ARGS...]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<10} {help_text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, _ = COMMANDS[argv[0]]
    return command(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
