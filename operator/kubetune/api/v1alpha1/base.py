"""Building blocks shared by the kubetune API models.

Every API model derives from `KubeModel`: camelCase on the wire, snake_case in Python, attribute
docstrings as field descriptions (they become `kubectl explain` text), unknown fields rejected.

Validation rules that a schema keyword cannot express are `Rule`s: a CEL expression that the API server
evaluates (`x-kubernetes-validations` in the CRD) and its Python twin that the models evaluate, with
one message for both, so a user sees the same sentence from `kubectl apply` and from the operator.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    WithJsonSchema,
    model_validator,
)
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, core_schema

GROUP = "kubetune.io"
VERSION = "v1alpha1"
API_VERSION = "kubetune.io/v1alpha1"


@dataclass(frozen=True)
class Rule:
    """A validation rule: CEL for the API server, `check` for the models, one message for both.

    `check` receives the model instance (model rules) or the field value (field rules) and returns
    True when the value is valid. Transition rules (CEL using `oldSelf`) have no Python twin: only the
    API server sees the old object.
    """

    cel: str
    message: str
    check: Callable[[Any], bool] | None = None
    reason: str | None = None
    explain: Callable[[Any], str] | None = None
    """A message for the models that names what is wrong (the API server's own error may do so: list-map keys)."""

    def as_schema(self) -> dict[str, str]:
        rule = {"rule": self.cel, "message": self.message}
        if self.reason:
            rule["reason"] = self.reason
        return rule

    def enforce(self, value: Any) -> Any:
        if self.check is not None and not self.check(value):
            raise ValueError(self.explain(value) if self.explain else self.message)
        return value


@dataclass(frozen=True)
class FieldRules:
    """`Annotated` metadata that attaches rules to a field: to its schema and to its validation."""

    rules: tuple[Rule, ...]

    def __get_pydantic_json_schema__(self, core: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core)
        schema.setdefault("x-kubernetes-validations", []).extend(r.as_schema() for r in self.rules)
        return schema

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self._enforce, handler(source))

    def _enforce(self, value: Any) -> Any:
        for rule in self.rules:
            rule.enforce(value)
        return value


def field_rules(*rules: Rule) -> FieldRules:
    return FieldRules(rules)


class KubeModel(BaseModel):
    """Base of every API model."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        extra="forbid",
        json_schema_extra=lambda schema, cls: _add_rules_to_schema(schema, cls),
    )

    rules: ClassVar[tuple[Rule, ...]] = ()
    """Object-level rules of this model, evaluated after its fields."""

    @model_validator(mode="after")
    def _enforce_rules(self) -> KubeModel:
        for rule in type(self).__dict__.get("rules", ()):
            rule.enforce(self)
        return self

    def to_wire(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase keys, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def _add_rules_to_schema(schema: dict[str, Any], cls: type) -> None:
    own: tuple[Rule, ...] = cls.__dict__.get("rules", ())
    if own:
        schema["x-kubernetes-validations"] = [r.as_schema() for r in own]


# --- Reusable field types -------------------------------------------------------------------------

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_LABEL_RE = re.compile(DNS_LABEL)

DnsLabel = Annotated[
    str,
    Field(min_length=1, max_length=63),
    field_rules(
        Rule(
            cel=f"self.matches('{DNS_LABEL}')",
            message="must be a DNS label: lowercase letters, digits and '-', "
            "starting and ending with a letter or digit",
            check=lambda v: bool(_DNS_LABEL_RE.match(v)),
        )
    ),
]
"""A Kubernetes object name of at most 63 characters (RFC 1123 label)."""


def uri_rules(schemes: tuple[str, ...], example: str) -> FieldRules:
    """Restrict a URI to `schemes`, with a message that lists them."""
    listed = ", ".join(f"{s}://" for s in schemes[:-1]) + f" or {schemes[-1]}://"
    pattern = "^(" + "|".join(schemes) + ")://[^/].*$"
    compiled = re.compile(pattern)
    return field_rules(
        Rule(
            cel=f"self.matches('{pattern}')",
            message=f"uri must start with {listed} (for example {example})",
            check=lambda v: bool(compiled.match(v)),
        )
    )


UriLength = Field(min_length=6, max_length=1024)


_QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
Quantity = Annotated[
    int | str,
    WithJsonSchema({"x-kubernetes-int-or-string": True, "pattern": _QUANTITY}),
    AfterValidator(lambda v: _check_quantity(v)),
]
"""A Kubernetes resource quantity such as 8, 500m, 24Gi."""


def _check_quantity(value: int | str) -> int | str:
    if isinstance(value, str) and not re.match(_QUANTITY, value):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (for example 8, 500m, 64Gi)")
    return value


class SecretKeyRef(KubeModel):
    """A key of a Secret in the object's namespace."""

    name: DnsLabel
    """Name of the Secret."""
    key: str = Field(min_length=1, max_length=253)
    """Key within the Secret."""


