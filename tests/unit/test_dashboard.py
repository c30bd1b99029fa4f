"""The Grafana dashboard shipped with the chart: valid JSON whose queries only use metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from kubetune.controllers import metrics
from kubetune.trainer.metrics import TrainerMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "kubetune" / "dashboards" / "kubetune.json"
METRIC_NAME = re.compile(r"\b(kubetune_[a-z0-9_]+|process_[a-z0-9_]+)\b")
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "summary": ["_sum", "_count"]}


def exposed_families() -> dict[str, set[str]]:
    """Every metric the operator and the trainer can expose, with the names of its samples."""
    objects = CollectorRegistry()
    objects.register(metrics.ObjectsCollector(lambda: {}))
    families = {}
    for registry in (metrics.REGISTRY, objects, TrainerMetrics("any").registry):
        for family in registry.collect():
            families[family.name] = {family.name + suffix for suffix in SUFFIXES.get(family.type, [""])}
    return families


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # panels inside collapsed rows
    return out


def test_dashboard_queries_use_existing_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    families = exposed_families()
    exposed = set().union(*families.values())
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    variables = [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert len(exprs) >= 10
    used = {name for expr in exprs + variables for name in METRIC_NAME.findall(expr)}
    assert used - exposed == set(), f"the dashboard queries metrics nobody exposes: {sorted(used - exposed)}"
    # Each of kubetune's metrics has a panel; the epoch says nothing the steps do not.
    unused = {name for name, samples in families.items() if name.startswith("kubetune_") and not samples & used}
    assert unused == {"kubetune_trainer_epoch"}


def test_dashboard_takes_its_datasource_from_a_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        sources = [panel["datasource"], *(t["datasource"] for t in panel["targets"])]
        assert all(s == {"type": "prometheus", "uid": "${datasource}"} for s in sources), panel["title"]
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
