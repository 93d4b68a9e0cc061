"""The runs a FineTuneJob leaves in object storage: list them, and pull one verified against its manifest.

A run is the prefix ``<output>/<namespace>/<name>/``. The trainer uploads every artifact and
writes ``manifest.json`` (each file with size, SHA-256 and CRC64NVME) last, so a run without a manifest is
incomplete: still training (``checkpoints/`` only), failed, or cut off while publishing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_serializer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from kubetune.api import API_VERSION
from kubetune.contract import CHECKPOINTS, MANIFEST, METRICS
from kubetune.storage import (
    ObjectInfo,
    ObjectStore,
    ProgressCallback,
    StorageConfig,
    StorageError,
    StorageURI,
    Transfer,
    URILike,
    join_uri,
    parse_uri,
)

__all__ = [
    "MANIFEST",
    "ArtifactsError",
    "Manifest",
    "ManifestFile",
    "PullResult",
    "RunInfo",
    "find_runs",
    "pull",
]

RunStatus = Literal["complete", "incomplete", "damaged"]


class ArtifactsError(Exception):
    """A run that cannot be listed or pulled; the message says which and why."""


class ManifestFile(BaseModel):
    """One published file: its path under the run, size and checksums."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    path: str = Field(min_length=1)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    crc64nvme: str | None = Field(None, pattern=r"^[0-9a-f]{16}$")  # absent in manifests before 0.2


class Manifest(BaseModel):
    """``manifest.json``: the trainer's push stage writes it (``to_wire``, built by
    ``kubetune.trainer.artifacts.manifest``); listing and pulling read it (``parse``). One model for
    both, so the keys cannot drift apart: apiVersion, kind, job, runId, createdAt and files, each
    file with path, size, sha256 and crc64nvme."""

    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    api_version: str = Field(API_VERSION, alias="apiVersion")  # not checked: kubetune.dev/... before 0.2
    kind: Literal["FineTuneJobManifest"]
    job: str = ""  # <namespace>/<name>
    run_id: str = Field("", alias="runId")
    created_at: datetime | None = Field(None, alias="createdAt")
    files: list[ManifestFile]

    @field_serializer("created_at")
    def _in_seconds(self, value: datetime | None) -> str | None:
        return value.isoformat(timespec="seconds") if value is not None else None

    def to_wire(self) -> dict[str, Any]:
        """The JSON document as written (absent values left out, as readers before 0.2 expect)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)

    @classmethod
    def parse(cls, raw: bytes, source: str) -> Manifest:
        """Parse and check a manifest; errors name ``source`` and the field."""
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactsError(f"{source}: not valid JSON ({exc})") from exc
        try:
            manifest = cls.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "(document)"
            raise ArtifactsError(f"{source}: {where}: {first['msg']}") from exc
        for entry in manifest.files:
            parts = entry.path.split("/")
            if entry.path.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise ArtifactsError(f"{source}: files: path {entry.path!r} is not a relative path")
        return manifest


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One run found under a prefix."""

    uri: StorageURI
    name: str  # relative to the listed prefix; "" when the prefix is the run itself
    status: RunStatus
    job: str | None
    size: int
    files: int
    date: datetime | None
    problem: str | None = None  # why a run is incomplete or damaged

    def to_dict(self) -> dict[str, object]:
        return {
            "uri": str(self.uri),
            "name": self.name,
            "status": self.status,
            "job": self.job,
            "size": self.size,
            "files": self.files,
            "date": self.date.isoformat() if self.date else None,
            "problem": self.problem,
        }


@dataclass(frozen=True, slots=True)
class PullResult:
    manifest: Manifest
    transfers: list[Transfer]

    @property
    def downloaded(self) -> int:
        return sum(1 for t in self.transfers if not t.skipped)

    @property
    def size(self) -> int:
        return sum(t.size for t in self.transfers)


# --------------------------------------------------------------------------- listing


def _run_root(name: str) -> tuple[str, ...] | None:
    """The run an object belongs to, by what only runs have: a manifest, metrics, checkpoints."""
    parts = tuple(name.split("/"))
    if CHECKPOINTS in parts[:-1]:
        return parts[: parts.index(CHECKPOINTS)]
    if parts[-1] in (MANIFEST, METRICS):
        return parts[:-1]
    return None


