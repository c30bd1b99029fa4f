"""The serving pod's check of the model's config.json before vLLM starts (`kubetune engine`), the reasons the
operator reads back from the termination message, and the kernel's OOM kill."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kubetune.planner.engine import limits_from_config, parsed_refusal, refusal, refusal_text
from kubetune.server import engine
from kubetune.status.engine import engine_failure, engine_reason

# The tiny Qwen2 of kubetune.trainer.tiny as transformers 5 writes it (the fields that matter).
TINY = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "max_position_embeddings": 4096,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
}


def model_dir(tmp_path: Path, **changes: Any) -> Path:
    folder = tmp_path / "tiny"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**TINY, **changes}))
    return folder


def check(config: dict[str, Any], size: int = 1, wanted: int | None = None) -> tuple[str, str] | None:
    limits = limits_from_config(config, "tiny")
    refused = refusal(limits, size, wanted, limits.context)
    return (refused.reason, refused.message) if refused else None


def test_heads_that_do_not_split_are_refused_with_the_sizes_that_do() -> None:
    assert check(TINY, 2) is None and check(TINY, 4) is None  # 4 heads; 2 KV heads replicated over 4 GPUs
    reason, message = check({**TINY, "num_attention_heads": 3, "num_key_value_heads": 1}, 2) or ("", "")
    assert reason == "TensorParallelSizeInvalid"
    assert message == (
        "tensorParallelSize 2 does not split the 3 attention heads (1 key-value heads) of tiny (Qwen2ForCausalLM) "
        "evenly: use one of 1"
    )
    # KV heads that neither divide nor are replicated evenly (6 heads, 3 KV heads over 2 GPUs).
    assert check({**TINY, "num_attention_heads": 6, "num_key_value_heads": 3}, 2) is not None
    # Multi-head latent attention shards no KV heads: only the query heads count.
    assert check({**TINY, "num_attention_heads": 8, "num_key_value_heads": 3, "kv_lora_rank": 512}, 8) is None


def test_a_context_beyond_the_configs_is_refused_with_what_would_work() -> None:
    assert check(TINY, wanted=4096) is None
    reason, message = check(TINY, wanted=8192) or ("", "")
    assert reason == "MaxModelLenTooLarge"
    assert message == (
        "maxModelLen 8192 is above the 4096 tokens tiny (Qwen2ForCausalLM) was trained for: set maxModelLen to at "
        "most 4096, or add ropeScaling {type: yarn, factor: 2, originalMaxPositionEmbeddings: 4096} (YaRN)"
    )


def test_the_context_is_derived_as_vllm_derives_it() -> None:
    def context(**changes: Any) -> int | None:
        return limits_from_config({**TINY, **changes}, "tiny").context

    # Linear and dynamic scaling multiply max_position_embeddings; YaRN's is already scaled (vLLM 0.32), or the
    # original times the factor (older vLLM): the larger of the two, so that neither vLLM is contradicted.
    assert context(rope_scaling={"rope_type": "linear", "factor": 4.0}) == 16384
    assert context(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}) == 8192
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}
    assert context(rope_scaling=yarn, max_position_embeddings=16384) == 16384
    assert context(rope_scaling=yarn) == 16384
    assert context(rope_scaling={"type": "llama3", "factor": 8.0}, max_position_embeddings=131072) == 131072
    nested = {"full_attention": {"rope_type": "linear", "factor": 2.0}, "sliding_attention": {"rope_type": "default"}}
    assert context(rope_parameters=nested) == 4096  # vLLM: the last layer type's factor
    assert context(model_max_length=32768) == 32768  # vLLM lets model_max_length override the positions
    multimodal = {"architectures": ["Qwen2VLForConditionalGeneration"], "text_config": {**TINY, "architectures": []}}
    assert limits_from_config(multimodal, "vl").context == 4096
    unknown = limits_from_config({"architectures": ["Whatever"]}, "x")
    assert (unknown.num_heads, unknown.context) == (None, None)
    assert refusal(unknown, 64, 10**9, unknown.context) is None  # nothing known: vLLM decides


def test_the_refusal_travels_in_the_termination_message() -> None:
    refused = refusal(limits_from_config(TINY, "tiny"), 8, None, None)
    assert refused is not None
    text = refusal_text(refused)
    assert text.startswith("kubetune engine refused to start vLLM: TensorParallelSizeInvalid: tensorParallelSize 8")
    assert parsed_refusal(text) == refused
    assert parsed_refusal("ValueError: Total number of attention heads (3) must be divisible") is None
    assert engine_reason(text, engine.EXIT_REFUSED) == "TensorParallelSizeInvalid"


def rendered_args(model: Path, *extra: str) -> list[str]:
    """vLLM's arguments as render/modelserver.py writes them (the parts the check reads)."""
    return ["--model", str(model), "--served-model-name", "tiny", "--tensor-parallel-size", "1", *extra]


