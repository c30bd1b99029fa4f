"""Children written only where their owner controls them.

A FineTuneJob or ModelServer names its children after itself, so whoever may create one in a namespace
could otherwise make the operator overwrite an object of the same name (redirect a Service, rewrite a
Role) and garbage-collect it with the owner. The operator never writes over an object whose controller
ownerReference is not the object it reconciles:

- a child that the operator's view does not show is created (POST): the API server refuses a taken name
  atomically; the object that holds it is then read once and applied only if it is ours after all (a view
  that lags behind);
- a child that the view shows as ours is applied with its uid as a precondition, so an object put in its
  place meanwhile is refused, not overwritten;
- anything else is a NameConflict, which the handler reports on the owner.

Objects without an owner (a namespace's trainer access, shared by its jobs) are the operator's when they carry
its managed-by label and no controller: those it applies onto; any other object of that name is a NameConflict.

A POST records the operator's fields under an Update entry of managedFields, which server-side apply does not
count as its own: a field that a later apply leaves out (an env var removed from spec.env) would stay forever.
So before the first apply onto an object it created, the operator renames that entry to Apply (a JSON patch
that first tests the entry), and from then on apply owns every field it ever set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune import faults
from kubetune.k8s.client import ApiError, Kube

MANAGED_BY = "kubetune-operator"  # render.common.MANAGED_BY (k8s/ imports nothing of render/)

Manifest = dict[str, Any]
Path = tuple[str, ...]


@dataclass(frozen=True)
class Controller:
    kind: str
    name: str
    uid: str


@dataclass(frozen=True)
class Seen:
    """What the operator's view holds of an existing child: its uid, its controller, and the (manager, operation)
    of each managedFields entry, in order."""

    uid: str
    controller: Controller | None
    managers: tuple[tuple[str, str], ...] = ()
    managed: bool = False
    """Labelled app.kubernetes.io/managed-by=kubetune-operator."""

    def created_entry(self, manager: str) -> int | None:
        """The index of `manager`'s Update entry when it has no Apply entry: an object it created by POST and never
        applied since."""
        if (manager, "Apply") in self.managers:
            return None
        return self.managers.index((manager, "Update")) if (manager, "Update") in self.managers else None


def controller_of(meta: Mapping[str, Any]) -> Controller | None:
    """The controller ownerReference of an object's (or a manifest's) metadata."""
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller"):
            return Controller(str(ref.get("kind", "")), str(ref.get("name", "")), str(ref.get("uid", "")))
    return None


def seen(body: Mapping[str, Any]) -> Seen:
    meta = body.get("metadata") or {}
    managers = tuple((str(m.get("manager", "")), str(m.get("operation", ""))) for m in meta.get("managedFields") or [])
    managed = (meta.get("labels") or {}).get("app.kubernetes.io/managed-by") == MANAGED_BY
    return Seen(str(meta.get("uid", "")), controller_of(meta), managers, managed)


class NameConflict(Exception):
    """The name of a child is taken by an object that its owner does not control."""

    def __init__(self, kind: str, name: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.name = name
        self.message = message


def conflict(manifest: Manifest, existing: Seen) -> NameConflict | None:
    """None when `existing` is controlled by the manifest's owner, else the conflict to report."""
    owner = controller_of(manifest["metadata"])
    holder = existing.controller
    if owner is not None and holder is not None and holder.uid == owner.uid:
        return None
    if owner is None and holder is None and existing.managed:
        return None  # an ownerless object of the operator's
    kind, name = manifest["kind"], manifest["metadata"]["name"]
    by = f"{holder.kind} {holder.name}" if holder else "no controller"
    if owner is None:
        message = (
            f"{kind} {name} already exists and is not kubetune's (kubetune's own has no controller and the label "
            f"app.kubernetes.io/managed-by={MANAGED_BY}): kubetune does not take over objects it did not create; "
            f"delete or rename that {kind}"
        )
        return NameConflict(kind, name, message)
    wanted = f"{owner.kind} {owner.name}"
    message = (
        f"{kind} {name} already exists and is controlled by {by}, not by {wanted}: kubetune does not take over "
        f"objects it did not create; delete or rename that {kind}, or give the {owner.kind} another name"
    )
    return NameConflict(kind, name, message)


def write(kube: Kube, manifest: Manifest, known: Seen | None, release: Sequence[Path] = ()) -> Manifest:
    """Create or apply one child (see the module docstring); raises NameConflict or ApiError (with its
    `subject` set to the child). The fields at the `release` paths are set only by the create: applies leave
    them out, and the first one gives up the operator's claim on them (another controller owns them then)."""
    try:
        written = _write(kube, manifest, known, tuple(release))
    except ApiError as err:
        err.subject = f"{manifest['kind']} {manifest['metadata']['name']}"
        raise
    meta = manifest["metadata"]
    faults.point(f"after-write:{manifest['kind']}", f"{meta.get('namespace')}/{meta['name']}")
    return written