def group_runs(objects: list[ObjectInfo]) -> dict[tuple[str, ...], list[ObjectInfo]]:
    """Objects by run, outermost runs only (a run's own files never start another run)."""
    roots: list[tuple[str, ...]] = []
    for root in sorted({r for o in objects if (r := _run_root(o.name)) is not None}, key=len):
        if not any(root[: len(outer)] == outer for outer in roots):
            roots.append(root)
    runs: dict[tuple[str, ...], list[ObjectInfo]] = {root: [] for root in sorted(roots)}
    for obj in objects:
        parts = tuple(obj.name.split("/"))
        for root in roots:
            if parts[: len(root)] == root:
                runs[root].append(obj)
                break
    return runs


def _inspect_run(
    store: ObjectStore, base: StorageURI, root: tuple[str, ...], objects: list[ObjectInfo]
) -> RunInfo:
    uri = join_uri(base, *root) if root else base
    prefix = "/".join(root) + "/" if root else ""
    files = {o.name[len(prefix) :]: o for o in objects}
    size = sum(o.size for o in objects)
    dates = [o.last_modified for o in objects if o.last_modified is not None]
    latest = max(dates) if dates else None

    def run(status: RunStatus, job: str | None, date: datetime | None, problem: str | None) -> RunInfo:
        return RunInfo(uri, "/".join(root), status, job, size, len(objects), date, problem)

    if MANIFEST not in files:
        job = None
        if METRICS in files:
            try:
                metrics = store.read_json(files[METRICS].uri)
                job = metrics.get("job") if isinstance(metrics, dict) else None
            except StorageError:
                pass
        return run("incomplete", job, latest, f"no {MANIFEST}")
    try:
        manifest = Manifest.parse(store.read_bytes(files[MANIFEST].uri), str(files[MANIFEST].uri))
    except (StorageError, ArtifactsError) as exc:
        return run("damaged", None, latest, str(exc))
    problems = _check_listing(manifest, files)
    date = manifest.created_at or latest
    if problems:
        return run("damaged", manifest.job or None, date, problems)
    return run("complete", manifest.job or None, date, None)


def _check_listing(manifest: Manifest, files: dict[str, ObjectInfo]) -> str | None:
    """What the listing shows wrong with a manifest's files: missing ones, or ones of another size."""
    missing = [f.path for f in manifest.files if f.path not in files]
    resized = [
        f"{f.path} ({files[f.path].size} bytes, {MANIFEST} says {f.size})"
        for f in manifest.files
        if f.path in files and files[f.path].size != f.size
    ]
    problems = []
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        problems.append(f"{len(missing)} file(s) in {MANIFEST} missing: {shown}")
    if resized:
        problems.append(f"{len(resized)} file(s) of the wrong size: {', '.join(resized[:5])}")
    return "; ".join(problems) or None


def find_runs(
    store: ObjectStore, uri: URILike, *, progress: Callable[[int, int], None] | None = None
) -> list[RunInfo]:
    """Every run under ``uri`` (the prefix may itself be a run), with status, size, date and job.

    ``progress(done, total)`` is called as each run's manifest is read.
    """
    base = parse_uri(uri)
    runs = group_runs(store.list_prefix(base))
    found = []
    for done, (root, objects) in enumerate(runs.items(), start=1):
        found.append(_inspect_run(store, base, root, objects))
        if progress is not None:
            progress(done, len(runs))
    return found


# --------------------------------------------------------------------------- pulling


