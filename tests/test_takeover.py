"""The takeover in one script (``lua/take_over.lua``), on a real server: a new owner claims a
page of every other consumer's pending entries, deletes the consumers it emptied, records the
takeover, and reads its first page (the replay first, new entries only when nothing is pending),
all fenced by the term's nonce; it rides in the same round trip as the acquisition, and a
stale or foreign term changes nothing.  Also the acquisition's other round trips: the heartbeat
id is asked again only when its connection changed; a read-ahead refused for a missing script
keeps the acks it carried."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import redis

from orderedstream import CoordinatorConfig, GroupKeys, LeaseConfig
from orderedstream._background import Waiter
from orderedstream._engine import SyncDriver
from orderedstream._lease import Holder, Lease, LeaseManager, parse_token
from orderedstream._reader import _ScriptedAhead, _WatchedAhead
from orderedstream._scripts import Scripts, TakeOverReply, take_over_op
from orderedstream._server import clone_client
from orderedstream._takeover import first_script, take_over
from orderedstream.exceptions import GroupMissing, NotOwner, ResyncNeeded
from orderedstream.testing import wait_until


def config(stream: str, consumer: str, claim_page: int = 100) -> CoordinatorConfig:
    return CoordinatorConfig(stream=stream, group="g", consumer=consumer, batch_size=50,
                             claim_page=claim_page, lease=LeaseConfig(ttl_ms=5000))


def manager(client: redis.Redis, stream: str, name: str) -> LeaseManager:
    beat = clone_client(client, name=f"os:{name}:beat", single=True)
    return LeaseManager(Scripts(clone_client(client)), GroupKeys(stream, "g"), name,
                        LeaseConfig(ttl_ms=5000), beat, f"os:{name}:beat")


def read_as(client: redis.Redis, stream: str, consumer: str, count: int) -> list[bytes]:
    """Deliver ``count`` new entries to ``consumer`` (a consumer that then dies)."""
    got: Any = client.xreadgroup("g", consumer, {stream: ">"}, count=count)
    return [row[0] for row in got[0][1]]


def pending_of(client: redis.Redis, stream: str) -> dict[bytes, list[bytes]]:
    rows: Any = client.xpending_range(stream, "g", "-", "+", 1000)
    out: dict[bytes, list[bytes]] = {}
    for row in rows:
        out.setdefault(row["consumer"], []).append(row["message_id"])
    return out


def driver(client: redis.Redis) -> SyncDriver:
    return SyncDriver(Scripts(client), client, Waiter(clone_client(client, single=True)),
                      threading.Event())


def test_take_over_claims_every_other_consumer_and_replays_them_first(
        client: redis.Redis, stream: str) -> None:
    """Riding behind the acquisition, the script moves every dead consumer's pending entries to
    the new owner, deletes those consumers, records the takeover, and hands back the replay's
    first page: exactly the claimed entries, in id order, each counted as a redelivery."""
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    ids = [client.xadd(stream, {"seq": i}) for i in range(10)]
    assert read_as(client, stream, "x", 3) == ids[:3]
    assert read_as(client, stream, "y", 4) == ids[3:7]
    keys = GroupKeys(stream, "g")
    lease = manager(client, stream, "b").try_acquire(first_script(keys, config(stream, "b")))
    assert isinstance(lease, Lease) and lease.head_start is not None
    got = TakeOverReply.parse(lease.head_start)
    assert got.epoch == lease.epoch
    assert (got.claimed, sorted(got.deleted), got.left, got.kind) == (7, ["x", "y"], [], "replay")
    assert [row[0] for row in got.read.rows] == ids[:7]
    assert [int(c) for c in got.read.counts] == [2] * 7
    assert got.tail == ids[-1].decode()
    assert pending_of(client, stream) == {b"b": ids[:7]}
    assert [c["name"] for c in client.xinfo_consumers(stream, "g")] == [b"b"]
    takeover = [f for _, f in client.xrange(keys.events) if f[b"type"] == b"takeover"]
    assert len(takeover) == 1 and takeover[0][b"claimed"] == b"7"
    assert takeover[0][b"epoch"] == str(lease.epoch).encode()
    # the three entries nobody read are still new: the replay came first
    assert client.xinfo_groups(stream)[0]["last-delivered-id"] == ids[6]


def test_take_over_reads_new_entries_when_nothing_is_pending(client: redis.Redis,
                                                             stream: str) -> None:
    """With nothing pending anywhere, the first page is new entries, delivered to the owner."""
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    ids = [client.xadd(stream, {"seq": i}) for i in range(3)]
    keys = GroupKeys(stream, "g")
    lease = manager(client, stream, "b").try_acquire(first_script(keys, config(stream, "b")))
    assert isinstance(lease, Lease)
    got = TakeOverReply.parse(lease.head_start)
    assert (got.claimed, got.kind) == (0, "new")
    assert [row[0] for row in got.read.rows] == ids
    assert pending_of(client, stream) == {b"b": ids}


def test_a_long_pending_list_is_finished_a_page_at_a_time(client: redis.Redis,
                                                          stream: str) -> None:
    """A dead consumer with more than one page pending is left to ``claim.lua`` pages, and the
    script reads nothing (a replay read before every claim could skip claimed entries); the
    takeover step then claims the rest, deletes it, and records the takeover once."""
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    ids = [client.xadd(stream, {"seq": i}) for i in range(7)]
    read_as(client, stream, "x", 5)
    keys = GroupKeys(stream, "g")
    cfg = config(stream, "b", claim_page=2)
    lease = manager(client, stream, "b").try_acquire(first_script(keys, cfg))
    assert isinstance(lease, Lease)
    got = TakeOverReply.parse(lease.head_start)
    assert (got.claimed, got.left, got.kind, got.read.rows) == (2, ["x"], "none", [])
    assert not [f for _, f in client.xrange(keys.events) if f[b"type"] == b"takeover"]
    done, reply = driver(client).run(take_over(keys, cfg, lease))
    assert reply.left == ["x"] and done.claimed == 5 and done.deleted == ("x",)
    assert pending_of(client, stream) == {b"b": ids[:5]}
    takeover = [f for _, f in client.xrange(keys.events) if f[b"type"] == b"takeover"]
    assert len(takeover) == 1 and takeover[0][b"claimed"] == b"5"


def test_take_over_refuses_a_term_that_is_not_the_lease_holder(client: redis.Redis,
                                                               stream: str) -> None:
    """Sent behind an acquisition that was refused, or with a stale term's nonce, the script
    answers NOTOWNER and changes nothing: the dead consumer keeps its pending entries."""
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    ids = [client.xadd(stream, {"seq": i}) for i in range(4)]
    read_as(client, stream, "x", 2)
    keys = GroupKeys(stream, "g")
    a = manager(client, stream, "a")
    held = a.try_acquire()
    assert isinstance(held, Lease)
    seen = manager(client, stream, "b").try_acquire(first_script(keys, config(stream, "b")))
    assert isinstance(seen, Holder) and seen.consumer == "a"
    scripts = Scripts(client)
    nonce = parse_token(held.token)[2]
    for consumer, with_nonce in [("b", nonce), ("a", "0badc0ffee00"), ("a", "")]:
        with pytest.raises(NotOwner):
            scripts.do(take_over_op(keys, consumer, with_nonce, 100, 50))
    assert pending_of(client, stream) == {b"x": ids[:2]}
    assert {c["name"] for c in client.xinfo_consumers(stream, "g")} == {b"x"}
    assert a.end_term(held.token, "released", "test")  # the holder's own nonce does pass:
    again = a.try_acquire()
    assert isinstance(again, Lease)
    got = scripts.do(take_over_op(keys, "a", parse_token(again.token)[2], 100, 50))
    assert got.claimed == 2 and pending_of(client, stream) == {b"a": ids[:2]}


def test_a_deliver_refused_for_a_missing_script_keeps_its_acks(client: redis.Redis,
                                                               stream: str) -> None:
    """A read-ahead request that found the script cache empty (a restart, ``SCRIPT FLUSH``) did
    not run: the acks it carried are handed back to be sent again (they were once dropped, and
    the entries stayed pending for the term)."""
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    ids = [client.xadd(stream, {"seq": i}) for i in range(2)]
    lease = manager(client, stream, "b").try_acquire()
    assert isinstance(lease, Lease)
    keys = GroupKeys(stream, "g")
    scripts = Scripts(client)
    scripts.sha("deliver")  # loaded: the first request runs
    ahead = _ScriptedAhead(scripts, keys, lease.token, "b", 10)
    run = driver(client).run
    run(ahead.send([], "0-0"))
    rows, _ = run(ahead.receive())
    assert [r[0] for r in rows] == ids
    client.script_flush()
    run(ahead.send(ids, ids[-1]))
    with pytest.raises(ResyncNeeded):
        run(ahead.receive())
    assert ahead.forget() == ids
    run(ahead.close())


@pytest.mark.parametrize("change", ["takeover", "expiry"])
def test_watched_read_is_refused_once_the_lease_changed(client: redis.Redis, stream: str,
                                                        change: str) -> None:
    """The read-ahead's WATCH fence: once the lease key was taken over (or expired) after the
    WATCH, its next request acks nothing and delivers nothing, and it says NOTOWNER."""
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    first = [client.xadd(stream, {"seq": i}) for i in range(3)]
    keys = GroupKeys(stream, "g")
    a, b = manager(client, stream, "a"), manager(client, stream, "b")
    old = a.try_acquire()
    assert isinstance(old, Lease)
    ahead = _WatchedAhead(Scripts(client), keys, old.token, "a", 10)
    run = driver(client).run
    run(ahead.send([], "0"))
    rows, _ = run(ahead.receive())
    assert [r[0] for r in rows] == first
    for i in range(3):
        client.xadd(stream, {"seq": 3 + i})
    if change == "takeover":
        client.delete(keys.lease)
        assert isinstance(b.try_acquire(), Lease)
    else:
        client.pexpire(keys.lease, 1)
        wait_until(lambda: not client.exists(keys.lease), 5, 0.005, message="the lease expired")
    run(ahead.send(list(first), first[-1]))
    with pytest.raises(NotOwner):
        run(ahead.receive())
    pending = client.xpending(stream, "g")
    assert pending["pending"] == 3 and pending["consumers"] == [{"name": b"a", "pending": 3}]
    assert client.xinfo_groups(stream)[0]["last-delivered-id"] == first[-1]


def test_watched_read_goes_on_after_our_own_renewal(client: redis.Redis, stream: str) -> None:
    """Our own renewal writes the lease key too: that EXEC is refused and the same request sent
    again (acks and read); when the term ends, the connection goes back without its WATCH."""
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    first = [client.xadd(stream, {"seq": i}) for i in range(3)]
    keys = GroupKeys(stream, "g")
    a = manager(client, stream, "a")
    lease = a.try_acquire()
    assert isinstance(lease, Lease)
    ahead = _WatchedAhead(Scripts(client), keys, lease.token, "a", 10)
    run = driver(client).run
    run(ahead.send([], "0"))
    run(ahead.receive())
    more = [client.xadd(stream, {"seq": 3 + i}) for i in range(3)]
    assert a.renew(lease)
    run(ahead.send(list(first), first[-1]))
    rows, _ = run(ahead.receive())
    assert [r[0] for r in rows] == more
    assert client.xpending(stream, "g")["pending"] == 3  # the first three were acked
    run(ahead.send([], more[-1]))
    rows, tail = run(ahead.receive())
    assert rows == [] and tail == more[-1].decode()
    run(ahead.close())
    conn = client.connection_pool.get_connection()
    try:
        client.set(keys.lease, "someone else")  # would abort a MULTI under a leftover WATCH
        for command in (("MULTI",), ("PING",), ("EXEC",)):
            conn.send_command(*command)
        replies = [conn.read_response() for _ in range(3)]
        assert replies[-1] == [b"PONG"]
    finally:
        client.connection_pool.release(conn)


def client_id_calls(client: redis.Redis) -> int:
    stats: Any = client.info("commandstats")
    return int(stats.get("cmdstat_client|id", {}).get("calls", 0))


def test_the_heartbeat_id_is_asked_again_only_when_its_socket_changed(
        client: redis.Redis, stream: str) -> None:
    """An acquisition publishes the heartbeat connection's id without asking the server again
    while that connection provably is the one the id was read on; once the server closed it
    (``CLIENT KILL``, a restart), the id is asked again and the fresh one is published."""
    keys = GroupKeys(stream, "g")
    m = manager(client, stream, "b")
    first = m.try_acquire()
    assert isinstance(first, Lease) and m.end_term(first.token, "released", "test")
    before = client_id_calls(client)
    second = m.try_acquire()
    assert isinstance(second, Lease) and client_id_calls(client) == before
    assert m.end_term(second.token, "released", "test")
    old_id = client.hget(keys.owner, "conn_id")
    client.client_kill_filter(_id=int(old_id or 0))
    third = m.try_acquire()
    assert isinstance(third, Lease) and client_id_calls(client) == before + 1
    listed = [c for c in client.client_list() if c.get("name") == "os:b:beat"]
    assert len(listed) == 1 and client.hget(keys.owner, "conn_id") == listed[0]["id"].encode()
    assert listed[0]["id"].encode() != old_id


def test_take_over_says_when_the_group_is_gone(client: redis.Redis, stream: str) -> None:
    """A missing stream or group is NOGROUP (raised as GroupMissing: the coordinator creates
    it again), not a bare script error."""
    keys = GroupKeys(stream, "g")
    lease = manager(client, stream, "b").try_acquire()
    assert isinstance(lease, Lease)
    scripts = Scripts(client)
    nonce = parse_token(lease.token)[2]
    with pytest.raises(GroupMissing):
        scripts.do(take_over_op(keys, "b", nonce, 100, 50))  # no stream
    client.xadd(stream, {"seq": 1})
    with pytest.raises(GroupMissing):
        scripts.do(take_over_op(keys, "b", nonce, 100, 50))  # a stream, no group
