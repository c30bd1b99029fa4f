"""The images that `make images` builds, run with podman (no daemon) the way the chart or the operator runs
them: the operator image as the chart's pod against a real API server, with nothing but the chart's
ServiceAccount and RBAC; the trainer and server images are in test_large_images.py (`make test-images`).

This module starts a control plane of its own: the session's operator must not compete with the image's.
"""

from __future__ import annotations

import base64
import json
import subprocess
import tomllib
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests import containers
from tests.helm import template
from tests.integration.support import Api, simulated_ftj, started_cluster, wait_for
from tests.integration.training import wait_done

from kubetune.dev.binaries import cache_root
from kubetune.dev.controlplane import Cluster, free_ports

NS = "kubetune-system"
# Unique per run: containers share the storage with any other run of this module on the machine.
POD = f"kubetune-operator-{uuid.uuid4().hex[:8]}"
Pod = containers.Pod


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with started_cluster(tmp_path_factory.mktemp("images-cluster")) as started:
        yield started


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> Api:
    return Api(cluster)


def test_podman_and_buildah_share_the_storages_run_state(operator_image: str) -> None:
    """podman keeps the run root its database was created with, whatever storage.conf says later; buildah reads
    storage.conf. Both must use the one hack/images.sh writes, or each would keep its own record of mounts. (After
    a build: hack/images.sh installs podman and buildah where they are missing, as on a fresh machine.)"""
    env = containers.storage_env()
    storage = tomllib.loads(Path(env["CONTAINERS_STORAGE_CONF"]).read_text())["storage"]
    used = containers.podman("info", "--format", "{{.Store.RunRoot}}").stdout.strip()
    assert used == storage["runroot"], (
        f"podman's database records the run root {used}: with no containers left (podman ps -a), remove "
        f"{storage['graphroot']}/libpod/bolt_state.db and podman makes a new one"
    )


@pytest.fixture(scope="module")
def operator_image() -> str:
    return containers.build("operator")


def service_account_folder(api: Api, kubeconfig: Path, folder: Path) -> Path:
    """What the kubelet mounts at /var/run/secrets/kubernetes.io/serviceaccount: a token of the chart's
    ServiceAccount, the cluster's CA, the namespace."""
    cluster_entry = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]
    if "certificate-authority-data" in cluster_entry:
        ca = base64.b64decode(cluster_entry["certificate-authority-data"]).decode()
    else:
        ca = Path(cluster_entry["certificate-authority"]).read_text()
    token = api.kubectl("create", "token", "kubetune", "-n", NS, "--duration=1h").stdout.strip()
    for name, text in {"token": token, "ca.crt": ca, "namespace": NS}.items():
        containers.write(folder / name, text)
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)
    return folder


def api_server_address(kubeconfig: Path) -> tuple[str, str]:
    server = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    host, port = server.removeprefix("https://").rsplit(":", 1)
    return host, port


