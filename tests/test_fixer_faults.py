"""The dead-letter path under faults: entries too big for a script, a server that goes away or
runs out of memory under a fixer, repairs that return nonsense, entries that fail for ever.
Judged from what the stream, the graveyard and the handler hold, never from the library's
own counters."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from orderedstream import (
    Coordinator,
    CoordinatorConfig,
    DeadLetters,
    Defer,
    Event,
    Fixer,
    FixerConfig,
    GroupKeys,
    LeaseConfig,
    Message,
    ParkedEntry,
    Producer,
    ServerRecovered,
    ServerUnavailable,
    identity_repair,
)
from orderedstream._demo import demo_repair
from orderedstream._scripts import Scripts
from orderedstream.testing import ServerProcess, park_directly, wait_until

from .test_deadletter import restreamed_origins

BIG = 10_000  # fields: 20,000 values, far past a script's ~8000


def big_fields(tag: str = "x") -> dict[str, str]:
    return {f"f{i:05d}": f"{tag}{i}" for i in range(BIG)}


def settled_parked(client: redis.Redis, stream: str) -> bool:
    keys = GroupKeys(stream, "g")
    return client.zcard(keys.delay) == 0 and client.hlen(keys.parked) == 0


def park_as_written(client: redis.Redis, stream: str, rows: list[dict[str, str]]) -> list[str]:
    """Write rows to the stream and park each the way the defer script does (due now)."""
    client.xgroup_create(stream, "g", id="$", mkstream=True)
    ids = [client.xadd(stream, row).decode() for row in rows]  # type: ignore[arg-type, union-attr]
    park_directly(client, GroupKeys(stream, "g"), (
        ParkedEntry(id=entry_id, origin_id=entry_id, group="g", reason="test",
                    raw={k.encode(): v.encode() for k, v in row.items()})
        for entry_id, row in zip(ids, rows, strict=True)))
    return ids


class Events:
    """A hook that keeps every event."""

    def __init__(self) -> None:
        self.seen: list[Event] = []
        self.lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        with self.lock:
            self.seen.append(event)

    def of(self, kind: type[Event]) -> list[Any]:
        with self.lock:
            return [e for e in self.seen if isinstance(e, kind)]


# -- entries too big for a script ------------------------------------------------------------

def test_big_entry_in_a_batch_is_restreamed_once_by_a_fixer_process(
        server: ServerProcess, client: redis.Redis, stream: str, tmp_path: Path) -> None:
    """A parked entry with 10,000 fields in one batch behind and before small ones, fixed by
    a `fix` process with the identity repair: every entry comes back exactly once (the big one
    whole), nothing stays parked, and the fixer process keeps running."""
    rows = [{"seq": "1"}, {"seq": "2"}, {"seq": "3"}, {"seq": "4", **big_fields()},
            {"seq": "5"}, {"seq": "6"}]
    ids = park_as_written(client, stream, rows)
    log = open(tmp_path / "fix.log", "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "orderedstream", "fix", "--redis-url", server.url, "--stream",
         stream, "--group", "g", "--name", "f1", "--visibility-ms", "1000",
         "--repair", "orderedstream:identity_repair", "--quiet"],
        stdout=log, stderr=log, env=dict(os.environ))
    try:
        wait_until(lambda: settled_parked(client, stream) or proc.poll() is not None, 20,
                   message="everything re-streamed")
        # two visibility periods more: a claimed-but-re-streamed entry would come back now
        deadline = time.monotonic() + 2.5
        wait_until(lambda: time.monotonic() >= deadline or proc.poll() is not None, 5,
                   message="two visibility periods")
        assert proc.poll() is None, (tmp_path / "fix.log").read_text()[-3000:]
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
    assert settled_parked(client, stream)
    origins = restreamed_origins(client, stream)
    assert origins == Counter(ids)
    [(_, copy)] = [(i, f) for i, f in client.xrange(stream)
                   if f.get(b"os-origin-id") == ids[3].encode()]
    assert {k: v for k, v in copy.items() if not k.startswith(b"os-")} == {
        k.encode(): v.encode() for k, v in rows[3].items()}


def test_big_entry_read_deferred_and_held_by_a_coordinator(
        client: redis.Redis, stream: str) -> None:
    """A coordinator reads an entry with 10,000 fields, parks it (Defer) and, in hold-key
    mode, parks a big entry behind the parked holder of its key; a fixer then releases the
    holder and its big follower in order.  No script fails anywhere."""
    keys = GroupKeys(stream, "g")
    handled: list[tuple[str, bool, int]] = []

    def handler(message: Message) -> None:
        fields = message.fields
        if fields["seq"] == "1" and not message.repaired:
            raise Defer("wait", delay_ms=0)
        handled.append((fields["seq"], message.repaired,
                        sum(not name.startswith("os-") for name in fields)))

    producer = Producer(client, stream)
    producer.send({"seq": "1", "key": "k", **big_fields()})  # parked as the holder of k
    producer.send({"seq": "2", "key": "k"})                  # parked behind it
    producer.send({"seq": "3", "key": "k", **big_fields("y")})  # and behind that
    config = CoordinatorConfig(stream=stream, group="g", consumer="c", hold_key_field="key",
                               lease=LeaseConfig(ttl_ms=1000))
    with Coordinator(config, handler, client) as coordinator:
        wait_until(lambda: client.hlen(keys.parked) == 3, 10,
                   message="holder and two followers parked")
        assert coordinator.join(0) is False  # still running: no script error
        with Fixer(FixerConfig(stream=stream, group="g"), identity_repair, client) as fixer:
            wait_until(lambda: len(handled) == 3, 15, message="all three handled")
            assert fixer.join(0) is False
        assert coordinator.join(0) is False
    assert handled == [("1", True, BIG + 2), ("2", False, 2), ("3", False, BIG + 2)]
    assert settled_parked(client, stream)


def test_big_plain_entry_deferred_then_restreamed(client: redis.Redis, stream: str) -> None:
    """Without hold-key mode: a 10,000-field entry is read, deferred, repaired and handled
    again whole, once."""
    handled: list[tuple[bool, int]] = []

    def handler(message: Message) -> None:
        if not message.repaired:
            raise Defer("wait", delay_ms=0)
        handled.append((message.repaired,
                        sum(not name.startswith("os-") for name in message.fields)))

    Producer(client, stream).send(big_fields())
    config = CoordinatorConfig(stream=stream, group="g", consumer="c",
                               lease=LeaseConfig(ttl_ms=1000))
    with Coordinator(config, handler, client), \
            Fixer(FixerConfig(stream=stream, group="g"), identity_repair, client):
        wait_until(lambda: handled, 10, message="the repaired copy handled")
        wait_until(lambda: settled_parked(client, stream), 5, message="nothing parked")
    assert handled == [(True, BIG)]


def test_big_entry_behind_a_release_becomes_the_holder_of_its_key(
        client: redis.Redis, stream: str) -> None:
    """hold.lua with the delay set and signal keys: an entry of 10,000 fields that must move
    behind the copies of its key's last release (a script cannot XADD it) is parked as the
    key's holder behind those copies instead, and a fixer re-streams it after them."""
    keys = GroupKeys(stream, "g")
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    big_id = client.xadd(stream, {"key": "k", **big_fields()}).decode()  # type: ignore[union-attr]
    last = client.xadd(stream, {"key": "k", "os-hold-gen": "1-1"}).decode()  # type: ignore[union-attr]
    client.xreadgroup("g", "c", {stream: ">"}, count=1)  # the big one is pending to c
    client.set(keys.lease, "c:1")
    client.hset(keys.held, "k", f"tail:1-1:{last}:1-1")
    record = ParkedEntry(id=big_id, origin_id=big_id, group="g", reason="held",
                         raw={b"key": b"k"}, hold_key="k", role="follower").to_json()
    user = [v for kv in big_fields().items() for v in kv]
    reply = Scripts(client).call(
        "hold", [stream, keys.lease, keys.parked, keys.held, keys.followers("k"), keys.delay,
                 keys.signal],
        ["c:1", "g", big_id, "k", "", record, big_id, "key", "k", *user])
    assert reply == [b"parked"]
    assert client.hget(keys.held, "k") == f"{big_id} {big_id} {last}".encode()
    assert client.xpending(stream, "g")["pending"] == 0
    assert b'"role":"holder"' in client.hget(keys.parked, big_id)  # type: ignore[operator]
    client.hset(keys.parked, big_id, ParkedEntry(
        id=big_id, origin_id=big_id, group="g", reason="held", hold_key="k", role="holder",
        raw={b"key": b"k", **{k.encode(): v.encode() for k, v in big_fields().items()}}
    ).to_json())
    fixer = Fixer(FixerConfig(stream=stream, group="g"), identity_repair, client)
    assert fixer.fix_once().restreamed == 0  # the group has not passed the copies yet
    client.xreadgroup("g", "c", {stream: ">"})
    client.xack(stream, "g", last)
    wait_until(lambda: fixer.fix_once().restreamed == 1, 5, message="re-streamed")
    [(copy_id, copy)] = client.xrange(stream, min=f"({last}")
    assert copy[b"os-hold-gen"] == big_id.encode() and len(copy) == BIG + 1 + 5
    assert client.hget(keys.held, "k") == f"tail:{big_id}:{copy_id.decode()}:{big_id}".encode()
    assert settled_parked(client, stream)


