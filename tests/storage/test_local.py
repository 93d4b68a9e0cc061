"""The same interface on local paths and file:// URIs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubetune.storage import ObjectNotFoundError, ObjectStore, StorageError


@pytest.fixture
def local() -> ObjectStore:
    return ObjectStore()


def _partial_files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if ".kubetune-part" in p.name]


def test_small_objects_round_trip(local: ObjectStore, tmp_path: Path) -> None:
    uri = f"file://{tmp_path}/out/metrics.json"
    info = local.write_json(uri, {"loss": 0.5, "steps": [1, 2]})
    assert info.size == (tmp_path / "out" / "metrics.json").stat().st_size
    assert local.read_json(uri) == {"loss": 0.5, "steps": [1, 2]}
    assert local.read_json(tmp_path / "out" / "metrics.json") == {"loss": 0.5, "steps": [1, 2]}
    local.write_text(tmp_path / "card.md", "# model card\n")
    assert local.read_text(str(tmp_path / "card.md")) == "# model card\n"
    assert local.exists(uri) and local.exists(tmp_path / "out")
    assert not local.exists(tmp_path / "missing.json")
    assert _partial_files(tmp_path) == []
    with pytest.raises(ObjectNotFoundError, match=r"missing\.json"):
        local.read_bytes(tmp_path / "missing.json")


def test_invalid_json_names_the_file_and_position(local: ObjectStore, tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text('{"a": 1,\n "b": }\n')
    with pytest.raises(StorageError, match=r"bad\.json.*line 2 column 7"):
        local.read_json(tmp_path / "bad.json")


def test_failed_write_leaves_the_old_content_and_no_temp_file(local: ObjectStore, tmp_path: Path) -> None:
    target = tmp_path / "manifest.json"
    target.mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(StorageError) as info:
        local.write_json(target, {"done": True})
    assert "write" in str(info.value) and str(target) in str(info.value)
    assert target.is_dir()
    assert _partial_files(tmp_path) == []


def test_prefix_round_trip_list_and_delete(local: ObjectStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(os.urandom(1000))
    (src / "sub" / "b.txt").write_text("hello")
    (src / ".a.bin.x1.kubetune-part").write_bytes(b"in flight")  # an unfinished write: never listed

    listing = local.list_prefix(src, checksums=True)
    assert [(o.name, o.size) for o in listing] == [("a.bin", 1000), ("sub/b.txt", 5)]
    assert listing[1].sha256 == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"

    out = local.upload_prefix(src, f"file://{tmp_path}/dest")
    assert sorted(t.dest.path.relative_to(tmp_path / "dest").as_posix() for t in out) == [
        "a.bin",
        "sub/b.txt",
    ]
    assert (tmp_path / "dest" / "sub" / "b.txt").read_text() == "hello"

    back = local.download_prefix(tmp_path / "dest", tmp_path / "back")
    assert not any(t.skipped for t in back)
    assert (tmp_path / "back" / "a.bin").read_bytes() == (src / "a.bin").read_bytes()

    mtime = (tmp_path / "back" / "a.bin").stat().st_mtime_ns
    again = local.download_prefix(tmp_path / "dest", tmp_path / "back")
    assert all(t.skipped for t in again)
    assert (tmp_path / "back" / "a.bin").stat().st_mtime_ns == mtime

    assert local.delete_prefix(tmp_path / "dest") == 2
    assert not (tmp_path / "dest").exists()
    assert local.list_prefix(tmp_path / "dest") == []
    with pytest.raises(ObjectNotFoundError):
        local.download_prefix(tmp_path / "dest", tmp_path / "back2")
