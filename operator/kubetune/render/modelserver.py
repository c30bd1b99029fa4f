"""A ModelServer's children: the vLLM Deployment and its Service (and the chat page when ui.enabled; the
NetworkPolicy and the KEDA ScaledObject are render/traffic.py's).

Adapters are not part of the Deployment: the operator loads them into the running replicas through vLLM's
runtime LoRA API, so a new adapter never restarts the server. The Deployment only makes their storage
visible: every claim an adapter is or will be written to is mounted read-only, and the adapter fetcher beside
vLLM (`kubetune fetcher`) gets the Secrets of s3:// adapters and downloads those into the cache volume that
both containers share. An s3:// base model is downloaded by an init container before vLLM starts; when the
namespace has the cache claim (docs/cache.md), into the cache entry a FineTuneJob's prepare step fills (or not at
all, when it is there), which vLLM then reads read-only.

The replica count is always spec.replicas: autoscalers scale the ModelServer (its scale subresource), never
the Deployment, so the operator is the one writer of the Deployment's replicas. A replica joins the Service
only once it has every adapter (the readiness gate ADAPTERS_GATE, which the operator sets), and the vLLM
container's termination message holds vLLM's error (`kubetune engine`).
"""

from __future__ import annotations

import json
from typing import Any

from kubetune.api.v1alpha1 import ModelServer
from kubetune.config import OperatorConfig, SecretKeyRef
from kubetune.planner.engine import rope_theta
from kubetune.render import traffic
from kubetune.render.common import (
    LABEL_MODELSERVER,
    Manifest,
    PodParts,
    cache_and_shm_parts,
    cache_parts,
    credential_parts,
    labels,
    merge_parts,
    metadata,
    resource_limits,
    s3_secret_parts,
    secured,
    storage_parts,
    user_env,
)
from kubetune.storage import CACHE_ROOT, SHARED_CACHE_ROOT, cached_model_dir, local_path, model_entries, parse

SERVER_CONTAINER = "vllm"
FETCHER_CONTAINER = "fetcher"
MODEL_INIT_CONTAINER = "model"
MODEL_LINK_DIR = "/var/run/kubetune-model"
"""An emptyDir where the init container links an hf:// model's cache entry (the commit is known in the pod only)."""
MODEL_LINK = f"{MODEL_LINK_DIR}/model"
# A replica is Ready (and in the Service) only once the operator has set this condition on its pod: when it
# has loaded every adapter it can (controllers/serving.py).
ADAPTERS_GATE = "kubetune.io/adapters-loaded"
API_KEY_VARIABLE = "VLLM_API_KEY"
# Asks vLLM for the API key on every route, not only under /v1 (server/auth.py says why).
AUTH_MIDDLEWARE = "kubetune.server.auth.RequireApiKey"


def served_name(server: ModelServer) -> str:
    return server.spec.base_model.served_name or server.metadata.name


def endpoint(server: ModelServer, config: OperatorConfig) -> str:
    """The OpenAI-compatible base URL inside the cluster."""
    return f"http://{server.metadata.name}.{server.metadata.namespace}.svc:{config.server_port}/v1"


def ui_endpoint(server: ModelServer, config: OperatorConfig) -> str:
    return f"http://{server.metadata.name}-ui.{server.metadata.namespace}.svc:{config.ui_port}/"


def api_key_ref(server: ModelServer, config: OperatorConfig) -> SecretKeyRef | None:
    """The Secret key that holds the server's API key: its own auth, else the installation's default."""
    if server.spec.auth is not None:
        ref = server.spec.auth.api_key_secret_ref
        return SecretKeyRef(name=ref.name, key=ref.key)
    return config.server.api_key_secret_ref


