"""The operator at scale on the local control plane: N FineTuneJobs -> N training Jobs -> N Succeeded.

    .venv/bin/python bench/operator_scale.py [--sizes 10,100,1000] [--gpu-nodes 250]

Starts its own control plane with kwok GPU nodes (4 GPUs each), the CRDs and the operator (as its own
user, so the API server can count its requests), then for each N creates N single-GPU FineTuneJobs in a
fresh namespace and prints:

- create-to-Job latency p50/p99: from the create call returning to the training Job's first watch event;
- convergence: from the first create to every FineTuneJob Succeeded (kwok completes the pods), and apart
  from it when every training Job was complete (the Job controller's part) and how long after its Job
  completed each FineTuneJob showed Succeeded (the operator's part, p50/p99);
- operator peak RSS and CPU seconds, and the CPU seconds of every control-plane component and of the
  bench itself (its watches and creates), so that it shows where the two cores went;
- API requests per job: the operator's requests counted by the API server (a FlowSchema matching its user,
  `apiserver_flowcontrol_dispatched_requests_total`), watches included, divided by N; the same for all
  clients together, and the API server's CPU milliseconds per request;
- the load average before and after;
- stage by stage (FineTuneJob -> Job -> pod -> bound -> Running -> pod Succeeded -> Job complete ->
  FineTuneJob Succeeded): how long each step took (p50/p99) and when the last job got through it, so that
  the stage that holds the others up shows.

Everything is observed through watches (no polling of the API server). Three cluster settings can be raised,
and are recorded with the results: `--controller-qps` (the kube-controller-manager's client rate limit, 20
requests/s by default), `--job-syncs` (its Job controller's workers, 5 by default) and `--kwok-parallelism`
(the pod stages kwok plays at once for all its simulated kubelets, 4 by default). `--profile-apiserver FILE`
writes a CPU profile of the API server during the largest size (`go tool pprof -top kube-apiserver FILE`).

`--without-operator` leaves the operator out and creates the N training Jobs themselves (the Job the operator
would render, without an owner): what the control plane alone needs for them on this machine, the floor
under any operator. `--compare` measures both in one run, size by size: first the floor (the operator
stopped), then the same N as FineTuneJobs (the operator started again), and prints the ratios: the time until
all FineTuneJobs Succeeded over the time until all bare Jobs completed, and the API requests per job of all
clients with the operator against those without (issue 21's targets: at most 1.25 and 20).

The operator runs without the prepare step (issue 17's CPU Job before each training Job) unless `--prepare`:
with it, a FineTuneJob brings a second Job and pod, which the floor does not have.

`--model-servers N` (200 by default when 1000 is among the sizes): after the largest size has converged, N
ModelServers in its namespace, each serving `--adapters-per-server` (5) of its Succeeded FineTuneJobs, and
how long until each server's status lists all its adapters Loaded (p50/p99/last from the first create), the
operator's peak RSS during that phase, its API requests per server and the CPU seconds per component. The
operator loads the adapters as on a cluster: over HTTP, signed, at each pod's IP and fetcher port, where
bench/serving_pods.py runs the real adapter fetcher in front of a fake vLLM and a fake S3 (kwok's pods get
addresses in a 127.N.0.0/16 the bench claims, so nothing of another cluster on the machine is reached).

Targets (issue 21, docs/scale.md): p50 < 0.3 s at 10 jobs, 1000 jobs within 1.25x of the floor, at most 20
requests per job from all clients, RSS < 250 MB. Timings are reported, never asserted. Results go to stdout
and bench/results/operator_scale.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from kubetune.api.v1alpha1 import FineTuneJob  # noqa: E402
from kubetune.config import OperatorConfig  # noqa: E402
from kubetune.dev.binaries import ensure_binaries  # noqa: E402
from kubetune.dev.controlplane import ControlPlane, kubeconfig_dict  # noqa: E402
from kubetune.dev.nodes import create_simulated_nodes, parse_pools, wait_nodes_ready  # noqa: E402
from kubetune.dev.pki import CLIENT_EXTENSIONS, ClientIdentity, signed_cert  # noqa: E402
from kubetune.dev.podranges import claim_pod_range, release_pod_range  # noqa: E402
from kubetune.k8s.client import Kube  # noqa: E402
from kubetune.planner import plan_job  # noqa: E402
from kubetune.render import finetunejob as render  # noqa: E402
from kubetune.render.common import LABEL_FINETUNEJOB, LABEL_MODELSERVER  # noqa: E402
from kubetune.render.modelserver import FETCHER_CONTAINER  # noqa: E402

# Not in system:masters: that group is matched by the built-in "exempt" FlowSchema first.
OPERATOR = ClientIdentity("bench-operator", "kubetune-operator-bench", ("kubetune-bench",))
FLOW_SCHEMA = "kubetune-operator-bench"
SERVING_PODS = Path(__file__).resolve().parent / "serving_pods.py"


def finetunejob(name: str, namespace: str) -> dict[str, Any]:
    """A small single-GPU job (Qwen2.5-0.5B, seq 2048): the planner finds it feasible on a 24 GB GPU."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B"},
            "dataset": {"uri": "s3://bench/data.jsonl"},
            "output": {"uri": f"s3://bench/{namespace}/{name}"},
            "hyperparameters": {"globalBatchSize": 8, "maxSeqLength": 2048, "maxSteps": 10},
            "resources": {"nodes": 1, "gpusPerNode": 1, "gpuType": "rtx-4090d"},
            "podMetadata": {"annotations": {"pod-complete.stage.kwok.x-k8s.io/delay": "1s"}},
        },
    }


