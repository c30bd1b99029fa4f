"""Helm, as the chart tests run it: the binary from the dev cache, the chart in charts/kubetune."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from kubetune.dev.binaries import ensure_helm

CHART = Path(__file__).resolve().parents[1] / "charts" / "kubetune"


def helm(*args: str, check: bool = True, kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run helm; its caches and config stay out of the user's home."""
    cmd = [str(ensure_helm()), *args]
    if kubeconfig:
        cmd += ["--kubeconfig", str(kubeconfig)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def set_flags(values: dict[str, str]) -> list[str]:
    """``--set-json key=value`` flags (values as JSON, so lists and maps need no Helm escaping)."""
    return [arg for key, value in values.items() for arg in ("--set-json", f"{key}={value}")]


def template_text(
    release: str = "kubetune", namespace: str = "kubetune-system", chart: Path = CHART, **values: str
) -> str:
    """The chart rendered by ``helm template`` with ``--set-json`` values."""
    return helm("template", release, str(chart), "--namespace", namespace, *set_flags(values)).stdout


def template(release: str = "kubetune", namespace: str = "kubetune-system", **values: str) -> list[dict[str, Any]]:
    """The chart's objects as rendered by ``helm template``."""
    return [doc for doc in yaml.safe_load_all(template_text(release, namespace, **values)) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of ``kind`` (and ``name``)."""
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''} in the chart"
    return found[0]
