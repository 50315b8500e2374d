"""The takeover: a new owner claims every other consumer's pending entries (DESIGN.md §5).

For each other consumer of the group, page through its pending list (``XPENDING`` for that
consumer) and ``XCLAIM`` the page to the new owner, in one fenced script per page; the script
that finds the dead consumer's pending list empty deletes it (``XGROUP DELCONSUMER`` drops a
consumer's pending entries, so it runs only where emptiness was just proven).  The claimed
entries are then replayed by the reader, in id order, before anything new.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import attrs
import redis

from ._config import CoordinatorConfig
from ._keys import GroupKeys
from ._lease import Lease
from ._scripts import Scripts
from .exceptions import GroupMissing


@attrs.frozen
class Takeover:
    """What a takeover did."""

    claimed: int
    deleted: tuple[str, ...]
    trimmed: tuple[str, ...]
    """Pending ids whose stream entry was gone (trimmed or deleted): acked, reported."""
    duration_ms: float


def other_consumers(client: redis.Redis, stream: str, group: str, me: str) -> list[str]:
    """The group's consumers other than ``me``; :class:`GroupMissing` when the stream or the
    group does not exist."""
    try:
        infos: Any = client.xinfo_consumers(stream, group)
    except redis.ResponseError as err:
        text = str(err)
        if text.startswith("NOGROUP") or "no such key" in text.lower():
            raise GroupMissing(f"{text} (the stream or group is gone)") from err
        raise
    names = [i["name"].decode() if isinstance(i["name"], bytes) else i["name"] for i in infos]
    return [n for n in names if n != me]


def take_over(scripts: Scripts, client: redis.Redis, keys: GroupKeys, config: CoordinatorConfig,
              lease: Lease, check: Callable[[], None]) -> Takeover:
    """Claim every other consumer's pending entries for ``config.consumer`` under ``lease``,
    deleting each consumer once its pending list is empty.  ``check`` raises once the lease is
    no longer valid (checked before every page)."""
    started = time.monotonic()
    claimed = 0
    deleted: list[str] = []
    trimmed: list[str] = []
    for name in other_consumers(client, config.stream, config.group, config.consumer):
        while True:
            check()
            page = scripts.claim(keys, lease.token, config.consumer, name, config.claim_page)
            claimed += page.claimed
            trimmed += page.trimmed
            if page.deleted:
                deleted.append(name)
                break
    return Takeover(claimed, tuple(deleted), tuple(trimmed),
                    (time.monotonic() - started) * 1000.0)
