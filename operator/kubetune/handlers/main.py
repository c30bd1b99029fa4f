"""`kubetune operator`: registers the handlers, configures kopf, runs until stopped (with --leader-election, only
while this replica holds the Lease)."""

from __future__ import annotations

import argparse
import contextlib
import http.server
import logging
import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

import kopf

from kubetune import config as operator_config
from kubetune.controllers import metrics, mounts, serving, training, workloads
from kubetune.controllers.context import CHILD_KINDS, Context
from kubetune.controllers.leader import LeaderElection
from kubetune.handlers import children, finetunejob, modelserver  # noqa: F401  (registers the handlers)
from kubetune.k8s import watch
from kubetune.k8s.client import Kube
from kubetune.render.common import MANAGED_BY

log = logging.getLogger(__name__)


class _NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """No diff base. The operator registers only watch-event handlers, which never diff; kopf would
    otherwise deep-copy every object on every event to build a diff base that nobody reads."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """Only watch-event handlers are registered, so kopf writes nothing onto the objects (no annotations,
    no finalizers); the operator posts its own Events."""
    settings.posting.enabled = False
    settings.persistence.diffbase_storage = _NoDiffBase()
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    # Only the operator's own children are watched among pods and the kinds of children it creates.
    managed = f"app.kubernetes.io/managed-by={MANAGED_BY}"
    settings.watching.label_selectors["pods"] = managed
    for kind in CHILD_KINDS:
        group, _version, plural = children.resource(kind)
        settings.watching.label_selectors[group, plural] = managed
    if memo.get("context") is None:
        context = memo.context = Context.create(operator_config.load(memo.get("config_path")))
        metrics.REGISTRY.register(metrics.ObjectsCollector(lambda: context.indexes))
        namespaces = memo.get("namespaces") or []
        failed_mounts = watch.Follower(lambda event: failed_mount(context, event))
        watch.start(context.kube, "Event", namespaces, {"fieldSelector": mounts.FIELDS}, failed_mounts)
        workloads.follow(context, namespaces)


def failed_mount(ctx: Context, event: dict[str, Any]) -> None:
    """A FailedMount Event: when it is about a pod of the operator's that waits, its owner looks again."""
    found = mounts.record(ctx, event)
    if found is None:
        return
    index, key = found
    if index == "training_pods":
        ctx.later(0, training.sync_status_locked, ctx, key)
    elif index == "prepare_pods":
        ctx.later(0, training.reconcile, ctx, key, True)
    else:
        ctx.later(0, serving.reconcile, ctx, key)


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kubetune operator", description="Run the kubetune operator.")
    parser.add_argument("--config", help="operator configuration YAML (default: $KUBETUNE_OPERATOR_CONFIG)")
    parser.add_argument("--namespace", "-n", action="append", default=[], help="watch only these namespaces")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness probe endpoint")
    parser.add_argument(
        "--metrics-address", default="0.0.0.0:8000", help="HOST:PORT of the Prometheus /metrics endpoint ('' = off)"
    )
    parser.add_argument(
        "--leader-election",
        action="store_true",
        help="run as one of several replicas: reconcile only while holding the Lease (controllers/leader.py)",
    )
    parser.add_argument("--lease", default="kubetune-operator", help="NAME of the Lease (with --leader-election)")
    parser.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE", "default"),
        help="namespace of the Lease (default: $POD_NAMESPACE)",
    )
    parser.add_argument(
        "--identity",
        default=os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}",
        help="this replica's name in the Lease (default: $POD_NAME)",
    )
    parser.add_argument("--verbose", "-v", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.metrics_address:
        try:
            metrics.serve(args.metrics_address)
        except (OSError, ValueError) as err:
            parser.error(f"--metrics-address {args.metrics_address}: {err}")
    if not args.verbose:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    election = None
    if args.leader_election:
        election = LeaderElection(Kube.connect(), args.lease_namespace, args.lease, args.identity)
        with standby_liveness(args.liveness):
            election.wait_until_leader()
        election.keep_renewing()
    try:
        kopf.run(
            standalone=True,
            clusterwide=not args.namespace,
            namespaces=args.namespace,
            liveness_endpoint=args.liveness or None,
            memo=kopf.Memo(config_path=args.config, namespaces=args.namespace),
        )
    finally:
        if election is not None:
            election.release()
    return 0


@contextlib.contextmanager
def standby_liveness(endpoint: str) -> Iterator[None]:
    """Answer the liveness probe while this replica waits for the Lease (kopf serves it once it runs)."""
    if not endpoint:
        yield
        return
    url = urllib.parse.urlsplit(endpoint)

    class Alive(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path.split("?")[0] == (url.path or "/") else 404)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer((url.hostname or "0.0.0.0", url.port or 80), Alive)
    thread = threading.Thread(target=server.serve_forever, name="standby-liveness", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
