"""The dead-letter path on a real server: defer, fixer, re-stream, graveyard, operators.

Every test judges from what the handler itself saw (or what the stream holds), never from the
library's own counters."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from orderedstream import (
    Coordinator,
    CoordinatorConfig,
    DeadLetters,
    Defer,
    Fixer,
    FixerConfig,
    GroupKeys,
    LeaseConfig,
    Message,
    ParkedEntry,
    Producer,
    RetryPolicy,
    Unrepairable,
)
from orderedstream._demo import demo_payload, demo_repair
from orderedstream.testing import ServerProcess, park_directly, read_records, wait_until


class Seen:
    """Handler: records every message; parks the demo's corrupted payloads."""

    def __init__(self, group: str = "g") -> None:
        self.messages: list[Message] = []
        self.group = group
        self.lock = threading.Lock()

    def __call__(self, message: Message) -> None:
        if message.fields.get("payload", "").startswith("CORRUPT:"):
            raise Defer("corrupted payload", delay_ms=0)
        with self.lock:
            self.messages.append(message)

    def seqs(self) -> list[int]:
        return [int(m.fields["seq"]) for m in self.messages]


def coordinator(client: redis.Redis, stream: str, handler: Callable[[Message], None],
                group: str = "g", **overrides: Any) -> Coordinator:
    config = CoordinatorConfig(stream=stream, group=group, consumer=f"c-{group}",
                               lease=LeaseConfig(ttl_ms=1000), **overrides)
    return Coordinator(config, handler, client)


def fixer(client: redis.Redis, stream: str, repair: Callable[[ParkedEntry], Any] = demo_repair,
          group: str = "g", **overrides: Any) -> Fixer:
    return Fixer(FixerConfig(stream=stream, group=group, **overrides), repair, client)


def produce(client: redis.Redis, stream: str, seqs: range, corrupt: Callable[[int], bool]
            ) -> list[str]:
    return Producer(client, stream).send_many(demo_payload(s, corrupt(s)) for s in seqs)


def settled(client: redis.Redis, stream: str, group: str = "g") -> bool:
    keys = GroupKeys(stream, group)
    return (client.zcard(keys.delay) == 0 and client.hlen(keys.parked) == 0
            and client.xpending(stream, group)["pending"] == 0)


def restreamed_origins(client: redis.Redis, stream: str) -> Counter[str]:
    origins: Counter[str] = Counter()
    for _, fields in client.xrange(stream):
        if b"os-origin-id" in fields:
            origins[fields[b"os-origin-id"].decode()] += 1
    return origins


def test_identical_corrupted_payloads_both_survive(client: redis.Redis, stream: str) -> None:
    """Two byte-identical bad entries are two parked entries, and both come back repaired."""
    producer = Producer(client, stream)
    same = {"seq": "7", "payload": "CORRUPT:7-redro"}
    ids = [producer.send(same), producer.send(same)]
    seen = Seen()
    with coordinator(client, stream, seen):
        keys = GroupKeys(stream, "g")
        wait_until(lambda: client.zcard(keys.delay) == 2, 5, message="both parked")
        assert sorted(m.decode() for m in client.zrange(keys.delay, 0, -1)) == sorted(ids)
        with fixer(client, stream):
            wait_until(lambda: len(seen.messages) == 2, 5, message="both handled repaired")
            wait_until(lambda: settled(client, stream), 5, message="nothing left parked")
    assert sorted(m.origin_id for m in seen.messages) == sorted(ids)
    assert all(m.repaired and m.fields["payload"] == "order-7" for m in seen.messages)