def test_the_engine_reads_the_models_config_and_its_last_arguments(tmp_path: Path) -> None:
    folder = model_dir(tmp_path)
    assert engine.preflight(rendered_args(folder, "--max-model-len", "4096"), {}) is None
    refused = engine.preflight(rendered_args(folder, "--max-model-len", "4096", "--max-model-len=8192"), {})
    assert refused is not None and refused.reason == "MaxModelLenTooLarge"
    assert refused.message.endswith(f"(YaRN) (config.json: {folder / 'config.json'})")
    # ropeScaling reaches vLLM as --hf-overrides, which the check applies to the config as vLLM does.
    overrides = {"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4096},
                 "max_position_embeddings": 8192}  # fmt: skip
    scaled = rendered_args(folder, "--max-model-len", "8192", "--hf-overrides", json.dumps(overrides))
    assert engine.preflight(scaled, {}) is None
    # vLLM's own escape hatch is vLLM's to honour; so are spellings the check does not parse.
    long = rendered_args(folder, "--max-model-len", "8192")
    assert engine.preflight(long, {"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1"}) is None
    assert engine.preflight(rendered_args(folder, "--max-model-len", "8k"), {}) is None
    refused = engine.preflight(rendered_args(folder, "-tp", "8"), {})
    assert refused is not None and refused.reason == "TensorParallelSizeInvalid"
    # No config.json to read (a folder without one, a path that does not exist): vLLM decides.
    assert engine.preflight(rendered_args(tmp_path, "--max-model-len", "8192"), {}) is None
    assert engine.preflight(rendered_args(tmp_path / "absent", "--max-model-len", "8192"), {}) is None


def test_a_refused_server_never_starts_vllm_and_the_operator_names_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = model_dir(tmp_path, num_attention_heads=3, num_key_value_heads=1)
    log = tmp_path / "termination-log"
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(log))

    def no_vllm(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("vLLM was started")

    monkeypatch.setattr(subprocess, "Popen", no_vllm)
    assert engine.main(rendered_args(folder, "--tensor-parallel-size", "2")) == engine.EXIT_REFUSED
    term = {"exitCode": engine.EXIT_REFUSED, "reason": "Error", "message": log.read_text()}
    pod = {
        "metadata": {"name": "tiny-abc"},
        "status": {"containerStatuses": [
            {"name": "vllm", "ready": False, "restartCount": 1, "state": {"waiting": {"reason": "CrashLoopBackOff"}},
             "lastState": {"terminated": term}}]},
    }  # fmt: skip
    problem = engine_failure(pod)
    assert problem is not None and problem.reason == "TensorParallelSizeInvalid"
    assert problem.message == (
        "pod tiny-abc: vLLM not started, restarted 1 time(s): tensorParallelSize 2 does not split the 3 attention "
        f"heads (1 key-value heads) of tiny (Qwen2ForCausalLM) evenly: use one of 1 (config.json: {folder}/config.json)"
    )


def test_the_kernels_oom_kill_is_out_of_memory_from_the_pod_status_alone() -> None:
    # What the kubelet reports when the kernel kills the container for its memory limit: no error line of vLLM's.
    oom = {"exitCode": 137, "reason": "OOMKilled", "finishedAt": "2026-01-01T00:00:00Z"}
    pod = {"metadata": {"name": "tiny-abc"}, "status": {"containerStatuses": [
        {"name": "vllm", "ready": False, "restartCount": 0, "state": {"terminated": oom}}]}}  # fmt: skip
    problem = engine_failure(pod)
    assert problem is not None and problem.reason == "OutOfMemory"
    assert problem.message == (
        "pod tiny-abc: vLLM exited with code 137 (OOMKilled, killed by SIGKILL): the kernel killed it for using more "
        "memory than its limit: raise spec.resources.memory"
    )
    # The log's tail (FallbackToLogsOnError) follows the advice; it does not change the reason.
    tail = {**oom, "message": "INFO 01-01 00:00:00 [gpu_model_runner.py:1] Loading weights took 1.2 s"}
    pod["status"]["containerStatuses"][0]["state"] = {"terminated": tail}  # type: ignore[index]
    problem = engine_failure(pod)
    assert problem is not None and problem.reason == "OutOfMemory" and problem.message.endswith("took 1.2 s")
    # A SIGKILL that was not the OOM killer's (a liveness probe's kill: reason Error) is not called OutOfMemory.
    assert engine_reason("", 137, "Error") == "EngineFailed"


def test_help_alone_describes_the_wrapper_without_starting_vllm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # The images check `kubetune engine --help` at build time, where vLLM's GPU build cannot start without a GPU.
    monkeypatch.setenv("KUBETUNE_TERMINATION_LOG", str(tmp_path / "termination-log"))

    def no_vllm(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("vLLM was started")

    monkeypatch.setattr(subprocess, "Popen", no_vllm)
    assert engine.main(["--help"]) == 0
    assert "vllm.entrypoints.openai.api_server --help" in capsys.readouterr().out
    assert not (tmp_path / "termination-log").exists()
