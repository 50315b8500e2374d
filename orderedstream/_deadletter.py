"""The dead-letter path: parking entries in the delay set (DESIGN.md §6).

A parked entry is a member of the group's delay set (its original stream id, scored by due time
on the server clock) plus a JSON record in the ``parked`` hash: the fields, exactly (a field that
is not UTF-8 is kept as base64), and the metadata an operator needs.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from typing import Any

from ._events import EntryParked
from ._keys import GroupKeys
from ._scripts import Scripts


def encode_fields(raw: Mapping[bytes, bytes]) -> list[list[Any]]:
    """Fields as JSON-safe pairs; bytes that are not UTF-8 become ``{"b64": ...}``."""

    def one(value: bytes) -> Any:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode("ascii")}

    return [[one(k), one(v)] for k, v in raw.items()]


def decode_fields(pairs: list[list[Any]]) -> dict[bytes, bytes]:
    """Inverse of :func:`encode_fields`."""

    def one(value: Any) -> bytes:
        if isinstance(value, dict):
            return base64.b64decode(value["b64"])
        return str(value).encode("utf-8")

    return {one(k): one(v) for k, v in pairs}


class Parker:
    """Parks entries for one (stream, group) through the fenced ``defer`` script."""

    def __init__(self, scripts: Scripts, keys: GroupKeys, group: str) -> None:
        self._scripts = scripts
        self._keys = keys
        self._group = group

    def park(self, token: str, epoch: int, consumer: str, entry_id: str,
             raw: Mapping[bytes, bytes], reason: str, delay_ms: int, attempts: int,
             stream: str) -> EntryParked:
        now_ms = int(time.time() * 1000)
        origin = raw.get(b"os-origin-id")
        record = {
            "id": entry_id,
            "origin_id": origin.decode("utf-8", "replace") if origin else entry_id,
            "group": self._group,
            "reason": reason,
            "attempts": attempts,
            "first_failure_ms": now_ms,
            "last_failure_ms": now_ms,
            "epoch": epoch,
            "consumer": consumer,
            "fixer_attempts": 0,
            "history": [],
            "fields": encode_fields(raw),
        }
        due = self._scripts.call(
            "defer", [stream, self._keys.lease, self._keys.delay, self._keys.parked],
            [token, self._group, entry_id, json.dumps(record, separators=(",", ":")), delay_ms])
        return EntryParked(stream=stream, group=self._group, consumer=consumer,
                           entry_id=entry_id, reason=reason, due_ms=int(due))
