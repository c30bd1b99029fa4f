"""Child manifests rendered from the examples, checked against golden files and for the contract."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from kubetune import storage
from kubetune.api.v1alpha1 import FineTuneJob, ModelServer, Plan, S3Access
from kubetune.api.v1alpha1.base import EnvVar
from kubetune.config import OperatorConfig, UnknownGpuType
from kubetune.render import finetunejob, modelserver, trainer_access
from kubetune.render.common import ANNOTATION_SPEC_HASH
from kubetune.trainer import cache
from tests.rejections import EXAMPLES

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "golden"
CONFIG = OperatorConfig()
PLAN = Plan(zero_stage=3, micro_batch_size=1, gradient_accumulation_steps=16, gradient_checkpointing=True, world_size=4)


def load_ftj(name: str) -> FineTuneJob:
    body = yaml.safe_load((EXAMPLES / name).read_text())
    body["metadata"] |= {"namespace": "team-a", "uid": "11111111-2222-3333-4444-555555555555", "generation": 1}
    return FineTuneJob.model_validate(body)


def load_server() -> ModelServer:
    body = yaml.safe_load((EXAMPLES / "modelserver.yaml").read_text())
    body["metadata"] |= {"namespace": "team-a", "uid": "66666666-2222-3333-4444-555555555555", "generation": 1}
    return ModelServer.model_validate(body)


def check_golden(name: str, manifests: list[dict]) -> None:
    text = yaml.safe_dump_all(manifests, sort_keys=False)
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") or not path.exists():
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; rerun with UPDATE_GOLDEN=1 and review the diff"


def test_finetunejob_children_match_golden() -> None:
    check_golden("finetunejob-sft.yaml", finetunejob.children(load_ftj("finetunejob-sft.yaml"), PLAN, CONFIG))


def test_dpo_children_mount_the_init_adapter() -> None:
    children = finetunejob.children(load_ftj("finetunejob-dpo.yaml"), PLAN, CONFIG, "pvc://adapters/qwen-sft/adapter")
    check_golden("finetunejob-dpo.yaml", children)
    annotations = children[-1]["spec"]["template"]["metadata"]["annotations"]
    config = yaml.safe_load(annotations[finetunejob.ANNOTATION_TRAINER_CONFIG])
    assert config["initAdapterUri"] == "pvc://adapters/qwen-sft/adapter"


def test_training_job_contract() -> None:
    ftj = load_ftj("finetunejob-sft.yaml")
    children = finetunejob.children(ftj, PLAN, CONFIG)
    assert [(c["kind"], c["metadata"]["name"]) for c in children] == [
        ("ServiceAccount", "kubetune-trainer"),  # the namespace's, shared by its jobs: no owner
        ("Role", "kubetune-trainer"),
        ("RoleBinding", "kubetune-trainer"),
        ("Job", "qwen-sft"),  # one node: no Service
    ]
    job = children[-1]
    for child in children:
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune-operator"
        assert child["metadata"]["namespace"] == "team-a"
    assert not any("ownerReferences" in c["metadata"] for c in children[:3])
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == ("FineTuneJob", "qwen-sft", True)
    assert job["spec"]["template"]["spec"]["serviceAccountName"] == "kubetune-trainer"
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 1, 1)
    # The first failed pod fails the Job and stops the others: the group restarts as one (the operator decides).
    rules = spec["podFailurePolicy"]["rules"]
    assert spec["backoffLimit"] == 0 and [r["action"] for r in rules] == ["FailJob", "FailJob"]
    assert rules[0]["onExitCodes"]["values"] == [3] and rules[1]["onPodConditions"] == [{"type": "DisruptionTarget"}]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["kubetune", "train", "--config", "/etc/kubetune/trainer.yaml"]
    # The trainer reads its configuration from its own pod's annotation, shown as that file (no ConfigMap).
    config_volume = next(v for v in pod["volumes"] if v["name"] == "config")
    (item,) = config_volume["downwardAPI"]["items"]
    field = "metadata.annotations['kubetune.io/trainer-config']"
    assert item == {"path": "trainer.yaml", "fieldRef": {"fieldPath": field}}
    config = yaml.safe_load(spec["template"]["metadata"]["annotations"]["kubetune.io/trainer-config"])
    assert config["job"]["name"] == "qwen-sft" and config["plan"]["worldSize"] == PLAN.world_size
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-GeForce-RTX-4090-D"}
    env = {e["name"]: e for e in container["env"]}
    assert env["MASTER_ADDR"]["value"] == "127.0.0.1"
    assert env["NNODES"]["value"] == "1" and env["NPROC_PER_NODE"]["value"] == "4"
    assert "job-completion-index" in env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/mnt/pvc/adapters"]["readOnly"] is False
    assert mounts["/mnt/pvc/datasets"]["readOnly"] is True
    assert "/dev/shm" in mounts
    assert "subdomain" not in pod and pod["restartPolicy"] == "Never"


def test_the_trainer_role_allows_only_patching_finetunejob_status() -> None:
    account, role, binding = trainer_access.namespace_objects("team-a")
    assert role["rules"] == [{"apiGroups": ["kubetune.io"], "resources": ["finetunejobs/status"], "verbs": ["patch"]}]
    subject = {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "team-a"}
    assert binding["subjects"] == [subject]
    assert trainer_access.is_trainer_access(role["metadata"]["labels"])


def test_the_status_policy_applies_to_the_trainer_account_only() -> None:
    policy, binding = trainer_access.status_policy()
    (condition,) = policy["spec"]["matchConditions"]
    assert ":kubetune-trainer'" in condition["expression"]
    assert policy["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == ["finetunejobs/status"]
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}


def test_suspend_does_not_change_the_job_hash_but_hyperparameters_do() -> None:
    ftj = load_ftj("finetunejob-sft.yaml")

    def job_hash(f: FineTuneJob) -> str:
        return finetunejob.children(f, PLAN, CONFIG)[-1]["metadata"]["annotations"][ANNOTATION_SPEC_HASH]

    suspended = ftj.model_copy(update={"spec": ftj.spec.model_copy(update={"suspend": True})})
    assert job_hash(suspended) == job_hash(ftj)
    assert finetunejob.children(suspended, PLAN, CONFIG)[-1]["spec"]["suspend"] is True
    hp = ftj.spec.hyperparameters.model_copy(update={"learning_rate": 1e-4})
    changed = ftj.model_copy(update={"spec": ftj.spec.model_copy(update={"hyperparameters": hp})})
    assert job_hash(changed) != job_hash(ftj)


def test_an_unknown_gpu_type_is_refused_with_the_configured_ones() -> None:
    # A pod planned for a GPU that the installation cannot select must not land on whatever GPU node is free.
    ftj = load_ftj("finetunejob-sft.yaml")
    res = ftj.spec.resources.model_copy(update={"gpu_type": "b200"})
    odd = ftj.model_copy(update={"spec": ftj.spec.model_copy(update={"resources": res})})
    with pytest.raises(UnknownGpuType, match=r"gpuType b200 is not configured .*configured: a100-40gb, .*rtx-4090d"):
        finetunejob.children(odd, PLAN, CONFIG)


def test_no_gpu_type_at_all_means_any_gpu_node() -> None:
    ftj = load_ftj("finetunejob-sft.yaml")
    res = ftj.spec.resources.model_copy(update={"gpu_type": None})
    plain = ftj.model_copy(update={"spec": ftj.spec.model_copy(update={"resources": res})})
    pod = finetunejob.children(plain, PLAN, CONFIG)[-1]["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_expected_children_name_what_children_renders() -> None:
    ftj = load_ftj("finetunejob-sft.yaml")
    for nodes in (1, 2):
        res = ftj.spec.resources.model_copy(update={"nodes": nodes, "gpus_per_node": 1})
        job = ftj.model_copy(update={"spec": ftj.spec.model_copy(update={"resources": res})})
        rendered = [(c["kind"], c["metadata"]["name"]) for c in finetunejob.children(job, PLAN, CONFIG)]
        meta = job.metadata
        expected = finetunejob.expected_children(meta.namespace, meta.name, nodes)
        assert [(c["kind"], c["metadata"]["name"]) for c in expected] == rendered


def test_modelserver_services_go_before_its_pods() -> None:
    # A Service whose name someone else holds stops the writes before any server pod starts for it.
    kinds = [c["kind"] for c in modelserver.children(load_server(), [], CONFIG)]
    assert kinds == ["Service", "Service", "Deployment", "Deployment"]  # the example enables the chat page


def test_modelserver_children_match_golden() -> None:
    locations = ["pvc://adapters/qwen-sft/adapter"]
    check_golden("modelserver.yaml", modelserver.children(load_server(), locations, CONFIG))


def test_s3_secrets_go_to_the_fetcher_only_and_an_s3_model_is_downloaded_first() -> None:
    server = load_server()
    model = server.spec.base_model.model_copy(
        update={"uri": "s3://models/qwen", "secret_ref": None, "s3": S3Access(secret_name="model-creds")}
    )
    server = server.model_copy(update={"spec": server.spec.model_copy(update={"base_model": model})})
    children = modelserver.children(server, ["s3://bucket/a"], CONFIG, ["adapter-creds"])
    deployment = next(c for c in children if c["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    vllm, fetcher = pod["containers"]
    mounts = {
        c["name"]: {m["mountPath"] for m in c["volumeMounts"]} for c in [*pod["containers"], *pod["initContainers"]]
    }
    assert "/var/run/secrets/kubetune/s3/adapter-creds" in mounts["fetcher"]
    assert not any(path.startswith("/var/run/secrets/kubetune") for path in mounts["vllm"])
    assert "/var/run/secrets/kubetune/s3/model-creds" in mounts["model"]
    assert "/var/cache/kubetune" in mounts["vllm"] & mounts["fetcher"] & mounts["model"]  # the shared downloads
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["s3-adapter-creds"]["secret"] == {"secretName": "adapter-creds", "optional": True}
    assert volumes["s3-model-creds"]["secret"] == {"secretName": "model-creds"}
    (init,) = pod["initContainers"]
    assert init["command"] == ["kubetune", "fetcher", "--download", "s3://models/qwen", "--secret-name", "model-creds"]
    assert vllm["args"][:2] == ["--model", "/var/cache/kubetune/s3/models/qwen"]
    assert fetcher["command"][:2] == ["kubetune", "fetcher"]


def with_model(server: ModelServer, uri: str, s3: S3Access | None = None) -> ModelServer:
    model = server.spec.base_model.model_copy(update={"uri": uri, "secret_ref": None, "s3": s3})
    return server.model_copy(update={"spec": server.spec.model_copy(update={"base_model": model})})


def test_an_s3_model_is_read_from_the_cache_claim_which_only_the_init_container_writes() -> None:
    server = with_model(load_server(), "s3://models/qwen", S3Access(secret_name="model-creds"))
    children = modelserver.children(server, [], CONFIG, cache_claim="kubetune-cache")
    pod = next(c for c in children if c["kind"] == "Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    vllm, fetcher = pod["containers"]
    entry = f"/var/cache/kubetune-shared/entries/{storage.model_entry_key('s3://models/qwen')}/model"
    # The same entry as a FineTuneJob's prepare step on this model (trainer/cache.py keys: URI and revision).
    assert entry.split("/")[-2] == cache.entry_key("s3://models/qwen", None)
    assert vllm["args"][:2] == ["--model", entry]
    assert init["command"][-2:] == ["--cache", "/var/cache/kubetune-shared"]

    def shared(container: dict) -> list[dict]:
        return [m for m in container["volumeMounts"] if m["mountPath"] == "/var/cache/kubetune-shared"]

    assert [m["readOnly"] for m in shared(init)] == [False]
    assert [m["readOnly"] for m in shared(vllm)] == [True] and shared(fetcher) == []
    (volume,) = [v for v in pod["volumes"] if v["name"] == "shared-cache"]
    assert volume["persistentVolumeClaim"] == {"claimName": "kubetune-cache", "readOnly": False}


def test_an_hf_model_is_read_from_the_cache_through_the_link_the_init_container_makes() -> None:
    server = with_model(load_server(), "hf://Qwen/Qwen2.5-7B-Instruct@main", None)
    env = [EnvVar(name="HF_ENDPOINT", value="http://hub.internal")]
    server = server.model_copy(update={"spec": server.spec.model_copy(update={"env": env})})
    pod = next(
        c
        for c in modelserver.children(server, [], CONFIG, "key", cache_claim="kubetune-cache")
        if c["kind"] == "Deployment"
    )["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    vllm = pod["containers"][0]
    # The commit is resolved in the pod: vLLM reads the link to its entry, without --revision.
    assert vllm["args"][:2] == ["--model", modelserver.MODEL_LINK] and "--revision" not in vllm["args"]
    assert init["command"][-5:] == [
        "hf://Qwen/Qwen2.5-7B-Instruct@main",
        "--link",
        modelserver.MODEL_LINK,
        "--cache",
        "/var/cache/kubetune-shared",
    ]
    # The init container has the Hub's endpoint (and a token when spec.baseModel has one), not the API key.
    assert {e["name"] for e in init["env"]} >= {"HF_ENDPOINT"} and all(
        not e["name"].startswith("VLLM_") for e in init["env"]
    )

    def mounted(container: dict, path: str) -> list[bool]:
        return [bool(m.get("readOnly")) for m in container["volumeMounts"] if m["mountPath"] == path]

    assert mounted(init, "/var/cache/kubetune-shared") == [False] and mounted(vllm, "/var/cache/kubetune-shared") == [
        True
    ]
    assert mounted(init, modelserver.MODEL_LINK_DIR) == [False] and mounted(vllm, modelserver.MODEL_LINK_DIR) == [True]
    # The prepare steps keep every commit's entry of the repository (a glob of keys), the one the pod links included.
    pattern = modelserver.cache_entry("hf://Qwen/Qwen2.5-7B-Instruct@main")
    assert pattern is not None and pattern.endswith("-*")
    key = storage.model_entry_key("hf://Qwen/Qwen2.5-7B-Instruct@v1", "0" * 40)
    assert cache.choose_evictions([cache.Entry(key, 10, 0.0)], 0, 0, [pattern], 1.0) == []
    other = storage.model_entry_key("hf://Qwen/Qwen2.5-0.5B", "0" * 40)
    assert cache.choose_evictions([cache.Entry(other, 10, 0.0)], 0, 0, [pattern], 1.0) == [other]


@pytest.mark.parametrize("uri", ["s3://models/qwen", "hf://Qwen/Qwen2.5-7B-Instruct", "pvc://models/qwen"])
def test_without_a_cache_claim_or_for_models_it_does_not_hold_the_server_is_unchanged(uri: str) -> None:
    server = with_model(load_server(), uri, S3Access(secret_name="c") if uri.startswith("s3") else None)
    plain = modelserver.children(server, [], CONFIG)
    assert modelserver.children(server, [], CONFIG, cache_claim=None) == plain
    with_claim = modelserver.children(server, [], CONFIG, cache_claim="kubetune-cache")
    assert (with_claim == plain) == uri.startswith("pvc://")  # a pvc:// model is on its claim
    assert (modelserver.cache_entry(uri) is None) == uri.startswith("pvc://")
    if uri.startswith("hf://"):  # without the claim, vLLM downloads it itself at the revision
        assert modelserver.server_arguments(server, CONFIG)[:2] == ["--model", "Qwen/Qwen2.5-7B-Instruct"]


def test_vllm_arguments() -> None:
    server = load_server()
    args = modelserver.server_arguments(server, CONFIG)
    joined = " ".join(args)
    assert "--model Qwen/Qwen2.5-7B" in joined
    assert "--tensor-parallel-size 4" in joined and "--max-model-len 131072" in joined
    assert "--enable-prefix-caching" in args and "--enable-lora" in args
    assert "--served-model-name qwen-7b" in joined
    # Adapters are loaded at run time, never on the command line: a new one does not roll the Deployment.
    assert "--lora-modules" not in args
    override = args[args.index("--override-generation-config") + 1]
    assert yaml.safe_load(override) == {
        "max_new_tokens": 1024,
        "repetition_penalty": 1.1,
        "temperature": 0.7,
        "top_p": 0.9,
    }
    assert args[-1] == "--gpu-memory-utilization=0.92"


def test_installation_server_args_come_before_the_users() -> None:
    config = OperatorConfig.model_validate({"server": {"extraArgs": ["--kv-cache-memory-bytes", "67108864"]}})
    args = modelserver.server_arguments(load_server(), config)
    assert args[-3:] == ["--kv-cache-memory-bytes", "67108864", "--gpu-memory-utilization=0.92"]


def test_new_adapter_on_a_mounted_claim_does_not_change_the_deployment() -> None:
    server = load_server()
    one = modelserver.children(server, ["pvc://adapters/a/adapter"], CONFIG)
    two = modelserver.children(server, ["pvc://adapters/a/adapter", "pvc://adapters/b/adapter"], CONFIG)
    assert one == two


def test_server_deployment_for_production() -> None:
    config = OperatorConfig.model_validate({"server": {"modelCacheClaim": "model-cache"}})
    pod = modelserver.deployment(load_server(), [], config)["spec"]["template"]
    container = pod["spec"]["containers"][0]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["cache"] == {"name": "cache", "persistentVolumeClaim": {"claimName": "model-cache"}}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"] >= 1800
    assert container["lifecycle"]["preStop"] and pod["spec"]["terminationGracePeriodSeconds"] == 60
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("hf://Qwen/Qwen2.5-7B@abc123", ["--model", "Qwen/Qwen2.5-7B", "--revision", "abc123"]),
        ("pvc://models/qwen/7b", ["--model", "/mnt/pvc/models/qwen/7b"]),
    ],
)
def test_model_arguments(uri: str, expected: list[str]) -> None:
    assert modelserver.model_arguments(uri) == expected


def test_chat_page_goes_where_the_installation_says() -> None:
    anywhere = modelserver.ui_deployment(load_server(), CONFIG)["spec"]["template"]["spec"]
    assert "nodeSelector" not in anywhere and "tolerations" not in anywhere
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    config = OperatorConfig.model_validate(
        {"uiScheduling": {"nodeSelector": {"pool": "web"}, "tolerations": [toleration]}}
    )
    placed = modelserver.ui_deployment(load_server(), config)["spec"]["template"]["spec"]
    assert placed["nodeSelector"] == {"pool": "web"} and placed["tolerations"] == [toleration]


def test_multi_node_job_rendezvous_through_a_headless_service() -> None:
    ftj = load_ftj("finetunejob-sft.yaml")
    two_nodes = ftj.model_copy(
        update={"spec": ftj.spec.model_copy(update={"resources": ftj.spec.resources.model_copy(update={"nodes": 2})})}
    )
    children = finetunejob.children(two_nodes, PLAN, CONFIG)
    assert [c["kind"] for c in children] == ["ServiceAccount", "Role", "RoleBinding", "Service", "Job"]
    service, job = children[3], children[4]
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == "qwen-sft-trainer"
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["MASTER_ADDR"]["value"] == "qwen-sft-0.qwen-sft-trainer.team-a.svc" and env["NNODES"]["value"] == "2"


def test_every_pod_meets_the_restricted_standard_unless_the_installation_says_otherwise() -> None:
    ftj = load_ftj("finetunejob-sft.yaml")
    server = load_server()

    def pod_specs(config: OperatorConfig) -> list[dict]:
        job = finetunejob.children(ftj, PLAN, config)[-1]
        return [
            job["spec"]["template"]["spec"],
            modelserver.deployment(server, [], config)["spec"]["template"]["spec"],
            modelserver.ui_deployment(server, config)["spec"]["template"]["spec"],
        ]

    for pod in pod_specs(CONFIG):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            }
    rootful = OperatorConfig.model_validate({"podSecurityContext": {}, "containerSecurityContext": {}})
    for pod in pod_specs(rootful):
        assert "securityContext" not in pod
        assert all("securityContext" not in c for c in pod["containers"])
