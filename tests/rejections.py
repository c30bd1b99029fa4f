"""Invalid objects and the message a user must see, for both the models and the API server.

Each case starts from an example in examples/, changes it with `set` (dotted path -> value, None deletes)
and names the text expected in the rejection. Unit tests feed them to the pydantic models, integration
tests to the real API server (`kubectl apply`), so the two layers are held to the same messages.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SFT = "finetunejob-sft.yaml"
DPO = "finetunejob-dpo.yaml"
SERVER = "modelserver.yaml"


@dataclass(frozen=True)
class Rejection:
    id: str
    example: str
    set: dict[str, Any]
    model_message: str
    """Text in the pydantic validation error."""
    server_message: str = ""
    """Text in the API server's rejection (defaults to model_message)."""
    extra: dict[str, Any] = field(default_factory=dict)
    server_must_not_say: str = ""
    """Text that must not appear in the API server's rejection (e.g. an evaluation error of a CEL rule)."""

    @property
    def expected_from_server(self) -> str:
        return self.server_message or self.model_message

    def body(self) -> dict[str, Any]:
        obj = yaml.safe_load((EXAMPLES / self.example).read_text())
        obj["metadata"]["name"] = "bad-" + self.id
        return with_changes(obj, self.set)


def with_changes(obj: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """A copy of `obj` with each dotted path set to its value (None deletes the field)."""
    obj = copy.deepcopy(obj)
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = obj
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(last, None)
        else:
            node[last] = value
    return obj


CASES = [
    Rejection(
        "sft-from-job", SFT, {"spec.fromFineTuneJob": "other"}, "fromFineTuneJob is only allowed with method DPO"
    ),
    Rejection(
        "sft-preference",
        SFT,
        {"spec.dataset.format": "preference"},
        "dataset.format preference (prompt/chosen/rejected) needs method DPO",
    ),
    Rejection(
        "dpo-prompt-response", DPO, {"spec.dataset.format": "prompt-response"}, "method DPO needs preference data"
    ),
    Rejection(
        "dpo-packing-on",
        DPO,
        {"spec.hyperparameters.packing": "on"},
        "hyperparameters.packing on is for SFT; DPO batches pairs of similar length instead",
    ),
    Rejection(
        "rank-too-large",
        SFT,
        {"spec.lora.r": 2048},
        "less than or equal to 1024",
        "should be less than or equal to 1024",
    ),
    Rejection(
        "rank-zero", SFT, {"spec.lora.r": 0}, "greater than or equal to 1", "should be greater than or equal to 1"
    ),
    Rejection("alpha-zero", SFT, {"spec.lora.alpha": 0}, "greater than 0", "should be greater than 0"),
    Rejection("dropout-one", SFT, {"spec.lora.dropout": 1.0}, "less than 1", "should be less than 1"),
    Rejection("lr-one", SFT, {"spec.hyperparameters.learningRate": 1.5}, "less than 1", "should be less than 1"),
    Rejection("lr-zero", SFT, {"spec.hyperparameters.learningRate": 0}, "greater than 0", "should be greater than 0"),
    Rejection(
        "seq-too-short",
        SFT,
        {"spec.hyperparameters.maxSeqLength": 8},
        "greater than or equal to 16",
        "should be greater than or equal to 16",
    ),
    Rejection(
        "seq-too-long",
        SFT,
        {"spec.hyperparameters.maxSeqLength": 2_000_000},
        "less than or equal to 1048576",
        "should be less than or equal to 1048576",
    ),
    Rejection(
        "nodes-zero",
        SFT,
        {"spec.resources.nodes": 0},
        "greater than or equal to 1",
        "should be greater than or equal to 1",
        server_must_not_say="modulus by zero",
    ),
    Rejection(
        "gpus-17",
        SFT,
        {"spec.resources.gpusPerNode": 17},
        "less than or equal to 16",
        "should be less than or equal to 16",
    ),
    Rejection(
        "unknown-scheme", SFT, {"spec.baseModel.uri": "ftp://models/qwen"}, "uri must start with hf://, pvc:// or s3://"
    ),
    Rejection(
        "dataset-scheme",
        SFT,
        {"spec.dataset.uri": "http://example.com/data.jsonl"},
        "uri must start with hf://, pvc://, s3:// or configmap://",
    ),
    Rejection("output-hf", SFT, {"spec.output.uri": "hf://me/adapter"}, "uri must start with pvc:// or s3://"),
    Rejection(
        "steps-and-epochs",
        SFT,
        {"spec.hyperparameters.maxSteps": 100},
        "set either hyperparameters.epochs or hyperparameters.maxSteps, not both",
    ),
    Rejection(
        "batch-not-multiple",
        SFT,
        {"spec.hyperparameters.globalBatchSize": 30},
        "globalBatchSize must be a multiple of the number of GPUs",
    ),
    Rejection("zero-stage-1", SFT, {"spec.distributed.zeroStage": 1}, "zeroStage must be auto, 0, 2 or 3"),
    Rejection(
        "micro-batch-word",
        SFT,
        {"spec.distributed.microBatchSize": "big"},
        "microBatchSize must be auto or a number from 1 to 1024",
    ),
    Rejection(
        "offload-without-zero",
        SFT,
        {"spec.distributed.zeroStage": 0, "spec.distributed.offload": "cpu"},
        "offload cpu needs ZeRO stage 2 or 3",
    ),
    Rejection("bad-from-job-name", DPO, {"spec.fromFineTuneJob": "Not_A_Name"}, "must be a DNS label"),
    Rejection(
        "validation-split",
        SFT,
        {"spec.dataset.validationSplit": 0.7},
        "less than or equal to 0.5",
        "should be less than or equal to 0.5",
    ),
    Rejection(
        "duplicate-adapters",
        SERVER,
        {"spec.adapters": [{"name": "a", "fromFineTuneJob": "x"}, {"name": "a", "uri": "pvc://adapters/y"}]},
        "adapter names must be unique: a is used more than once",
        'spec.adapters[1]: Duplicate value: {"name":"a"}',
    ),
    Rejection(
        "server-name-ui",
        SERVER,
        {"metadata.name": "chat-ui"},
        "a ModelServer's name may not end in -ui or -trainer",
    ),
    Rejection(
        "server-name-trainer",
        SERVER,
        {"metadata.name": "sft-trainer"},
        "a ModelServer's name may not end in -ui or -trainer",
    ),
    Rejection(
        "adapter-name-not-dns",
        SERVER,
        {"spec.adapters": [{"name": "My_Adapter", "fromFineTuneJob": "x"}]},
        "must be a DNS label",
    ),
    Rejection(
        "adapter-both-sources",
        SERVER,
        {"spec.adapters": [{"name": "a", "fromFineTuneJob": "x", "uri": "pvc://adapters/x"}]},
        "set exactly one of fromFineTuneJob or uri",
    ),
    Rejection(
        "tensor-parallel-3",
        SERVER,
        {"spec.tensorParallelSize": 3},
        "tensorParallelSize must be a power of two from 1 to 64",
    ),
    Rejection(
        "tensor-parallel-128",
        SERVER,
        {"spec.tensorParallelSize": 128},
        "tensorParallelSize must be a power of two from 1 to 64",
    ),
    Rejection(
        "lora-rank-vllm",
        SERVER,
        {"spec.maxLoraRank": 100},
        "maxLoraRank must be one of 1, 8, 16, 32, 64, 128, 256, 320, 512",
    ),
    Rejection(
        "rollout-all-zero",
        SERVER,
        {"spec.rollout": {"maxSurge": 0, "maxUnavailable": "0%"}},
        "rollout.maxSurge and rollout.maxUnavailable may not both be 0",
    ),
    Rejection(
        "rollout-number-as-text",
        SERVER,
        {"spec.rollout": {"maxSurge": "5"}},
        "neither a number of replicas nor a percentage such as 25%",
        "spec.rollout.maxSurge in body should match '^[0-9]+%$'",
    ),
    Rejection(
        "autoscaling-min-above-max",
        SERVER,
        {"spec.autoscaling": {"minReplicas": 4, "maxReplicas": 2}},
        "autoscaling.minReplicas must not be above autoscaling.maxReplicas",
    ),
    Rejection(
        "allowed-client-empty",
        SERVER,
        {"spec.allowedClients": [{}]},
        "each allowedClients entry needs a namespaceSelector, a podSelector or both",
    ),
    Rejection(
        "context-beyond-rope-scaling",
        SERVER,
        {"spec.ropeScaling": {"factor": 2, "originalMaxPositionEmbeddings": 32768}},
        "maxModelLen must not exceed ropeScaling.factor x ropeScaling.originalMaxPositionEmbeddings",
    ),
    Rejection(
        "temperature",
        SERVER,
        {"spec.generationDefaults.temperature": 3},
        "less than or equal to 2",
        "should be less than or equal to 2",
    ),
    Rejection(
        "unknown-field", SFT, {"spec.lorra": {"r": 8}}, "Extra inputs are not permitted", 'unknown field "spec.lorra"'
    ),
]

# Changes to an existing object that the API server must refuse (CEL transition rules).
IMMUTABLE = [
    ("method", {"spec.method": "DPO", "spec.dataset.format": "auto"}, "method is immutable"),
    ("base-model", {"spec.baseModel.uri": "hf://Qwen/Qwen2.5-14B"}, "baseModel.uri is immutable"),
]
