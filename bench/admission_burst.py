"""Where the create -> Job time of a burst of FineTuneJobs goes, request by request.

    .venv/bin/python bench/admission_burst.py [--bursts 8] [--size 10] [--gpu-nodes 20]

Starts the local control plane with the API server writing an audit log of every create, patch and update,
runs the operator as bench/operator_scale.py does, and creates `--bursts` bursts of `--size` FineTuneJobs
(each burst measured by operator_scale's `run_size`: its create -> Job p50 is printed per burst). Then, per
job, from the audit log's timestamps (when the API server received each request and when it answered):

- operator reaction: the FineTuneJob's create answered -> the Job's create received (the namespace's trainer
  ServiceAccount, Role and RoleBinding are written once per namespace, before the first Job);
- the Job in the API server;
- create answered -> Job answered, the sum.

p50 and max of each over all jobs. Timings are reported, never asserted. Results go to stdout and
bench/results/admission_burst.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(ROOT / "bench"))

import operator_scale as scale  # noqa: E402

from kubetune.k8s.client import Kube  # noqa: E402

STEPS = ("operator reaction", "Job in the API server", "create -> Job answered")
CHILD_RESOURCES = ("finetunejobs", "jobs")


class AuditedControlPlane(scale.BenchControlPlane):
    """The bench's control plane, with an audit log of the writes (metadata only, written synchronously)."""

    def component_argv(self, binaries: Any, ports: dict[str, int]) -> dict[str, list[str]]:
        argv = super().component_argv(binaries, ports)
        policy = self.state_dir / "audit-policy.yaml"
        rules = [{"level": "Metadata", "verbs": ["create", "patch", "update"]}, {"level": "None"}]
        policy.write_text(
            yaml.safe_dump(
                {"apiVersion": "audit.k8s.io/v1", "kind": "Policy", "omitStages": ["RequestReceived"], "rules": rules}
            )
        )
        argv["kube-apiserver"] += [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-mode=blocking",
        ]
        return argv

    @property
    def audit_log(self) -> Path:
        return self.state_dir / "audit.log"


def seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def steps_per_job(audit_log: Path) -> list[tuple[float, ...]]:
    """Per job of the bench's namespaces, the durations of STEPS from the audit log."""
    requests: dict[tuple[str, str], list[tuple[float, float, str, str]]] = {}
    for line in audit_log.read_text().splitlines():
        entry = json.loads(line)
        ref = entry.get("objectRef") or {}
        if not ref.get("namespace", "").startswith("bench-") or ref.get("resource") not in CHILD_RESOURCES:
            continue
        if ref.get("subresource"):
            continue
        job = ref.get("name") or ""
        received, answered = seconds(entry["requestReceivedTimestamp"]), seconds(entry["stageTimestamp"])
        who = "operator" if entry["user"]["username"] == scale.OPERATOR.user else "other"
        requests.setdefault((ref["namespace"], job), []).append((received, answered, ref["resource"], who))
    rows = []
    for found in requests.values():
        found.sort()
        create = next((r for r in found if r[2] == "finetunejobs" and r[3] == "other"), None)
        job = next((r for r in found if r[2] == "jobs" and r[3] == "operator"), None)
        if create and job:
            rows.append((job[0] - create[1], job[1] - job[0], job[1] - create[1]))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bursts", type=int, default=8)
    parser.add_argument("--size", type=int, default=10)
    parser.add_argument("--gpu-nodes", type=int, default=20, help="kwok nodes of 4 GPUs")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "admission_burst.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    state = Path(tempfile.mkdtemp(prefix="kubetune-burst-"))
    plane = AuditedControlPlane(state, controller_qps=200)
    operator: subprocess.Popen[bytes] | None = None
    p50s = []
    try:
        scale.prepare_cluster(plane, args.gpu_nodes)
        operator = scale.start_operator(plane)
        admin = Kube.from_kubeconfig(str(plane.kubeconfig), field_manager="bench")
        kubectl = [str(plane.cluster().kubectl_path), "--kubeconfig", str(plane.kubeconfig)]
        for burst in range(args.bursts):
            result = scale.run_size(args.size, admin, kubectl, operator.pid, plane.pids(), timeout=60)
            p50s.append(result["create_to_job_p50_s"])
            print(f"burst {burst + 1}: create -> Job p50 {result['create_to_job_p50_s']} s", flush=True)
            time.sleep(2)
    finally:
        scale.stop(operator, plane)
    rows = steps_per_job(plane.audit_log)
    summary = {
        step: {"p50_s": round(statistics.median(v), 3), "max_s": round(max(v), 3)}
        for step, v in zip(STEPS, zip(*rows, strict=True), strict=True)
    }
    print(f"\n{len(rows)} jobs in {args.bursts} bursts of {args.size}; create -> Job p50 per burst: {p50s}")
    print("| step | p50 | max |\n|---|---|---|")
    for step, figures in summary.items():
        print(f"| {step} | {figures['p50_s']} s | {figures['max_s']} s |")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    machine = platform.node(), os.cpu_count(), platform.machine()
    args.output.write_text(
        json.dumps(
            {"machine": f"{machine[0]}: {machine[1]} cores, {machine[2]}", "burst_p50_s": p50s, "steps": summary},
            indent=2,
        )
        + "\n"
    )
    shutil.rmtree(state, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
