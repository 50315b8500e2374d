"""What an operator sees of one (stream, group): owner and lease, every consumer's state, lag,
oldest pending entry, the dead-letter counts and the failover timeline.  Read-only, but for
:func:`record_member`: the one record a coordinator keeps for operators."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from typing import Any

import attrs
import redis

from ._dlq import DeadLetterCounts, DeadLetters
from ._keys import GroupKeys, id_order
from ._lease import parse_token
from ._server import server_ms


@attrs.frozen(kw_only=True)
class ConsumerState:
    name: str
    state: str
    """'owner', 'standby', 'dead' (its connection is gone), 'gone' (in the group's consumer list
    only: it read once and is not running), or 'unknown' (CLIENT LIST not permitted)."""
    pending: int
    idle_ms: int | None
    """XINFO CONSUMERS idle: since its last read attempt (Valkey, Redis 7.2+) or delivery."""
    inactive_ms: int | None
    """Since its last successful read (Valkey, Redis 7.2+); None where the server lacks it."""
    pid: int | None = None
    host: str | None = None


@attrs.frozen(kw_only=True)
class TimelineEvent:
    ts_ms: int
    type: str
    """'acquired', 'takeover', 'released' (clean stop), 'ended' (a standby saw the owner's
    connection vanish)."""
    consumer: str
    epoch: int | None
    detail: dict[str, str]


@attrs.frozen(kw_only=True)
class GroupStatus:
    stream: str
    group: str
    server_ms: int
    owner: str | None
    epoch: int | None
    lease_remaining_ms: int | None
    owner_since_ms: int | None
    consumers: tuple[ConsumerState, ...]
    stream_length: int
    entries_read: int | None
    lag: int | None
    """Entries not yet delivered to the group (XINFO GROUPS lag; None when the server cannot
    tell, e.g. after deletions)."""
    pending: int
    oldest_pending_age_ms: int | None
    """Age of the oldest pending entry by its id's timestamp."""
    dead_letters: DeadLetterCounts
    timeline: tuple[TimelineEvent, ...]

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


_HOST = socket.gethostname()


def record_member(client: redis.Redis, keys: GroupKeys, consumer: str, role: str | None,
                  conn_name: str) -> None:
    """Tell operators who is there (the members hash; best effort): ``role`` None removes
    ``consumer``.  Liveness is never read from it (``CLIENT LIST`` names are)."""
    with contextlib.suppress(redis.RedisError, OSError):
        if role is None:
            client.hdel(keys.members, consumer)
            return
        client.hset(keys.members, consumer, json.dumps({
            "role": role, "pid": os.getpid(), "host": _HOST, "conn_name": conn_name,
            "since": time.time()}))


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _inactive(xinfo: Any) -> int | None:
    """XINFO CONSUMERS ``inactive`` (Valkey, Redis 7.2+; -1 = never read), else None."""
    value = xinfo.get("inactive")
    return int(value) if value is not None and value >= 0 else None


def group_status(client: redis.Redis, stream: str, group: str,
                 timeline: int = 20) -> GroupStatus:
    """Read the state of (stream, group).  Needs XINFO; CLIENT LIST is used when permitted."""
    keys = GroupKeys(stream, group)
    now = server_ms(client)
    lease: Any = client.get(keys.lease)
    pttl = int(client.pttl(keys.lease)) if lease else None
    owner_hash: Any = client.hgetall(keys.owner)
    owner = epoch = since = None
    if lease:
        token = _text(lease)
        owner, epoch, _ = parse_token(token)
        if owner_hash and _text(owner_hash.get(b"token", b"")) == token:
            since = int(owner_hash.get(b"since_ms", 0)) or None
    try:
        groups: Any = client.xinfo_groups(stream)
        info: Any = client.xinfo_stream(stream)
        xconsumers: Any = client.xinfo_consumers(stream, group)
    except redis.ResponseError:
        groups, info, xconsumers = [], {"length": 0}, []
    ginfo: Any = next((g for g in groups if _text(g["name"]) == group), {})
    members: Any = client.hgetall(keys.members)
    try:
        listed: Any = client.client_list()
        connections: set[str] | None = {c.get("name", "") for c in listed}
    except redis.ResponseError:
        connections = None
    states: dict[str, ConsumerState] = {}
    by_name = {_text(c["name"]): c for c in xconsumers}
    for raw_name, raw in members.items():
        name = _text(raw_name)
        try:
            member = json.loads(raw)
        except ValueError:
            continue
        x = by_name.get(name, {})
        if connections is None:
            state = "unknown"
        elif member.get("conn_name") not in connections:
            state = "dead"
        else:
            state = "owner" if name == owner else "standby"
        states[name] = ConsumerState(
            name=name, state=state, pending=int(x.get("pending", 0)),
            idle_ms=int(x["idle"]) if "idle" in x else None, inactive_ms=_inactive(x),
            pid=member.get("pid"), host=member.get("host"))
    for name, x in by_name.items():
        if name not in states:
            states[name] = ConsumerState(
                name=name, state="owner" if name == owner else "gone",
                pending=int(x.get("pending", 0)), idle_ms=int(x.get("idle", 0)),
                inactive_ms=_inactive(x))
    pending = int(ginfo.get("pending", 0)) if ginfo else 0
    oldest_age = None
    if pending:
        summary: Any = client.xpending(stream, group)
        if summary.get("min"):
            oldest_age = now - id_order(_text(summary["min"]))[0]
    lag = ginfo.get("lag") if ginfo else None
    events: Any = client.xrevrange(keys.events, count=timeline)
    line = []
    for entry_id, fields in reversed(events):
        f = {_text(k): _text(v) for k, v in fields.items()}
        kind = f.pop("type", "?")
        consumer = f.pop("consumer", "?")
        ep = f.pop("epoch", None)
        ts = int(f.pop("ts_ms", _text(entry_id).split("-")[0]))
        line.append(TimelineEvent(ts_ms=ts, type=kind, consumer=consumer,
                                  epoch=int(ep) if ep is not None else None, detail=f))
    order = {"owner": 0, "standby": 1, "unknown": 2, "dead": 3, "gone": 4}
    return GroupStatus(
        stream=stream, group=group, server_ms=now, owner=owner, epoch=epoch,
        lease_remaining_ms=pttl, owner_since_ms=since,
        consumers=tuple(sorted(states.values(), key=lambda c: (order[c.state], c.name))),
        stream_length=int(info.get("length", 0)),
        entries_read=ginfo.get("entries-read") if ginfo else None,
        lag=int(lag) if lag is not None else None, pending=pending,
        oldest_pending_age_ms=oldest_age,
        dead_letters=DeadLetters(client, stream, group).counts(), timeline=tuple(line))