def modelserver(name: str, namespace: str, jobs: list[str]) -> dict[str, Any]:
    """One single-GPU server of the jobs' base model, serving the adapters of `jobs` under their names."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "ModelServer",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B"},
            "adapters": [{"name": job, "fromFineTuneJob": job} for job in jobs],
            "maxLoras": len(jobs),
            "replicas": 1,
            "gpuType": "rtx-4090d",
        },
    }


def server_jobs(index: int, per_server: int, jobs: int) -> list[str]:
    """The FineTuneJobs whose adapters server `index` serves: the next `per_server` of the `jobs` created by
    `run_size` (job-0000 ...), going round when there are fewer jobs than adapters in all."""
    return [f"job-{(index * per_server + k) % jobs:04d}" for k in range(per_server)]


def all_loaded(adapters: int) -> str:
    """What `SERVER_STATES` prints for a server whose status lists `adapters` adapters, every one Loaded."""
    return " ".join(["Loaded"] * adapters)


# A ModelServer's name and the state of each adapter its status lists, in order ("Loaded Loaded Pending").
SERVER_STATES = "{.metadata.name} {.status.adapters[*].state}{'\\n'}"


def serving_pods_template() -> str:
    """A server pod's name, IP and the operator's public key from its fetcher's environment: what the fetcher
    of `serving_pods.py` needs to stand in for the pod's sidecar."""
    key = f'{{.spec.containers[?(@.name=="{FETCHER_CONTAINER}")].env[?(@.name=="KUBETUNE_OPERATOR_PUBLIC_KEY")].value}}'
    return f"{{.metadata.name}} {{.status.podIP}} {key}{{'\\n'}}"


def bare_job(name: str, namespace: str) -> dict[str, Any]:
    """The training Job the operator would render for `finetunejob(name, namespace)`, standing alone: no
    owner, and the namespace's default ServiceAccount (the operator's kubetune-trainer is not created)."""
    body = finetunejob(name, namespace)
    body["metadata"]["uid"] = "00000000-0000-0000-0000-000000000000"
    ftj = FineTuneJob.model_validate(body)
    config = OperatorConfig()
    gpu = config.gpu_type(ftj.spec.resources.gpu_type)
    plan = plan_job(ftj.spec, gpu_memory_gib=gpu.memory_gib, gpu_type=ftj.spec.resources.gpu_type)
    job = render.training_job(ftj, render.trainer_config(ftj, plan, None), config)
    del job["metadata"]["ownerReferences"]
    job["spec"]["template"]["spec"]["serviceAccountName"] = "default"
    # Not the operator's: its watches select its children by this label, and with --compare the floor's 1000 Jobs
    # and pods stay in the cluster while the operator runs (they raised its RSS from about 175 to 285 MiB).
    for meta in (job["metadata"], job["spec"]["template"]["metadata"]):
        meta["labels"].pop("app.kubernetes.io/managed-by", None)
    return job


def flow_schema() -> dict[str, Any]:
    """Classifies the operator's requests so the API server counts them apart from everyone else's."""
    return {
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
        "kind": "FlowSchema",
        "metadata": {"name": FLOW_SCHEMA},
        "spec": {
            "matchingPrecedence": 500,
            "priorityLevelConfiguration": {"name": "workload-high"},
            "rules": [
                {
                    "subjects": [{"kind": "User", "user": {"name": OPERATOR.user}}],
                    "resourceRules": [
                        {
                            "verbs": ["*"],
                            "apiGroups": ["*"],
                            "resources": ["*"],
                            "namespaces": ["*"],
                            "clusterScope": True,
                        }
                    ],
                    "nonResourceRules": [{"verbs": ["*"], "nonResourceURLs": ["*"]}],
                }
            ],
        },
    }


def dispatched_requests(kube: Kube) -> tuple[float, float]:
    """Requests the API server has dispatched so far: (the operator's user's, everyone's)."""
    response = kube.api.call_api(
        "GET", kube.api.configuration.host + "/metrics", header_params={"Accept": "text/plain"}
    )
    response.read()
    pattern = re.compile(r"^apiserver_flowcontrol_dispatched_requests_total\{([^}]*)\} (\S+)$")
    operator = everyone = 0.0
    for line in response.data.decode().splitlines():
        if m := pattern.match(line):
            everyone += float(m.group(2))
            if f'flow_schema="{FLOW_SCHEMA}"' in m.group(1):
                operator += float(m.group(2))
    return operator, everyone


def apiserver_profile(kube: Kube, seconds: int, path: Path) -> threading.Thread:
    """Fetch a CPU profile of the API server over the next `seconds` in the background (read it with
    `go tool pprof -top kube-apiserver PATH`)."""

    def fetch() -> None:
        response = kube.api.call_api(
            "GET",
            f"{kube.api.configuration.host}/debug/pprof/profile?seconds={seconds}",
            _request_timeout=seconds + 60,
        )
        response.read()
        path.write_bytes(response.data or b"")

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    return thread


def cluster_admin_binding() -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "kubetune-operator-bench"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": OPERATOR.user}],
    }


def watch_line(line: str) -> tuple[str, str] | None:
    """(name, state) of one line a `Watcher`'s template printed: the first word, and the words after it."""
    parts = line.split()
    return (parts[0], " ".join(parts[1:])) if parts else None


