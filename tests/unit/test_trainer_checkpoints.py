"""Checkpoint bookkeeping, process layout and exit codes of the trainer (no torch needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kubetune.trainer import checkpoints
from kubetune.trainer.distributed import Layout, combined_exit_code, layout_from_env
from kubetune.trainer.errors import TrainerFailure, report_failure


def make(root: Path, step: int, complete: bool) -> Path:
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"x")
    if complete:
        checkpoints.mark_complete(path, step)
    return path


def test_latest_complete_ignores_half_written(tmp_path: Path) -> None:
    make(tmp_path, 5, True)
    make(tmp_path, 10, True)
    make(tmp_path, 15, False)
    (tmp_path / "checkpoint-x").mkdir()
    latest = checkpoints.latest_complete(tmp_path)
    assert latest is not None and latest.step == 10
    assert json.loads((latest.path / checkpoints.MARKER).read_text())["step"] == 10
    assert [c.step for c in checkpoints.remove_incomplete(tmp_path)] == [15]
    assert not (tmp_path / "checkpoint-15").exists()


def test_rotation_keeps_the_newest_complete(tmp_path: Path) -> None:
    for step in (2, 4, 6):
        make(tmp_path, step, True)
    assert [c.step for c in checkpoints.rotate(tmp_path, keep=2)] == [2]
    assert [c.step for c in checkpoints.checkpoints(tmp_path)] == [4, 6]
    assert checkpoints.latest_complete(tmp_path / "absent") is None


def test_layout_from_operator_env() -> None:
    env = {"NNODES": "2", "NPROC_PER_NODE": "4", "NODE_RANK": "1", "MASTER_ADDR": "job-0.svc", "MASTER_PORT": "29400"}
    layout = layout_from_env(env)
    assert layout.world_size == 8
    worker = layout.worker_env(local_rank=2, cpu_count=16)
    assert worker["RANK"] == "6" and worker["LOCAL_RANK"] == "2" and worker["WORLD_SIZE"] == "8"
    assert worker["MASTER_ADDR"] == "job-0.svc" and worker["MASTER_PORT"] == "29400"
    assert worker["OMP_NUM_THREADS"] == "4"
    assert layout_from_env({}, default_nnodes=1, default_nproc=2) == Layout(nproc_per_node=2)


@pytest.mark.parametrize(
    ("codes", "code"), [([0, 0], 0), ([143, 143], 143), ([0, -15], 143), ([1, 143], 1), ([1, 3], 3), ([-9, 0], 1)]
)
def test_combined_exit_code(codes: list[int], code: int) -> None:
    assert combined_exit_code(codes) == code


def test_failure_goes_to_the_termination_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(log))
    assert report_failure(TrainerFailure("DatasetInvalid", "line 3: missing 'response'")) == 3
    assert json.loads(log.read_text()) == {"reason": "DatasetInvalid", "message": "line 3: missing 'response'"}
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "absent" / "log"))
    assert report_failure(TrainerFailure("ModelNotFound", "x")) == 3  # unwritable: printed only


def test_pure_trainer_modules_do_not_import_torch() -> None:
    modules = (
        "checkpoints, config, deepspeed_config, distributed, errors, inputs, progress, adapter, data, records, retries"
    )
    code = f"import sys; from kubetune.trainer import {modules}; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
