"""The Argo CD health checks in argocd/resource_customizations, run in a real Lua runtime.

Each case of every health_test.yaml (argo-cd's own format) feeds its testdata object to health.lua and
compares the result, under Lua 5.1 (the dialect of Argo CD's gopher-lua) and 5.4. The testdata objects are
validated by the API models, so they cannot drift from the API.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune.api.v1alpha1 import API_VERSION, GROUP, KINDS, FineTuneJob, ModelServer

ROOT = Path(__file__).resolve().parents[2]
CUSTOMIZATIONS = ROOT / "argocd" / "resource_customizations" / GROUP
EXAMPLES = ROOT / "examples"
LUA_VERSIONS = ("lua51", "lua54")
MODELS: dict[str, type[FineTuneJob] | type[ModelServer]] = {kind.__name__: kind for kind in KINDS}
REQUIRED_STATUSES = {
    "FineTuneJob": {"Progressing", "Healthy", "Degraded", "Suspended"},
    "ModelServer": {"Progressing", "Healthy", "Degraded"},
}
# The condition types the operator writes (status/finetunejob.py, handlers/finetunejob.py, status/modelserver.py).
CONDITION_TYPES = {
    "FineTuneJob": {"Admitted", "Running", "Suspended", "Succeeded", "Failed", "Queued", "Preempted"},
    "ModelServer": {"Ready", "AdaptersReady", "Autoscaling"},
}


class _StringTimestamps(yaml.SafeLoader):
    """YAML without implicit timestamps: the API server hands Argo CD RFC 3339 strings, not dates."""


_StringTimestamps.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_StringTimestamps)


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.load_all(path.read_text(), Loader=_StringTimestamps) if doc is not None]


def to_lua(lua: Any, value: Any) -> Any:
    """`value` (parsed JSON/YAML) as Lua values, the way Argo CD hands an object to health.lua.

    Mappings and lists become tables, lists 1-based; null entries of a mapping are left out (a Lua table
    cannot hold nil, and reading them gives nil as in Argo CD). Numbers become floats, as JSON numbers are
    in gopher-lua, so a script that concatenates a number fails here as it would show "2.0" under 5.4.
    """
    if isinstance(value, dict):
        table = lua.table()
        for key, item in value.items():
            if item is not None:
                table[key] = to_lua(lua, item)
        return table
    if isinstance(value, list):
        if any(item is None for item in value):
            raise ValueError("a Lua array cannot hold nil")
        table = lua.table()
        for index, item in enumerate(value, start=1):
            table[index] = to_lua(lua, item)
        return table
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        return float(value)
    raise TypeError(f"no Lua value for {type(value).__name__}")


def health(script: Path, obj: dict[str, Any], lua_version: str) -> dict[str, Any]:
    """Run `script` with the global `obj` like Argo CD does; the returned table as a dict."""
    runtime = importlib.import_module(f"lupa.{lua_version}").LuaRuntime()
    runtime.globals().obj = to_lua(runtime, obj)
    result = runtime.execute(script.read_text())
    return dict(result.items())


@dataclass(frozen=True)
class Case:
    kind: str
    input_path: Path
    status: str
    message: str

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.input_path.stem}"


def kind_dirs() -> list[Path]:
    return sorted(p for p in CUSTOMIZATIONS.iterdir() if p.is_dir())


def cases() -> list[Case]:
    found = []
    for folder in kind_dirs():
        for test in load(folder / "health_test.yaml")["tests"]:
            expected = test["healthStatus"]
            found.append(Case(folder.name, folder / test["inputPath"], expected["status"], expected.get("message", "")))
    return found


def sample_files() -> list[Path]:
    return sorted(CUSTOMIZATIONS.glob("*/testdata/*.yaml"))


@pytest.mark.parametrize("lua_version", LUA_VERSIONS)
@pytest.mark.parametrize("case", cases(), ids=lambda c: c.id)
def test_health(case: Case, lua_version: str) -> None:
    result = health(CUSTOMIZATIONS / case.kind / "health.lua", load(case.input_path), lua_version)
    assert (result.get("status"), result.get("message")) == (case.status, case.message)


def test_every_kind_has_a_health_check() -> None:
    assert [p.name for p in kind_dirs()] == sorted(MODELS)
    for folder in kind_dirs():
        assert {p.name for p in folder.iterdir() if p.is_file()} == {"health.lua", "health_test.yaml"}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_testdata_file_is_a_case(kind: str) -> None:
    tested = {c.input_path for c in cases() if c.kind == kind}
    assert tested <= set(sample_files()), "a test names a file that does not exist"
    untested = [p.name for p in sample_files() if p.parent.parent.name == kind and p not in tested]
    assert not untested, f"testdata without a test in {kind}/health_test.yaml"


@pytest.mark.parametrize("kind", sorted(REQUIRED_STATUSES))
def test_the_statuses_are_covered(kind: str) -> None:
    covered = {c.status for c in cases() if c.kind == kind}
    assert REQUIRED_STATUSES[kind] <= covered


@pytest.mark.parametrize("path", sample_files(), ids=lambda p: f"{p.parent.parent.name}/{p.stem}")
def test_testdata_is_what_the_api_allows(path: Path) -> None:
    kind = path.parent.parent.name
    body = load(path)
    assert (body["apiVersion"], body["kind"]) == (API_VERSION, kind)
    MODELS[kind].model_validate(body)
    types = {c["type"] for c in (body.get("status") or {}).get("conditions") or []}
    assert types <= CONDITION_TYPES[kind], f"condition types the operator never writes: {types - CONDITION_TYPES[kind]}"


@pytest.mark.parametrize("lua_version", LUA_VERSIONS)
def test_to_lua_converts_like_argo_cd(lua_version: str) -> None:
    runtime = importlib.import_module(f"lupa.{lua_version}").LuaRuntime()
    runtime.globals().obj = to_lua(
        runtime, {"a": [[1, 2], {"b": True}], "off": False, "gone": None, "s": "x", "n": 3, "empty": []}
    )
    probe = runtime.execute(
        "return #obj.a, obj.a[1][2], obj.a[2].b, obj.off, obj.gone == nil, obj.s, string.format('%d', obj.n),"
        " #obj.empty"
    )
    assert tuple(probe) == (2, 2, True, False, True, "x", "3", 0)
    with pytest.raises(ValueError):
        to_lua(runtime, [1, None])


# --- examples/argocd ------------------------------------------------------------------------------


def example_objects() -> list[dict[str, Any]]:
    return [doc for path in sorted((EXAMPLES / "argocd").rglob("*.yaml")) for doc in load_all(path)]


def kubetune_objects() -> list[dict[str, Any]]:
    return [doc for doc in example_objects() if doc.get("apiVersion") == API_VERSION]


def test_example_workloads_are_valid() -> None:
    found = kubetune_objects()
    assert {o["kind"] for o in found} == set(MODELS)
    for body in found:
        MODELS[body["kind"]].model_validate(body)


def test_example_workloads_are_the_readme_examples() -> None:
    """The Argo CD workloads are examples/*.yaml with sync waves: one spec to keep right."""
    plain = {(d["kind"], d["metadata"]["name"]): d for p in EXAMPLES.glob("*.yaml") for d in load_all(p)}
    for body in kubetune_objects():
        assert body["spec"] == plain[(body["kind"], body["metadata"]["name"])]["spec"]


def wave(body: dict[str, Any]) -> int:
    return int(body["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-wave", "0"))


def test_example_sync_waves_follow_the_references() -> None:
    """A FineTuneJob comes after the job it starts from; a ModelServer after the jobs whose adapters it names."""
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in kubetune_objects()}
    for body in by_name.values():
        spec = body["spec"]
        refs = [spec["fromFineTuneJob"]] if spec.get("fromFineTuneJob") else []
        refs += [a["fromFineTuneJob"] for a in spec.get("adapters", []) if a.get("fromFineTuneJob")]
        for ref in refs:
            assert wave(by_name[("FineTuneJob", ref)]) < wave(body), f"{body['metadata']['name']} -> {ref}"


def test_example_applications_point_into_this_repository() -> None:
    apps = [d for d in example_objects() if d.get("kind") == "Application"]
    assert apps
    for app in apps:
        source = app["spec"]["source"]
        assert source["path"] in ("charts/kubetune", "examples/argocd/workloads")
        assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
    workloads = next(a for a in apps if a["spec"]["source"]["path"] == "examples/argocd/workloads")
    assert (ROOT / workloads["spec"]["source"]["path"]).is_dir()


def test_argocd_cm_example_carries_the_health_checks() -> None:
    """The argocd-cm example holds copies of the Lua files: the same text under argo-cd's key names."""
    patch = load(EXAMPLES / "argocd" / "argocd-cm-patch.yaml")
    expected = {
        f"resource.customizations.health.{GROUP}_{folder.name}": (folder / "health.lua").read_text()
        for folder in kind_dirs()
    }
    assert patch["data"] == expected, (
        "examples/argocd/argocd-cm-patch.yaml differs from argocd/resource_customizations: copy each health.lua"
    )