class Watcher:
    """`kubectl get --watch` in the background: when each object was first seen, its latest state (what its line
    says after the name), and when it first showed `done` (a state value, or "*" for any); `all_done` is set once
    `expected` objects have."""

    def __init__(
        self, kubectl: list[str], resource: str, namespace: str, template: str, done: str = "", selector: str = ""
    ) -> None:
        self.first_seen: dict[str, float] = {}
        self.state: dict[str, str] = {}
        self.reached: dict[str, dict[str, float]] = {}
        """state -> object -> when it was first seen in that state"""
        self.done_at: dict[str, float] = {}
        self.done = done
        self.expected = 0
        self.all_done = threading.Event()
        self.restarts = 0
        self.cmd = [
            *kubectl,
            "get",
            resource,
            "-n",
            namespace,
            "--watch",
            "--output-watch-events=false",
            *(["-l", selector] if selector else []),
            "-o",
            f"jsonpath={template}",
        ]
        self.stopping = False
        self.ended: list[dict[str, Any]] = []
        """Each time kubectl ended by itself: when (monotonic), its exit code and the end of its stderr."""
        self.proc = self._start()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _start(self) -> subprocess.Popen[str]:
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115  # read when kubectl ends, then replaced
        return subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=self.stderr, text=True, bufsize=1)

    def _read(self) -> None:
        while True:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self._line(line, time.monotonic())
            self.proc.wait()
            if self.stopping:
                return
            # The watch ended (the API server closed it): list and watch again; nothing seen is lost.
            self.restarts += 1
            self.stderr.seek(0)
            self.ended.append(
                {"at": time.monotonic(), "exit": self.proc.returncode, "stderr": self.stderr.read()[-300:]}
            )
            self.proc = self._start()

    def _line(self, line: str, now: float) -> None:
        seen = watch_line(line)
        if seen is None:
            return
        name, state = seen
        self.first_seen.setdefault(name, now)
        self.state[name] = state
        self.reached.setdefault(state, {}).setdefault(name, now)
        if state and self.done in (state, "*") and name not in self.done_at:
            self.done_at[name] = now
            if self.expected and len(self.done_at) >= self.expected:
                self.all_done.set()

    def mark_done(self, name: str, at: float) -> None:
        """Record `name` as done at `at` (monotonic) without a line of the watch (`missed_by_the_watch`)."""
        self.done_at.setdefault(name, at)
        if self.expected and len(self.done_at) >= self.expected:
            self.all_done.set()

    def stop(self) -> None:
        self.stopping = True
        self.proc.terminate()
        self.thread.join(timeout=10)


def process_stats(pid: int) -> tuple[float, float]:
    """(peak RSS in MiB, CPU seconds) of a process."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm_kib = int(re.search(r"VmHWM:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    return hwm_kib / 1024, cpu


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each named process (0 when it is gone)."""
    found = {}
    for name, pid in pids.items():
        try:
            found[name] = process_stats(pid)[1]
        except (OSError, AttributeError):
            found[name] = 0.0
    return found