def test_defer_records_metadata_and_due_time(client: redis.Redis, stream: str) -> None:
    """The parked record keeps fields, reason, attempts, epoch and consumer; the entry is acked
    in the same step (nothing stays pending)."""
    produce(client, stream, range(1, 4), lambda s: s == 2)
    seen = Seen()
    with coordinator(client, stream, seen) as c:
        wait_until(lambda: len(seen.messages) == 2, 5, message="two handled")
        epoch = c.epoch
    dlq = DeadLetters(client, stream, "g")
    [item] = dlq.entries()
    assert item.entry is not None
    assert item.entry.fields == {"seq": "2", "payload": "CORRUPT:2-redro"}
    assert item.entry.reason == "corrupted payload"
    assert (item.entry.epoch, item.entry.consumer, item.entry.attempts) == (epoch, "c-g", 1)
    assert client.xpending(stream, "g")["pending"] == 0
    assert dlq.counts().parked == 1


def test_later_entries_flow_on_while_one_is_parked(client: redis.Redis, stream: str) -> None:
    """Default ordering: the parked entry comes back at the tail, flagged repaired; the rest
    are handled in order, each once."""
    produce(client, stream, range(1, 101), lambda s: s % 10 == 0)
    seen = Seen()
    with coordinator(client, stream, seen), fixer(client, stream):
        wait_until(lambda: len(seen.messages) == 100, 10, message="all 100 handled")
        wait_until(lambda: settled(client, stream), 5, message="settled")
    originals = [int(m.fields["seq"]) for m in seen.messages if not m.repaired]
    repaired = [int(m.fields["seq"]) for m in seen.messages if m.repaired]
    assert originals == [s for s in range(1, 101) if s % 10]
    assert sorted(repaired) == list(range(10, 101, 10))
    assert sorted(seen.seqs()) == list(range(1, 101))


def test_restream_reaches_only_the_deferring_group(client: redis.Redis, stream: str) -> None:
    """Group g parks entry 3; group g2 handled it fine.  The repaired copy is handled by g only;
    g2 skips it (acks it unseen)."""
    produce(client, stream, range(1, 6), lambda s: s == 3)
    seen_g = Seen()
    seen_g2: list[Message] = []
    c1 = coordinator(client, stream, seen_g, group="g")
    c2 = coordinator(client, stream, seen_g2.append, group="g2")
    with c1, c2, fixer(client, stream, repair=demo_repair, group="g"):
        wait_until(lambda: len(seen_g.messages) == 5, 10, message="g handled 5")
        wait_until(lambda: client.xpending(stream, "g2")["pending"] == 0
                   and client.xinfo_groups(stream)[1]["last-delivered-id"]
                   == client.xinfo_stream(stream)["last-generated-id"], 5,
                   message="g2 read past the repaired copy")
    assert [int(m.fields["seq"]) for m in seen_g2] == [1, 2, 3, 4, 5]
    assert not any(m.repaired for m in seen_g2)
    assert [m.repaired for m in seen_g.messages] == [False] * 4 + [True]


def test_malformed_entries_are_parked_with_a_reason(client: redis.Redis, stream: str) -> None:
    """Missing fields (the handler raises), bytes that are not UTF-8, and a 4 MB value: each
    is parked with a reason; the owner goes on; nothing crashes."""
    producer = Producer(client, stream)
    producer.send({"seq": "1", "payload": "order-1"})
    missing = producer.send({"other": "x"})
    bad_bytes = producer.send({b"seq": b"\xff\xfe", b"payload": b"\xc3\x28"})
    huge = producer.send({"seq": "4", "payload": "CORRUPT:" + "x" * (4 << 20)})
    producer.send({"seq": "5", "payload": "order-5"})

    def handler(message: Message) -> None:
        int(message.fields["seq"])  # KeyError for the entry without one
        Seen.__call__(seen, message)

    seen = Seen()
    c = coordinator(client, stream, handler,
                    retry=RetryPolicy(max_attempts=2, initial_backoff_ms=1, park_delay_ms=0))
    with c:
        wait_until(lambda: len(seen.messages) == 2, 10, message="good entries handled")
        wait_until(lambda: DeadLetters(client, stream, "g").counts().parked == 3, 5,
                   message="three parked")
    parked = {i.id: i.entry for i in DeadLetters(client, stream, "g").entries()}
    assert set(parked) == {missing, bad_bytes, huge}
    assert all(e is not None for e in parked.values())
    assert "KeyError" in parked[missing].reason  # type: ignore[union-attr]
    assert "not UTF-8" in parked[bad_bytes].reason  # type: ignore[union-attr]
    assert parked[bad_bytes].raw == {b"seq": b"\xff\xfe", b"payload": b"\xc3\x28"}  # type: ignore[union-attr]
    assert len(parked[huge].raw[b"payload"]) == 8 + (4 << 20)  # type: ignore[union-attr]
    assert seen.seqs() == [1, 5]