def api_key_env(ref: SecretKeyRef | None, variable: str = API_KEY_VARIABLE) -> list[Manifest]:
    """The API key as an environment variable from its Secret (never its value)."""
    if ref is None:
        return []
    return [{"name": variable, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def rope_overrides(server: ModelServer) -> dict[str, Any] | None:
    """vLLM's --hf-overrides for ropeScaling. vLLM derives the longest context of a YaRN model from an already
    scaled max_position_embeddings, and the override replaces the model's whole RoPE configuration, so both go
    in, with the RoPE base."""
    scaling = server.spec.rope_scaling
    if scaling is None:
        return None
    parameters: dict[str, Any] = {
        "rope_type": scaling.type,
        "factor": scaling.factor,
        "original_max_position_embeddings": scaling.original_max_position_embeddings,
    }
    if (theta := rope_theta(server.spec)) is not None:
        parameters["rope_theta"] = theta
    positions = int(scaling.factor * scaling.original_max_position_embeddings)
    return {"rope_scaling": parameters, "max_position_embeddings": positions}


def cache_entry(uri: str) -> str | None:
    """The cache entries (docs/cache.md) a server's pods read their base model from when the namespace has the
    cache claim, which the init container fills: that of an s3:// model, any commit of an hf:// one (a key
    pattern: the pod resolves the revision). A pvc:// model is on its claim."""
    return model_entries(uri) if parse(uri).scheme in ("s3", "hf") else None


def model_arguments(uri: str, cached: bool = False) -> list[str]:
    """vLLM's --model (and --revision) for a base model URI; `cached`: read from the model cache (an hf:// model
    through the link the init container made to the entry of the commit it resolved)."""
    loc = parse(uri)
    if loc.scheme == "hf" and cached:
        return ["--model", MODEL_LINK]
    if loc.scheme == "hf":
        args = ["--model", f"{loc.root}/{loc.path}"]
        return args + (["--revision", loc.revision] if loc.revision else [])
    return ["--model", cached_model_dir(uri) if cached else local_path(uri)]


def server_arguments(server: ModelServer, config: OperatorConfig, cached: bool = False) -> list[str]:
    """The vLLM OpenAI server's command-line arguments: the operator's own, the installation's
    (config.server.extraArgs), then the user's spec.engineArgs, so that later ones win. `cached`: the base model
    is read from the model cache."""
    spec = server.spec
    g = spec.generation_defaults
    overrides: dict[str, Any] = {
        "temperature": g.temperature,
        "top_p": g.top_p,
        "repetition_penalty": g.repetition_penalty,
    }
    if g.max_tokens is not None:
        overrides["max_new_tokens"] = g.max_tokens
    args = [
        *model_arguments(spec.base_model.uri, cached),
        "--served-model-name",
        served_name(server),
        "--host",
        "0.0.0.0",
        "--port",
        str(config.server_port),
        "--tensor-parallel-size",
        str(spec.tensor_parallel_size),
        "--enable-prefix-caching" if spec.enable_prefix_caching else "--no-enable-prefix-caching",
        "--enable-lora",
        "--max-loras",
        str(spec.max_loras),
        "--max-lora-rank",
        str(spec.max_lora_rank),
        # Decoding defaults come from the spec alone, not from the model's generation_config.json.
        "--generation-config",
        "vllm",
        "--override-generation-config",
        json.dumps(overrides, sort_keys=True),
    ]
    if spec.max_model_len:
        args += ["--max-model-len", str(spec.max_model_len)]
    if (rope := rope_overrides(server)) is not None:
        args += ["--hf-overrides", json.dumps(rope, sort_keys=True)]
    if api_key_ref(server, config) is not None:
        args += ["--middleware", AUTH_MIDDLEWARE]
    return args + list(config.server.extra_args) + list(spec.engine_args)


def _meta(server: ModelServer, name: str, component: str) -> dict[str, Any]:
    return metadata(name, server.metadata.namespace, server, labels(LABEL_MODELSERVER, server.metadata.name, component))


def children(
    server: ModelServer,
    adapter_locations: list[str],
    config: OperatorConfig,
    adapter_secrets: list[str] | None = None,
    operator_key: str = "",
    cache_claim: str | None = None,
) -> list[Manifest]:
    """Every object the operator applies for a ModelServer, in creation order; `adapter_locations` are the URIs of
    its adapters, present and future (pvc:// ones are mounted), `adapter_secrets` the Secrets of its s3:// adapters,
    `operator_key` the public key the adapter fetchers check the operator's requests with, `cache_claim` the
    model cache's claim in the server's namespace, if it has one.
    The Services go first: when a name is taken by someone else, no pod has started for it yet; the NetworkPolicy
    (when the installation renders them) before any pod it guards."""
    ui = server.spec.ui.enabled
    policy = config.server.network_policy.enabled
    return [
        service(server, config),
        *([ui_service(server, config)] if ui else []),
        *([traffic.network_policy(server, config)] if policy else []),
        deployment(server, adapter_locations, config, adapter_secrets or [], operator_key, cache_claim),
        *([ui_deployment(server, config)] if ui else []),
    ]


def _probe(path: str, port: int, period: int, failures: int) -> Manifest:
    return {
        "httpGet": {"path": path, "port": port},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": 5,
    }


def _model_cache_parts(config: OperatorConfig) -> PodParts:
    """The download cache on a shared claim when configured, so that replicas and restarts reuse the weights."""
    claim = config.server.model_cache_claim
    if not claim:
        return PodParts()
    return PodParts(
        volumes=[{"name": "cache", "persistentVolumeClaim": {"claimName": claim}}],
        mounts=[{"name": "cache", "mountPath": CACHE_ROOT}],
    )


def fetcher_env(config: OperatorConfig, key: SecretKeyRef | None, operator_key: str) -> list[Manifest]:
    """Who the fetcher answers (the operator's public key, for this pod) and where vLLM is, with its key."""
    return [
        {"name": "KUBETUNE_OPERATOR_PUBLIC_KEY", "value": operator_key},
        {"name": "KUBETUNE_POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "KUBETUNE_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "KUBETUNE_VLLM_ADDRESS", "value": f"$(KUBETUNE_POD_IP):{config.server_port}"},
        *api_key_env(key),
    ]


def fetcher_container(
    image: str, storage: PodParts, secrets: PodParts, config: OperatorConfig, env: list[Manifest]
) -> Manifest:
    """The adapter fetcher: the same cache and claims as vLLM, and the s3:// adapters' Secrets, which vLLM lacks."""
    port = config.server.fetcher_port
    return {
        "name": FETCHER_CONTAINER,
        "image": image,
        "command": ["kubetune", "fetcher", "--host", "0.0.0.0", "--port", str(port)],
        "env": env,
        "ports": [{"name": "fetcher", "containerPort": port}],
        "volumeMounts": [dict(m) for m in merge_parts([storage, secrets]).mounts if m["mountPath"] != "/dev/shm"],
        "readinessProbe": _probe("/health", port, 10, 3),
        "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
    }


def model_init_container(
    server: ModelServer, image: str, mounts: list[Manifest], cached: bool, env: list[Manifest] | None = None
) -> Manifest:
    """Downloads an s3:// base model to the path vLLM's --model names, before vLLM starts; `cached`: that path is
    in the model cache, which this container alone mounts writable. With the cache, an hf:// model too: its
    revision resolved to a commit (with `env`: HF_TOKEN, HF_ENDPOINT), the commit's entry used or filled, and
    linked at MODEL_LINK."""
    model = server.spec.base_model
    access = model.s3
    args = [model.uri]
    if parse(model.uri).scheme == "hf":
        args += ["--link", MODEL_LINK]
    if access and access.secret_name:
        args += ["--secret-name", access.secret_name]
    if access and access.endpoint:
        args += ["--endpoint", access.endpoint]
    if access and access.region:
        args += ["--region", access.region]
    if cached:
        args += ["--cache", SHARED_CACHE_ROOT]
    return {
        "name": MODEL_INIT_CONTAINER,
        "image": image,
        "command": ["kubetune", "fetcher", "--download", *args],
        **({"env": env} if env else {}),
        "volumeMounts": [dict(m) for m in mounts],
    }


def deployment(
    server: ModelServer,
    adapter_locations: list[str],
    config: OperatorConfig,
    adapter_secrets: list[str] | None = None,
    operator_key: str = "",
    cache_claim: str | None = None,
) -> Manifest:
    spec = server.spec
    key = api_key_ref(server, config)
    name = server.metadata.name
    image = spec.image or config.images.server
    # The model cache: written by the init container only; vLLM reads the model from it.
    cached = bool(cache_claim) and cache_entry(spec.base_model.uri) is not None
    hf_cached = cached and parse(spec.base_model.uri).scheme == "hf"
    model_cache = cache_parts(cache_claim if cached else None, writable=True)
    if hf_cached:
        link = {"name": "model-link", "mountPath": MODEL_LINK_DIR}
        model_cache = model_cache + PodParts(volumes=[{"name": "model-link", "emptyDir": {}}], mounts=[link])
    read_only_cache = PodParts(mounts=[{**m, "readOnly": True} for m in model_cache.mounts])
    storage = merge_parts(
        [
            _model_cache_parts(config),
            cache_and_shm_parts(),
            storage_parts([(spec.base_model.uri, False), *((uri, False) for uri in adapter_locations)]),
        ]
    )
    parts = merge_parts(
        [
            storage,
            read_only_cache,
            credential_parts(spec.base_model.uri, spec.base_model.secret_ref),
            PodParts(env=[{"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"}, *api_key_env(key)]),
            PodParts(env=user_env(spec.env)),
        ]
    )
    # Adapters may arrive before their Secret: optional, so that the server starts anyway.
    adapter_secret_parts = s3_secret_parts(adapter_secrets or [], optional=True)
    model_secret = s3_secret_parts([spec.base_model.s3.secret_name if spec.base_model.s3 else None])
    gpu = config.gpu_type(spec.gpu_type)
    pod_labels = labels(LABEL_MODELSERVER, name, "server")
    annotations = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(config.server_port),
        "prometheus.io/path": "/metrics",
    }
    if spec.pod_metadata:
        pod_labels = {**spec.pod_metadata.labels, **pod_labels}
        annotations |= spec.pod_metadata.annotations
    container = {
        "name": SERVER_CONTAINER,
        "image": image,
        # vLLM's OpenAI server, whose error becomes the termination message (server/engine.py); the log's tail
        # when the wrapper itself could not write it.
        "command": ["kubetune", "engine"],
        "args": server_arguments(server, config, cached),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "env": parts.env,
        "ports": [{"name": "http", "containerPort": config.server_port}],
        "resources": resource_limits(spec.tensor_parallel_size, spec.resources.cpu, spec.resources.memory),
        "volumeMounts": parts.mounts,
        # Model loads can take many minutes: the startup probe allows 30 before liveness starts.
        "startupProbe": _probe("/health", config.server_port, 10, 180),
        "readinessProbe": _probe("/health", config.server_port, 5, 3),
        "livenessProbe": _probe("/health", config.server_port, 10, 6),
        # Let the load balancer stop sending requests before vLLM begins to drain; on SIGTERM vLLM finishes
        # the requests it has within the grace period.
        "lifecycle": {"preStop": {"sleep": {"seconds": 5}}},
    }
    pod_spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": config.server.termination_grace_seconds,
        "containers": [
            container,
            fetcher_container(image, storage, adapter_secret_parts, config, fetcher_env(config, key, operator_key)),
        ],
        "readinessGates": [{"conditionType": ADAPTERS_GATE}],
        "volumes": merge_parts([parts, model_cache, adapter_secret_parts, model_secret]).volumes,
    }
    if parse(spec.base_model.uri).scheme == "s3" or hf_cached:
        mounts = merge_parts([storage, PodParts(mounts=model_cache.mounts), model_secret]).mounts
        # The Hub's token and the user's variables (HF_ENDPOINT, proxies); not vLLM's API key.
        hub_env = [e for e in parts.env if not e["name"].startswith("VLLM_")] if hf_cached else None
        pod_spec["initContainers"] = [model_init_container(server, image, mounts, cached, hub_env)]
    if gpu.node_selector:
        pod_spec["nodeSelector"] = dict(gpu.node_selector)
    if gpu.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in gpu.tolerations]
    secured(pod_spec, config.pod_security_context, config.container_security_context)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(server, name, "server"),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": traffic.server_selector(server)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": spec.rollout.max_surge, "maxUnavailable": spec.rollout.max_unavailable},
            },
            "template": {"metadata": {"labels": pod_labels, "annotations": annotations}, "spec": pod_spec},
        },
    }


