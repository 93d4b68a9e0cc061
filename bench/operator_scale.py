"""The operator at scale: 100, 500 and 1,000 FineTuneJobs applied to one namespace.

    .venv/bin/python bench/operator_scale.py                          # 100, 500, 1000, as fast as possible
    .venv/bin/python bench/operator_scale.py --sizes 1000 --rate 20   # paced: 20 FineTuneJobs per second

The control plane is the project's (``kubetune_testkit.controlplane.ControlPlane``: etcd and
kube-apiserver on loopback) without the controller manager, so the load is the operator's and no
pod is created. For each size, a fresh namespace and a fresh operator process
(``python -m kubetune operator -n NS`` with the control plane's admin kubeconfig) are used; the
operator's peak RSS is the kernel's high-water mark (``VmHWM`` in /proc/PID/status).

Measured per size:

* apply -> Job latency: from the moment the FineTuneJob's POST is sent to the moment a watch on
  Jobs in the namespace (opened before the first apply) delivers the trainer Job's ADDED event;
  p50, p99 and max. (``creationTimestamp`` has one-second resolution, too coarse for this.)
* the time until every Job exists, and jobs per second;
* API requests per FineTuneJob: ``apiserver_request_total`` scraped from the API server with the
  admin client before the first apply and once the operator is quiet (every FineTuneJob has a
  phase and the counter has not moved for 3 s), less the benchmark's own requests; by verb and
  resource;
* the operator's peak RSS, and its RSS when idle before the first apply;
* CPU seconds used by the operator, kube-apiserver and etcd from the first apply until every
  Job exists, and (``--py-spy PATH``) where the operator's own CPU time goes.

Results: a table on stdout and raw figures in ``bench/operator_scale.json``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from _common import (
    HERE,
    Column,
    comma_list,
    cpu_seconds,
    load1,
    now,
    parser_for,
    print_columns,
    status_kib,
    write_results,
)
from kubernetes.client import ApiClient
from prometheus_client.parser import text_string_to_metric_families
from urllib3.exceptions import ProtocolError

from kubetune import api
from kubetune.operator.kube import Kube
from kubetune_testkit.controlplane import ControlPlane, free_port
from kubetune_testkit.operator_runner import install_crd

Counts = dict[tuple[str, str], float]
COLUMNS: tuple[Column, ...] = (
    ("jobs", "size", ">5"),
    ("p50 s", "latency_p50_s", ">6.2f"),
    ("p99 s", "latency_p99_s", ">6.2f"),
    ("max s", "latency_max_s", ">6.2f"),
    ("all Jobs s", "all_jobs_seconds", ">10.1f"),
    ("jobs/s", "jobs_per_second", ">7.1f"),
    ("req/job", "requests_per_job", ">7.1f"),
    ("idle MB", "operator_idle_rss_mb", ">7.0f"),
    ("peak MB", "operator_peak_rss_mb", ">7.0f"),
)


def manifest(namespace: str, name: str) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"name": "Qwen/Qwen2.5-0.5B"},
            "dataset": {"train": "s3://data/train.jsonl", "validationSplit": 0.05},
            "method": "lora",
            "training": {"epochs": 1, "packing": True},
            "output": {"uri": "s3://models/out/"},
            "credentials": {"storageSecret": "s3-creds"},
            "resources": {"gpus": 1},
        },
    }


def request_counts(kube: Kube) -> Counts:
    """apiserver_request_total summed over codes, by (verb, resource[/subresource])."""
    params = kube.client.param_serialize(
        method="GET", resource_path="/metrics", auth_settings=["BearerToken"]
    )
    response = kube.client.call_api(*params, _request_timeout=30)
    text = response.read().decode()  # type: ignore[no-untyped-call]
    counts: Counts = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        if family.name != "apiserver_request":
            continue
        for sample in family.samples:
            if sample.name != "apiserver_request_total" or not sample.labels.get("resource"):
                continue
            resource = sample.labels["resource"]
            if sample.labels.get("subresource"):
                resource += "/" + sample.labels["subresource"]
            counts[(sample.labels["verb"], resource)] += sample.value
    return counts


class JobWatch(threading.Thread):
    """Records when each Job's ADDED event arrives (a raw watch: no model objects built)."""

    def __init__(self, client: ApiClient, namespace: str) -> None:
        super().__init__(name="job-watch", daemon=True)
        self.client = client
        self.namespace = namespace
        self.seen: dict[str, float] = {}
        self.opened = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        params = self.client.param_serialize(
            method="GET",
            resource_path=f"/apis/batch/v1/namespaces/{self.namespace}/jobs",
            query_params=[("watch", "true"), ("timeoutSeconds", "3600")],
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        response = self.client.call_api(*params)  # the body is not read: it streams
        self.opened.set()
        with contextlib.suppress(ProtocolError):  # the control plane going away ends the stream
            self._read(response.response.stream(amt=None, decode_content=True))

    def _read(self, chunks: Iterator[bytes]) -> None:
        buffer = b""
        for chunk in chunks:
            now = time.monotonic()
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ADDED":
                    with self._lock:
                        self.seen.setdefault(event["object"]["metadata"]["name"], now)

    def count(self) -> int:
        with self._lock:
            return len(self.seen)


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(name="rss", daemon=True)
        self.pid = pid
        self.stop = threading.Event()
        self.samples: list[tuple[float, int]] = []

    def run(self) -> None:
        start = time.monotonic()
        while not self.stop.wait(0.25):
            try:
                self.samples.append((round(time.monotonic() - start, 2), status_kib("VmRSS", self.pid)))
            except (FileNotFoundError, KeyError):
                return


def percentile(values: list[float], p: float) -> float:
    """Nearest rank."""
    s = sorted(values)
    return s[max(0, -(-int(p * len(s)) // 100) - 1)] if s else float("nan")


def start_operator(plane: ControlPlane, namespace: str, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    health = free_port()
    env = {**os.environ, "KUBECONFIG": str(plane.kubeconfig_path), "KUBETUNE_LOG_FORMAT": "plain"}
    command = [sys.executable, "-m", "kubetune", "operator", "-n", namespace]
    command += ["--metrics-port", str(free_port()), "--health-port", str(health)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc, health
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the operator did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def apply_all(
    kube: Kube, namespace: str, n: int, rate: float, workers: int
) -> tuple[dict[str, float], float, float]:
    """Create n FineTuneJobs from parallel clients, paced at ``rate`` per second when given; returns
    when each POST was sent, the start and the end."""
    sent: dict[str, float] = {}
    t0 = time.monotonic()

    def apply(index: int) -> None:
        name = f"ftj-{index:05d}"
        if rate:
            delay = t0 + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        sent[name] = time.monotonic()
        kube.create(manifest(namespace, name))

    with ThreadPoolExecutor(max(workers, 8) if rate else workers) as pool:
        list(pool.map(apply, range(n)))
    return sent, t0, time.monotonic()


def wait_quiet(kube: Kube, namespace: str, n: int, deadline: float) -> tuple[int, Counts]:
    """Until every FineTuneJob has a phase and the request counter has not moved for 3 s; returns
    how many list requests this made, and the last counts."""
    own_lists = 0
    path = f"/apis/{api.API_VERSION}/namespaces/{namespace}/{api.PLURAL}"
    while time.monotonic() < deadline:
        items = kube.request("GET", path)["items"]
        own_lists += 1
        if sum(1 for i in items if (i.get("status") or {}).get("phase")) == n:
            break
        time.sleep(1.0)
    previous = request_counts(kube)
    while True:
        time.sleep(3.0)
        current = request_counts(kube)
        if sum(current.values()) == sum(previous.values()):
            return own_lists, current
        previous = current


def control_plane_pids() -> dict[str, int]:
    """kube-apiserver and etcd, started by this process's ControlPlane."""
    import psutil

    found = {}
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if child.name() in ("kube-apiserver", "etcd"):
                found[child.name()] = child.pid
    return found


def profile(py_spy: str | None, pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy sampling every thread of the operator (collapsed stacks), until stopped."""
    if not py_spy:
        return None
    command = [
        py_spy,
        "record",
        "-p",
        str(pid),
        "-o",
        str(out),
        "--format",
        "raw",
        "-r",
        "100",
        "--nonblocking",
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top_functions(collapsed: Path, count: int = 20) -> list[tuple[str, float]]:
    """Where the operator's CPU samples end (self time), by package and function, largest first."""
    totals: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, number = line.strip().rpartition(" ")
        if not number.isdigit():
            continue
        n = int(number)
        samples += n
        leaf = stack.split(";")[-1]  # "function (path/to/module.py:line)"
        function, _, where = leaf.partition(" (")
        module = where.split(":")[0]
        package = module.split("/")[0] if "/" in module else module
        totals[f"{package}: {function}"] += n
    return [(frame, round(n / samples, 3)) for frame, n in totals.most_common(count)] if samples else []


def run_size(
    plane: ControlPlane,
    admin: ApiClient,
    n: int,
    rate: float,
    workers: int,
    work: Path,
    py_spy: str | None = None,
) -> dict[str, Any]:
    kube = Kube(admin)
    namespace = f"bench-{n}-{int(time.time())}"
    kube.request("POST", "/api/v1/namespaces", body={"metadata": {"name": namespace}})
    log = work / f"operator-{namespace}.log"
    proc, _ = start_operator(plane, namespace, log)
    try:
        time.sleep(2.0)  # the operator's watches are open and settled
        idle_rss = status_kib("VmRSS", proc.pid)
        watch = JobWatch(admin, namespace)
        watch.start()
        watch.opened.wait(10)
        sampler = RssSampler(proc.pid)
        sampler.start()
        before = request_counts(kube)
        load = load1()
        pids = {"operator": proc.pid, **control_plane_pids()}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        spy = profile(py_spy, proc.pid, work / f"profile-{n}.txt")
        sent, t0, applied = apply_all(kube, namespace, n, rate, workers)
        deadline = applied + max(120.0, n * 0.5)
        while watch.count() < n and time.monotonic() < deadline:
            time.sleep(0.05)
        all_jobs = time.monotonic()
        cpu = {name: round(cpu_seconds(pid) - cpu_before[name], 2) for name, pid in pids.items()}
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        missing = n - watch.count()
        own_lists, after = wait_quiet(kube, namespace, n, deadline)
        quiet = time.monotonic()
        peak_rss = status_kib("VmHWM", proc.pid)
        sampler.stop.set()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    latencies = [watch.seen[name] - t for name, t in sent.items() if name in watch.seen]
    # Leases are the API server's own heartbeats: the operator runs without peering.
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in set(after) | set(before) if k[1] != "leases"}
    # The benchmark's own requests: its creates, its one watch, its list polls.
    # (A watch is counted when it ends: the benchmark's own is still open.)
    delta[("POST", "finetunejobs")] = delta.get(("POST", "finetunejobs"), 0.0) - n
    delta[("LIST", "finetunejobs")] = delta.get(("LIST", "finetunejobs"), 0.0) - own_lists
    by_kind = {f"{verb} {res}": round(v / n, 2) for (verb, res), v in sorted(delta.items()) if v > 0}
    return {
        "size": n,
        "namespace": namespace,
        "rate_per_s": rate or None,
        "apply_workers": workers,
        "load_before": load,
        "apply_seconds": applied - t0,
        "all_jobs_seconds": all_jobs - t0,
        "quiet_seconds": quiet - t0,
        "jobs_per_second": (n - missing) / (all_jobs - t0),
        "missing_jobs": missing,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p90_s": percentile(latencies, 90),
        "latency_p99_s": percentile(latencies, 99),
        "latency_max_s": max(latencies) if latencies else float("nan"),
        "latency_mean_s": statistics.fmean(latencies) if latencies else float("nan"),
        "cpu_seconds_until_all_jobs": cpu,
        "operator_profile": top_functions(work / f"profile-{n}.txt") if py_spy else None,
        "requests_per_job": round(sum(v for v in delta.values() if v > 0) / n, 2),
        "requests_per_job_by_kind": by_kind,
        "operator_idle_rss_mb": idle_rss / 1024,
        "operator_peak_rss_mb": peak_rss / 1024,
        "rss_samples_mb": [
            (t, round(kib / 1024, 1)) for t, kib in sampler.samples[:: max(1, len(sampler.samples) // 60)]
        ],
    }


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-size medians of the numeric figures."""
    keys = [k for k, v in runs[0].items() if isinstance(v, int | float) and k != "repeat"]
    out: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    out["runs"] = len(runs)
    out["latency_p99_s_runs"] = [round(r["latency_p99_s"], 2) for r in runs]
    out["operator_peak_rss_mb_runs"] = [round(r["operator_peak_rss_mb"], 1) for r in runs]
    return out


def main() -> int:
    parser = parser_for(__doc__)
    parser.add_argument("--sizes", default="100,500,1000")
    parser.add_argument(
        "--rate", type=float, default=0.0, help="FineTuneJobs per second; 0 = as fast as possible"
    )
    parser.add_argument("--workers", type=int, default=4, help="parallel clients applying FineTuneJobs")
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per size (a fresh namespace and operator)"
    )
    parser.add_argument("--py-spy", help="path of a py-spy binary: profile the operator during the apply")
    parser.add_argument("--output", type=Path, default=HERE / "operator_scale.json")
    args = parser.parse_args()
    sizes = [int(s) for s in comma_list(args.sizes)]
    started = now()
    results = []
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-operator-") as scratch:
        work = Path(scratch)
        with ControlPlane(controller_manager=False) as plane, plane.admin_api_client() as admin:
            install_crd(admin)
            for repeat, n in ((rep, n) for rep in range(args.repeats) for n in sizes):
                result = {
                    "repeat": repeat,
                    **run_size(plane, admin, n, args.rate, args.workers, work, args.py_spy),
                }
                results.append(result)
                r = result
                print(
                    f"{n:>5} FineTuneJobs: p50 {r['latency_p50_s']:.2f}s p99 {r['latency_p99_s']:.2f}s, "
                    f"all Jobs after {r['all_jobs_seconds']:.1f}s, {r['requests_per_job']} requests/job, "
                    f"operator peak RSS {r['operator_peak_rss_mb']:.0f} MB (load {r['load_before']:.2f}); "
                    f"CPU seconds until all Jobs: {r['cpu_seconds_until_all_jobs']}",
                    flush=True,
                )
    mode = (
        f"paced at {args.rate:g}/s" if args.rate else f"applied as fast as possible by {args.workers} clients"
    )
    print(f"\nFineTuneJobs {mode}; apply -> trainer Job latency from a watch; median of {args.repeats}")
    summary = [median_of([r for r in results if r["size"] == n]) for n in sizes]
    print_columns(summary, COLUMNS)
    if results and results[-1]["operator_profile"]:
        print("\noperator CPU samples by package and function, self time (largest size):")
        for frame, share in results[-1]["operator_profile"]:
            print(f"  {share:>6.1%}  {frame[:100]}")
    if results:
        print("\nrequests per FineTuneJob by kind (largest size):")
        for kind, v in sorted(results[-1]["requests_per_job_by_kind"].items(), key=lambda kv: -kv[1]):
            print(f"  {kind:<40} {v:>6.2f}")
    figures = {"nproc": os.cpu_count(), "summary": summary, "results": results}
    write_results(args.output, __file__, started, figures)
    print(f"\nraw figures: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
