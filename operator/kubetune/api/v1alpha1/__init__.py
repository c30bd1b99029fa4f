"""kubetune.io/v1alpha1: the FineTuneJob and ModelServer API, the only definition of it."""

from kubetune.api.v1alpha1.base import (
    API_VERSION,
    GROUP,
    VERSION,
    Condition,
    ConditionStatus,
    KubeModel,
    LabelSelector,
    ObjectMeta,
    Rule,
    S3Access,
)
from kubetune.api.v1alpha1.finetunejob import (
    AdapterStatus,
    CheckpointStatus,
    DatasetFormat,
    FineTuneJob,
    FineTuneJobSpec,
    FineTuneJobStatus,
    JobState,
    MemoryEstimate,
    Method,
    Plan,
    Progress,
)
from kubetune.api.v1alpha1.modelserver import (
    AdapterSource,
    AdapterState,
    ModelServer,
    ModelServerSpec,
    ModelServerStatus,
    ServedAdapterStatus,
    ServerState,
)
from kubetune.api.v1alpha1.trainerconfig import JobIdentity, TrainerConfig

KINDS = (FineTuneJob, ModelServer)

__all__ = [
    "API_VERSION",
    "GROUP",
    "KINDS",
    "VERSION",
    "AdapterSource",
    "AdapterState",
    "AdapterStatus",
    "CheckpointStatus",
    "Condition",
    "ConditionStatus",
    "DatasetFormat",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "JobIdentity",
    "JobState",
    "KubeModel",
    "LabelSelector",
    "MemoryEstimate",
    "Method",
    "ModelServer",
    "ModelServerSpec",
    "ModelServerStatus",
    "ObjectMeta",
    "Plan",
    "Progress",
    "Rule",
    "S3Access",
    "ServedAdapterStatus",
    "ServerState",
    "TrainerConfig",
]
