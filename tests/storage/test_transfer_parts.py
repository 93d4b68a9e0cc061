"""Transfer pieces that need no server: part ranges, and hashing blocks written out of order."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import threading
from pathlib import Path

import pytest

from kubetune.storage.checksums import OrderedHasher
from kubetune.storage.transfer import part_ranges, pwrite_all

MiB = 1024 * 1024


def test_part_ranges_cover_the_file_once() -> None:
    assert part_ranges(0, 64 * MiB, 64 * MiB) == [(0, 0)]
    assert part_ranges(64 * MiB - 1, 64 * MiB, 64 * MiB) == [(0, 64 * MiB - 1)]
    ranges = part_ranges(64 * MiB + 12345, 8 * MiB, 8 * MiB)
    assert len(ranges) == 9 and ranges[0] == (0, 8 * MiB) and ranges[-1] == (64 * MiB, 64 * MiB + 12345)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    # S3 allows 10,000 parts: parts grow for files that would need more.
    huge = part_ranges(200_000 * MiB, 8 * MiB, 8 * MiB)
    assert len(huge) <= 10_000 and huge[-1][1] == 200_000 * MiB


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blocks_added_in_any_order_hash_like_the_file(tmp_path: Path, seed: int) -> None:
    data = os.urandom(200_000)
    blocks = [(o, data[o : o + 1000]) for o in range(0, len(data), 1000)]
    random.Random(seed).shuffle(blocks)
    path = tmp_path / "f"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    try:
        hasher = OrderedHasher(fd)
        lock = threading.Lock()

        def worker(share: list[tuple[int, bytes]]) -> None:
            for offset, block in share:
                with lock:  # the order of writes is random; each block is written before it is added
                    pwrite_all(fd, block, offset)
                hasher.add(offset, block)

        threads = [threading.Thread(target=worker, args=(blocks[i::4],)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert hasher.hashed == len(data)
        assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)


def test_a_gap_stops_the_hash_at_the_gap(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(bytes(3000))
    fd = os.open(path, os.O_RDONLY)
    try:
        hasher = OrderedHasher(fd)
        hasher.add(0, bytes(1000))
        hasher.add(2000, bytes(1000))  # 1000-2000 never came
        assert hasher.hashed == 1000
    finally:
        os.close(fd)
