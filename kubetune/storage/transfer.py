"""What a transfer is made of: its results, the objects it moves, its progress, its threads and parts."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeAlias

from kubetune.storage.uri import StorageURI

MAX_PARTS = 10_000


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One object of a listing. ``name`` is relative to the listed prefix (``/``-separated)."""

    uri: StorageURI
    name: str
    size: int
    etag: str | None = None
    sha256: str | None = None
    last_modified: datetime | None = None
    crc64nvme: str | None = None


@dataclass(frozen=True, slots=True)
class Transfer:
    """One file moved (or found already in place, ``skipped``). ``sha256`` and ``crc64nvme`` are
    the content's, where known: taken from the bytes or recorded with the object whose bytes were
    verified against the other ("" and None where unknown)."""

    source: StorageURI
    dest: StorageURI
    size: int
    sha256: str
    skipped: bool
    crc64nvme: str | None = None


@dataclass(slots=True)
class Fetch:
    """One object to download and what is known of it before its first GET."""

    src: StorageURI
    dest: Path
    size: int | None = None
    etag: str | None = None
    sha256: str | None = None  # recorded with the object (from a HEAD), if known
    expected: str | None = None  # from a manifest: the bytes must match it as well
    expected_source: str = ""
    crc64nvme: str | None = None  # recorded with the object (from a HEAD), if known
    expected_crc64nvme: str | None = None  # from a manifest


ProgressCallback: TypeAlias = Callable[[int, int], None]
"""Called as bytes move: ``(bytes done, bytes in all)``, from any of the transfer threads."""


class Progress:
    """Adds up the bytes moved by every thread of one transfer and reports the running total."""

    def __init__(self, total: int, callback: ProgressCallback | None) -> None:
        self.total = total
        self._callback = callback
        self._done = 0
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        if self._callback is None or not nbytes:
            return
        with self._lock:
            self._done += nbytes
            done = self._done
        self._callback(done, self.total)


class TaskGroup:
    """Tasks on a thread pool. Tasks may add tasks; the first failure stops every task not yet
    started (running ones see :attr:`failed`) and :meth:`wait` raises it once all have ended."""

    def __init__(self, workers: int) -> None:
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kubetune-storage")
        self._cond = threading.Condition()
        self._pending = 0
        self._error: BaseException | None = None

    @property
    def failed(self) -> bool:
        return self._error is not None

    def submit(self, task: Callable[[], None]) -> None:
        with self._cond:
            if self._error is not None:
                return
            self._pending += 1
        self._pool.submit(self._run, task)

    def _run(self, task: Callable[[], None]) -> None:
        try:
            if self._error is None:
                task()
        except BaseException as exc:
            self.fail(exc)
        finally:
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc

    def wait(self) -> None:
        try:
            with self._cond:
                while self._pending:
                    self._cond.wait()
        except BaseException as exc:  # e.g. KeyboardInterrupt: stop the workers, then re-raise
            self.fail(exc)
            raise
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
        if self._error is not None:
            raise self._error


class Batch:
    """The files of one transfer on one task group: each file's task leaves its :class:`Transfer`
    at the file's index, and a file in flight leaves a clean-up that runs if the batch fails."""

    def __init__(self, files: int, workers: int, progress: Progress) -> None:
        self.results: list[Transfer | None] = [None] * files
        self.progress = progress
        self.group = TaskGroup(workers)
        self._cleanups: list[Callable[[], None]] = []

    def on_failure(self, cleanup: Callable[[], None]) -> None:
        self._cleanups.append(cleanup)  # list.append is atomic; read only after every task has ended

    def run(self, tasks: Iterable[Callable[[], None]]) -> list[Transfer]:
        try:
            for task in tasks:
                self.group.submit(task)
            self.group.wait()
        except BaseException:
            for cleanup in self._cleanups:
                cleanup()
            raise
        return [r for r in self.results if r is not None]


def part_ranges(size: int, threshold: int, chunk: int) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` of a transfer: one for a file under ``threshold``, else parts
    of ``chunk`` bytes (grown if needed to stay within S3's 10,000 parts)."""
    if size < threshold:
        return [(0, size)]
    chunk = max(chunk, -(-size // MAX_PARTS))
    return [(start, min(start + chunk, size)) for start in range(0, size, chunk)]


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) == size:
        return data
    chunks = [data]
    got = len(data)
    while got < size:
        more = os.pread(fd, size - got, offset + got)
        if not more:
            raise OSError(f"unexpected end of file at byte {offset + got}")
        chunks.append(more)
        got += len(more)
    return b"".join(chunks)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