class S3Access(KubeModel):
    """How pods reach an s3:// location on AWS S3 or an S3-compatible store (MinIO, Ceph RGW).

    Only the pods that read or write the location see the Secret (training pods; the adapter fetcher beside
    vLLM): the operator never reads it."""

    secret_name: DnsLabel | None = None
    """A Secret in this namespace with the keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (optional:
    AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, AWS_REGION). Without it the pod's own identity is used (IRSA, EKS Pod
    Identity, instance profile)."""
    endpoint: str | None = Field(default=None, max_length=512, pattern=r"^https?://[^/]+")
    """The S3 API of an S3-compatible store, e.g. http://minio.minio.svc:9000 (buckets are then addressed by
    path); AWS S3 when unset and the Secret has no AWS_ENDPOINT_URL."""
    region: str | None = Field(default=None, min_length=1, max_length=64, pattern=r"^[a-z0-9-]+$")
    """The bucket's region, e.g. eu-west-1 (us-east-1 when unset and the Secret has no AWS_REGION)."""


def s3_rules(uri_optional: bool = False, secret_ref: bool = True) -> tuple[Rule, ...]:
    """`s3` belongs to s3:// locations, whose credentials go there rather than into `secretRef`."""
    has_uri = "has(self.uri) && " if uri_optional else ""
    rules = [
        Rule(
            cel=f"!has(self.s3) || ({has_uri}self.uri.startsWith('s3://'))",
            message="s3 is only for s3:// locations",
            check=lambda s: s.s3 is None or (s.uri or "").startswith("s3://"),
        )
    ]
    if secret_ref:
        rules.append(
            Rule(
                cel="!has(self.secretRef) || !self.uri.startsWith('s3://')",
                message="secretRef is the Hugging Face token of hf://; give s3:// credentials in s3.secretName",
                check=lambda s: s.secret_ref is None or not s.uri.startswith("s3://"),
            )
        )
    return tuple(rules)


class EnvVar(KubeModel):
    """An environment variable set in the workload's containers."""

    name: str = Field(min_length=1, max_length=256, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Variable name."""
    value: str | None = None
    """Literal value."""
    secret_key_ref: SecretKeyRef | None = None
    """Take the value from a Secret key instead of `value`."""

    rules = (
        Rule(
            cel="has(self.value) != has(self.secretKeyRef)",
            message="set exactly one of value or secretKeyRef",
            check=lambda s: (s.value is None) != (s.secret_key_ref is None),
        ),
    )


class PodMetadata(KubeModel):
    """Labels and annotations added to the pods kubetune creates (e.g. for sidecars or cost tags)."""

    labels: dict[str, str] = Field(default_factory=dict)
    """Labels added to the pods."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations added to the pods."""


# --- Status building blocks -----------------------------------------------------------------------


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(KubeModel):
    """One aspect of the object's state, in the Kubernetes condition convention."""

    type: str = Field(max_length=316)
    """Condition type, e.g. Succeeded, Running, Ready."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: str = Field(max_length=1024)
    """CamelCase reason for the last transition, e.g. Unschedulable, DatasetInvalid."""
    message: str = Field(default="", max_length=32768)
    """Human-readable details."""
    last_transition_time: datetime
    """When the status last changed."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation this condition was computed for."""


class ObjectMeta(KubeModel):
    """The subset of Kubernetes object metadata the operator reads."""

    model_config = ConfigDict(extra="ignore")

    name: str = ""
    namespace: str = ""
    uid: str = ""
    generation: int = 0
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    creation_timestamp: datetime | None = None


class LabelSelectorRequirement(KubeModel):
    """A label selector requirement: key, operator and values."""

    key: str = Field(min_length=1, max_length=317)
    """The label key."""
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    """How the key relates to the values."""
    values: list[str] = Field(default_factory=list)
    """Values for In and NotIn; empty for Exists and DoesNotExist."""


class LabelSelector(KubeModel):
    """A Kubernetes label selector (matchLabels and matchExpressions are ANDed)."""

    match_labels: dict[str, str] = Field(default_factory=dict)
    """Labels that must all be present with these values."""
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list)
    """Set-based requirements."""

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether an object with `labels` is selected."""
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "In" and (not present or labels[req.key] not in req.values):
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True
