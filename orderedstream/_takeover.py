"""The takeover: a new owner claims every other consumer's pending entries (DESIGN.md §5).

For each other consumer of the group, page through its pending list (``XPENDING`` for that
consumer) and ``XCLAIM`` the page to the new owner; the script that finds the dead consumer's
pending list empty deletes it (``XGROUP DELCONSUMER`` drops a consumer's pending entries, so it
runs only where emptiness was just proven).  The claimed entries are then replayed by the
reader, in id order, before anything new.

The first page of every consumer, the timeline record and the owner's first read are one
script (``lua/take_over.lua``), fenced by the term's nonce, so it rides in the same round trip
as the acquisition (:func:`first_script`, sent by the standby: the reply waits on
:attr:`Lease.head_start`); when a dead consumer had more than one page pending, the rest is
claimed a page per script (``lua/claim.lua``, the lease checked before each) and nothing was
read yet.
"""

from __future__ import annotations

import contextlib
import time

import attrs
import redis

from ._config import CoordinatorConfig
from ._engine import Plain, Step
from ._keys import GroupKeys
from ._lease import Lease, Then, parse_token
from ._reader import check_lease
from ._scripts import (
    EVENTS_MAXLEN,
    TakeOverReply,
    claim_op,
    take_over_command,
    take_over_op,
)
from ._wire import Timeline as T


@attrs.frozen
class Takeover:
    """What a takeover did."""

    claimed: int
    deleted: tuple[str, ...]
    trimmed: tuple[str, ...]
    """Pending ids whose stream entry was gone (trimmed or deleted): acked, reported."""
    duration_ms: float


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


def first_script(keys: GroupKeys, config: CoordinatorConfig) -> Then:
    """The ``take_over`` script for a term with a given nonce, for the standby to send right
    behind its acquisition (see :mod:`._lease`)."""

    def build(nonce: str) -> tuple[str, list[str], list[object]]:
        return take_over_command(keys, config.consumer, nonce, config.claim_page,
                                 config.batch_size)

    return build


def take_over(keys: GroupKeys, config: CoordinatorConfig,
              lease: Lease) -> Step[tuple[Takeover, TakeOverReply]]:
    """Claim every other consumer's pending entries for ``config.consumer`` under ``lease``,
    deleting each consumer once its pending list is empty, add the takeover to the group's
    timeline, and read the first page: the ``take_over`` script's reply that came with the
    acquisition (:attr:`Lease.head_start`), or that script run now; then, for consumers left
    with entries pending, a page per ``claim`` script (the lease checked before each).  Returns
    what was done and the script's reply (its first page: ``kind`` 'none' when consumers were
    left, nothing read then)."""
    started = time.monotonic()
    raw, lease.head_start = lease.head_start, None
    if raw is not None:  # its duration: from the acquisition it rode with
        started = lease.sent_at
        got = TakeOverReply.parse(raw)
    else:
        check_lease(lease)
        got = yield take_over_op(keys, config.consumer, parse_token(lease.token)[2],
                                 config.claim_page, config.batch_size)
    claimed = got.claimed
    deleted = list(got.deleted)
    trimmed = list(got.trimmed)
    for name in got.left:
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
    if got.left:  # else the script added it
        with contextlib.suppress(redis.RedisError):  # the timeline is for operators: best effort
            yield Plain("XADD", keys.events, "MAXLEN", "~", EVENTS_MAXLEN, "*",
                        T.TYPE, "takeover", T.CONSUMER, config.consumer, T.EPOCH, lease.epoch,
                        T.CLAIMED, done.claimed, T.DELETED, ",".join(done.deleted),
                        T.TRIMMED, len(done.trimmed), T.DURATION_MS, f"{done.duration_ms:.1f}")
    return done, got