def test_malformed_record_goes_to_the_graveyard(client: redis.Redis, stream: str) -> None:
    """A parked record that is not ours (hand-edited, truncated) is buried with the reason and
    its raw text; the fixer goes on with the next one."""
    keys = GroupKeys(stream, "g")
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    client.hset(keys.parked, "1-1", "{not json")
    client.zadd(keys.delay, {"1-1": 0})
    client.hset(keys.parked, "1-2", json.dumps({"group": "g", "fields": [["seq", "2"]]}))
    client.zadd(keys.delay, {"1-2": 0})
    fixer(client, stream).fix_once()
    buried = DeadLetters(client, stream, "g").graveyard()
    assert [b["id"] for b in buried] == ["1-1"]
    assert "malformed" in buried[0]["reason"] and buried[0]["record"] == "{not json"
    assert restreamed_origins(client, stream) == Counter({"1-2": 1})
    assert client.zcard(keys.delay) == 0


def test_failing_repair_backs_off_then_buries(client: redis.Redis, stream: str) -> None:
    """A repair that raises is rescheduled with exponential backoff (server clock) and, past
    max_attempts, buried with its history; Unrepairable buries at once."""
    keys = GroupKeys(stream, "g")
    produce(client, stream, range(1, 3), lambda s: True)
    seen = Seen()
    with coordinator(client, stream, seen):
        wait_until(lambda: client.zcard(keys.delay) == 2, 5, message="parked")
    calls: list[str] = []

    def repair(entry: ParkedEntry) -> dict[str, str]:
        calls.append(entry.id)
        if entry.fields["seq"] == "1":
            raise Unrepairable("no way to fix seq 1")
        raise RuntimeError("downstream is down")

    f = fixer(client, stream, repair, max_attempts=3, initial_backoff_ms=50)
    with f:
        wait_until(lambda: client.xlen(keys.graveyard) == 2, 5, message="both buried")
    buried = {b["id"]: b for b in DeadLetters(client, stream, "g").graveyard()}
    ids = sorted(buried)
    assert calls.count(ids[0]) == 1 and calls.count(ids[1]) == 3
    assert "unrepairable" in buried[ids[0]]["reason"]
    history = json.loads(buried[ids[1]]["record"])["history"]
    assert [h["error"] for h in history] == ["RuntimeError('downstream is down')"] * 3
    gaps = [b["ms"] - a["ms"] for a, b in itertools.pairwise(history)]
    assert gaps[0] >= 50 and gaps[1] >= 100  # backoff 50 ms, then 100 ms
    assert settled(client, stream)


def test_due_times_are_honoured_on_the_server_clock(client: redis.Redis, stream: str) -> None:
    """An entry deferred for D ms is repaired D ms later, within 50 ms, by the server's clock
    (the fixer does not rely on the server's ~100 ms blocking-timeout granularity)."""
    delays = [120, 250, 400, 650]
    producer = Producer(client, stream)
    for i, delay in enumerate(delays):
        producer.send({"seq": str(i), "delay": str(delay)})
    parked_at: dict[str, float] = {}
    repaired_at: dict[str, float] = {}
    probe = redis.Redis(connection_pool=client.connection_pool)

    def server_ms() -> float:
        sec, usec = probe.time()
        return sec * 1000.0 + usec / 1000.0

    def handler(message: Message) -> None:
        if not message.repaired:
            parked_at[message.id] = server_ms()
            raise Defer("later", delay_ms=int(message.fields["delay"]))

    def repair(entry: ParkedEntry) -> dict[bytes, bytes]:
        repaired_at[entry.id] = server_ms()
        return dict(entry.raw)

    with fixer(client, stream, repair), coordinator(client, stream, handler):
        wait_until(lambda: len(repaired_at) == 4, 5, message="all four repaired")
    for entry_id, repaired in repaired_at.items():
        waited = repaired - parked_at[entry_id]
        delay = int(client.xrange(stream, entry_id, entry_id)[0][1][b"delay"])
        assert delay - 5 <= waited <= delay + 50, (entry_id, delay, waited)


