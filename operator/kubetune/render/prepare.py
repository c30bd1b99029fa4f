"""The prepare step of a FineTuneJob: a Job of one CPU pod, `kubetune prepare`, written before the training Job.

The pod fetches the base model and the dataset (into the cache claim when the job's namespace has one), runs the
trainer's own dataset check, tokenizes the records with the model's chat template and reports status.dataset
with the job's status Role (the channel of the training pods' progress). It requests no GPU: what can be known
on a CPU is learned there, and only its success makes the operator write the training Job
(controllers/training.py). It is labelled with its own key, not the training one, so that the training Job and
pod indexes never see it.
"""

from __future__ import annotations

from typing import Any

from kubetune.api.v1alpha1 import CacheSettings, FineTuneJob, FineTuneJobSpec, TrainerConfig
from kubetune.config import OperatorConfig
from kubetune.render.common import (
    ANNOTATION_SPEC_HASH,
    Manifest,
    PodParts,
    cache_parts,
    content_hash,
    labels,
    merge_parts,
    metadata,
    secured,
    user_env,
)
from kubetune.render.finetunejob import ANNOTATION_TRAINER_CONFIG, CONFIG_FILE, EXIT_PERMANENT, config_text, pod_parts
from kubetune.render.trainer_access import TRAINER_ACCOUNT
from kubetune.storage import CONFIG_DIR, SHARED_CACHE_ROOT

LABEL_PREPARE = "kubetune.io/prepare"
PREPARE_CONTAINER = "prepare"


def prepare_name(job: str) -> str:
    """`<job>-prep`: its pod `<job>-prep-<suffix>` fits the 58 characters of a generated name's prefix for every
    job name (at most 52), which the trainer status policy needs to recognise it (render/trainer_access.py)."""
    return f"{job}-prep"


def inputs_hash(spec: FineTuneJobSpec) -> str:
    """Hash of what the prepare step's result depends on: a new spec with the same inputs is not prepared again."""
    return content_hash(
        {
            "baseModel": spec.base_model.uri,
            "dataset": spec.dataset.to_wire(),
            "method": spec.method.value,
            "maxSeqLength": spec.hyperparameters.max_seq_length,
            "seed": spec.hyperparameters.seed,
        }
    )


def cache_settings(config: OperatorConfig, keep: list[str]) -> CacheSettings:
    """The cache as the prepare pod sees it; `keep`: entries of unfinished jobs, never evicted."""
    limit = config.cache.size_limit_gib
    return CacheSettings(
        root=SHARED_CACHE_ROOT,
        size_limit_bytes=int(limit * 2**30) if limit is not None else None,
        keep=sorted(set(keep)),
        idle_seconds=config.cache.evict_idle_seconds,
    )


def optional_secrets(parts: PodParts) -> None:
    """Secrets made optional, so that a missing one does not keep the pod waiting for its volume: the prepare
    step finds it missing and fails with AccessDenied, saying which."""
    for volume in parts.volumes:
        if "secret" in volume:
            volume["secret"] = {**volume["secret"], "optional": True}
    for var in parts.env:
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if ref is not None:
            var["valueFrom"] = {"secretKeyRef": {**ref, "optional": True}}


def prepare_job(
    ftj: FineTuneJob,
    trainer: TrainerConfig,
    config: OperatorConfig,
    cache_claim: str | None = None,
    keep: list[str] | None = None,
) -> Manifest:
    """The Job of the prepare pod. `trainer` is the training configuration; the inputs hash and, with a cache
    claim, the cache settings (`keep`: entries unfinished jobs use) are added here."""
    name = ftj.metadata.name
    digest = inputs_hash(ftj.spec)
    cache = cache_settings(config, keep or []) if cache_claim else None
    prepare_config = trainer.model_copy(update={"inputs_hash": digest, "cache": cache})
    parts = merge_parts(
        [
            pod_parts(ftj, prepare_config),
            cache_parts(cache_claim, writable=True),
            PodParts(env=[{"name": "KUBETUNE_FINETUNEJOB", "value": name}]),
            PodParts(env=user_env(ftj.spec.env)),
        ]
    )
    optional_secrets(parts)
    scheduling = config.prepare.scheduling or config.gpu_type(ftj.spec.resources.gpu_type)
    quantities = {"cpu": config.prepare.cpu, "memory": config.prepare.memory}
    container = {
        "name": PREPARE_CONTAINER,
        "image": ftj.spec.image or config.images.trainer,
        "command": ["kubetune", "prepare", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}"],
        "env": parts.env,
        "resources": {"requests": dict(quantities), "limits": dict(quantities)},
        "volumeMounts": parts.mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": TRAINER_ACCOUNT,
        "restartPolicy": "Never",
        "containers": [container],
        "volumes": parts.volumes,
    }
    if scheduling.node_selector:
        pod_spec["nodeSelector"] = dict(scheduling.node_selector)
    if scheduling.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in scheduling.tolerations]
    secured(pod_spec, config.pod_security_context, config.container_security_context)
    job_labels = labels(LABEL_PREPARE, name, "prepare")
    job_meta = metadata(prepare_name(name), ftj.metadata.namespace, ftj, job_labels)
    job_meta["annotations"] = {ANNOTATION_SPEC_HASH: digest}
    template = {
        "metadata": {
            "labels": dict(job_labels),
            "annotations": {ANNOTATION_TRAINER_CONFIG: config_text(prepare_config)},
        },
        "spec": pod_spec,
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": job_meta,
        "spec": {
            "backoffLimit": config.prepare.backoff_limit,
            # A definite answer (invalid data, a model that does not exist, no access) is not retried.
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": PREPARE_CONTAINER,
                            "operator": "In",
                            "values": [EXIT_PERMANENT],
                        },
                    },
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                ]
            },
            "template": template,
        },
    }
