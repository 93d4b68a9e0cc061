"""Download throughput of a 1 GB model prefix from S3 on loopback: kubetune's ObjectStore versus
a single-stream boto3 ``get_object`` read loop.

    .venv/bin/python bench/storage.py                    # 4 x 256 MiB, 3 runs per method
    .venv/bin/python bench/storage.py --files 8 --file-mib 128 --repeats 5

The server is the project's test S3 server (``kubetune.testing.s3.S3Server``: versitygw with its
posix backend) on 127.0.0.1. The prefix is uploaded once with ``ObjectStore.upload_prefix`` (so
every object carries its SHA-256, as the trainer's artifacts do). Each download goes to a fresh,
empty directory, and the page cache is left as it is: the server's files are read from memory,
so the figures are about the client and the protocol, not the disk.

Methods (interleaved, so load changes hit all alike):

    objectstore          ObjectStore.download_prefix with the default StorageConfig (transfer manager,
                         8 MiB ranged GETs, 8 in flight), every file hashed and checked, renamed into place
    objectstore-c<N>-<M> the same with max_concurrency N and multipart_chunksize M MiB
    objectstore-unverified  the same transfers without the SHA-256 check (a subclass in this script:
                         kubetune always verifies), to show what the check costs
    get_object           one get_object per file, the body read in 1 MiB blocks and written to disk
    get_object+sha256    the same, hashing while reading (what verifying the download costs it)

Results: a table on stdout and raw figures in ``bench/storage.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune.storage import MiB, ObjectStore, StorageURI, Transfer, parse_uri
from kubetune.testing.s3 import S3Server

HERE = Path(__file__).resolve().parent
BLOCK = 1 * MiB


def make_files(directory: Path, count: int, size: int) -> None:
    """Incompressible files, written in 16 MiB blocks from a seeded generator."""
    import random

    rng = random.Random(7)
    directory.mkdir(parents=True)
    for i in range(count):
        with (directory / f"model-{i + 1:05d}-of-{count:05d}.safetensors").open("wb") as f:
            left = size
            while left:
                n = min(left, 16 * MiB)
                f.write(rng.randbytes(n))
                left -= n


def objectstore_download(server: S3Server, uri: str, dest: Path, **config: Any) -> int:
    with ObjectStore(server.storage_config(**config)) as store:
        transfers = store.download_prefix(uri, dest)
    return sum(t.size for t in transfers)


class UnverifiedStore(ObjectStore):
    """ObjectStore minus the SHA-256 check after each download: the transfer manager alone.
    Not a mode kubetune has; it shows what the verification costs."""

    def _finish_download(
        self, src: StorageURI, dest: Path, tmp: Path, size: int, sha: str | None
    ) -> Transfer:
        tmp.replace(dest)
        return Transfer(src, parse_uri(dest), size, sha or "", skipped=False)


def unverified_download(server: S3Server, uri: str, dest: Path) -> int:
    with UnverifiedStore(server.storage_config()) as store:
        transfers = store.download_prefix(uri, dest)
    return sum(t.size for t in transfers)


def get_object_download(server: S3Server, uri: str, dest: Path, *, hashing: bool) -> int:
    loc = parse_uri(uri)
    client = server.client()
    total = 0
    try:
        listing = client.list_objects_v2(Bucket=loc.bucket, Prefix=loc.key)
        dest.mkdir(parents=True, exist_ok=True)
        for obj in listing.get("Contents", []):
            body = client.get_object(Bucket=loc.bucket, Key=obj["Key"])["Body"]
            digest = hashlib.sha256()
            with (dest / obj["Key"].rsplit("/", 1)[-1]).open("wb") as f:
                while block := body.read(BLOCK):
                    if hashing:
                        digest.update(block)
                    f.write(block)
                    total += len(block)
    finally:
        client.close()
    return total


def parse_variant(name: str) -> dict[str, Any]:
    """objectstore-c4-32 -> max_concurrency 4, multipart_chunksize 32 MiB."""
    _, conc, chunk = name.split("-")
    return {"max_concurrency": int(conc[1:]), "multipart_chunksize": int(chunk) * MiB}


def action(method: str, server: S3Server, uri: str) -> Callable[[Path], int]:
    if method == "objectstore":
        return lambda dest: objectstore_download(server, uri, dest)
    if method == "objectstore-unverified":
        return lambda dest: unverified_download(server, uri, dest)
    if method.startswith("objectstore-"):
        cfg = parse_variant(method)
        return lambda dest: objectstore_download(server, uri, dest, **cfg)
    if method in ("get_object", "get_object+sha256"):
        hashing = method.endswith("sha256")
        return lambda dest: get_object_download(server, uri, dest, hashing=hashing)
    raise SystemExit(f"unknown method {method}")


def measure(methods: list[str], files: int, size: int, repeats: int) -> list[dict[str, Any]]:
    """Upload the prefix once, then download it with each method in turn, ``repeats`` times."""
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-storage-") as scratch:
        root = Path(scratch)
        make_files(root / "source", files, size)
        with S3Server(root / "s3") as server:
            bucket = server.create_bucket("bench")
            uri = f"s3://{bucket}/models/bench/"
            with ObjectStore(server.storage_config()) as store:
                store.upload_prefix(root / "source", uri)
            shutil.rmtree(root / "source")
            actions = {method: action(method, server, uri) for method in methods}
            get_object_download(server, uri, root / "warm", hashing=False)  # page cache and server warm
            shutil.rmtree(root / "warm")
            for repeat in range(repeats):
                for method in methods:
                    dest = root / f"dest-{method}-{repeat}"
                    load = os.getloadavg()[0]
                    t0 = time.perf_counter()
                    nbytes = actions[method](dest)
                    seconds = time.perf_counter() - t0
                    shutil.rmtree(dest)
                    if nbytes != files * size:
                        raise RuntimeError(f"{method}: {nbytes} bytes, expected {files * size}")
                    runs.append(
                        {
                            "method": method,
                            "repeat": repeat,
                            "seconds": seconds,
                            "bytes": nbytes,
                            "mb_per_s": nbytes / seconds / 1e6,
                            "load_before": load,
                        }
                    )
                    print(
                        f"run {repeat + 1}/{repeats} {method:<22} {nbytes / seconds / 1e6:>8,.0f} MB/s "
                        f"{seconds:6.2f}s (load {load:.2f})",
                        flush=True,
                    )
    return runs


def summarize(runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    base_runs = [r["mb_per_s"] for r in runs if r["method"] == "get_object"]
    base = statistics.median(base_runs) if base_runs else None
    summary = []
    for method in methods:
        mine = [r["mb_per_s"] for r in runs if r["method"] == method]
        median = statistics.median(mine)
        summary.append(
            {
                "method": method,
                "median_mb_per_s": median,
                "runs_mb_per_s": [round(x) for x in mine],
                "vs_get_object": median / base if base else None,
            }
        )
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--file-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--methods",
        default="objectstore,get_object,get_object+sha256",
        help="comma-separated; objectstore-c<N>-<MiB> tunes concurrency and part size",
    )
    parser.add_argument("--output", type=Path, default=HERE / "storage.json")
    args = parser.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    size = args.file_mib * MiB
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    runs = measure(methods, args.files, size, args.repeats)
    summary = summarize(runs, methods)
    print(f"\n{args.files} x {args.file_mib} MiB from versitygw on loopback, median of {args.repeats}")
    header = f"{'method':<22} {'MB/s':>8} {'x get_object':>12}  runs"
    print(header)
    print("-" * len(header))
    for s in summary:
        print(
            f"{s['method']:<22} {s['median_mb_per_s']:>8,.0f} {s['vs_get_object'] or 0:>12.2f}  "
            f"{s['runs_mb_per_s']}"
        )
    args.output.write_text(
        json.dumps(
            {
                "command": " ".join([".venv/bin/python", "bench/storage.py", *sys.argv[1:]]),
                "started": started,
                "nproc": os.cpu_count(),
                "files": args.files,
                "file_bytes": size,
                "summary": summary,
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"\nraw figures: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
