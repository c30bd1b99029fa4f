"""kubetune's images built by hack/images.sh and run with podman (no daemon) the way a kubelet would run the
containers the operator or the chart renders: the same command and args, environment, user, read-only root
file system, capabilities and mounts. Volumes are host folders that the test fills in."""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "hack" / "images.sh"
FIELD_ANNOTATION = re.compile(r"metadata\.annotations\['(.+)'\]")


def storage_env() -> dict[str, str]:
    """The environment that points podman at the storage hack/images.sh builds into."""
    exports = subprocess.run([str(SCRIPT), "env"], check=True, capture_output=True, text=True).stdout
    variables = dict(pair.split("=", 1) for pair in exports.removeprefix("export ").split())
    return {**os.environ, **variables}


def ref(name: str) -> str:
    """The reference hack/images.sh tags an image with."""
    return subprocess.run([str(SCRIPT), "refs", name], check=True, capture_output=True, text=True).stdout.strip()


def build(name: str) -> str:
    """Build (or find in the layer cache) one image; its reference."""
    result = subprocess.run([str(SCRIPT), "build", name], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return ref(name)


def podman(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, env=storage_env(), timeout=timeout)
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}: {result.stderr[-4000:]}"
    return result


@dataclass
class Pod:
    """A rendered pod template and what the kubelet would fill in: its name and namespace, the folders behind
    its volumes, and the secrets its environment reads."""

    template: dict[str, Any]
    workdir: Path
    name: str = "pod-0"
    namespace: str = "default"
    claims: dict[str, Path] = field(default_factory=dict)
    """persistentVolumeClaim name -> host folder."""
    files: dict[str, dict[str, str]] = field(default_factory=dict)
    """configMap/secret/projected volume name -> file name -> content."""
    annotations: dict[str, str] = field(default_factory=dict)
    """Annotations the pod gets beside its template's (e.g. a Job's completion index)."""
    ip: str = "127.0.0.1"
    """status.podIP: the address the pod's containers share (loopback when they run without a network)."""
    kubelet_env: dict[str, str] = field(default_factory=dict)
    """Variables the kubelet adds (KUBERNETES_SERVICE_HOST and _PORT)."""
    kubelet_mounts: dict[str, Path] = field(default_factory=dict)
    """Read-only mounts the kubelet adds: path in the container -> host folder (the service account's)."""

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self.template["spec"])

    def container(self, name: str) -> dict[str, Any]:
        return next(c for c in self.spec["containers"] if c["name"] == name)

    def all_annotations(self) -> dict[str, str]:
        return {**self.template.get("metadata", {}).get("annotations", {}), **self.annotations}

    def volume_folder(self, volume: dict[str, Any]) -> Path:
        """A host folder with the volume's content, readable and writable by the pod's user."""
        folder = self.workdir / "volumes" / volume["name"]
        if "persistentVolumeClaim" in volume:
            folder = self.claims[volume["persistentVolumeClaim"]["claimName"]]
        elif "downwardAPI" in volume:
            annotations = self.all_annotations()
            for item in volume["downwardAPI"]["items"]:
                match = FIELD_ANNOTATION.fullmatch(item["fieldRef"]["fieldPath"])
                assert match, f"downward API field {item['fieldRef']['fieldPath']} is not supported here"
                write(folder / item["path"], annotations[match[1]])
        elif volume["name"] in self.files:
            for name, text in self.files[volume["name"]].items():
                write(folder / name, text)
        else:
            assert "emptyDir" in volume, f"volume {volume['name']}: give its files"
        folder.mkdir(parents=True, exist_ok=True)
        owner = self.spec.get("securityContext", {})
        for path in [folder, *folder.rglob("*")]:
            os.chown(path, owner.get("runAsUser", 0), owner.get("fsGroup", owner.get("runAsGroup", 0)))
        return folder

    def env_value(self, var: dict[str, Any]) -> str:
        if "value" in var:
            return str(var["value"])
        source = var["valueFrom"]
        assert "fieldRef" in source, f"{var['name']}: only values and fieldRefs are supported here"
        path = source["fieldRef"]["fieldPath"]
        match = FIELD_ANNOTATION.fullmatch(path)
        known = {"metadata.name": self.name, "metadata.namespace": self.namespace, "status.podIP": self.ip}
        return self.all_annotations()[match[1]] if match else known[path]

    def run_args(self, container_name: str, *, network: str = "host", detach: bool = False) -> list[str]:
        """`podman run` arguments for one container, as the kubelet would start it."""
        container = self.container(container_name)
        pod_security = self.spec.get("securityContext", {})
        security = container.get("securityContext", {})
        user = security.get("runAsUser", pod_security.get("runAsUser"))
        group = security.get("runAsGroup", pod_security.get("runAsGroup", user))
        args = ["run", "--name", f"{self.name}-{container_name}", f"--network={network}", "--pull=never"]
        args += ["--detach"] if detach else ["--rm"]
        if user is not None:
            args += [f"--user={user}:{group}"]
        if "fsGroup" in pod_security:
            args += [f"--group-add={pod_security['fsGroup']}"]
        if security.get("readOnlyRootFilesystem"):
            # read-only as in a pod: no writable /tmp or /run unless a volume is mounted there
            args += ["--read-only", "--read-only-tmpfs=false"]
        if "ALL" in security.get("capabilities", {}).get("drop", []):
            args += ["--cap-drop=all"]
        if security.get("allowPrivilegeEscalation") is False:
            args += ["--security-opt=no-new-privileges"]
        if "workingDir" in container:
            args += [f"--workdir={container['workingDir']}"]
        for name, value in self.kubelet_env.items():
            args += ["--env", f"{name}={value}"]
        defined: dict[str, str] = {}
        for var in container.get("env", []):
            # $(NAME) names a variable defined earlier in the list, which the kubelet substitutes.
            value = re.sub(r"\$\((\w+)\)", lambda m: defined.get(m[1], m[0]), self.env_value(var))
            defined[var["name"]] = value
            args += ["--env", f"{var['name']}={value}"]
        for target, source in self.kubelet_mounts.items():
            args += ["--volume", f"{source}:{target}:ro"]
        volumes = {v["name"]: v for v in self.spec.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if volume.get("emptyDir", {}).get("medium") == "Memory":
                args += [f"--tmpfs={mount['mountPath']}:rw,mode=1777"]
                continue
            source = self.volume_folder(volume) / mount.get("subPath", "")
            args += ["--volume", f"{source}:{mount['mountPath']}:{'ro' if mount.get('readOnly') else 'rw'}"]
        if container.get("command"):
            args += ["--entrypoint", json.dumps(container["command"])]
        return [*args, container["image"], *container.get("args", [])]


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def registry_binary(cache: Path) -> Path:
    """Debian's docker-registry (the CNCF distribution registry), unpacked from its package into `cache` rather
    than installed: installing it would start it as a system service."""
    binary = cache / "usr" / "bin" / "docker-registry"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        download = ["apt-get", "download", "docker-registry"]
        if subprocess.run(download, cwd=cache, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
            subprocess.run(download, cwd=cache, check=True, capture_output=True)
        (deb,) = cache.glob("docker-registry_*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(cache)], check=True)
    return binary
