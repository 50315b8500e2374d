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
from ._keys import GroupKeys, TopicGroupKeys, id_order
from ._lease import parse_token
from ._server import AnyClient, node_client, server_ms
from ._topic import Topic, _node_of, load_topic


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


# -- partitioned topics ------------------------------------------------------------------------

@attrs.frozen(kw_only=True)
class PartitionState:
    """One partition of a topic's group: who owns it (its lease), how far behind it is."""

    index: int
    stream: str
    node: str
    """``host:port`` of the primary serving its slot ('' on a single server)."""
    owner: str | None
    epoch: int | None
    lease_remaining_ms: int | None
    owner_pid: int | None
    owner_since_ms: int | None
    length: int
    entries_read: int | None
    lag: int | None
    """Entries not yet delivered to the group (XINFO GROUPS lag; None when the server cannot
    tell, or when no member created the group on this partition yet)."""
    pending: int
    """Delivered, not yet acknowledged."""
    parked: int
    """In the delay set (waiting for the fixer)."""
    graveyard: int


@attrs.frozen(kw_only=True)
class MemberState:
    """One member of a topic's group: live (its membership not expired on the server's
    clock) or not (only seen as a lease holder), what it owns and what the target gives it."""

    name: str
    live: bool
    expires_in_ms: int | None
    owned: tuple[int, ...]
    """Partitions whose lease it holds now."""
    target: tuple[int, ...]
    """Partitions the stored target gives it."""


@attrs.frozen(kw_only=True)
class TopicEvent:
    """A record of the group's rebalance timeline (``partition`` None: 'joined', 'left',
    'gone', 'expired', 'assigned', 'released') or of one partition's failover timeline
    ('acquired', 'released', 'ended', 'stalled': a term began or ended)."""

    ts_ms: int
    type: str
    member: str
    partition: int | None
    epoch: int | None
    detail: dict[str, str]


@attrs.frozen(kw_only=True)
class TopicStatus:
    topic: str
    group: str
    cluster: bool
    server_ms: int
    target_version: int
    target_members: tuple[str, ...]
    partitions: tuple[PartitionState, ...]
    members: tuple[MemberState, ...]
    timeline: tuple[TopicEvent, ...]
    """Oldest first (newest last)."""

    @property
    def owned(self) -> int:
        return sum(1 for p in self.partitions if p.owner is not None)

    def as_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["partition_count"] = len(self.partitions)
        out["owned"] = self.owned
        out["lag"] = sum(p.lag or 0 for p in self.partitions)
        out["pending"] = sum(p.pending for p in self.partitions)
        out["parked"] = sum(p.parked for p in self.partitions)
        return out


_TERM_EVENTS = (b"acquired", b"released", b"ended", b"stalled")


def _event(entry_id: Any, fields: Any, partition: int | None) -> TopicEvent:
    f = {_text(k): _text(v) for k, v in fields.items()}
    kind = f.pop("type", "?")
    member = f.pop("member", None) or f.pop("consumer", "?")
    epoch = f.pop("epoch", None)
    ts = int(f.pop("ts_ms", _text(entry_id).split("-")[0]))
    return TopicEvent(ts_ms=ts, type=kind, member=member, partition=partition,
                      epoch=int(epoch) if epoch is not None and epoch.isdigit() else None,
                      detail=f)


