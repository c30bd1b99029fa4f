"""What every handler shares: the API client, the operator configuration, the status writer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune.config import OperatorConfig
from kubetune.k8s import events
from kubetune.k8s.client import Kube
from kubetune.k8s.status_writer import StatusWriter


@dataclass
class Context:
    kube: Kube
    config: OperatorConfig
    status: StatusWriter

    @classmethod
    def create(cls, config: OperatorConfig) -> Context:
        kube = Kube.connect(config.field_manager)
        return cls(kube=kube, config=config, status=StatusWriter(kube))

    def event(self, kind: str, meta: dict[str, Any], warning: bool, reason: str, message: str) -> None:
        events.post(self.kube, kind, meta, "Warning" if warning else "Normal", reason, message)
