"""Integration tests run against a real local control plane, started once per session.

Set KUBETUNE_KUBECONFIG to use a cluster that is already running (e.g. one from
``python -m kubetune.dev up``); it is then left running at the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.integration.support import Api, OperatorProcess, operator_fixture, started_cluster

from kubetune.dev.binaries import ensure_binaries
from kubetune.dev.controlplane import Cluster
from kubetune.dev.nodes import create_simulated_nodes, wait_nodes_ready

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration as ``integration``."""
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A running cluster with the simulated nodes Ready: ``.kubeconfig`` and ``.kubectl(*args)``."""
    existing = os.environ.get("KUBETUNE_KUBECONFIG")
    binaries = ensure_binaries()
    if existing:
        handle = Cluster(kubeconfig=Path(existing), kubectl_path=binaries.kubectl)
        wait_nodes_ready(handle.kubeconfig, create_simulated_nodes(handle.kubeconfig))
        yield handle
        return
    with started_cluster(tmp_path_factory.mktemp("kubetune-cluster")) as started:
        yield started


@pytest.fixture(scope="session")
def operator(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OperatorProcess]:
    """The CRDs and one operator for the whole session (two would fight over the same objects)."""
    yield from operator_fixture(cluster, tmp_path_factory)


@pytest.fixture(scope="session")
def api(cluster: Cluster) -> Api:
    return Api(cluster)


@pytest.fixture
def ns(api: Api, operator: OperatorProcess) -> Iterator[str]:
    """A namespace of its own for one test, with the operator running; deleted afterwards."""
    name = api.create_namespace()
    yield name
    api.kube.delete("Namespace", "", name)
