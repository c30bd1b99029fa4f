"""`kubetune train --config FILE`: the entry point of every training pod.

The pod's process reads the config, fetches the inputs and checks the dataset (before any GPU work), then
trains in-process (one GPU) or starts one worker per GPU of this pod. Exit codes: 0 done, 3 configuration
problem (reason in the termination log, no retry), 143 stopped by SIGTERM after a checkpoint, 1 anything else
(the Job retries and the retry resumes from the latest checkpoint).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

from kubetune.api.v1alpha1 import TrainerConfig
from kubetune.trainer.config import load_config
from kubetune.trainer.distributed import layout_from_env, run_workers
from kubetune.trainer.errors import EXIT_RETRY, TrainerFailure, report_failure
from kubetune.trainer.inputs import Inputs, stage
from kubetune.trainer.progress import log_event

log = logging.getLogger("kubetune.trainer")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubetune train", description="Run LoRA post-training (SFT or DPO).")
    parser.add_argument("--config", required=True, type=Path, help="TrainerConfig, YAML or JSON")
    # Set by the launcher for its workers: the directory with the staged inputs.
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def launch(config: TrainerConfig, config_path: Path) -> int:
    """Stage the inputs, then train here (world of one) or in one worker per local GPU."""
    inputs = stage(config)
    log_event("dataset", **inputs.data.report.to_dict())
    nodes = config.spec.resources.nodes
    layout = layout_from_env(os.environ, nodes, max(1, config.plan.world_size // nodes))
    if layout.world_size == 1:
        from kubetune.trainer.train import run

        return run(config, inputs)
    staged = Path(tempfile.mkdtemp(prefix="kubetune-inputs-"))
    try:
        inputs.save(staged)
        log_event("launch", nodes=layout.nnodes, nodeRank=layout.node_rank, processes=layout.nproc_per_node)
        return run_workers(layout, ["--config", str(config_path), "--worker", str(staged)])
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def work(config: TrainerConfig, staged: Path) -> int:
    from kubetune.trainer.train import run

    return run(config, Inputs.load(staged))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = load_config(args.config)
        return work(config, args.worker) if args.worker else launch(config, args.config)
    except TrainerFailure as failure:
        return report_failure(failure)
    except Exception:
        traceback.print_exc()
        return EXIT_RETRY


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