# -- the server goes away, or refuses writes ------------------------------------------------

def test_idle_fixer_waits_for_a_killed_server_and_resumes(own_server: ServerProcess) -> None:
    """SIGKILL the server under an idle fixer and start it again (AOF): the fixer says so once,
    keeps running, and repairs what is parked after the restart."""
    stream = "s-restart"
    client = own_server.client()
    events = Events()
    client.xgroup_create(stream, "g", id="$", mkstream=True)
    fixer = Fixer(FixerConfig(stream=stream, group="g", max_wait_ms=300), demo_repair, client,
                  hooks=[events])
    fixer.start()
    try:
        wait_until(lambda: fixer._wait_id is not None, 5, message="fixer idle in XREAD BLOCK")
        own_server.kill()
        wait_until(lambda: events.of(ServerUnavailable), 5, message="ServerUnavailable")
        assert fixer.join(1.0) is False  # a second later: still running, still trying
        own_server.start()
        client = own_server.client()
        keys = GroupKeys(stream, "g")
        entry_id = client.xadd(stream, {"seq": "1", "payload": "CORRUPT:1-redro"}).decode()
        park_directly(client, keys, [ParkedEntry(
            id=entry_id, origin_id=entry_id, group="g", reason="test",
            raw={b"seq": b"1", b"payload": b"CORRUPT:1-redro"})])
        wait_until(lambda: settled_parked(client, stream), 10, message="re-streamed")
        assert restreamed_origins(client, stream) == Counter([entry_id])
        assert events.of(ServerRecovered)
        assert len(events.of(ServerUnavailable)) <= 2  # connection refused, then LOADING
    finally:
        fixer.stop(5)
        client.close()
    fixer.join(0)  # re-raises an error that ended it


