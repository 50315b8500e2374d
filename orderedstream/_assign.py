"""TEMPORARY stand-in (replaced by the topic1 branch's version)."""
from __future__ import annotations

import hashlib
from collections.abc import Sequence


def _w(member: str, p: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{member}/{p}".encode(), digest_size=8).digest(), "big")


def assign(partitions: int, members: Sequence[str]) -> dict[str, tuple[int, ...]]:
    names = sorted(set(members))
    out: dict[str, list[int]] = {m: [] for m in names}
    if not names:
        return {}
    base, extra = divmod(partitions, len(names))
    at_ceil = 0
    pairs = sorted(((_w(m, p), p, m) for p in range(partitions) for m in names), reverse=True)
    done: set[int] = set()
    for _, p, m in pairs:
        if p in done:
            continue
        n = len(out[m])
        if n < base or (n == base and at_ceil < extra):
            if n == base:
                at_ceil += 1
            out[m].append(p)
            done.add(p)
    return {m: tuple(sorted(v)) for m, v in out.items()}