def test_retry_and_purge_by_an_operator(client: redis.Redis, stream: str) -> None:
    """dlq retry makes an entry due now; purge drops it for good; both through the CLI."""
    keys = GroupKeys(stream, "g")
    produce(client, stream, range(1, 4), lambda s: True)

    def later(message: Message) -> None:
        raise Defer("wait an hour", delay_ms=3_600_000)

    with coordinator(client, stream, later):
        wait_until(lambda: client.zcard(keys.delay) == 3, 5, message="parked")
    ids = [m.decode() for m in client.zrange(keys.delay, 0, -1)]
    url = _url(client)
    out = _cli(url, stream, "dlq", "list", "--json")
    listed = json.loads(out)
    assert [e["id"] for e in listed["entries"]] == ids
    assert listed["counts"]["parked"] == 3 and listed["counts"]["next_due_ms"] > 3_000_000
    _cli(url, stream, "dlq", "retry", ids[0])
    now_ms = int(client.time()[0]) * 1000 + 1000
    assert 0 < (client.zscore(keys.delay, ids[0]) or 0) <= now_ms  # due now, server clock
    _cli(url, stream, "dlq", "purge", ids[1])
    assert client.zscore(keys.delay, ids[1]) is None and not client.hexists(keys.parked, ids[1])
    shown = json.loads(_cli(url, stream, "dlq", "show", ids[2]))
    assert shown["reason"] == "wait an hour" and shown["fields"]["seq"] == "3"
    fixer(client, stream).fix_once()
    assert restreamed_origins(client, stream) == Counter({ids[0]: 1})
    _cli(url, stream, "dlq", "purge", "--all")
    assert client.zcard(keys.delay) == 0 and client.hlen(keys.parked) == 0


def _url(client: redis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw['host']}:{kw['port']}/{kw.get('db', 0)}"


def _cli(url: str, stream: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "orderedstream", *args[:2], "--redis-url", url, "--stream",
         stream, "--group", "g", *args[2:]] if args[0] == "dlq" else
        [sys.executable, "-m", "orderedstream", *args],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, COLUMNS="200"))
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- processes ------------------------------------------------------------------------------