def test_fixer_waits_out_oom_and_restreams_exactly_once(own_server: ServerProcess) -> None:
    """maxmemory set tiny while entries are parked: every write of the fixer is refused (OOM),
    it keeps running; after maxmemory 0 it re-streams every entry exactly once."""
    stream = "s-oom"
    client = own_server.client()
    ids = park_as_written(client, stream, [{"seq": str(i)} for i in range(200)])
    client.config_set("maxmemory", "1")
    events = Events()
    fixer = Fixer(FixerConfig(stream=stream, group="g", visibility_ms=1000, batch_size=50),
                  identity_repair, client, hooks=[events])
    fixer.start()
    try:
        wait_until(lambda: events.of(ServerUnavailable), 5, message="ServerUnavailable")
        assert "OOM" in events.of(ServerUnavailable)[0].reason

        def oom_errors() -> int:
            stats: Any = client.info("errorstats")
            return int(stats.get("errorstat_OOM", {}).get("count", 0))

        seen = oom_errors()
        wait_until(lambda: oom_errors() >= seen + 3, 10, message="three more refused tries")
        assert fixer.join(0) is False
        assert client.zcard(GroupKeys(stream, "g").delay) == 200
        client.config_set("maxmemory", "0")
        wait_until(lambda: settled_parked(client, stream), 10, message="re-streamed")
        wait_until(lambda: events.of(ServerRecovered), 5, message="ServerRecovered")
    finally:
        client.config_set("maxmemory", "0")
        fixer.stop(5)
        client.close()
    fixer.join(0)
    assert restreamed_origins(own_server.client(), stream) == Counter(ids)
    assert len(events.of(ServerUnavailable)) == 1