def service(server: ModelServer, config: OperatorConfig) -> Manifest:
    name = server.metadata.name
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(server, name, "server"),
        "spec": {
            "selector": traffic.server_selector(server),
            "ports": [{"name": "http", "port": config.server_port, "targetPort": "http"}],
        },
    }


def ui_deployment(server: ModelServer, config: OperatorConfig) -> Manifest:
    """The Gradio chat page, talking to the server's OpenAI endpoint."""
    name = f"{server.metadata.name}-ui"
    pod_labels = labels(LABEL_MODELSERVER, server.metadata.name, "ui")
    container = {
        "name": "ui",
        "image": config.images.ui,
        # --host spelled out like vLLM's: where pods share one network (the dev node agent), it becomes the pod IP.
        "command": [
            *("kubetune", "ui", "--endpoint", endpoint(server, config)),
            *("--host", "0.0.0.0", "--port", str(config.ui_port)),
        ],
        "ports": [{"name": "http", "containerPort": config.ui_port}],
        "readinessProbe": _probe("/", config.ui_port, 10, 3),
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
    }
    if key := api_key_env(api_key_ref(server, config), "OPENAI_API_KEY"):
        container["env"] = key
    pod_spec: Manifest = {"containers": [container]}
    if config.ui_scheduling.node_selector:
        pod_spec["nodeSelector"] = dict(config.ui_scheduling.node_selector)
    if config.ui_scheduling.tolerations:
        pod_spec["tolerations"] = list(config.ui_scheduling.tolerations)
    secured(pod_spec, config.pod_security_context, config.container_security_context)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(server, name, "ui"),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {LABEL_MODELSERVER: server.metadata.name, "app.kubernetes.io/component": "ui"}},
            "template": {"metadata": {"labels": pod_labels}, "spec": pod_spec},
        },
    }


def ui_service(server: ModelServer, config: OperatorConfig) -> Manifest:
    name = f"{server.metadata.name}-ui"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(server, name, "ui"),
        "spec": {
            "selector": {LABEL_MODELSERVER: server.metadata.name, "app.kubernetes.io/component": "ui"},
            "ports": [{"name": "http", "port": config.ui_port, "targetPort": "http"}],
        },
    }
