"""The pure parts of kubetune.dev.binaries: wrapper go.mod generation and friends."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.dev import binaries

UPSTREAM_GOMOD = """\
// generated header comment
module k8s.io/kubernetes

go 1.26.0

godebug default=go1.26

require (
\tgithub.com/example/lib v1.2.3
\tk8s.io/api v0.0.0
\tk8s.io/client-go v0.0.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go // trailing comment
\tgithub.com/example/lib => github.com/example/fork v1.2.4
)

replace k8s.io/kubectl => ./staging/src/k8s.io/kubectl
"""


def test_local_replaced_modules_lists_only_local_paths_in_order() -> None:
    assert binaries.local_replaced_modules(UPSTREAM_GOMOD) == ["k8s.io/api", "k8s.io/client-go", "k8s.io/kubectl"]


def test_wrapper_gomod_requires_kubernetes_and_pins_each_staging_module() -> None:
    text = binaries.wrapper_gomod(UPSTREAM_GOMOD, "v1.36.2", "v0.36.2")
    lines = text.splitlines()
    assert lines[0] == f"module {binaries.WRAPPER_MODULE}"
    assert "go 1.26.0" in lines
    assert "godebug default=go1.26" in lines
    assert "require k8s.io/kubernetes v1.36.2" in lines
    replaces = [line.strip() for line in lines if "=>" in line]
    assert replaces == [
        "k8s.io/api => k8s.io/api v0.36.2",
        "k8s.io/client-go => k8s.io/client-go v0.36.2",
        "k8s.io/kubectl => k8s.io/kubectl v0.36.2",
    ]
    assert "github.com/example" not in text
    assert "\n\n\n" not in text and text.endswith(")\n")


def test_godebug_block_is_kept_verbatim() -> None:
    upstream = UPSTREAM_GOMOD.replace("godebug default=go1.26", "godebug (\n\tdefault=go1.26\n\tx509sha1=1\n)")
    assert binaries.godebug_directives(upstream) == ["godebug (\n\tdefault=go1.26\n\tx509sha1=1\n)"]
    assert "\tx509sha1=1" in binaries.wrapper_gomod(upstream, "v1.36.2", "v0.36.2")


def test_wrapper_gomod_refuses_a_gomod_without_local_replaces() -> None:
    with pytest.raises(ValueError, match="local path"):
        binaries.wrapper_gomod("module x\n\ngo 1.26.0\n", "v1.36.2", "v0.36.2")


def test_version_ldflags_stamp_both_version_packages() -> None:
    flags = binaries.version_ldflags("v1.36.2")
    assert "-X k8s.io/component-base/version.gitVersion=v1.36.2" in flags
    assert "-X k8s.io/client-go/pkg/version.gitMinor=36" in flags
    assert flags.startswith("-s -w ")


def test_cache_layout_is_keyed_by_version(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path))
    expected = binaries.expected_binaries()
    assert expected.kube_apiserver == tmp_path / "bin" / "kubernetes-v1.36.2" / "kube-apiserver"
    assert expected.kwok == tmp_path / "bin" / "kwok-v0.8.0" / "kwok"
    assert binaries.helm_path(tmp_path) == tmp_path / "bin" / "helm-v4.3.1" / "helm"
    assert expected.etcd == tmp_path / "bin" / "etcd-3.5.1" / "etcd"
    assert binaries.missing_binaries(expected) == [Path(p) for p in vars(expected).values()]
    env = binaries.go_env(tmp_path)
    assert env["GOMODCACHE"].startswith(str(tmp_path)) and env["CGO_ENABLED"] == "0"


def test_wheel_member_finds_exactly_one() -> None:
    names = ["pkg/__init__.py", "pkg-1.0.data/scripts/kubectl", "pkg-1.0.dist-info/RECORD"]
    assert binaries.wheel_member(names, "scripts/kubectl") == "pkg-1.0.data/scripts/kubectl"
    with pytest.raises(RuntimeError):
        binaries.wheel_member(names, "etcdbin/etcd")
