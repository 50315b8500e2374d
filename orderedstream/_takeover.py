"""The takeover: a new owner claims every other consumer's pending entries (DESIGN.md §5).

For each other consumer of the group, page through its pending list (``XPENDING`` for that
consumer) and ``XCLAIM`` the page to the new owner, in one fenced script per page; the script
that finds the dead consumer's pending list empty deletes it (``XGROUP DELCONSUMER`` drops a
consumer's pending entries, so it runs only where emptiness was just proven).  The claimed
entries are then replayed by the reader, in id order, before anything new.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import attrs
import redis

from ._config import CoordinatorConfig
from ._engine import Plain, Step
from ._keys import GroupKeys
from ._lease import Lease
from ._reader import check_lease
from ._scripts import EVENTS_MAXLEN, claim_op
from ._wire import Timeline as T
from .exceptions import GroupMissing


@attrs.frozen
class Takeover:
    """What a takeover did."""

    claimed: int
    deleted: tuple[str, ...]
    trimmed: tuple[str, ...]
    """Pending ids whose stream entry was gone (trimmed or deleted): acked, reported."""
    duration_ms: float


def other_consumers(stream: str, group: str, me: str) -> Step[list[str]]:
    """The group's consumers other than ``me``; :class:`GroupMissing` when the stream or the
    group does not exist."""
    try:
        infos: Any = yield Plain("XINFO CONSUMERS", stream, group)
    except redis.ResponseError as err:
        text = str(err)
        if text.startswith("NOGROUP") or "no such key" in text.lower():
            raise GroupMissing(f"{text} (the stream or group is gone)") from err
        raise
    names = [i["name"].decode() if isinstance(i["name"], bytes) else i["name"] for i in infos]
    return [n for n in names if n != me]


def ensure_group(client: redis.Redis, config: CoordinatorConfig, after: str | None) -> str | None:
    """Create the group (and the stream) unless it exists; returns the id it was created at, or
    None.  A group found missing after the start (a restart that lost the data, ``XGROUP
    DESTROY``) is created after ``after`` (the last entry this process handed out) when the
    stream still has entries, else at ``config.create_group_from``."""
    start = config.create_group_from
    if after is not None and client.xlen(config.stream):
        start = after
    try:
        client.xgroup_create(config.stream, config.group, id=start, mkstream=True)
    except redis.ResponseError as err:
        if "BUSYGROUP" not in str(err):
            raise
        return None
    return start


def take_over(keys: GroupKeys, config: CoordinatorConfig, lease: Lease) -> Step[Takeover]:
    """Claim every other consumer's pending entries for ``config.consumer`` under ``lease``,
    deleting each consumer once its pending list is empty (the lease is checked before every
    page), and add the takeover to the group's timeline."""
    started = time.monotonic()
    claimed = 0
    deleted: list[str] = []
    trimmed: list[str] = []
    for name in (yield from other_consumers(config.stream, config.group, config.consumer)):
        while True:
            check_lease(lease)
            page = yield claim_op(keys, lease.token, config.consumer, name, config.claim_page)
            claimed += page.claimed
            trimmed += page.trimmed
            if page.deleted:
                deleted.append(name)
                break
    done = Takeover(claimed, tuple(deleted), tuple(trimmed),
                    (time.monotonic() - started) * 1000.0)
    with contextlib.suppress(redis.RedisError):  # the timeline is for operators: best effort
        yield Plain("XADD", keys.events, "MAXLEN", "~", EVENTS_MAXLEN, "*",
                    T.TYPE, "takeover", T.CONSUMER, config.consumer, T.EPOCH, lease.epoch,
                    T.CLAIMED, done.claimed, T.DELETED, ",".join(done.deleted),
                    T.TRIMMED, len(done.trimmed), T.DURATION_MS, f"{done.duration_ms:.1f}")
    return done