def children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children (the kubectl watches)."""
    usage = os.times()
    return usage.children_user + usage.children_system


def log_problems(log: Path) -> dict[str, int]:
    """How often the operator logged each warning or error (its message up to the first colon), so that a
    result shows the retries and failures behind it even when the log itself is gone."""
    found: dict[str, int] = {}
    if not log.exists():
        return found
    for line in log.read_text(errors="replace").splitlines():
        if match := re.match(r"\S+ \S+ (WARNING|ERROR) (\S+): ([^:]*)", line):
            message = re.sub(r"[\w.-]+/[\w.-]+", "NAMESPACE/NAME", match.group(3))  # one count for all jobs
            key = f"{match.group(1)} {match.group(2)}: {message}"
            found[key] = found.get(key, 0) + 1
    return found


def show(value: float | None, unit: str = " s") -> str:
    """A figure for the printed table; "-" for one that does not apply (no operator)."""
    return "-" if value is None else f"{value}{unit}"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def first_reached(watcher: Watcher, matches: Any) -> dict[str, float]:
    """Per object, when it was first seen in a state for which `matches(state)` holds."""
    found: dict[str, float] = {}
    for state, seen in watcher.reached.items():
        if matches(state):
            for name, at in seen.items():
                found[name] = min(at, found.get(name, at))
    return found


def stages(
    start: float, created: dict[str, float], jobs: Watcher, pods: Watcher, ftjs: Watcher | None
) -> list[dict[str, Any]]:
    """The pipeline of one job, stage by stage: how long each step took (p50/p99 over the jobs) and when the
    last job got through it (seconds after the first create), so that the slowest stage shows. Without
    FineTuneJobs (`ftjs` None: the bench created the Jobs) the pipeline starts at the Job."""
    points = [
        ("created", created),
        *([("Job (operator)", jobs.first_seen)] if ftjs else []),
        ("pod (Job controller)", pods.first_seen),
        ("bound (scheduler)", first_reached(pods, lambda s: not s.endswith("/"))),
        ("Running (kwok)", first_reached(pods, lambda s: s.startswith("Running"))),
        ("pod Succeeded (kwok, 1 s delay)", first_reached(pods, lambda s: s.startswith("Succeeded"))),
        ("Job complete (Job controller)", jobs.done_at),
        *([("Succeeded (operator)", ftjs.done_at)] if ftjs else []),
    ]
    rows = []
    for (_, before), (name, after) in itertools.pairwise(points):
        steps = [after[k] - before[k] for k in after if k in before]
        rows.append(
            {
                "stage": name,
                "p50_s": round(statistics.median(steps), 3) if steps else None,
                "p99_s": round(percentile(steps, 0.99), 3) if steps else None,
                "last_at_s": round(max(after.values()) - start, 1) if after else None,
                "count": len(after),
            }
        )
    return rows


class BenchControlPlane(ControlPlane):
    """The local control plane, with the controller-manager's client rate limit raised when asked, and kwok's pods
    in a loopback range of its own (claimed like a node agent's), where the bench's server pods answer the
    operator at their IPs and no other cluster of the machine places its pods."""

    def __init__(
        self,
        state_dir: Path,
        controller_qps: int,
        job_syncs: int = 0,
        kwok_parallelism: int = 0,
        profiling: bool = False,
    ) -> None:
        super().__init__(state_dir, ensure_binaries())
        self.controller_qps = controller_qps
        self.job_syncs = job_syncs
        self.kwok_parallelism = kwok_parallelism
        self.profiling = profiling
        self.pod_cidr = claim_pod_range(state_dir)

    def component_argv(self, binaries: Any, ports: dict[str, int]) -> dict[str, list[str]]:
        argv = super().component_argv(binaries, ports)
        # kwok gives the pods the addresses after its gateway (.0.1) in this range.
        gateway = self.pod_cidr.replace(".0.0/", ".0.1/")
        argv["kwok"] = [f"--cidr={gateway}" if a.startswith("--cidr=") else a for a in argv["kwok"]]
        if self.profiling:
            apiserver = argv["kube-apiserver"]
            argv["kube-apiserver"] = [a.replace("--profiling=false", "--profiling=true") for a in apiserver]
        if self.controller_qps:
            qps = self.controller_qps
            argv["kube-controller-manager"] += [f"--kube-api-qps={qps}", f"--kube-api-burst={2 * qps}"]
        if self.job_syncs:
            argv["kube-controller-manager"].append(f"--concurrent-job-syncs={self.job_syncs}")
        if self.kwok_parallelism:
            # kwok plays 4 pod stages at a time by default (one worker pool for every simulated kubelet)
            # (a configuration file replaces kwok's defaults: the other pools keep their default sizes here)
            options = {
                "podPlayStageParallelism": self.kwok_parallelism,
                "nodePlayStageParallelism": 4,
                "nodeLeaseParallelism": 4,
                "podsOnNodeSyncParallelism": 1,
                "enablePodsOnNodeSyncListPager": True,
            }
            config = self.state_dir / "kwok-options.yaml"
            config.write_text(
                yaml.safe_dump(
                    {"apiVersion": "config.kwok.x-k8s.io/v1alpha1", "kind": "KwokConfiguration", "options": options}
                )
            )
            argv["kwok"].append(f"--config={config}")
        return argv

    def stop(self) -> None:
        super().stop()
        release_pod_range(self.state_dir)

    def pids(self) -> dict[str, int]:
        state = json.loads(self.state_file.read_text())
        return {name: int(entry["pid"]) for name, entry in state["processes"].items()}


def missed_by_the_watch(admin: Kube, namespace: str, watcher: Watcher, start: float, start_wall: float) -> list[str]:
    """FineTuneJobs the API server shows Succeeded that the watch never printed so, recorded as done when their
    Succeeded condition says (whole seconds). After a kubectl watch that ended and was started again, an update
    can be missing from what it prints (seen in --compare runs at 1000 jobs: 1 to 15 jobs, with the FineTuneJob
    Succeeded in the API server); without this the size would wait for its timeout."""
    found = []
    for ftj in admin.list("FineTuneJob", namespace):
        name, status = ftj["metadata"]["name"], ftj.get("status") or {}
        condition = next((c for c in status.get("conditions") or [] if c["type"] == "Succeeded"), None)
        if name in watcher.done_at or status.get("state") != "Succeeded" or condition is None:
            continue
        wall = datetime.fromisoformat(condition["lastTransitionTime"].replace("Z", "+00:00")).timestamp()
        watcher.mark_done(name, start + wall - start_wall)
        found.append(name)
    return found


def unfinished(admin: Kube, namespace: str, names: list[str], most: int = 10) -> list[dict[str, Any]]:
    """What the API server says of FineTuneJobs that never showed Succeeded (at most `most`): their state,
    conditions and resourceVersion, and their training Job's conditions."""
    found = []
    for name in names[:most]:
        ftj = admin.get("FineTuneJob", namespace, name) or {}
        job = admin.get("Job", namespace, name) or {}
        status = ftj.get("status") or {}
        found.append(
            {
                "name": name,
                "state": status.get("state"),
                "conditions": [(c["type"], c["status"], c.get("reason")) for c in status.get("conditions") or []],
                "resourceVersion": (ftj.get("metadata") or {}).get("resourceVersion"),
                "job_conditions": [(c["type"], c["status"]) for c in (job.get("status") or {}).get("conditions") or []],
            }
        )
    return found


def run_size(
    n: int,
    admin: Kube,
    kubectl: list[str],
    operator_pid: int | None,
    components: dict[str, int],
    timeout: float,
    profile: tuple[Path, int] | None = None,
) -> dict[str, Any]:
    """Create N FineTuneJobs and measure them; without an operator (`operator_pid` None) create the N
    training Jobs themselves, which measures the control plane's own part."""
    with_operator = operator_pid is not None
    namespace = f"bench-{n}-{int(time.time()) % 100000}"
    admin.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    if not with_operator:
        wait_for_default_service_account(admin, namespace)
    load_before = load_average()
    own_before = time.process_time() + children_cpu_seconds()
    # The training Jobs only (with the prepare step on, each FineTuneJob also has a CPU Job first).
    jobs_template = "{.metadata.name} {.status.completionTime}{'\\n'}"
    jobs = Watcher(kubectl, "jobs", namespace, jobs_template, "*", selector=LABEL_FINETUNEJOB)
    ftjs = None
    if with_operator:
        ftjs = Watcher(kubectl, "finetunejobs", namespace, "{.metadata.name} {.status.state}{'\\n'}", "Succeeded")
        ftjs.expected = n
    jobs.expected = n
    label = LABEL_FINETUNEJOB.replace(".", "\\.")
    template = f"{{.metadata.labels.{label}}} {{.status.phase}}/{{.spec.nodeName}}{{'\\n'}}"
    pods = Watcher(kubectl, "pods", namespace, template)
    watchers = [w for w in (jobs, ftjs, pods) if w is not None]
    time.sleep(1.0)  # let the watches start
    requests_before = dispatched_requests(admin)
    cpu_before = process_stats(operator_pid)[1] if operator_pid else 0.0
    components_before = cpu_seconds(components)
    created: dict[str, float] = {}
    render = finetunejob if with_operator else bare_job

    def create(i: int) -> None:
        name = f"job-{i:04d}"
        admin.create(render(name, namespace))
        created[name] = time.monotonic()

    profiling = apiserver_profile(admin, profile[1], profile[0]) if profile else None
    start, start_wall = time.monotonic(), time.time()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(create, range(n)))
    create_seconds = time.monotonic() - start
    last = ftjs if ftjs is not None else jobs
    missed: list[str] = []
    deadline = start + timeout
    while not last.all_done.wait(max(0.0, min(5.0, deadline - time.monotonic()))) and time.monotonic() < deadline:
        # Every training Job complete and no FineTuneJob newly Succeeded for 10 s: ask the API server once.
        quiet = time.monotonic() - max(last.done_at.values(), default=start) > 10
        if ftjs is not None and jobs.all_done.is_set() and quiet:
            missed += missed_by_the_watch(admin, namespace, ftjs, start, start_wall)
    succeeded = len(last.done_at)
    converged = max(last.done_at.values(), default=time.monotonic()) - start
    jobs.all_done.wait(15.0)  # its kubectl may still be printing what it received before the last Succeeded
    for watcher in watchers:
        watcher.stop()
    if profiling is not None:
        profiling.join()
    stuck = unfinished(admin, namespace, [name for name in created if name not in last.done_at]) if ftjs else []
    for entry in stuck:  # what the bench's own watch last printed of it, and when
        entry["watched"] = {
            "state": last.state.get(entry["name"]),
            "states_seen_at_s": {
                k: round(v[entry["name"]] - start, 1) for k, v in last.reached.items() if entry["name"] in v
            },
        }
    ended = [{**e, "at": round(e["at"] - start, 1)} for w in watchers for e in w.ended]
    latencies = [jobs.first_seen[name] - t for name, t in created.items() if name in jobs.first_seen]
    completed = jobs.done_at
    lags = [ftjs.done_at[name] - t for name, t in completed.items() if name in ftjs.done_at] if ftjs else []
    time.sleep(2.0)  # let trailing requests land before counting
    requests = [after - before for after, before in zip(dispatched_requests(admin), requests_before, strict=True)]
    rss, cpu_after = process_stats(operator_pid) if operator_pid else (0.0, 0.0)
    components_after = cpu_seconds(components)
    own_cpu = time.process_time() + children_cpu_seconds() - own_before
    return {
        "jobs": n,
        "namespace": namespace,
        "operator": with_operator,
        "create_seconds": round(create_seconds, 2),
        "create_to_job_p50_s": round(statistics.median(latencies), 3) if latencies and with_operator else None,
        "create_to_job_p99_s": round(percentile(latencies, 0.99), 3) if latencies and with_operator else None,
        "jobs_created": len(latencies),
        "succeeded": succeeded,
        "all_succeeded_s": round(converged, 1) if succeeded >= n else None,
        "all_jobs_complete_s": round(max(completed.values()) - start, 1) if len(completed) >= n else None,
        "job_complete_to_succeeded_p50_s": round(statistics.median(lags), 3) if lags else None,
        "job_complete_to_succeeded_p99_s": round(percentile(lags, 0.99), 3) if lags else None,
        "operator_peak_rss_mib": round(rss, 1) if with_operator else None,
        "operator_cpu_s": round(cpu_after - cpu_before, 1) if with_operator else None,
        "api_requests_per_job": round(requests[0] / n, 1) if with_operator else None,
        "api_requests_per_job_all_clients": round(requests[1] / n, 1),
        "kube_apiserver_cpu_ms_per_request": round(
            1000 * (components_after["kube-apiserver"] - components_before["kube-apiserver"]) / max(requests[1], 1), 2
        ),
        "cpu_s": {
            **{k: round(components_after[k] - components_before[k], 1) for k in components},
            "bench": round(own_cpu, 1),
        },
        "stages": stages(start, created, jobs, pods, ftjs),
        "watch_restarts": sum(w.restarts for w in watchers),
        "succeeded_missed_by_the_watch": missed,
        "not_succeeded": stuck,
        "watches_ended": ended,
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def reset_peak_rss(pid: int) -> bool:
    """Start the process's peak RSS (VmHWM) afresh from its current RSS, so that a phase's peak shows apart from
    the sizes before it (Linux: clear_refs 5); False when the kernel refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def spread(values: list[float]) -> dict[str, float | None]:
    """p50, p99 and the last of some seconds."""
    if not values:
        return {"p50_s": None, "p99_s": None, "last_s": None}
    return {
        "p50_s": round(statistics.median(values), 2),
        "p99_s": round(percentile(values, 0.99), 2),
        "last_s": round(max(values), 2),
    }


def start_serving_pods(kubectl: list[str], namespace: str, fetcher_port: int, log: Path) -> list[subprocess.Popen[Any]]:
    """The server pods' fetchers (bench/serving_pods.py), fed by a watch of the server pods: [watch, fetchers]."""
    watch = subprocess.Popen(
        [
            *kubectl,
            "get",
            "pods",
            "-n",
            namespace,
            "-l",
            LABEL_MODELSERVER,
            "--watch",
            "--output-watch-events=false",
            "-o",
            f"jsonpath={serving_pods_template()}",
        ],
        stdout=subprocess.PIPE,
    )
    fetchers = subprocess.Popen(
        [sys.executable, str(SERVING_PODS), "--fetcher-port", str(fetcher_port)],
        stdin=watch.stdout,
        stdout=subprocess.PIPE,
        stderr=open(log, "wb"),  # noqa: SIM115
        text=True,
    )
    assert watch.stdout is not None
    watch.stdout.close()  # the fetchers' process reads it
    return [watch, fetchers]


def stop_serving_pods(processes: list[subprocess.Popen[Any]]) -> dict[str, Any]:
    """Stop the watch and the fetchers; what the fetchers answered (bench/serving_pods.py's last line)."""
    watch, fetchers = processes
    fetchers.terminate()
    report, _ = fetchers.communicate(timeout=30)
    watch.terminate()
    watch.wait(timeout=10)
    lines = report.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def run_model_servers(
    count: int,
    per_server: int,
    jobs: int,
    namespace: str,
    admin: Kube,
    kubectl: list[str],
    operator_pid: int,
    components: dict[str, int],
    timeout: float,
    state: Path,
) -> dict[str, Any]:
    """Create `count` ModelServers in the namespace of `jobs` Succeeded FineTuneJobs, each serving the adapters of
    `per_server` of them, and measure until every server's status lists all its adapters Loaded: loaded into its
    pod's (fake) vLLM by the operator, through the real adapter fetcher at the pod's IP (bench/serving_pods.py)."""
    fetcher_port = OperatorConfig().server.fetcher_port
    load_before = load_average()
    own_before = time.process_time() + children_cpu_seconds()
    pods = start_serving_pods(kubectl, namespace, fetcher_port, state / "serving-pods.log")
    servers = Watcher(kubectl, "modelservers", namespace, SERVER_STATES, all_loaded(per_server))
    servers.expected = count
    time.sleep(1.0)  # let the watches start
    rss_reset = reset_peak_rss(operator_pid)
    rss_at_start = process_stats(operator_pid)[0]
    requests_before = dispatched_requests(admin)
    cpu_before = process_stats(operator_pid)[1]
    components_before = cpu_seconds(components)
    created: dict[str, float] = {}

    def create(i: int) -> None:
        name = f"server-{i:03d}"
        admin.create(modelserver(name, namespace, server_jobs(i, per_server, jobs)))
        created[name] = time.monotonic()

    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(create, range(count)))
    create_seconds = time.monotonic() - start
    servers.all_done.wait(max(0.0, start + timeout - time.monotonic()))
    servers.stop()
    time.sleep(2.0)  # let trailing requests land before counting
    requests = [after - before for after, before in zip(dispatched_requests(admin), requests_before, strict=True)]
    rss, cpu_after = process_stats(operator_pid)
    components_after = cpu_seconds(components)
    pods_cpu = cpu_seconds({"pods": pods[1].pid})["pods"]  # started with the phase: all of it is the phase's
    answered = stop_serving_pods(pods)
    own_cpu = time.process_time() + children_cpu_seconds() - own_before
    pods_up = [at - start for at in answered.pop("fetcher_up_at", {}).values()]
    pods_loaded = [at - start for at in answered.pop("last_load_at", {}).values()]
    loaded = [servers.done_at[name] - start for name in created if name in servers.done_at]
    own = [servers.done_at[name] - at for name, at in created.items() if name in servers.done_at]
    return {
        "model_servers": count,
        "adapters_per_server": per_server,
        "finetunejobs": jobs,
        "create_seconds": round(create_seconds, 2),
        "all_loaded": len(loaded),
        # seconds from the first create until each server's status listed all its adapters Loaded
        "loaded_from_first_create": spread(loaded),
        # the same from each server's own create
        "loaded_from_own_create": spread(own),
        # from the first create until each server pod had its IP (its fetcher listening there), and until its
        # (fake) vLLM had taken the last load: what the status then waits for is the operator's look and write
        "pod_up_from_first_create": spread(pods_up),
        "pod_adapters_loaded_from_first_create": spread(pods_loaded),
        "not_loaded_states": dict(Counter(servers.state.get(k, "unseen") for k in created if k not in servers.done_at)),
        "operator_rss_at_start_mib": round(rss_at_start, 1),
        "operator_peak_rss_mib": round(rss, 1),
        "operator_peak_rss_is_this_phase": rss_reset,
        "operator_cpu_s": round(cpu_after - cpu_before, 1),
        "api_requests_per_server": round(requests[0] / count, 1),
        "api_requests_per_server_all_clients": round(requests[1] / count, 1),
        "cpu_s": {
            **{k: round(components_after[k] - components_before[k], 1) for k in components},
            "server pods (fetchers, fake vLLM, fake S3)": round(pods_cpu, 1),
            "bench": round(own_cpu - pods_cpu, 1),
        },
        "server_pods": answered,
        "watch_restarts": servers.restarts,
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }


def wait_for_default_service_account(kube: Kube, namespace: str, timeout: float = 60.0) -> None:
    """The controller-manager creates a namespace's default ServiceAccount; pods are refused until then."""
    deadline = time.monotonic() + timeout
    while kube.get("ServiceAccount", namespace, "default") is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"no default ServiceAccount in {namespace} after {timeout:.0f} s")
        time.sleep(0.2)


def prepare_cluster(plane: BenchControlPlane, gpu_nodes: int) -> None:
    """Start the control plane with its GPU nodes, the CRDs, the FlowSchema and cluster-admin binding of the
    operator's user, and that user's client certificate."""
    plane.start()
    plane.wait_ready()
    nodes = create_simulated_nodes(plane.kubeconfig, parse_pools(f"gpu={gpu_nodes}"))
    wait_nodes_ready(plane.kubeconfig, nodes, timeout=300)
    cluster = plane.cluster()
    cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
    for crd in ("finetunejobs", "modelservers"):
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}.kubetune.io", "--timeout=60s")
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([flow_schema(), cluster_admin_binding()]))
    signed_cert(plane.pki_dir, OPERATOR.file_stem, OPERATOR.subject(), CLIENT_EXTENSIONS)


def compare(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size measured both ways (floor first), the operator's run against the floor's."""
    rows = []
    for floor, run in itertools.pairwise(results):
        if floor["operator"] or not run["operator"] or floor["jobs"] != run["jobs"]:
            continue
        floor_s, operator_s = floor["all_jobs_complete_s"], run["all_succeeded_s"]
        rows.append(
            {
                "jobs": run["jobs"],
                "floor_s": floor_s,
                "operator_s": operator_s,
                "time_ratio": round(operator_s / floor_s, 2) if floor_s and operator_s else None,
                "requests_per_job_floor": floor["api_requests_per_job_all_clients"],
                "requests_per_job_with_operator": run["api_requests_per_job_all_clients"],
                "operator_requests_per_job": run["api_requests_per_job"],
            }
        )
    return rows


def start_operator(plane: BenchControlPlane, prepare: bool = False) -> subprocess.Popen[bytes]:
    """`kubetune operator` as the operator's user, its output in operator.log of the plane's state folder; the
    prepare step (a CPU Job before each training Job) only with `prepare`, so that by default the operator's
    Jobs are the floor's."""
    server = yaml.safe_load(plane.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    kubeconfig = plane.state_dir / "operator.kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(kubeconfig_dict(server, plane.pki_dir, OPERATOR.file_stem)))
    config = OperatorConfig()
    config.prepare.enabled = prepare
    config_file = plane.state_dir / "operator-config.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json", by_alias=True)))
    log = plane.state_dir / "operator.log"
    operator = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kubetune",
            "operator",
            "--config",
            str(config_file),
            "--liveness",
            "",
            "--metrics-address",
            "",
        ],
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        stdout=open(log, "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )
    time.sleep(3)
    if operator.poll() is not None:
        raise SystemExit(f"the operator exited with code {operator.returncode}: see {log}")
    return operator


def stop_operator(operator: subprocess.Popen[bytes]) -> None:
    """SIGTERM, killed if its backlog keeps it past 30 s (nothing of it is measured any more)."""
    operator.send_signal(signal.SIGTERM)
    try:
        operator.wait(timeout=30)
    except subprocess.TimeoutExpired:
        operator.kill()
        operator.wait()


def stop(operator: subprocess.Popen[bytes] | None, plane: BenchControlPlane) -> None:
    """Stop the operator, then the control plane."""
    try:
        if operator is not None:
            stop_operator(operator)
    finally:
        plane.stop()


def print_serving(serving: dict[str, Any]) -> None:
    """The ModelServer phase's lines of the printed summary."""
    first, own = serving["loaded_from_first_create"], serving["loaded_from_own_create"]
    print(
        f"\n{serving['model_servers']} ModelServers x {serving['adapters_per_server']} adapters of "
        f"{serving['finetunejobs']} Succeeded FineTuneJobs: {serving['all_loaded']} listed every adapter Loaded"
    )
    print(
        "| all adapters Loaded, s from the first create: p50 | p99 | last | from its own create p50/p99 "
        "| operator peak RSS | operator CPU | API requests/server (all clients) | load before/after |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {show(first['p50_s'])} | {show(first['p99_s'])} | {show(first['last_s'])} "
        f"| {show(own['p50_s'])} / {show(own['p99_s'])} | {serving['operator_peak_rss_mib']} MiB "
        f"| {serving['operator_cpu_s']} s | {serving['api_requests_per_server']} "
        f"({serving['api_requests_per_server_all_clients']}) "
        f"| {serving['load_average_before']} / {serving['load_average_after']} |"
    )
    up, loads = serving["pod_up_from_first_create"], serving["pod_adapters_loaded_from_first_create"]
    print(
        f"ModelServers, s from the first create until: the server pod had its IP p50 {show(up['p50_s'])}, last "
        f"{show(up['last_s'])}; its vLLM took the last load p50 {show(loads['p50_s'])}, last {show(loads['last_s'])}"
    )
    cpu = ", ".join(f"{name} {seconds}" for name, seconds in serving["cpu_s"].items())
    print(f"ModelServers, CPU seconds of the others: {cpu}")
    print(f"ModelServers, what the server pods answered: {serving['server_pods']}")
    if serving["not_loaded_states"]:
        print(f"ModelServers not Loaded, by adapter states: {serving['not_loaded_states']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--gpu-nodes", type=int, default=250)
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for one size to converge")
    parser.add_argument(
        "--controller-qps", type=int, default=0, help="kube-controller-manager --kube-api-qps (0: its default, 20)"
    )
    parser.add_argument(
        "--job-syncs", type=int, default=0, help="kube-controller-manager --concurrent-job-syncs (0: its default, 5)"
    )
    parser.add_argument(
        "--kwok-parallelism", type=int, default=0, help="kwok's podPlayStageParallelism (0: its default, 4)"
    )
    parser.add_argument(
        "--profile-apiserver",
        type=Path,
        help="write a CPU profile of the API server during the largest size to this file",
    )
    parser.add_argument("--profile-seconds", type=int, default=120, help="how long the profile lasts")
    parser.add_argument(
        "--without-operator",
        action="store_true",
        help="no operator: create the N training Jobs directly (the control plane's own time for them)",
    )
    parser.add_argument(
        "--compare", action="store_true", help="for each size, the floor (no operator) first, then the operator"
    )
    parser.add_argument(
        "--model-servers",
        type=int,
        help="after the largest size with the operator, this many ModelServers serving its jobs' adapters "
        "(0: none; default 200 when 1000 is among the sizes, else 0)",
    )
    parser.add_argument("--adapters-per-server", type=int, default=5)
    parser.add_argument(
        "--prepare",
        action="store_true",
        help="the operator runs each FineTuneJob's prepare step (a CPU Job before the training Job); off by "
        "default, so that the operator's training Jobs are the floor's",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "operator_scale.json")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    model_servers = args.model_servers if args.model_servers is not None else (200 if 1000 in sizes else 0)

    # Stopped with SIGTERM, still stop the control plane and the operator (the finally clause below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    state = Path(tempfile.mkdtemp(prefix="kubetune-bench-"))
    plane = BenchControlPlane(
        state, args.controller_qps, args.job_syncs, args.kwok_parallelism, profiling=args.profile_apiserver is not None
    )
    operator: subprocess.Popen[bytes] | None = None
    results: list[dict[str, Any]] = []
    serving: dict[str, Any] | None = None
    try:
        prepare_cluster(plane, args.gpu_nodes)
        admin = Kube.from_kubeconfig(str(plane.kubeconfig), field_manager="bench")
        kubectl = [str(plane.cluster().kubectl_path), "--kubeconfig", str(plane.kubeconfig)]
        modes = [False, True] if args.compare else [not args.without_operator]
        for n in sizes:
            for with_operator in modes:
                if with_operator and operator is None:
                    operator = start_operator(plane, args.prepare)
                elif not with_operator and operator is not None:
                    stop_operator(operator)
                    operator = None
                wanted = args.profile_apiserver and n == max(sizes) and with_operator
                profile = (args.profile_apiserver, args.profile_seconds) if wanted else None
                operator_pid = operator.pid if operator is not None else None
                result = run_size(n, admin, kubectl, operator_pid, plane.pids(), args.timeout, profile)
                results.append(result)
                print(json.dumps(result), flush=True)
                if model_servers and operator_pid and n == max(sizes) and result["succeeded"] >= n:
                    serving = run_model_servers(
                        model_servers,
                        args.adapters_per_server,
                        n,
                        result["namespace"],
                        admin,
                        kubectl,
                        operator_pid,
                        plane.pids(),
                        args.timeout,
                        state,
                    )
                    print(json.dumps(serving), flush=True)
    finally:
        stop(operator, plane)
    problems = log_problems(state / "operator.log")
    # Kept when the run failed or a size did not converge (the operator's log is there); etcd's data is a few
    # hundred MB.
    servers_converged = serving is None or serving["all_loaded"] >= model_servers
    if all(r["succeeded"] >= r["jobs"] for r in results) and servers_converged:
        shutil.rmtree(state, ignore_errors=True)
    else:
        print(f"not every job or server converged: the operator's log is in {state / 'operator.log'}")

    machine = f"{platform.node()}: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}"
    qps = args.controller_qps or "default (20)"
    syncs = args.job_syncs or "default (5)"
    kwok = args.kwok_parallelism or "default (4)"
    print(
        f"\nmachine: {machine}, {args.gpu_nodes} kwok GPU nodes (4 GPUs each), "
        f"controller-manager QPS {qps}, concurrent Job syncs {syncs}, kwok pod stage parallelism {kwok}"
        + (", WITHOUT the operator (the bench created the Jobs)" if args.without_operator else "")
    )
    print(
        "| jobs | create->Job p50 | p99 | all Jobs complete | all Succeeded | Job complete->Succeeded p50/p99 "
        "| operator peak RSS | operator CPU | API requests/job | load before/after |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['jobs']} | {show(r['create_to_job_p50_s'])} | {show(r['create_to_job_p99_s'])} "
            f"| {show(r['all_jobs_complete_s'])} | {show(r['all_succeeded_s'])} "
            f"| {show(r['job_complete_to_succeeded_p50_s'])} / {show(r['job_complete_to_succeeded_p99_s'])} "
            f"| {show(r['operator_peak_rss_mib'], ' MiB')} | {show(r['operator_cpu_s'])} "
            f"| {show(r['api_requests_per_job'], '')} | {r['load_average_before']} / {r['load_average_after']} |"
        )
    for r in results:
        cpu = ", ".join(f"{name} {seconds}" for name, seconds in r["cpu_s"].items())
        print(f"\n{r['jobs']} jobs, CPU seconds of the others: {cpu}")
        print(
            f"{r['jobs']} jobs, API requests per job from all clients: {r['api_requests_per_job_all_clients']}, "
            f"kube-apiserver CPU per request: {r['kube_apiserver_cpu_ms_per_request']} ms"
        )
        print(f"{r['jobs']} jobs, stage by stage | p50 | p99 | last one through it (s after the first create)")
        for row in r["stages"]:
            print(f"| {row['stage']} | {row['p50_s']} s | {row['p99_s']} s | {row['last_at_s']} s |")
    comparison = compare(results) if args.compare else []
    if comparison:
        print(
            "\n| jobs | floor: all Jobs complete | operator: all Succeeded | ratio | requests/job floor "
            "| with operator | operator's own |"
        )
        print("|---|---|---|---|---|---|---|")
        for c in comparison:
            print(
                f"| {c['jobs']} | {show(c['floor_s'])} | {show(c['operator_s'])} | {show(c['time_ratio'], '')} "
                f"| {c['requests_per_job_floor']} | {c['requests_per_job_with_operator']} "
                f"| {c['operator_requests_per_job']} |"
            )
    if serving is not None:
        print_serving(serving)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "machine": machine,
        "gpu_nodes": args.gpu_nodes,
        "controller_qps": args.controller_qps or None,
        "concurrent_job_syncs": args.job_syncs or None,
        "kwok_pod_stage_parallelism": args.kwok_parallelism or None,
        "operator": not args.without_operator,
        "prepare_step": args.prepare,
        "operator_log_problems": problems,
    }
    if problems:
        print(f"\nthe operator logged warnings or errors: {problems}")
    everything = {**summary, "results": results, "comparison": comparison, "model_servers": serving}
    args.output.write_text(json.dumps(everything, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
