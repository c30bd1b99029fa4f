"""What a training pod may do with the API: patch the status of its own FineTuneJob, nothing else.

Every namespace with FineTuneJobs has one ServiceAccount, Role and RoleBinding for its training pods, all named
`kubetune-trainer` and written once (not per job: three fewer objects and writes for every job). The Role lets
that account patch the status of FineTuneJobs; the ValidatingAdmissionPolicy `kubetune-trainer-status` narrows
it to the job whose training pod holds the token. A pod's token names its pod (the claim
`authentication.kubernetes.io/pod-name`), and the pods of a training Job are named `<job>-<index>-<suffix>`
(an Indexed Job named like its FineTuneJob), and its prepare pod `<job>-prep-<suffix>` (the Job `<job>-prep`,
render/prepare.py), so the policy compares the two; no pod of another job matches (their rest has a further
`-`). That is also why FineTuneJob names are at most 52 characters: Kubernetes cuts the pod name's prefix at 58
(`<name>-<index>-`, index < 1024; `<name>-prep-`).

The policy is cluster-scoped: the chart installs it (`admissionPolicy.enabled`), `kubetune dev up` and the tests
apply it with the CRDs. Without it, a training pod could patch the status of other FineTuneJobs of its
namespace (never their spec, never anything else).
"""

from __future__ import annotations

from collections.abc import Mapping

from kubetune.render.common import LABEL_COMPONENT, MANAGED_BY, Manifest

TRAINER_ACCOUNT = "kubetune-trainer"
COMPONENT = "trainer-access"
STATUS_POLICY = "kubetune-trainer-status"
POD_NAME_CLAIM = "authentication.kubernetes.io/pod-name"
MAX_JOB_NAME = 52


def _meta(namespace: str) -> dict[str, object]:
    return {
        "name": TRAINER_ACCOUNT,
        "namespace": namespace,
        "labels": {
            "app.kubernetes.io/name": f"kubetune-{COMPONENT}",
            LABEL_COMPONENT: COMPONENT,
            "app.kubernetes.io/part-of": "kubetune",
            "app.kubernetes.io/managed-by": MANAGED_BY,
        },
    }


def namespace_objects(namespace: str) -> list[Manifest]:
    """The ServiceAccount of a namespace's training pods, its Role and the RoleBinding (no owner: they serve
    every FineTuneJob of the namespace and stay when the jobs go)."""
    account: Manifest = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(namespace)}
    role: Manifest = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _meta(namespace),
        "rules": [{"apiGroups": ["kubetune.io"], "resources": ["finetunejobs/status"], "verbs": ["patch"]}],
    }
    binding: Manifest = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(namespace),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": TRAINER_ACCOUNT},
        "subjects": [{"kind": "ServiceAccount", "name": TRAINER_ACCOUNT, "namespace": namespace}],
    }
    return [account, role, binding]


def is_trainer_access(labels: Mapping[str, str]) -> bool:
    return labels.get(LABEL_COMPONENT) == COMPONENT and labels.get("app.kubernetes.io/managed-by") == MANAGED_BY


def status_policy() -> list[Manifest]:
    """The ValidatingAdmissionPolicy and its binding that keep each training pod to its own job's status."""
    pod = (
        f"has(request.userInfo.extra) && '{POD_NAME_CLAIM}' in request.userInfo.extra"
        f" ? request.userInfo.extra['{POD_NAME_CLAIM}'][0] : ''"
    )
    policy: Manifest = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": STATUS_POLICY, "labels": {"app.kubernetes.io/part-of": "kubetune"}},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": ["kubetune.io"],
                        "apiVersions": ["*"],
                        "operations": ["UPDATE"],
                        "resources": ["finetunejobs/status"],
                    }
                ]
            },
            "matchConditions": [
                {
                    "name": "requested-by-a-training-pod",
                    "expression": f"request.userInfo.username.startsWith('system:serviceaccount:')"
                    f" && request.userInfo.username.endsWith(':{TRAINER_ACCOUNT}')",
                }
            ],
            "variables": [
                {"name": "pod", "expression": pod},
                {"name": "prefix", "expression": "object.metadata.name + '-'"},
            ],
            "validations": [
                {
                    "expression": "variables.pod.startsWith(variables.prefix)"
                    " && variables.pod.substring(size(variables.prefix)).matches('^([0-9]+|prep)-[a-z0-9]+$')",
                    "reason": "Forbidden",
                    "message": "A training pod may change only the status of its own FineTuneJob.",
                    "messageExpression": "'A training pod may change only the status of its own FineTuneJob: '"
                    " + (variables.pod == '' ? 'this token names no pod' : 'pod ' + variables.pod + ' is not')"
                    " + ' a training pod of FineTuneJob ' + object.metadata.name + '.'",
                }
            ],
        },
    }
    binding: Manifest = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": STATUS_POLICY, "labels": {"app.kubernetes.io/part-of": "kubetune"}},
        "spec": {"policyName": STATUS_POLICY, "validationActions": ["Deny"]},
    }
    return [policy, binding]