def _spawn(running: list[subprocess.Popen[bytes]], log: Path, *args: str,
           env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - closed by the OS when the child exits
    proc = subprocess.Popen([sys.executable, "-m", "orderedstream", *args],
                            env=dict(os.environ, **(env or {})), stdout=out, stderr=out)
    running.append(proc)
    return proc


def _park_directly(client: redis.Redis, stream: str, n: int) -> list[str]:
    """n corrupted entries, parked the way the defer script parks them (record + due 0)."""
    keys = GroupKeys(stream, "g")
    client.xgroup_create(stream, "g", id="$", mkstream=True)
    ids = produce(client, stream, range(1, n + 1), lambda s: True)
    return park_directly(client, keys, (
        ParkedEntry(id=entry_id, origin_id=entry_id, group="g", reason="test",
                    raw={b"seq": str(i).encode(), b"payload": f"CORRUPT:{i}".encode()})
        for i, entry_id in enumerate(ids, start=1)))


@pytest.mark.slow
def test_two_fixers_restream_10000_entries_exactly_once(
        server: ServerProcess, client: redis.Redis, stream: str, tmp_path: Path,
        procs: list[subprocess.Popen[bytes]]) -> None:
    """Two fixer processes on the same 10,000 parked entries: each is re-streamed once."""
    ids = _park_directly(client, stream, 10_000)
    common = ("fix", "--redis-url", server.url, "--stream", stream, "--group", "g",
              "--batch", "200", "--quiet")
    for name in ("f1", "f2"):
        _spawn(procs, tmp_path / f"{name}.log", *common, "--name", name)
    wait_until(lambda: settled_parked(client, stream), 60, message="all re-streamed")
    origins = restreamed_origins(client, stream)
    assert set(origins) == set(ids)
    assert max(origins.values()) == 1


def settled_parked(client: redis.Redis, stream: str) -> bool:
    keys = GroupKeys(stream, "g")
    return client.zcard(keys.delay) == 0 and client.hlen(keys.parked) == 0


@pytest.mark.slow
def test_fixer_killed_between_claim_and_restream(
        server: ServerProcess, client: redis.Redis, stream: str, tmp_path: Path,
        procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL a fixer while it holds claimed entries (inside its slow repair); a new fixer gets
    them once the visibility lease runs out; each is re-streamed exactly once."""
    ids = _park_directly(client, stream, 50)
    keys = GroupKeys(stream, "g")
    common = ("fix", "--redis-url", server.url, "--stream", stream, "--group", "g",
              "--batch", "20", "--visibility-ms", "1000", "--repair",
              "orderedstream.testing:slow_repair", "--quiet")
    slow = _spawn(procs, tmp_path / "f1.log", *common, "--name", "f1",
                  env={"ORDEREDSTREAM_REPAIR_MS": "200"})
    wait_until(lambda: client.hlen(keys.claims) > 0, 10, message="f1 claimed a batch")
    slow.send_signal(signal.SIGKILL)
    slow.wait(5)
    # the kill landed between claim and re-stream: entries are held under f1's visibility lease
    assert DeadLetters(client, stream, "g").counts().claimed > 0
    _spawn(procs, tmp_path / "f2.log", *common, "--name", "f2")
    wait_until(lambda: settled_parked(client, stream), 20, message="all re-streamed")
    origins = restreamed_origins(client, stream)
    assert set(origins) == set(ids) and max(origins.values()) == 1


@pytest.mark.slow
def test_consumer_killed_right_after_a_defer(
        server: ServerProcess, client: redis.Redis, stream: str, tmp_path: Path,
        procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL the owner as soon as it has parked something; a standby takes over and a fixer
    runs: every sequence number is handled, repaired ones once, nothing lost."""
    record = tmp_path / "record.jsonl"
    env = {"ORDEREDSTREAM_RECORD": str(record)}
    produce(client, stream, range(1, 301), lambda s: s % 7 == 0)
    keys = GroupKeys(stream, "g")
    consume = ("consume", "--redis-url", server.url, "--stream", stream, "--group", "g",
               "--handler", "orderedstream.testing:record_handler", "--lease-ttl-ms", "1000",
               "--batch", "10", "--quiet")
    first = _spawn(procs, tmp_path / "a.log", *consume, "--name", "a",
                   env={**env, "ORDEREDSTREAM_WORK_MS": "2"})
    wait_until(lambda: client.zcard(keys.delay) >= 1, 10, message="a parked one")
    first.send_signal(signal.SIGKILL)
    first.wait(5)
    _spawn(procs, tmp_path / "b.log", *consume, "--name", "b", env=env)
    _spawn(procs, tmp_path / "f.log", "fix", "--redis-url", server.url, "--stream", stream,
           "--group", "g", "--quiet")
    wait_until(lambda: {r["seq"] for r in read_records(record)} == set(range(1, 301)), 20,
               message="every seq handled")
    wait_until(lambda: settled(client, stream), 10, message="settled")
    records = read_records(record)
    repaired = Counter(r["seq"] for r in records if r["repaired"])
    assert set(repaired) == set(range(7, 301, 7)) and max(repaired.values()) == 1
    plain = Counter(r["seq"] for r in records if not r["repaired"])
    assert not set(plain) & set(repaired)
    for seq, n in plain.items():  # handled twice only as a flagged redelivery
        assert n == 1 or any(r["red"] for r in records if r["seq"] == seq), seq
