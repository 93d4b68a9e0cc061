"""`kubetune artifacts pull` and `kubetune artifacts ls` on local paths and on the real S3 test server."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from awscrt.checksums import crc64nvme  # type: ignore[import-untyped]
from typer.testing import CliRunner

from kubetune.artifacts import Manifest, find_runs
from kubetune.cli import app
from kubetune.storage import ObjectStore, crc64_hex
from kubetune_testkit.s3 import RequestRecorder, S3Server

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

MiB = 1024 * 1024


def make_run(
    root: Path, job: str = "default/demo", *, big: int = 300_000, manifest: bool = True, crc64: bool = True
) -> Path:
    """A run laid out as the trainer publishes it, with its manifest in the trainer's format (without
    the CRC64NVME the trainer records since 0.2 when ``crc64`` is false)."""
    files = {
        "adapter/adapter_config.json": b'{"r": 8}',
        "adapter/adapter_model.safetensors": os.urandom(big),
        "merged/tokenizer.json": b'{"model": {"vocab": {}}}' * 100,
        "metrics.json": json.dumps({"job": job, "after": {"loss": 1.5}}).encode(),
        "README.md": b"# demo\n",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    if manifest:
        (root / "manifest.json").write_text(
            json.dumps(
                {
                    "apiVersion": "kubetune.dev/v1alpha1",
                    "kind": "FineTuneJobManifest",
                    "job": job,
                    "runId": "r1",
                    "createdAt": "2026-12-01T10:00:00+00:00",
                    "files": [
                        {"path": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()}
                        | ({"crc64nvme": crc64_hex(crc64nvme(d))} if crc64 else {})
                        for n, d in sorted(files.items())
                    ],
                }
            )
        )
    return root


def _partial_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if ".kubetune-part" in p.name]


def _same_tree(a: Path, b: Path) -> bool:
    def tree(root: Path) -> dict[str, bytes]:
        return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    return tree(a) == tree(b)


runner = CliRunner(env={"COLUMNS": "250"})


# --------------------------------------------------------------------------- local paths


def test_pull_a_local_run_then_again_with_nothing_to_do(tmp_path: Path) -> None:
    run = make_run(tmp_path / "runs" / "default" / "demo")
    (run / "checkpoints" / "step-10").mkdir(parents=True)
    (run / "checkpoints" / "step-10" / "optimizer.pt").write_bytes(os.urandom(1000))
    dest = tmp_path / "pulled"

    result = runner.invoke(app, ["artifacts", "pull", str(run), str(dest)])
    assert result.exit_code == 0, result.output
    assert "default/demo: 5 files" in result.output and "5 downloaded" in result.output
    assert "verified against manifest.json" in result.output
    (run / "checkpoints" / "step-10" / "optimizer.pt").unlink()  # checkpoints are not in the manifest
    (run / "checkpoints" / "step-10").rmdir()
    (run / "checkpoints").rmdir()
    assert _same_tree(run, dest)

    again = runner.invoke(app, ["artifacts", "pull", f"file://{run}", str(dest)])
    assert again.exit_code == 0, again.output
    assert "0 downloaded, 5 already there" in again.output


def test_pull_refuses_a_local_run_without_manifest(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", manifest=False)
    result = runner.invoke(app, ["artifacts", "pull", str(run), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert f"{run} has no manifest.json: the run is incomplete" in result.output
    assert "nothing was downloaded" in result.output
    assert not (tmp_path / "out").exists()

    missing = runner.invoke(app, ["artifacts", "pull", str(tmp_path / "nothing"), str(tmp_path / "out")])
    assert missing.exit_code == 1
    assert "nothing under this prefix" in missing.output


def test_pull_refuses_a_tampered_local_file(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    weights = run / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1234] ^= 0xFF  # same size, other bytes
    weights.write_bytes(bytes(data))
    dest = tmp_path / "out"
    result = runner.invoke(app, ["artifacts", "pull", str(run), str(dest)])
    assert result.exit_code == 1
    assert "adapter_model.safetensors failed" in result.output and "manifest.json" in result.output
    assert not (dest / "adapter" / "adapter_model.safetensors").exists()
    assert not (dest / "manifest.json").exists()  # the local copy does not claim to be complete
    assert _partial_files(tmp_path) == []


def test_bad_manifests_name_the_file_and_field(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    doc = json.loads((run / "manifest.json").read_text())
    doc["files"][1]["sha256"] = "xyz"
    (run / "manifest.json").write_text(json.dumps(doc))
    result = runner.invoke(app, ["artifacts", "pull", str(run), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert f"{run}/manifest.json: files.1.sha256:" in result.output

    doc["files"][1] = {"path": "../../etc/passwd", "size": 1, "sha256": "0" * 64}
    with pytest.raises(Exception, match=r"files: path '\.\./\.\./etc/passwd' is not a relative path"):
        Manifest.parse(json.dumps(doc).encode(), "m.json")


def test_the_manifest_the_trainer_writes_is_the_one_pull_reads(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from kubetune.trainer import artifacts

    staging = make_run(tmp_path / "run", manifest=False)
    files = [f for f in staging.rglob("*") if f.is_file()]
    ctx = SimpleNamespace(
        job=SimpleNamespace(metadata=SimpleNamespace(namespace="team-a", name="demo")),
        run_id="r7",
        staging=staging,
    )
    written = artifacts.manifest(ctx, files).to_wire()  # type: ignore[arg-type]  # what manifest() reads
    # The keys (and the form of createdAt) as the trainer has always written them.
    assert list(written) == ["apiVersion", "kind", "job", "runId", "createdAt", "files"]
    assert written["apiVersion"] == "kubetune.io/v1alpha1" and written["kind"] == "FineTuneJobManifest"
    assert (written["job"], written["runId"]) == ("team-a/demo", "r7")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", written["createdAt"])
    assert [list(f) for f in written["files"]] == [["path", "size", "sha256", "crc64nvme"]] * len(files)
    assert [f["path"] for f in written["files"]] == sorted(f.relative_to(staging).as_posix() for f in files)
    read = Manifest.parse(json.dumps(written).encode(), "manifest.json")
    assert read.to_wire() == written
    assert (read.job, read.run_id, len(read.files)) == ("team-a/demo", "r7", len(files))

    # An earlier release's manifest (another apiVersion, no CRC64NVME) reads, and writes back as it was.
    old = json.loads((make_run(tmp_path / "old", crc64=False) / "manifest.json").read_text())
    assert Manifest.parse(json.dumps(old).encode(), "old.json").to_wire() == old


def test_ls_tells_complete_incomplete_and_damaged_runs_apart(tmp_path: Path) -> None:
    root = tmp_path / "finetunes"
    make_run(root / "default" / "done", "default/done")
    partial = make_run(root / "default" / "publishing", "default/publishing", manifest=False)
    (partial / "checkpoints" / "step-5").mkdir(parents=True)
    (partial / "checkpoints" / "step-5" / "model.safetensors").write_bytes(os.urandom(5000))
    training = root / "team-a" / "training" / "checkpoints" / "step-1"
    training.mkdir(parents=True)
    (training / "adapter_model.safetensors").write_bytes(os.urandom(7000))
    broken = make_run(root / "team-a" / "broken", "team-a/broken")
    (broken / "merged" / "tokenizer.json").unlink()
    (root / "notes.txt").write_text("not a run")

    runs = {r.name: r for r in find_runs(ObjectStore(), root)}
    assert set(runs) == {"default/done", "default/publishing", "team-a/training", "team-a/broken"}
    done = runs["default/done"]
    assert (done.status, done.job, done.files) == ("complete", "default/done", 6)
    assert done.size == sum(p.stat().st_size for p in (root / "default" / "done").rglob("*") if p.is_file())
    assert done.date is not None and done.date.isoformat() == "2026-12-01T10:00:00+00:00"
    assert (runs["default/publishing"].status, runs["default/publishing"].job) == (
        "incomplete",
        "default/publishing",
    )
    assert (runs["team-a/training"].status, runs["team-a/training"].job) == ("incomplete", None)
    assert runs["team-a/training"].size == 7000
    assert runs["team-a/broken"].status == "damaged"
    assert runs["team-a/broken"].problem == "1 file(s) in manifest.json missing: merged/tokenizer.json"

    table = runner.invoke(app, ["artifacts", "ls", str(root)])
    assert table.exit_code == 0, table.output
    lines = {line.split()[0]: line for line in table.output.splitlines() if line.strip()}
    assert "complete" in lines["default/done"] and "default/done" in lines["default/done"]
    assert "incomplete" in lines["team-a/training"]
    assert "damaged" in lines["team-a/broken"]
    listed = json.loads(runner.invoke(app, ["artifacts", "ls", str(root), "--json"]).output)
    assert {r["name"]: r["status"] for r in listed}["default/publishing"] == "incomplete"

    # The prefix may be the run itself.
    (only,) = find_runs(ObjectStore(), root / "default" / "done")
    assert (only.name, only.status) == ("", "complete")


# --------------------------------------------------------------------------- S3


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    return ["--endpoint", s3_server.endpoint]


@pytest.mark.s3
def test_pull_an_s3_run_with_large_files_in_parts(
    s3_server: S3Server, s3_bucket: str, s3_env: list[str], tmp_path: Path
) -> None:
    run = make_run(tmp_path / "run", big=70 * MiB + 17)  # over the default 64 MiB threshold: ranged GETs
    prefix = f"s3://{s3_bucket}/finetunes/default/demo"
    with ObjectStore(s3_server.storage_config()) as store:
        store.upload_prefix(run, prefix)
    gets = s3_server.request_count("GetObject", s3_bucket)

    result = runner.invoke(app, ["artifacts", "pull", prefix, str(tmp_path / "out"), *s3_env])
    assert result.exit_code == 0, result.output
    assert _same_tree(run, tmp_path / "out")
    # One GET per file; two ranged GETs for the 70 MiB one; the manifest read once.
    assert s3_server.request_count("GetObject", s3_bucket) - gets == 5 + 1 + 1
    assert s3_server.request_count("HeadObject", s3_bucket) == 0

    listing = runner.invoke(app, ["artifacts", "ls", f"s3://{s3_bucket}/finetunes", "--json", *s3_env])
    assert listing.exit_code == 0, listing.output
    (info,) = json.loads(listing.output)
    assert (info["name"], info["status"], info["job"], info["files"]) == (
        "default/demo",
        "complete",
        "default/demo",
        6,
    )
    assert info["size"] == sum(p.stat().st_size for p in run.rglob("*") if p.is_file())


@pytest.mark.s3
def test_pull_refuses_an_s3_run_without_manifest(
    s3_server: S3Server, s3_bucket: str, s3_env: list[str], tmp_path: Path
) -> None:
    run = make_run(tmp_path / "run", manifest=False)
    prefix = f"s3://{s3_bucket}/finetunes/default/demo"
    with ObjectStore(s3_server.storage_config()) as store:
        store.upload_prefix(run, prefix)
    gets = s3_server.request_count("GetObject", s3_bucket)
    result = runner.invoke(app, ["artifacts", "pull", prefix, str(tmp_path / "out"), *s3_env])
    assert result.exit_code == 1
    assert f"{prefix} has no manifest.json: the run is incomplete" in result.output
    assert s3_server.request_count("GetObject", s3_bucket) == gets
    assert not (tmp_path / "out").exists()

    listing = runner.invoke(app, ["artifacts", "ls", f"s3://{s3_bucket}/finetunes", *s3_env])
    assert listing.exit_code == 0
    assert "incomplete" in listing.output and "no manifest.json" in listing.output


@pytest.mark.s3
@pytest.mark.parametrize("crc64", [True, False], ids=["manifest-crc64nvme", "manifest-sha256-only"])
def test_pull_refuses_tampered_s3_objects(
    s3_server: S3Server, s3_client: S3Client, s3_bucket: str, s3_env: list[str], tmp_path: Path, crc64: bool
) -> None:
    run = make_run(tmp_path / "run", crc64=crc64)
    prefix = f"s3://{s3_bucket}/finetunes/default/demo"
    key = "finetunes/default/demo/adapter/adapter_model.safetensors"
    store = ObjectStore(s3_server.storage_config())
    store.upload_prefix(run, prefix)

    # Replaced by a consistent object (its own recorded SHA-256 matches it); only the manifest knows.
    other = tmp_path / "other.safetensors"
    other.write_bytes(os.urandom(300_000))
    store.upload_file(other, f"s3://{s3_bucket}/{key}")
    dest = tmp_path / "out"
    result = runner.invoke(app, ["artifacts", "pull", prefix, str(dest), *s3_env])
    assert result.exit_code == 1
    assert f"download s3://{s3_bucket}/{key} failed" in result.output
    assert f"{'CRC64NVME' if crc64 else 'SHA-256'} " in result.output
    assert f"recorded in {prefix}/manifest.json" in result.output
    assert not (dest / "adapter" / "adapter_model.safetensors").exists()
    assert not (dest / "manifest.json").exists()
    assert _partial_files(tmp_path) == []

    # Bit rot on the server: caught against the object's own SHA-256 as well.
    store.upload_file(run / "adapter" / "adapter_model.safetensors", f"s3://{s3_bucket}/{key}")
    path = s3_server.object_path(s3_bucket, key)
    data = bytearray(path.read_bytes())
    data[777] ^= 0xFF
    with path.open("r+b") as f:
        f.write(data)
    result = runner.invoke(app, ["artifacts", "pull", prefix, str(dest), *s3_env])
    assert result.exit_code == 1
    assert "corrupt" in result.output
    assert not (dest / "adapter" / "adapter_model.safetensors").exists()
    assert _partial_files(tmp_path) == []

    # A file the manifest lists is gone: refused before any download.
    s3_client.delete_object(Bucket=s3_bucket, Key=key)
    recorder = RequestRecorder(store.client)
    result = runner.invoke(app, ["artifacts", "pull", prefix, str(tmp_path / "out2"), *s3_env])
    assert result.exit_code == 1
    assert "does not match its manifest.json: 1 file(s) in manifest.json missing: adapter/adapter_model" in (
        result.output
    )
    assert not (tmp_path / "out2").exists()
    assert recorder.count("GetObject") == 0
    store.close()
