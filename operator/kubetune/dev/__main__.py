"""``python -m kubetune.dev up|down|status|build``: the local control plane from the command line."""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from kubetune.dev.binaries import ensure_binaries
from kubetune.dev.controlplane import Cluster, ControlPlane, KubectlError, repo_root
from kubetune.dev.nodes import create_simulated_nodes, parse_pools, wait_nodes_ready

DEFAULT_NODES = "gpu=4,cpu=2"


def crd_files(root: Path) -> list[Path]:
    """The CRD manifests in ``<root>/crds`` (none when the folder is missing)."""
    folder = root / "crds"
    return sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]) if folder.is_dir() else []


def up(state_dir: Path | None = None, nodes: str = DEFAULT_NODES, apply_crds: bool = True) -> Cluster:
    """Build or find the binaries, start the control plane, add the simulated nodes and the CRDs."""
    started = time.monotonic()
    plane = ControlPlane(state_dir, ensure_binaries())
    pools = parse_pools(nodes)
    plane.start()
    names = create_simulated_nodes(plane.kubeconfig, pools)  # meanwhile the controllers start up
    plane.wait_ready()
    wait_nodes_ready(plane.kubeconfig, names)
    cluster = plane.cluster()
    print(
        f"kubetune dev: cluster ready in {time.monotonic() - started:.1f}s "
        f"({sum(p.count for p in pools)} simulated nodes)"
    )
    print(f"kubeconfig: {plane.kubeconfig}")
    print(f"export KUBECONFIG={plane.kubeconfig}")
    crds = crd_files(repo_root()) if apply_crds else []
    if crds:
        apply_crd_files(cluster, crds)
        print(f"kubetune dev: applied {len(crds)} CRD files from crds/")
    return cluster


def apply_crd_files(cluster: Cluster, paths: list[Path]) -> None:
    """Server-side apply the CRDs and wait until they are Established."""
    files = [f"--filename={path}" for path in paths]
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", *files)
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *files)
    except KubectlError as error:
        raise RuntimeError(f"the cluster runs, but applying crds/ failed:\n{error.stderr.strip()}") from error


def down(state_dir: Path | None = None, purge: bool = False) -> None:
    """Stop every component; with ``purge`` also delete the state folder (etcd data, certificates)."""
    plane = ControlPlane(state_dir)
    plane.stop()
    if purge:
        shutil.rmtree(plane.state_dir, ignore_errors=True)
    print(f"kubetune dev: stopped{' and removed' if purge else ''} {plane.state_dir}")


def status(state_dir: Path | None = None) -> bool:
    """Print each component's state; True when all are healthy."""
    plane = ControlPlane(state_dir)
    statuses = plane.status()
    for s in statuses:
        state = "healthy" if s.healthy else ("running" if s.running else "stopped")
        print(f"{s.name:<24} {state:<8} pid={s.pid or '-':<8} {s.detail}")
    if plane.kubeconfig.exists():
        print(f"kubeconfig: {plane.kubeconfig}")
    return all(s.healthy for s in statuses)


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m kubetune.dev`` (and later ``kubetune dev``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--state-dir", type=Path, default=None, help="state folder (default: ${KUBETUNE_STATE:-<repo>/.state}/cluster)"
    )
    root = argparse.ArgumentParser(prog="kubetune dev", description="The local control plane with simulated GPU nodes.")
    commands = root.add_subparsers(dest="command", required=True)
    up_cmd = commands.add_parser("up", parents=[common], help="start the cluster (builds the binaries the first time)")
    up_cmd.add_argument("--nodes", default=DEFAULT_NODES, help="simulated nodes, e.g. gpu=250,cpu=2")
    up_cmd.add_argument("--no-crds", action="store_true", help="do not apply crds/*.yaml")
    down_cmd = commands.add_parser("down", parents=[common], help="stop the cluster")
    down_cmd.add_argument("--purge", action="store_true", help="also delete the state folder")
    commands.add_parser("status", parents=[common], help="show each component's health")
    commands.add_parser("build", help="only build or fetch the binaries (slow the first time), e.g. in CI")
    return root


def main(argv: list[str] | None = None) -> int:
    """Entry point; the exit code."""
    args = parser().parse_args(argv)
    if args.command == "up":
        try:
            up(args.state_dir, nodes=args.nodes, apply_crds=not args.no_crds)
        except RuntimeError as error:
            print(f"kubetune dev: {error}", file=sys.stderr)
            return 1
        return 0
    if args.command == "down":
        down(args.state_dir, purge=args.purge)
        return 0
    if args.command == "build":
        print(ensure_binaries())
        return 0
    return 0 if status(args.state_dir) else 1


if __name__ == "__main__":
    sys.exit(main())
