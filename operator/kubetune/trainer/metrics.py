"""Rank 0's Prometheus endpoint: the progress it reports to the FineTuneJob, as gauges (docs/metrics.md).

The gauges follow the progress reports (every progressIntervalSeconds). The endpoint listens on all addresses
at METRICS_PORT, or KUBETUNE_METRICS_PORT when set (0: no endpoint). Only rank 0 serves, so the workers of one
pod never compete for the port; on the dev cluster "all addresses" is the pod's own IP (the bind shim).
No torch here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Gauge, start_http_server

from kubetune.api.v1alpha1 import Progress
from kubetune.api.v1alpha1.trainerconfig import METRICS_PORT

log = logging.getLogger(__name__)
PORT_ENV = "KUBETUNE_METRICS_PORT"


def metrics_port(env: Mapping[str, str]) -> int:
    """The port to serve on: KUBETUNE_METRICS_PORT, else METRICS_PORT; 0 means no endpoint."""
    return int(env.get(PORT_ENV) or METRICS_PORT)


class TrainerMetrics:
    """The trainer's gauges in a registry of their own, labelled with the FineTuneJob's name."""

    def __init__(self, finetunejob: str) -> None:
        self.registry = CollectorRegistry()
        self._server: WSGIServer | None = None

        def labelled(name: str, doc: str) -> Gauge:
            family = Gauge(f"kubetune_trainer_{name}", doc, ["finetunejob"], registry=self.registry)
            return family.labels(finetunejob)

        self.step = labelled("step", "Optimizer steps done.")
        self.total_steps = labelled("total_steps", "Optimizer steps of the whole run.")
        self.epoch = labelled("epoch", "Epochs done (fractional).")
        self.loss = labelled("loss", "Training loss, averaged since the previous report.")
        self.eval_loss = labelled("eval_loss", "Loss on the validation split at the latest evaluation.")
        self.learning_rate = labelled("learning_rate", "Learning rate at the latest step.")
        self.tokens_per_second = labelled("tokens_per_second", "Input tokens trained per second since the last report.")
        self.eta_seconds = labelled("eta_seconds", "Estimated seconds until the run finishes.")
        unknown = (self.epoch, self.loss, self.eval_loss, self.learning_rate, self.tokens_per_second, self.eta_seconds)
        for gauge in unknown:
            gauge.set(math.nan)  # until reported: no value rather than a misleading 0

    def update(self, progress: Progress) -> None:
        """Set the gauges from one progress report; what it leaves out keeps its last value."""
        self.step.set(progress.step)
        self.total_steps.set(progress.total_steps)
        optional = (
            (self.epoch, progress.epoch),
            (self.loss, progress.loss),
            (self.eval_loss, progress.eval_loss),
            (self.learning_rate, progress.learning_rate),
            (self.tokens_per_second, progress.tokens_per_second),
            (self.eta_seconds, progress.eta_seconds),
        )
        for gauge, value in optional:
            if value is not None:
                gauge.set(value)

    def serve(self, port: int, address: str = "0.0.0.0") -> int | None:
        """Serve /metrics from a daemon thread (port 0: any free port); returns the bound port, or None when
        the port is taken: a metrics endpoint that cannot start never stops training."""
        try:
            self._server, _thread = start_http_server(port, address, registry=self.registry)
        except OSError as err:
            log.warning("no metrics endpoint on %s:%d: %s", address, port, err)
            return None
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
