"""Kubernetes quantities in bytes, and bytes for people."""

from __future__ import annotations

import re

from kubetune import api

GIB = 1024**3

_SUFFIXES: dict[str, float] = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18, "m": 10**-3,
}  # fmt: skip


def parse_quantity(value: str) -> int:
    """A Kubernetes quantity (``80Gi``, ``40G``, ``500m``) in bytes."""
    match = re.fullmatch(api.QUANTITY_PATTERN, value)
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity such as 80Gi")
    number = value.rstrip("".join(_SUFFIXES))
    suffix = value[len(number) :]
    return int(float(number) * _SUFFIXES.get(suffix, 1))


def gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB"