def topic_status(client: AnyClient, topic: str | Topic, group: str, *, timeline: int = 20,
                 partition_events: int = 3) -> TopicStatus:
    """Read the state of (topic, group) on one server or a cluster (``client`` from
    :func:`~._server.connect_url`; ``topic`` a name or a loaded :class:`~._topic.Topic`):
    one round trip for the clock of the topic's node, then one pipeline for the rest, sent to
    every node at once (the group's records, and every partition's lease, owner, group info,
    length, dead-letter counts and newest timeline records, each on its own node).
    ``timeline``: records of the group's rebalance timeline; ``partition_events``: the newest
    records of each partition's failover timeline, those where a term began or ended (merged
    in, by time)."""
    if not isinstance(topic, Topic):
        topic = load_topic(client, topic)
    gkeys = TopicGroupKeys(topic.name, group)
    now = server_ms(node_client(client, gkeys.members))
    pipe = client.pipeline(transaction=False)
    pipe.zrange(gkeys.members, 0, -1, withscores=True)
    pipe.hmget(gkeys.assignment, ["version", "members", "target"])
    pipe.xrevrange(gkeys.events, count=timeline)
    per = 8
    for stream in topic.streams:
        keys = GroupKeys(stream, group)
        pipe.get(keys.lease)
        pipe.pttl(keys.lease)
        pipe.hmget(keys.owner, ["token", "pid", "since_ms"])
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)
        pipe.zcard(keys.delay)
        pipe.xlen(keys.graveyard)
        pipe.xrevrange(keys.events, count=max(partition_events, 1))
    replies: list[Any] = pipe.execute(raise_on_error=False)
    for reply in replies[:3]:
        if isinstance(reply, Exception):
            raise reply
    scored, (version, members_json, target_json), events = replies[:3]
    target: dict[str, list[int]] = json.loads(_text(target_json)) if target_json else {}
    owners: dict[str, list[int]] = {}
    parts = []
    line = [_event(i, f, None) for i, f in reversed(events)]
    for index, stream in enumerate(topic.streams):
        mine = replies[3 + per * index: 3 + per * (index + 1)]
        for n, reply in enumerate(mine):
            if isinstance(reply, Exception) and n != 4:  # 4: XINFO GROUPS of no stream yet
                raise reply
        lease, pttl, (token, pid, since), length, groups, parked, graveyard, pevents = mine
        owner = epoch = None
        if lease:
            owner, epoch, _ = parse_token(_text(lease))
            owners.setdefault(owner, []).append(index)
        same_term = bool(lease) and token is not None and _text(token) == _text(lease)
        ginfo: Any = {}
        if not isinstance(groups, Exception):  # no stream yet: no group either
            ginfo = next((g for g in groups if _text(g["name"]) == group), {})
        lag = ginfo.get("lag") if ginfo else None
        parts.append(PartitionState(
            index=index, stream=stream, node=_node_of(client, stream) if
            isinstance(client, redis.RedisCluster) else "",
            owner=owner, epoch=epoch, lease_remaining_ms=int(pttl) if lease else None,
            owner_pid=int(pid) if same_term and pid else None,
            owner_since_ms=int(since) if same_term and since else None,
            length=int(length), entries_read=ginfo.get("entries-read") if ginfo else None,
            lag=int(lag) if lag is not None else None,
            pending=int(ginfo.get("pending", 0)) if ginfo else 0,
            parked=int(parked), graveyard=int(graveyard)))
        if partition_events > 0:  # a new term or one ended ('takeover' records: noise here)
            line += [_event(i, f, index) for i, f in reversed(pevents)
                     if f.get(b"type") in _TERM_EVENTS]
    line.sort(key=lambda e: e.ts_ms)
    live = {_text(m): int(score) for m, score in scored}
    names = sorted(set(live) | set(owners) | set(target), key=lambda n: (n not in live, n))
    members = tuple(MemberState(
        name=n, live=live.get(n, 0) > now,
        expires_in_ms=live[n] - now if n in live else None,
        owned=tuple(sorted(owners.get(n, ()))), target=tuple(target.get(n, ())))
        for n in names)
    return TopicStatus(
        topic=topic.name, group=group, cluster=isinstance(client, redis.RedisCluster),
        server_ms=now, target_version=int(_text(version)) if version else 0,
        target_members=tuple(json.loads(_text(members_json))) if members_json else (),
        partitions=tuple(parts), members=members, timeline=tuple(line[-timeline:]))
