"""The demo's manifests and datasets are what the API and the trainer accept."""

from __future__ import annotations

from kubetune.api.v1alpha1 import FineTuneJob, ModelServer
from kubetune.config import OperatorConfig
from kubetune.dev import demo
from kubetune.dev.__main__ import parser
from kubetune.dev.agent import daemons
from kubetune.dev.agent.node import dev_gpu_node, node_manifest
from kubetune.render import modelserver


def test_demo_jobs_and_server_validate_against_the_api() -> None:
    sft = FineTuneJob.model_validate(demo.finetunejob(demo.SFT_JOB, "SFT", "sft.jsonl", demo.SFT_STEPS))
    dpo = FineTuneJob.model_validate(
        demo.finetunejob(demo.DPO_JOB, "DPO", "dpo.jsonl", demo.DPO_STEPS, fromFineTuneJob=demo.SFT_JOB)
    )
    server = ModelServer.model_validate(demo.model_server())
    assert sft.spec.resources.gpus_per_node == 1
    assert dpo.spec.from_fine_tune_job == demo.SFT_JOB
    assert server.spec.ui.enabled
    assert server.spec.adapter_selector is not None
    assert sft.metadata.labels == dpo.metadata.labels == server.spec.adapter_selector.match_labels


def test_demo_datasets_have_the_trainer_formats() -> None:
    assert all(set(r) == {"prompt", "response"} for r in demo.sft_records())
    pairs = demo.preference_records()
    assert all(set(r) == {"prompt", "chosen", "rejected"} and r["chosen"] != r["rejected"] for r in pairs)
    # DPO moves one token: each pair differs in its last character only, and rejects what SFT taught.
    taught = {r["prompt"]: r["response"] for r in demo.sft_records()}
    assert all(r["chosen"][:-1] == r["rejected"][:-1] == taught[r["prompt"]][:-1] for r in pairs)
    assert [r["prompt"] for r in pairs] == demo.QUESTIONS


def test_dev_demo_subcommand() -> None:
    args = parser().parse_args(["demo", "--no-serve"])
    assert args.command == "demo" and args.no_serve


def test_dev_operator_puts_chat_pages_on_the_agents_node() -> None:
    node = node_manifest(dev_gpu_node())
    ui = modelserver.ui_deployment(
        ModelServer.model_validate({**demo.model_server(), "metadata": {"name": "s", "namespace": "n"}}),
        daemons.dev_operator_config(agent=True),
    )["spec"]["template"]["spec"]
    assert all(node["metadata"]["labels"].get(k) == v for k, v in ui["nodeSelector"].items())
    for taint in node["spec"]["taints"]:
        assert any(t["key"] == taint["key"] and t["effect"] == taint["effect"] for t in ui["tolerations"]), taint
    assert daemons.dev_operator_config(agent=False) == OperatorConfig()
