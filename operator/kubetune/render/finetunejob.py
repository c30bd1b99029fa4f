"""A FineTuneJob's children: an Indexed Job, and a headless Service when the job spans several nodes. The Job is
named like the FineTuneJob, the Service `<job>-trainer`: ModelServer names may not end in -trainer, so the two
kinds never want the same Service.

The trainer's configuration travels in an annotation of the pod template, which a downwardAPI volume shows
to the trainer as a file: no ConfigMap to create, to lose in a crash, to be taken over, or for the operator to
be allowed to read.

The training pods run as their namespace's `kubetune-trainer` ServiceAccount, which may only patch the status
of the pod's own FineTuneJob (render/trainer_access.py); that is how the trainer reports progress
(docs/progress.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from kubetune.api.v1alpha1 import FineTuneJob, JobIdentity, Plan, PreparedInputs, TrainerConfig
from kubetune.api.v1alpha1.trainerconfig import METRICS_PORT
from kubetune.config import OperatorConfig
from kubetune.render.common import (
    ANNOTATION_SPEC_HASH,
    LABEL_FINETUNEJOB,
    Manifest,
    PodParts,
    cache_and_shm_parts,
    cache_parts,
    content_hash,
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
from kubetune.render.trainer_access import TRAINER_ACCOUNT, namespace_objects
from kubetune.storage import CONFIG_DIR, parse

TRAINER_CONTAINER = "trainer"
SAFE_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
CONFIG_FILE = "trainer.yaml"
ANNOTATION_TRAINER_CONFIG = "kubetune.io/trainer-config"
# Exit code with which the trainer reports a problem no retry can fix (bad dataset, missing model).
EXIT_PERMANENT = 3
# Exit code of a trainer stopped by SIGTERM after it saved a checkpoint (trainer/main.py).
EXIT_TERMINATED = 143
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
KUEUE_PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
CREATE_ONLY_WHEN_QUEUED = (("spec", "suspend"),)
# Rank 0 serves its progress as Prometheus metrics; the pod's podMetadata.annotations may override these.
SCRAPE_ANNOTATIONS = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": str(METRICS_PORT),
    "prometheus.io/path": "/metrics",
}


@dataclass(frozen=True)
class Names:
    """Names of a FineTuneJob's children (all derived from the job's name)."""

    job: str

    @property
    def service(self) -> str:
        return f"{self.job}-trainer"

    @property
    def training_job(self) -> str:
        return self.job

    def master_addr(self, namespace: str, nodes: int) -> str:
        """Where the torch.distributed rendezvous listens: the DNS name of pod 0 of the Indexed Job under the
        headless Service, or the pod itself when it is the only one."""
        return f"{self.training_job}-0.{self.service}.{namespace}.svc" if nodes > 1 else "127.0.0.1"


def trainer_config(
    ftj: FineTuneJob, plan: Plan, init_adapter_uri: str | None, prepared: PreparedInputs | None = None
) -> TrainerConfig:
    """The configuration the trainer reads: the admitted spec plus the resolved plan (and where the prepare step
    cached the inputs)."""
    base = parse(ftj.spec.base_model.uri)
    return TrainerConfig(
        job=JobIdentity(name=ftj.metadata.name, namespace=ftj.metadata.namespace, uid=ftj.metadata.uid),
        spec=ftj.spec,
        plan=plan,
        init_adapter_uri=init_adapter_uri,
        base_model_revision=base.revision,
        prepared=prepared,
    )


def children(
    ftj: FineTuneJob,
    plan: Plan,
    config: OperatorConfig,
    init_adapter_uri: str | None = None,
    prepared: PreparedInputs | None = None,
    cache_claim: str | None = None,
) -> list[Manifest]:
    """Every object the operator writes for a FineTuneJob, in creation order: its namespace's trainer access
    (shared with the namespace's other jobs), then the job's own children (the prepare Job, render/prepare.py, goes
    in the training Job's place until it succeeded)."""
    trainer = trainer_config(ftj, plan, init_adapter_uri, prepared)
    # One node rendezvouses on its own pod: a Service would only cost API writes and endpoint updates.
    service = [headless_service(ftj, config)] if ftj.spec.resources.nodes > 1 else []
    # Kueue alone suspends a queued Job: a queued run that its user suspends has none (docs/kueue.md).
    queued_and_held = held_without_job(ftj.spec.queue_name, ftj.spec.suspend)
    job = [] if queued_and_held else [training_job(ftj, trainer, config, cache_claim)]
    return [*namespace_objects(ftj.metadata.namespace), *service, *job]


def held_without_job(queue_name: str | None, suspend: bool) -> bool:
    """A queued run suspended by its user: its training Job is deleted (the trainer checkpoints, Kueue releases
    the quota) and created again, queued, when spec.suspend is false."""
    return bool(queue_name) and suspend


def expected_children(namespace: str, name: str, nodes: int, job: bool = True) -> list[Manifest]:
    """Kind and name (no content) of every object that `children` renders for a job of `nodes` nodes (and its
    training Job unless not `job`): what must exist while the job runs, known without planning it."""
    names = Names(name)
    wanted = [(m["kind"], TRAINER_ACCOUNT) for m in namespace_objects(namespace)]
    wanted += [("Service", names.service)] if nodes > 1 else []
    wanted += [("Job", names.training_job)] if job else []
    return [{"kind": kind, "metadata": {"namespace": namespace, "name": child}} for kind, child in wanted]


def _meta(ftj: FineTuneJob, name: str) -> dict[str, Any]:
    return metadata(name, ftj.metadata.namespace, ftj, labels(LABEL_FINETUNEJOB, ftj.metadata.name, "trainer"))


def config_text(trainer: TrainerConfig) -> str:
    """The trainer's configuration as the pod reads it. suspend, the TTL and backoffLimit are left out: the
    trainer does not use them, the operator applies them to a running Job in place, and that Job's pod template
    (where this goes) cannot change."""
    operator_only = {"suspend": False, "ttl_seconds_after_finished": None, "backoff_limit": 0}
    fixed = trainer.model_copy(update={"spec": trainer.spec.model_copy(update=operator_only)})
    # libyaml's emitter when PyYAML has it: the same text, many times faster than the pure-Python one.
    return yaml.dump(fixed.to_wire(), Dumper=SAFE_DUMPER, sort_keys=False)


def headless_service(ftj: FineTuneJob, config: OperatorConfig) -> Manifest:
    """Gives pod 0 a stable DNS name for the torch.distributed rendezvous of a multi-node job."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(ftj, Names(ftj.metadata.name).service),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {LABEL_FINETUNEJOB: ftj.metadata.name},
            "ports": [{"name": "rendezvous", "port": config.rendezvous_port, "targetPort": config.rendezvous_port}],
        },
    }


def _distributed_env(ftj: FineTuneJob, config: OperatorConfig) -> list[Manifest]:
    names = Names(ftj.metadata.name)
    resources = ftj.spec.resources
    return [
        {"name": "MASTER_ADDR", "value": names.master_addr(ftj.metadata.namespace, resources.nodes)},
        {"name": "MASTER_PORT", "value": str(config.rendezvous_port)},
        {"name": "NNODES", "value": str(resources.nodes)},
        {
            "name": "NODE_RANK",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
            },
        },
        {"name": "NPROC_PER_NODE", "value": str(resources.gpus_per_node)},
        {"name": "KUBETUNE_FINETUNEJOB", "value": ftj.metadata.name},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
    ]


def pod_parts(ftj: FineTuneJob, trainer: TrainerConfig) -> PodParts:
    """Config file, cache, claims, ConfigMaps and credentials: what every pod reading the job's inputs mounts."""
    spec = ftj.spec
    uris = [(spec.base_model.uri, False), (spec.dataset.uri, False), (spec.output.uri, True)]
    if trainer.init_adapter_uri:
        uris.append((trainer.init_adapter_uri, False))
    field = f"metadata.annotations['{ANNOTATION_TRAINER_CONFIG}']"
    config_file = {"path": CONFIG_FILE, "fieldRef": {"fieldPath": field}}
    config_parts = PodParts(
        volumes=[{"name": "config", "downwardAPI": {"items": [config_file]}}],
        mounts=[{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}],
    )
    return merge_parts(
        [
            config_parts,
            cache_and_shm_parts(),
            storage_parts([(u, w) for u, w in uris if "://" in u]),
            credential_parts(spec.base_model.uri, spec.base_model.secret_ref),
            credential_parts(spec.dataset.uri, spec.dataset.secret_ref),
            # DPO's starting adapter (a FineTuneJob's output) is read with this job's output credentials.
            s3_secret_parts([a.secret_name for a in (spec.base_model.s3, spec.dataset.s3, spec.output.s3) if a]),
        ]
    )


def pod_template(
    ftj: FineTuneJob, trainer: TrainerConfig, config: OperatorConfig, cache_claim: str | None = None
) -> Manifest:
    spec = ftj.spec
    names = Names(ftj.metadata.name)
    parts = pod_parts(ftj, trainer) + cache_parts(cache_claim, writable=False)
    env = merge_parts([PodParts(env=_distributed_env(ftj, config)), parts, PodParts(env=user_env(spec.env))]).env
    gpu = config.gpu_type(spec.resources.gpu_type)
    pod_labels = labels(LABEL_FINETUNEJOB, ftj.metadata.name, "trainer")
    pod_annotations = dict(SCRAPE_ANNOTATIONS)
    if spec.pod_metadata:
        pod_labels = {**spec.pod_metadata.labels, **pod_labels}
        pod_annotations.update(spec.pod_metadata.annotations)
    pod_annotations[ANNOTATION_TRAINER_CONFIG] = config_text(trainer)
    container = {
        "name": TRAINER_CONTAINER,
        "image": spec.image or config.images.trainer,
        "command": ["kubetune", "train", "--config", f"{CONFIG_DIR}/{CONFIG_FILE}"],
        "env": env,
        "ports": [
            {"name": "rendezvous", "containerPort": config.rendezvous_port},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
        "resources": resource_limits(spec.resources.gpus_per_node, spec.resources.cpu, spec.resources.memory),
        "volumeMounts": parts.mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": TRAINER_ACCOUNT,
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": config.trainer_termination_grace_seconds,
        "containers": [container],
        "volumes": parts.volumes,
    }
    if spec.priority_class_name and not spec.queue_name:  # queued: Kueue's label on the Job (training_job)
        pod_spec["priorityClassName"] = spec.priority_class_name
    if spec.resources.nodes > 1:
        pod_spec["subdomain"] = names.service
    if gpu.node_selector:
        pod_spec["nodeSelector"] = dict(gpu.node_selector)
    if gpu.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in gpu.tolerations]
    secured(pod_spec, config.pod_security_context, config.container_security_context)
    return {"metadata": {"labels": pod_labels, "annotations": pod_annotations}, "spec": pod_spec}


def training_hash(template: Manifest) -> str:
    """Hash of what a running Job cannot change: its pod template (which carries the trainer's configuration)."""
    return content_hash(template)


def training_job(
    ftj: FineTuneJob, trainer: TrainerConfig, config: OperatorConfig, cache_claim: str | None = None
) -> Manifest:
    """An Indexed Job with one pod per node; pod i is NODE_RANK i. With a cache claim, the pods mount it
    read-only (the prepare step filled it)."""
    spec = ftj.spec
    template = pod_template(ftj, trainer, config, cache_claim)
    job_meta = _meta(ftj, Names(ftj.metadata.name).training_job)
    job_meta["annotations"] = {ANNOTATION_SPEC_HASH: training_hash(template)}
    if spec.queue_name:
        job_meta["labels"][KUEUE_QUEUE_LABEL] = spec.queue_name
    if spec.queue_name and spec.priority_class_name:
        job_meta["labels"][KUEUE_PRIORITY_LABEL] = spec.priority_class_name
    job_spec: dict[str, Any] = {
        "completionMode": "Indexed",
        "completions": spec.resources.nodes,
        "parallelism": spec.resources.nodes,
        # The first failed pod fails the Job, and the Job controller stops the other pods: the ranks fail and
        # restart as one group. The operator decides what comes next (controllers/training.py): a new Job that
        # resumes from the newest checkpoint, counted against spec.backoffLimit unless the pod was disrupted.
        "backoffLimit": 0,
        # Queued: created suspended, and from then on Kueue alone suspends and resumes it (CREATE_ONLY_WHEN_QUEUED).
        "suspend": True if spec.queue_name else spec.suspend,
        "podFailurePolicy": {"rules": _failure_rules(bool(spec.queue_name))},
        "template": template,
    }
    if spec.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.ttl_seconds_after_finished
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": job_meta, "spec": job_spec}


def _failure_rules(queued: bool) -> list[Manifest]:
    rules: list[Manifest] = [
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In", "values": [EXIT_PERMANENT]},
        },
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget"}]},
    ]
    if queued:
        # Kueue evicts by suspending the Job, whose controller then deletes the pods: the trainer saves a checkpoint
        # and exits 143, which is no failure (backoffLimit 0 would fail the Job); it resumes when admitted again.
        rules.append(
            {
                "action": "Ignore",
                "onExitCodes": {"containerName": TRAINER_CONTAINER, "operator": "In", "values": [EXIT_TERMINATED]},
            }
        )
    return rules


def create_only_fields(ftj: FineTuneJob) -> list[tuple[str, ...]]:
    """Fields of the training Job that the operator sets when it creates the Job and never again: a queued Job's
    spec.suspend belongs to Kueue once the Job exists."""
    return list(CREATE_ONLY_WHEN_QUEUED) if ftj.spec.queue_name else []