@pytest.fixture(scope="module")
def operator_container(api: Api, operator_image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    """The chart's operator Deployment (its own ports free on this host) running from the image, with the
    chart's CRDs, ServiceAccount, RBAC and configuration applied."""
    liveness, metrics = free_ports(2)
    objects = template(namespace=NS, livenessPort=str(liveness), **{"metrics.port": str(metrics)})
    api.kubectl("create", "namespace", NS, check=False)
    rest = [o for o in objects if o["kind"] != "Deployment"]
    api.kubectl("apply", "--server-side", "-f", "-", input="\n---\n".join(json.dumps(o) for o in rest))
    api.kubectl("wait", "--for=condition=Established", "crd/finetunejobs.kubetune.io", "crd/modelservers.kubetune.io")
    (deployment,) = [o for o in objects if o["kind"] == "Deployment"]
    config_map = next(o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].endswith("-config"))
    # The operator's signing key (the chart makes it once; here the rendered Secret's key, decoded).
    key = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"].endswith("-signing-key"))
    signing_key = {name: base64.b64decode(value).decode() for name, value in key["data"].items()}
    workdir = tmp_path_factory.mktemp("operator-pod")
    host, port = api_server_address(api.cluster.kubeconfig)
    pod = containers.Pod(
        template=deployment["spec"]["template"],
        workdir=workdir,
        name=POD,
        namespace=NS,
        files={"config": config_map["data"], "signing-key": signing_key},
        kubelet_env={"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port},
        kubelet_mounts={
            "/var/run/secrets/kubernetes.io/serviceaccount": service_account_folder(
                api, api.cluster.kubeconfig, workdir / "serviceaccount"
            )
        },
    )
    args = pod.run_args("operator", detach=True)
    assert args[args.index("--entrypoint") + 1] == json.dumps(["kubetune", "operator"])
    containers.podman(*args)
    try:
        yield pod
    finally:
        log = containers.podman("logs", f"{POD}-operator", check=False)
        (workdir / "operator.log").write_text(log.stdout + log.stderr)
        containers.podman("rm", "--force", "--ignore", "--time=5", f"{POD}-operator", check=False)


def test_operator_image_runs_as_the_charts_pod_and_reconciles(api: Api, operator_container: Pod) -> None:
    def holder() -> str | None:
        lease = api.get("Lease", NS, "kubetune") or {}
        return (lease.get("spec") or {}).get("holderIdentity")

    # The chart's --leader-election: the container takes the Lease under its POD_NAME.
    wait_for(lambda: holder() == POD, 90, "the operator container holding the Lease")
    namespace, name = "images-test", f"image-{uuid.uuid4().hex[:6]}"
    api.kubectl("create", "namespace", namespace, check=False)
    api.apply(simulated_ftj(name, namespace))
    job = wait_for(lambda: api.get("Job", namespace, name), 60, "the training Job")
    assert job["metadata"]["ownerReferences"][0]["kind"] == "FineTuneJob"
    assert job["spec"]["template"]["spec"]["containers"][0]["image"] == containers.ref("trainer")
    # kwok completes the pod; the operator in the container carries that into the FineTuneJob's status.
    wait_done(api, namespace, name, timeout=120)


def test_operator_container_is_non_root_with_a_read_only_root(operator_container: Pod) -> None:
    name = f"{POD}-operator"
    assert containers.podman("exec", name, "id", "-u").stdout.strip() == "65532"
    write = containers.podman("exec", name, "touch", "/opt/venv/written", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr
    # /tmp is the chart's emptyDir: writable.
    containers.podman("exec", name, "touch", "/tmp/written")


def test_operator_container_answers_the_charts_liveness_probe(operator_container: Pod) -> None:
    container = operator_container.container("operator")
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == "healthz")
    path = container["livenessProbe"]["httpGet"]["path"]

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    wait_for(healthy, 60, "the liveness endpoint")


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """A registry on 127.0.0.1 (plain HTTP), for as long as the test runs."""
    binary = containers.registry_binary(cache_root() / "tools" / "docker-registry")
    (port,) = free_ports(1)
    config = {
        "version": 0.1,
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "blobs")}},
        "http": {"addr": f"127.0.0.1:{port}"},
    }
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    with open(tmp_path / "registry.log", "wb") as log:
        process = subprocess.Popen([str(binary), "serve", str(tmp_path / "config.yml")], stdout=log, stderr=log)
    try:
        wait_for(lambda: urlopen_status(f"http://127.0.0.1:{port}/v2/") == 200, 30, "the registry")
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def urlopen_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except OSError:
        return 0


def skopeo_config(reference: str, *flags: str) -> dict[str, Any]:
    """The image configuration (user, entry point) at a skopeo reference."""
    command = ["skopeo", "inspect", "--config", *flags, reference]
    result = subprocess.run(command, capture_output=True, text=True, env=containers.storage_env())
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout)["config"])


def test_make_push_copies_the_image_to_a_registry(operator_image: str, registry: str) -> None:
    env = {**containers.storage_env(), "SKOPEO_FLAGS": "--dest-tls-verify=false"}
    push = ["make", "--no-print-directory", "push", f"REGISTRY={registry}/team", "IMAGES=operator"]
    result = subprocess.run(push, cwd=containers.ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    pushed = f"docker://{registry}/team/{operator_image.rsplit('/', 1)[1]}"
    config = skopeo_config(pushed, "--tls-verify=false")
    assert config["User"] == "65532:65532" and config["Entrypoint"] == ["kubetune", "operator"]


def test_archive_is_an_oci_archive_of_the_image(operator_image: str) -> None:
    result = subprocess.run(
        [str(containers.SCRIPT), "archive", "operator"], cwd=containers.ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    archive = containers.ROOT / result.stdout.split()[0]
    assert archive.name == operator_image.rsplit("/", 1)[1].replace(":", "-") + ".oci.tar"
    config = skopeo_config(f"oci-archive:{archive}")
    assert config["User"] == "65532:65532" and config["Entrypoint"] == ["kubetune", "operator"]