def _write(kube: Kube, manifest: Manifest, known: Seen | None, release: tuple[Path, ...]) -> Manifest:
    if known is not None:
        try:
            return _apply_onto(kube, manifest, known, release)
        except ApiError as err:
            if not _replaced(err):
                raise
        # Replaced or deleted since the view saw it: look again.
    else:
        try:
            return kube.create(manifest)
        except ApiError as err:
            if not err.already_exists:
                raise
    meta = manifest["metadata"]
    current = kube.get(manifest["kind"], meta["namespace"], meta["name"])
    if current is None:
        return kube.create(manifest)
    return _apply_onto(kube, manifest, seen(current), release)


def _apply_onto(kube: Kube, manifest: Manifest, existing: Seen, release: tuple[Path, ...] = ()) -> Manifest:
    """Apply onto the object `existing` describes, if its owner controls it (else NameConflict)."""
    if (refused := conflict(manifest, existing)) is not None:
        raise refused
    meta = manifest["metadata"]
    if (entry := existing.created_entry(kube.field_manager)) is not None:
        fields = _released_fields(kube, manifest, entry, release) if release else None
        try:
            kube.rename_created_entry(manifest["kind"], meta["namespace"], meta["name"], existing.uid, entry, fields)
        except ApiError as err:
            if err.status not in (404, 422):  # gone, or another object / entry now
                raise
            raise ApiError(409, "Conflict", f"the object changed since it was read: {err.message}") from err
    return kube.apply(without(manifest, release), uid=existing.uid)


def _released_fields(
    kube: Kube, manifest: Manifest, entry: int, release: tuple[Path, ...]
) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(the created entry's fieldsV1 as read, the same without the `release` paths); None when it is gone."""
    meta = manifest["metadata"]
    current = kube.get(manifest["kind"], meta["namespace"], meta["name"])
    entries = ((current or {}).get("metadata") or {}).get("managedFields") or []
    if entry >= len(entries):
        return None
    fields = entries[entry].get("fieldsV1") or {}
    return fields, without_fields(fields, release)


def without(manifest: Manifest, paths: Sequence[Path]) -> Manifest:
    """A copy of `manifest` without the fields at `paths` (("spec", "suspend"), say)."""
    copy = dict(manifest)
    for path in paths:
        copy = _dropped(copy, path)
    return copy


def without_fields(fields: dict[str, Any], paths: Sequence[Path]) -> dict[str, Any]:
    """A managedFields fieldsV1 set without the fields at `paths` (keys "f:<name>")."""
    copy = dict(fields)
    for path in paths:
        copy = _dropped(copy, tuple(f"f:{part}" for part in path))
    return copy


def _dropped(tree: dict[str, Any], path: Path) -> dict[str, Any]:
    head, *rest = path
    if head not in tree:
        return tree
    if not rest:
        return {k: v for k, v in tree.items() if k != head}
    inner = tree[head]
    return {**tree, head: _dropped(inner, tuple(rest))} if isinstance(inner, dict) else tree


def _replaced(err: ApiError) -> bool:
    """An apply with a uid precondition refused because the object is another one (422: the uid is immutable)
    or gone (409)."""
    if err.status == 409:
        return err.reason != "AlreadyExists"
    return err.status == 422 and "metadata.uid" in err.message


def start_writes(
    kube: Kube, manifests: list[Manifest], lookup: Callable[[Manifest], Seen | None]
) -> Callable[[], list[Manifest]]:
    """Write children that do not depend on one another concurrently (one round trip); the returned function
    waits and returns them in order, or raises the first error (a NameConflict before an ApiError)."""
    if not manifests:
        return list

    def writer(manifest: Manifest) -> Callable[[], Manifest]:
        return lambda: write(kube, manifest, lookup(manifest))

    wait = kube.start_all([writer(m) for m in manifests])

    def done() -> list[Manifest]:
        results, errors = wait()
        if errors:
            raise next((e for e in errors if isinstance(e, NameConflict)), errors[0])
        return list(results)

    return done


def delete_owned(kube: Kube, kind: str, namespace: str, name: str, owner_uid: str, known: Seen | None = None) -> bool:
    """Delete a child its owner no longer wants, if the owner controls it (`known` is the view's record of it;
    read when None). An object of someone else under that name is left alone. True when one was deleted."""
    if known is None:
        current = kube.get(kind, namespace, name)
        if current is None:
            return False
        known = seen(current)
    if known.controller is None or known.controller.uid != owner_uid:
        return False
    kube.delete(kind, namespace, name, uid=known.uid)
    return True
