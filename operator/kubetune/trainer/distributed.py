"""The process layout: one `kubetune train` per pod, which runs training itself or starts one worker per GPU.

The operator sets MASTER_ADDR, MASTER_PORT, NNODES, NODE_RANK (the Job's completion index) and NPROC_PER_NODE.
Workers get the torch.distributed environment (RANK, LOCAL_RANK, WORLD_SIZE, ...) and rendezvous at
MASTER_ADDR:MASTER_PORT. The launcher forwards SIGTERM to them and exits with the most telling worker code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

from kubetune.trainer.errors import EXIT_CONFIG, EXIT_OK, EXIT_RETRY, EXIT_TERMINATED


@dataclass(frozen=True)
class Layout:
    """Processes of this run: `nnodes` pods of `nproc_per_node` workers; this pod is `node_rank`."""

    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def worker_env(self, local_rank: int, cpu_count: int | None = None) -> dict[str, str]:
        """The torch.distributed environment of one local worker."""
        env = {
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
            "WORLD_SIZE": str(self.world_size),
            "RANK": str(self.node_rank * self.nproc_per_node + local_rank),
            "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(self.nproc_per_node),
            "GROUP_RANK": str(self.node_rank),
            "NODE_RANK": str(self.node_rank),
        }
        if cpu_count:
            # Without this every worker starts one thread per core and they fight over the CPUs.
            env["OMP_NUM_THREADS"] = str(max(1, cpu_count // self.nproc_per_node))
        return env


def layout_from_env(env: Mapping[str, str], default_nnodes: int = 1, default_nproc: int = 1) -> Layout:
    """The layout from the operator's environment, falling back to the spec's nodes and GPUs per node."""
    return Layout(
        nnodes=int(env.get("NNODES") or default_nnodes),
        nproc_per_node=int(env.get("NPROC_PER_NODE") or default_nproc),
        node_rank=int(env.get("NODE_RANK") or env.get("JOB_COMPLETION_INDEX") or 0),
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=int(env.get("MASTER_PORT") or 29500),
    )


def combined_exit_code(codes: Sequence[int]) -> int:
    """One exit code for the pod: a configuration failure wins, then a retryable failure, then SIGTERM."""
    if any(c == EXIT_CONFIG for c in codes):
        return EXIT_CONFIG
    if any(c not in (EXIT_OK, EXIT_TERMINATED, -signal.SIGTERM) for c in codes):
        return EXIT_RETRY
    if any(c in (EXIT_TERMINATED, -signal.SIGTERM) for c in codes):
        return EXIT_TERMINATED
    return EXIT_OK


def run_workers(layout: Layout, argv: list[str], poll: float = 0.5) -> int:
    """Start `nproc_per_node` workers running `python -m kubetune.trainer.main ARGV`, wait, return one code.

    When a worker fails, the others are stopped (they would block in a collective otherwise).
    """
    procs = []
    for local_rank in range(layout.nproc_per_node):
        cpus = None if "OMP_NUM_THREADS" in os.environ else os.cpu_count()
        env = {**os.environ, **layout.worker_env(local_rank, cpus)}
        procs.append(subprocess.Popen([sys.executable, "-m", "kubetune.trainer.main", *argv], env=env))

    def forward(signum: int, _frame: FrameType | None) -> None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        return _wait(procs, poll)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _wait(procs: list[subprocess.Popen[bytes]], poll: float) -> int:
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c is not None and c != EXIT_OK]
        if failed or all(c is not None for c in codes):
            break
        time.sleep(poll)
    if failed:
        # Give the others time to finish on their own: after SIGTERM every rank is saving the same checkpoint;
        # after an error the others usually fail the same way or block in a collective.
        terminated = all(c in (EXIT_TERMINATED, -signal.SIGTERM) for c in failed)
        deadline = time.monotonic() + (float("inf") if terminated else 30)
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(poll)
        for p in procs:
            if p.poll() is None:
                p.kill()
    return combined_exit_code([p.wait() for p in procs])