def pull(
    store: ObjectStore,
    uri: URILike,
    dest: str | Path,
    *,
    progress: ProgressCallback | None = None,
) -> PullResult:
    """Download the files of a finished run into ``dest``, each checked against ``manifest.json``.

    A run without a manifest is refused before anything is downloaded. Every file must have the
    size and checksum the manifest records (its CRC64NVME, or its SHA-256 where the manifest has no
    CRC64NVME; the CRC guards against damage at 8 GB/s, and anyone able to rewrite a file could
    rewrite the manifest beside it too) and the checksum its object records; one that does not
    is never renamed into place. ``dest/manifest.json`` is written last, after every file is
    verified, so a local copy with a manifest is as complete as the run. Files already in
    ``dest`` with the right content are not downloaded again.
    """
    base = parse_uri(uri)
    root = Path(dest).absolute()
    manifest_uri = join_uri(base, MANIFEST)
    objects = {o.name: o for o in store.list_prefix(base)}
    if MANIFEST not in objects:
        if not objects:
            raise ArtifactsError(f"no run at {base}: nothing under this prefix")
        raise ArtifactsError(
            f"{base} has no {MANIFEST}: the run is incomplete (still running, failed, or not "
            "published yet); nothing was downloaded"
        )
    raw = store.read_bytes(manifest_uri)
    manifest = Manifest.parse(raw, str(manifest_uri))
    if problems := _check_listing(manifest, objects):
        raise ArtifactsError(f"{base} does not match its {MANIFEST}: {problems}; nothing was downloaded")
    store.delete(root / MANIFEST)  # a manifest left from an earlier pull must not vouch for a mix
    transfers = store.download_objects(
        [objects[f.path] for f in manifest.files],
        root,
        expected={f.path: f.sha256 for f in manifest.files},
        expected_crc64nvme={f.path: f.crc64nvme for f in manifest.files if f.crc64nvme},
        expected_source=str(manifest_uri),
        progress=progress,
    )
    store.write_bytes(root / MANIFEST, raw)
    return PullResult(manifest, transfers)


# --------------------------------------------------------------------------- command line


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _transfer_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )


def run_pull(uri: str, dest: Path, config: StorageConfig, console: Console, err: Console) -> int:
    """``kubetune artifacts pull``: 0 when every file is in place and verified, 1 otherwise."""
    try:
        with ObjectStore(config) as store, _transfer_progress(err) as bar:
            task = bar.add_task(f"pull {uri}", total=None)
            result = pull(
                store, uri, dest, progress=lambda done, total: bar.update(task, completed=done, total=total)
            )
    except (ArtifactsError, StorageError) as exc:
        err.print(f"kubetune artifacts pull: {exc}", markup=False, highlight=False)
        return 1
    m = result.manifest
    console.print(
        f"{m.job or uri}: {len(result.transfers)} files, {_human(result.size)} in {dest} "
        f"({result.downloaded} downloaded, {len(result.transfers) - result.downloaded} already there), "
        f"every file verified against {MANIFEST}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    return 0


def run_ls(uri: str, config: StorageConfig, console: Console, err: Console, *, as_json: bool) -> int:
    """``kubetune artifacts ls``: a table (or JSON) of the runs under ``uri``; 1 when there are none."""
    try:
        with (
            ObjectStore(config) as store,
            Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                console=err,
                transient=True,
            ) as bar,
        ):
            task = bar.add_task(f"reading runs under {uri}", total=None)
            runs = find_runs(
                store, uri, progress=lambda done, total: bar.update(task, completed=done, total=total)
            )
    except StorageError as exc:
        err.print(f"kubetune artifacts ls: {exc}", markup=False, highlight=False)
        return 1
    if as_json:
        console.print_json(json.dumps([r.to_dict() for r in runs]))
        return 0 if runs else 1
    if not runs:
        err.print(f"kubetune artifacts ls: no runs under {uri}", markup=False, highlight=False)
        return 1
    table = Table(box=None, pad_edge=False)
    for column in ("RUN", "STATUS", "JOB", "SIZE", "FILES", "DATE", "NOTE"):
        table.add_column(column, justify="right" if column in ("SIZE", "FILES") else "left")
    style = {"complete": "green", "incomplete": "yellow", "damaged": "red"}
    for r in runs:
        table.add_row(
            r.name or str(r.uri),
            Text(r.status, style=style[r.status]),
            r.job or "-",
            _human(r.size),
            str(r.files),
            r.date.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC") if r.date else "-",
            r.problem or "",
        )
    console.print(table)
    return 0
