"""The Coordinator in-process, on a real server: order, replay-first takeover, retries, parking,
trimmed entries, bounded stop, and the connection watch."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import pytest
import redis

from orderedstream import (
    Coordinator,
    CoordinatorConfig,
    Defer,
    EntriesTrimmed,
    Event,
    GroupKeys,
    HandlerError,
    HandlerFailed,
    LeaseConfig,
    LeaseLostEvent,
    Message,
    OwnerConnectionGone,
    Producer,
    RetryPolicy,
    Role,
    TakeoverCompleted,
    WatchDisabled,
)
from orderedstream.testing import ServerProcess, verdict, wait_until


class Recorder:
    """Handler that records (seq, redelivered, epoch) and can be told to fail."""

    def __init__(self, fail: Callable[[Message], None] | None = None) -> None:
        self.records: list[tuple[int, bool, int]] = []
        self.messages: list[Message] = []
        self.fail = fail
        self.lock = threading.Lock()

    def __call__(self, message: Message) -> None:
        if self.fail is not None:
            self.fail(message)
        with self.lock:
            self.records.append((int(message.fields["seq"]), message.redelivered, message.epoch))
            self.messages.append(message)

    def seqs(self) -> list[int]:
        return [r[0] for r in self.records]


def make(client: redis.Redis, stream: str, name: str, handler: Callable[[Message], None],
         events: list[Event] | None = None, **overrides: object) -> Coordinator:
    lease = overrides.pop("lease", LeaseConfig(ttl_ms=1000))
    config = CoordinatorConfig(stream=stream, group="g", consumer=name, lease=lease,
                               **overrides)  # type: ignore[arg-type]
    hooks = [events.append] if events is not None else []
    return Coordinator(config, handler, client, hooks=hooks)


def fill(client: redis.Redis, stream: str, n: int, start: int = 1) -> list[str]:
    return Producer(client, stream).send_many({"seq": s} for s in range(start, start + n))


def test_entries_are_handled_once_in_order(client: redis.Redis, stream: str) -> None:
    """A lone owner hands every entry to the handler once, in stream order, then acks them."""
    fill(client, stream, 1234)
    rec = Recorder()
    with make(client, stream, "a", rec, batch_size=100) as coordinator:
        wait_until(lambda: len(rec.records) >= 1234, 10, message="1234 handled")
        fill(client, stream, 66, start=1235)
        wait_until(lambda: len(rec.records) >= 1300, 10, message="late entries handled")
        assert coordinator.role is Role.OWNER
        wait_until(lambda: client.xpending(stream, "g")["pending"] == 0, 5, message="all acked")
    assert rec.seqs() == list(range(1, 1301))
    assert not any(r[1] for r in rec.records)


def test_graceful_stop_hands_over_at_once(client: redis.Redis, stream: str) -> None:
    """stop() releases the lease and wakes the standby: no TTL wait, nothing lost or reordered."""
    fill(client, stream, 300)
    rec = Recorder(fail=lambda m: time.sleep(0.002))
    a = make(client, stream, "a", rec, lease=LeaseConfig(ttl_ms=30_000), batch_size=20)
    b = make(client, stream, "b", rec, lease=LeaseConfig(ttl_ms=30_000), batch_size=20)
    a.start()
    wait_until(lambda: a.role is Role.OWNER and len(rec.records) > 50, 10, message="a owns")
    b.start()
    wait_until(lambda: b.role is Role.STANDBY, 5, message="b standby")
    t0 = time.monotonic()
    assert a.stop(5)
    wait_until(lambda: b.role is Role.OWNER, 2, interval=0.001, message="b takes over")
    handoff = time.monotonic() - t0
    wait_until(lambda: len(set(rec.seqs())) >= 300, 10, message="all handled")
    b.stop(5)
    assert handoff < 1.0  # far below the 30 s TTL: the release woke the standby
    v = verdict(((s, red) for s, red, _ in rec.records), 300)
    assert v.ok, v


def test_simultaneous_starts_elect_one_owner(client: redis.Redis, stream: str) -> None:
    """Four coordinators started together: one owns, three wait; every entry handled once."""
    fill(client, stream, 500)
    rec = Recorder()
    group = [make(client, stream, f"c{i}", rec) for i in range(4)]
    barrier = threading.Barrier(4)

    def go(c: Coordinator) -> None:
        barrier.wait()
        c.start()

    threads = [threading.Thread(target=go, args=(c,)) for c in group]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_until(lambda: len(rec.records) >= 500, 10, message="500 handled")
    # the last to start may still be on its way to standing by: wait for every role
    wait_until(lambda: Role.STARTING not in [c.role for c in group], 10,
               message="every coordinator owns or stands by")
    roles = [c.role for c in group]
    for c in group:
        c.stop(5)
    assert roles.count(Role.OWNER) == 1 and roles.count(Role.STANDBY) == 3
    assert rec.seqs() == list(range(1, 501))
    assert len({r[2] for r in rec.records}) == 1


def test_failing_handler_is_retried_in_place(client: redis.Redis, stream: str) -> None:
    """A handler that raises is retried on the same entry with growing backoff; nothing after it
    is handled first."""
    fill(client, stream, 20)
    attempts: dict[int, int] = {}

    def flaky(m: Message) -> None:
        seq = int(m.fields["seq"])
        attempts[seq] = attempts.get(seq, 0) + 1
        assert m.attempt == attempts[seq]
        if seq == 7 and attempts[seq] < 3:
            raise RuntimeError("transient")

    rec = Recorder(fail=flaky)
    events: list[Event] = []
    policy = RetryPolicy(max_attempts=5, initial_backoff_ms=20, multiplier=3.0)
    with make(client, stream, "a", rec, events, retry=policy):
        wait_until(lambda: len(rec.records) >= 20, 10, message="20 handled")
    assert rec.seqs() == list(range(1, 21))
    failures = [e for e in events if isinstance(e, HandlerError)]
    assert [(e.entry_id, e.attempt, e.action, e.backoff_ms) for e in failures] == [
        (rec.messages[6].id, 1, "retry", 20), (rec.messages[6].id, 2, "retry", 60)]


def test_exhausted_retries_park_the_entry(client: redis.Redis, stream: str) -> None:
    """When the budget runs out the entry is parked with its reason (and acked); the stream
    flows on."""
    fill(client, stream, 10)

    def poison(m: Message) -> None:
        if m.fields["seq"] == "4":
            raise ValueError("bad amount")

    rec = Recorder(fail=poison)
    policy = RetryPolicy(max_attempts=2, initial_backoff_ms=5, on_exhausted="park")
    with make(client, stream, "a", rec, retry=policy):
        wait_until(lambda: len(rec.records) >= 9, 10, message="9 handled")
        wait_until(lambda: client.xpending(stream, "g")["pending"] == 0, 5, message="acked")
    keys = GroupKeys(stream, "g")
    parked = client.hgetall(keys.parked)
    assert len(parked) == 1 and client.zcard(keys.delay) == 1
    record = json.loads(next(iter(parked.values())))
    assert record["reason"] == "handler failed 2 times: ValueError('bad amount')"
    assert record["attempts"] == 2 and ["seq", "4"] in record["fields"]
    assert rec.seqs() == [1, 2, 3, 5, 6, 7, 8, 9, 10]


def test_exhausted_retries_can_stop_instead(client: redis.Redis, stream: str) -> None:
    """on_exhausted='stop': run() raises HandlerFailed, the entry stays pending, the lease is
    handed over."""
    fill(client, stream, 5)

    def poison(m: Message) -> None:
        if m.fields["seq"] == "3":
            raise ValueError("nope")

    coordinator = make(client, stream, "a", Recorder(fail=poison),
                       retry=RetryPolicy(max_attempts=2, initial_backoff_ms=5,
                                         on_exhausted="stop"))
    with pytest.raises(HandlerFailed, match="2 times"):
        coordinator.run()
    pending = client.xpending_range(stream, "g", "-", "+", 10)
    assert [p["message_id"] for p in pending][:1] == [
        client.xrange(stream)[2][0]]
    assert client.get(GroupKeys(stream, "g").lease) is None


def test_defer_and_undecodable_entries_are_parked(client: redis.Redis, stream: str) -> None:
    """Defer parks; two identical payloads stay two parked entries; bytes that are not UTF-8 are
    parked with a reason instead of crashing the consumer."""
    p = Producer(client, stream)
    p.send({"seq": 1})
    p.send({"seq": 2, "payload": "same"})
    p.send({"seq": 3, "payload": "same"})
    p.send({b"seq": b"4", b"blob": b"\xff\xfe"})
    p.send({"seq": 5})

    def refuse(m: Message) -> None:
        if m.fields.get("payload") == "same":
            raise Defer("payload needs repair", delay_ms=0)

    rec = Recorder(fail=refuse)
    with make(client, stream, "a", rec):
        wait_until(lambda: len(rec.records) >= 2, 10, message="handled")
        wait_until(lambda: client.xpending(stream, "g")["pending"] == 0, 5, message="acked")
    parked = {k.decode(): json.loads(v) for k, v in
              client.hgetall(GroupKeys(stream, "g").parked).items()}
    reasons = sorted(r["reason"] for r in parked.values())
    assert len(parked) == 3
    assert reasons[:2] == ["payload needs repair"] * 2
    assert reasons[2].startswith("undecodable entry")
    assert rec.seqs() == [1, 5]


def test_takeover_claims_10000_pending_entries_in_order(client: redis.Redis,
                                                         stream: str) -> None:
    """A dead consumer with 10,000 pending entries: all are claimed in pages, replayed first in
    id order (flagged redelivered), and only then do new entries flow; the dead consumer is
    deleted."""
    fill(client, stream, 10_000)
    client.xgroup_create(stream, "g", id="0")
    client.xreadgroup("g", "dead", {stream: ">"}, count=10_000)
    fill(client, stream, 100, start=10_001)
    rec = Recorder()
    events: list[Event] = []
    with make(client, stream, "a", rec, events, batch_size=500):
        wait_until(lambda: len(rec.records) >= 10_100, 30, message="10100 handled")
    assert rec.seqs() == list(range(1, 10_101))
    assert all(r[1] for r in rec.records[:10_000]) and not any(r[1] for r in rec.records[10_000:])
    takeover = next(e for e in events if isinstance(e, TakeoverCompleted))
    assert takeover.claimed == 10_000 and list(takeover.consumers_deleted) == ["dead"]
    assert [c["name"] for c in client.xinfo_consumers(stream, "g")] == [b"a"]


def test_trimmed_pending_entry_is_acked_and_reported(client: redis.Redis, stream: str) -> None:
    """A pending entry whose stream entry was deleted is acked and reported, never handed out
    and never left stuck in the pending list."""
    ids = fill(client, stream, 5)
    client.xgroup_create(stream, "g", id="0")
    client.xreadgroup("g", "dead", {stream: ">"}, count=5)
    client.xdel(stream, ids[2])
    rec = Recorder()
    events: list[Event] = []
    with make(client, stream, "a", rec, events):
        wait_until(lambda: len(rec.records) >= 4, 10, message="4 handled")
        wait_until(lambda: client.xpending(stream, "g")["pending"] == 0, 5, message="PEL empty")
    assert rec.seqs() == [1, 2, 4, 5]
    trimmed = [i for e in events if isinstance(e, EntriesTrimmed) for i in e.ids]
    assert trimmed == [ids[2]]


def test_stop_is_bounded_while_idle(client: redis.Redis, stream: str) -> None:
    """An idle owner blocked in XREAD BLOCK (30 s here) stops at once: stop() unblocks it."""
    rec = Recorder()
    coordinator = make(client, stream, "a", rec, block_ms=30_000)
    coordinator.start()
    wait_until(lambda: coordinator.role is Role.OWNER, 5, message="owner")
    time.sleep(0.05)  # let it park in XREAD BLOCK (nothing to assert on here)
    t0 = time.monotonic()
    assert coordinator.stop(5)
    assert time.monotonic() - t0 < 1.0
    assert coordinator.stop(5)  # idempotent


def test_lost_lease_stops_handing_out(client: redis.Redis, stream: str) -> None:
    """When another consumer takes the lease the owner stops handling, reports LeaseLost and
    waits as a standby."""
    fill(client, stream, 5)
    rec = Recorder()
    events: list[Event] = []
    keys = GroupKeys(stream, "g")
    coordinator = make(client, stream, "a", rec, events)
    coordinator.start()
    wait_until(lambda: len(rec.records) >= 5, 5, message="5 handled")
    client.set(keys.lease, "intruder:999", px=60_000)  # someone else owns it now
    wait_until(lambda: coordinator.role is Role.STANDBY, 5, message="a back to standby")
    fill(client, stream, 5, start=6)
    time.sleep(0.2)  # give a (wrongly) running owner time to misbehave
    coordinator.stop(5)
    assert rec.seqs() == [1, 2, 3, 4, 5]
    assert any(isinstance(e, LeaseLostEvent) for e in events)


def test_connection_watch_ends_a_dead_term_before_the_ttl(server: ServerProcess,
                                                         client: redis.Redis,
                                                         stream: str) -> None:
    """When the owner's heartbeat connection disappears the standby ends the term at once
    (the 60 s TTL is never waited out)."""
    fill(client, stream, 3)
    events: list[Event] = []
    rec = Recorder()
    a = make(client, stream, "a", rec, lease=LeaseConfig(ttl_ms=60_000))
    b = make(client, stream, "b", rec, events, lease=LeaseConfig(ttl_ms=60_000))
    a.start()
    wait_until(lambda: len(rec.records) >= 3, 5, message="a handled")
    b.start()
    wait_until(lambda: b.role is Role.STANDBY, 5, message="b standby")
    assert _kill_named(client, "os:a:beat") == 1
    wait_until(lambda: b.role is Role.OWNER, 3, message="b owns after watch")
    a.stop(5)
    b.stop(5)
    assert any(isinstance(e, OwnerConnectionGone) and e.owner == "a" for e in events)


def test_new_entries_after_an_acked_gap_longer_than_a_batch(client: redis.Redis,
                                                            stream: str) -> None:
    """The group's last-delivered id lies 150 acked entries past anything this consumer saw:
    its first read-ahead cannot match the delivered ids to the bodies it fetched, so it reads
    them back from its pending list.  Each remaining entry is handled once, in order."""
    fill(client, stream, 300)
    client.xgroup_create(stream, "g", id="0")
    got = client.xreadgroup("g", "earlier", {stream: ">"}, count=150)
    client.xack(stream, "g", *[entry_id for entry_id, _ in got[0][1]])
    rec = Recorder()
    with make(client, stream, "a", rec, batch_size=100):
        wait_until(lambda: len(rec.records) >= 150, 10, message="150 handled")
        wait_until(lambda: client.xpending(stream, "g")["pending"] == 0, 5, message="acked")
    assert rec.seqs() == list(range(151, 301))
    assert not any(r[1] for r in rec.records)


def test_script_cache_flush_mid_stream_loses_nothing(client: redis.Redis, stream: str) -> None:
    """SCRIPT FLUSH (or a restarted server) while entries flow: the read-ahead finds its script
    gone, reloads it, and reads back what was delivered; nothing is lost, doubled or reordered."""
    fill(client, stream, 500)
    flushed = threading.Event()

    def flush_once(message: Message) -> None:
        if message.fields["seq"] == "120" and not flushed.is_set():
            client.script_flush()
            flushed.set()

    rec = Recorder(flush_once)
    with make(client, stream, "a", rec, batch_size=50):
        wait_until(lambda: len(rec.records) >= 500, 10, message="500 handled")
    assert flushed.is_set()
    assert rec.seqs() == list(range(1, 501))


def test_watch_falls_back_to_the_ttl_when_client_list_is_denied(server: ServerProcess,
                                                               client: redis.Redis,
                                                               stream: str) -> None:
    """A standby whose ACL denies CLIENT LIST says so once (WatchDisabled) and keeps waiting on
    the lease; a handover still reaches it."""
    user = f"nolist-{stream}"
    client.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], channels=["*"],
                       commands=["+@all", "-client|list"])
    limited = server.client(username=user, password="pw")
    try:
        fill(client, stream, 3)
        rec = Recorder()
        events: list[Event] = []
        a = make(client, stream, "a", rec)
        b = make(limited, stream, "b", rec, events)
        a.start()
        wait_until(lambda: len(rec.records) >= 3, 5, message="a handled")
        b.start()
        wait_until(lambda: any(isinstance(e, WatchDisabled) for e in events), 5,
                   message="b reports the watch disabled")
        assert b.role is Role.STANDBY
        a.stop(5)
        wait_until(lambda: b.role is Role.OWNER, 5, message="b owns after the handover")
        fill(client, stream, 2, start=4)
        wait_until(lambda: len(rec.records) >= 5, 5, message="b handled")
        b.stop(5)
        assert sum(isinstance(e, WatchDisabled) for e in events) == 1
        assert rec.seqs() == [1, 2, 3, 4, 5]
    finally:
        limited.close()
        client.acl_deluser(user)


def _kill_named(client: redis.Redis, name: str) -> int:
    for info in client.client_list():
        if info.get("name") == name:
            client.client_kill_filter(_id=info["id"])
            return 1
    return 0