# -- repairs that return nonsense, entries that fail for ever -------------------------------

@pytest.mark.parametrize("result", [None, "fields", {"payload": None}])
def test_repair_returning_no_fields_is_a_failed_repair(
        client: redis.Redis, stream: str, result: Any) -> None:
    """A repair that returns None (or a string, or a None value) re-streams nothing: it is a
    failed repair, retried with backoff and then buried with a reason that says what to do."""
    ids = park_as_written(client, stream, [{"seq": "1"}])
    fixer = Fixer(FixerConfig(stream=stream, group="g", max_attempts=2, initial_backoff_ms=10),
                  lambda entry: result, client)
    wait_until(lambda: fixer.fix_once().claimed == 0 and settled_parked(client, stream), 5,
               message="buried")
    assert restreamed_origins(client, stream) == Counter()
    [grave] = DeadLetters(client, stream, "g").graveyard()
    assert grave["id"] == ids[0]
    assert "repair failed 2 times" in grave["reason"]
    assert "the repair returned" in grave["reason"]
    if result is None:
        assert "raise Unrepairable" in grave["reason"]


def test_entry_failing_after_every_repair_is_buried_after_max_parks(
        client: redis.Redis, stream: str) -> None:
    """A handler that always defers one entry with delay 0, and an identity repair: the entry
    cycles park -> re-stream at most every min_park_delay_ms, and after max_parks cycles goes
    to the graveyard ("parked 11 times"); the other entries are handled once each."""
    calls: list[float] = []
    others: list[str] = []

    def handler(message: Message) -> None:
        if message.fields["seq"] == "2":
            calls.append(time.monotonic())
            raise Defer("always", delay_ms=0)
        others.append(message.fields["seq"])

    Producer(client, stream).send_many({"seq": str(i)} for i in range(1, 6))
    config = CoordinatorConfig(stream=stream, group="g", consumer="c",
                               lease=LeaseConfig(ttl_ms=1000))
    dlq = DeadLetters(client, stream, "g")
    with Coordinator(config, handler, client), \
            Fixer(FixerConfig(stream=stream, group="g"), identity_repair, client):
        wait_until(lambda: dlq.graveyard(), 15, message="buried")
        wait_until(lambda: settled_parked(client, stream), 5, message="nothing parked")
    [grave] = dlq.graveyard()
    assert grave["reason"].startswith("parked 11 times")
    assert len(calls) == 11  # the original and 10 repaired copies
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert min(gaps) >= 0.09  # the park floor (100 ms on the server clock)
    assert sorted(others) == ["1", "3", "4", "5"]
