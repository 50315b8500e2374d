"""Promises kept under the faults and bad input found so far: replay behind a trimmed prefix,
an entry that kills its consumer, a handler that never returns, a group or stream that vanishes,
a server at maxmemory, names outside ASCII, a handler that raises KeyboardInterrupt."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis

from orderedstream import (
    Coordinator,
    CoordinatorConfig,
    Event,
    GroupKeys,
    GroupRecreated,
    HandlerFailed,
    HandlerStalled,
    LeaseConfig,
    LeaseLostEvent,
    Message,
    Producer,
    RetryPolicy,
    Role,
    ServerRecovered,
    ServerUnavailable,
)
from orderedstream._deadletter import ParkedEntry
from orderedstream.testing import (
    ReplicatedServers,
    ServerProcess,
    park_directly,
    read_records,
    verdict,
    wait_until,
)

from .conftest import EXTERNAL_URL, Consumers


def fill(client: redis.Redis, stream: str, n: int, start: int = 1) -> list[str]:
    return Producer(client, stream).send_many({"seq": s} for s in range(start, start + n))


def coordinator(client: redis.Redis, stream: str, name: str, handler: object,
                events: list[Event] | None = None, **overrides: object) -> Coordinator:
    lease = overrides.pop("lease", LeaseConfig(ttl_ms=1000))
    config = CoordinatorConfig(stream=stream, group="g", consumer=name, lease=lease,
                               **overrides)  # type: ignore[arg-type]
    return Coordinator(config, handler, client,  # type: ignore[arg-type]
                       hooks=[events.append] if events is not None else [])


def log_lines(consumers: Consumers, name: str, word: str) -> int:
    path = consumers.record.parent / f"{name}.log"
    return sum(word in line for line in path.read_text().splitlines()) if path.exists() else 0


def test_restart_replays_pending_entries_behind_a_trimmed_prefix(
        client: redis.Redis, stream: str, consumers: Consumers) -> None:
    """A consumer that restarts under its own name with 250 pending entries, the oldest 220 of
    them trimmed from a capped stream (more than four batches of 50), hands out the 30 surviving
    pending entries first (flagged redelivered), then the new ones; the trimmed ids are reported
    while they are found, not again on every idle loop."""
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    fill(client, stream, 250)
    client.xreadgroup("g", "c1", {stream: ">"}, count=250)  # c1 had them all, then died
    client.xtrim(stream, maxlen=30, approximate=False)
    fill(client, stream, 10, start=251)
    consumers.start("c1", batch=50)
    wait_until(lambda: len(read_records(consumers.record)) >= 40, 20, message="40 handled")
    records = read_records(consumers.record)
    assert [r["seq"] for r in records] == list(range(221, 261))
    assert all(r["red"] for r in records[:30]) and not any(r["red"] for r in records[30:])
    wait_until(lambda: client.xpending(stream, "g")["pending"] == 0, 10, message="all acked")
    reported = log_lines(consumers, "c1", "c1 entries_trimmed")
    assert 1 <= reported <= 5  # one event per page that held trimmed ids
    for round_ in range(3):  # idle loops and new batches: no more trimmed reports
        fill(client, stream, 1, start=261 + round_)
        wait_until(lambda n=round_: len(read_records(consumers.record)) >= 41 + n, 10,
                   message="new entry handled")
    assert log_lines(consumers, "c1", "c1 entries_trimmed") == reported


@pytest.mark.slow
def test_an_entry_that_kills_its_consumer_is_parked_after_max_deliveries(
        client: redis.Redis, stream: str, consumers: Consumers,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An entry on which the handling process dies (os._exit, as a segfault or OOM kill would)
    is delivered again to each new owner; past max_deliveries (3) it is parked with the reason,
    and every other entry is handled: the group does not stop for good."""
    monkeypatch.setenv("POISON_SEQ", "5")
    fill(client, stream, 20)
    crashed = 0
    for attempt in range(8):
        proc = consumers.start(f"c{attempt}", extra=(
            "--handler", "tests.handlers:crash_on_poison", "--max-deliveries", "3"))
        wait_until(lambda p=proc: p.poll() is not None
                   or {r["seq"] for r in read_records(consumers.record)} >= {20}, 20,
                   message="a crash or the last entry handled")
        if proc.poll() is None:
            break
        assert proc.returncode == 3
        crashed += 1
    assert crashed == 3  # deliveries 1, 2, 3 crashed; the 4th was over the limit: parked
    records = read_records(consumers.record)
    v = verdict([(r["seq"], r["red"]) for r in records], 20, late=[5])
    assert v.lost == (5,) and not v.out_of_order and v.unflagged_duplicates == 0
    keys = GroupKeys(stream, "g")
    parked = client.hvals(keys.parked)
    assert len(parked) == 1
    entry = ParkedEntry.from_json("x", parked[0])
    assert entry.fields["seq"] == "5" and "delivered 4 times" in entry.reason


def test_a_stalled_handler_hands_the_group_to_a_standby(client: redis.Redis,
                                                         stream: str) -> None:
    """A handler call that does not return within handler_timeout_ms: the owner says so
    (HandlerStalled), stops renewing and gives its lease up; a standby takes over within the
    timeout + the TTL and hands out the stuck entry again, flagged; when the stuck call finally
    returns, the old owner hands out and acknowledges nothing more."""
    fill(client, stream, 10)
    release = threading.Event()
    handled: list[tuple[str, int, bool, int]] = []  # (who, seq, redelivered, epoch)
    lock = threading.Lock()

    def make_handler(who: str) -> object:
        def handle(message: Message) -> None:
            seq = int(message.fields["seq"])
            if who == "a" and seq == 3:
                release.wait(30)
            with lock:
                handled.append((who, seq, message.redelivered, message.epoch))
        return handle

    events: list[Event] = []
    a = coordinator(client, stream, "a", make_handler("a"), events, handler_timeout_ms=600,
                    batch_size=5)
    b = coordinator(client, stream, "b", make_handler("b"), batch_size=5)
    a.start()
    wait_until(lambda: a.role is Role.OWNER and len(handled) >= 2, 5, message="a owns")
    stalled_at = time.monotonic()
    b.start()
    wait_until(lambda: any(h[0] == "b" for h in handled), 5, message="b handles")
    taken = time.monotonic() - stalled_at
    assert taken < 0.6 + 1.0 + 1.0  # timeout + TTL, plus slack for a loaded machine
    stalls = [e for e in events if isinstance(e, HandlerStalled)]
    assert len(stalls) == 1 and stalls[0].entry_id and stalls[0].running_ms >= 600
    wait_until(lambda: {h[1] for h in handled if h[0] == "b"} >= set(range(3, 11)), 5,
               message="b handled 3..10")
    release.set()  # the stuck call returns now: its term is over
    wait_until(lambda: a.role is Role.STANDBY, 5, message="a back to standby")
    fill(client, stream, 5, start=11)
    wait_until(lambda: {h[1] for h in handled if h[0] == "b"} >= set(range(3, 16)), 5,
               message="b handled the new ones")
    a.stop(5)
    b.stop(5)
    by_a = [h for h in handled if h[0] == "a"]
    assert [h[1] for h in by_a] == [1, 2, 3]  # the stuck call's own late record, nothing more
    by_b = [h for h in handled if h[0] == "b"]
    # a's acks of 1 and 2 were never sent (nothing of a stalled term is acknowledged): b hands
    # out 1, 2 and the stuck 3 first, flagged, under a newer epoch (a store fenced by epoch
    # refuses the stuck call's late write)
    assert [(h[1], h[2]) for h in by_b[:3]] == [(1, True), (2, True), (3, True)]
    assert by_b[0][3] > by_a[-1][3]
    assert any(isinstance(e, LeaseLostEvent) for e in events)
    assert client.xpending(stream, "g")["pending"] == 0


def test_a_deleted_stream_and_group_are_created_again(client: redis.Redis, stream: str) -> None:
    """The stream (and with it the group) deleted under a running owner and its standby: the
    group is created again (said once, GroupRecreated), and entries added afterwards are
    handled in order; nobody dies."""
    events: list[Event] = []
    seen: list[int] = []
    a = coordinator(client, stream, "a", lambda m: seen.append(int(m.fields["seq"])), events)
    b = coordinator(client, stream, "b", lambda m: seen.append(int(m.fields["seq"])), events)
    a.start()
    b.start()
    fill(client, stream, 5)
    wait_until(lambda: len(seen) >= 5, 5, message="5 handled")
    client.delete(stream)
    fill(client, stream, 5, start=6)
    wait_until(lambda: len(seen) >= 10, 10, message="5 more handled after the deletion")
    assert seen == list(range(1, 11))
    assert sum(isinstance(e, GroupRecreated) for e in events) == 1
    assert a.role in (Role.OWNER, Role.STANDBY) and b.role in (Role.OWNER, Role.STANDBY)
    a.stop(5)
    b.stop(5)


def test_a_server_at_maxmemory_is_waited_out(server: ServerProcess, client: redis.Redis,
                                             stream: str) -> None:
    """While the server refuses writes (OOM at maxmemory), the coordinator backs off and says
    so once; when memory is freed it goes on, and every entry is handled once, in order."""
    if not isinstance(server, ServerProcess):
        pytest.skip("changes the server's configuration")
    fill(client, stream, 50)
    events: list[Event] = []
    seen: list[int] = []
    client.config_set("maxmemory", "1")
    try:
        c = coordinator(client, stream, "a", lambda m: seen.append(int(m.fields["seq"])), events)
        c.start()
        wait_until(lambda: any(isinstance(e, ServerUnavailable) for e in events), 5,
                   message="ServerUnavailable")
        fill_failed = False
        try:
            fill(client, stream, 1, start=51)
        except redis.exceptions.OutOfMemoryError:
            fill_failed = True
        assert fill_failed and seen == []
    finally:
        client.config_set("maxmemory", "0")
    wait_until(lambda: len(seen) >= 50, 10, message="50 handled after memory was freed")
    c.stop(5)
    assert seen == list(range(1, 51))
    assert sum(isinstance(e, ServerUnavailable) for e in events) == 1
    assert sum(isinstance(e, ServerRecovered) for e in events) == 1


def test_the_with_block_reraises_the_loops_error(client: redis.Redis, stream: str) -> None:
    """``with Coordinator(...)`` re-raises the error that ended its loop when the block exits
    (here the retry policy's "stop"), instead of swallowing it."""
    fill(client, stream, 1)

    def fail(message: Message) -> None:
        raise ValueError("boom")

    c = coordinator(client, stream, "a", fail,
                    retry=RetryPolicy(max_attempts=1, on_exhausted="stop"))
    with pytest.raises(HandlerFailed, match="boom"), c:
        wait_until(lambda: c.role is Role.STOPPED, 5, message="loop ended")


def _cli(url: str, stream: str, *argv: str, env: dict[str, str] | None = None
         ) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "orderedstream", *argv, "--redis-url", url,
                             "--stream", stream, "--group", "g"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_names_outside_ascii_and_with_spaces_work(
        server: ServerProcess, client: redis.Redis, stream: str, consumers: Consumers,
        procs: list[subprocess.Popen[bytes]]) -> None:
    """A consumer named ``café`` owns, its standby ``naïve`` sees its connection vanish and
    takes over long before the 60 s TTL (the connection watch works on the encoded name), and
    a fixer named ``my fixer`` repairs and re-streams."""
    fill(client, stream, 5)
    owner = consumers.start("café", ttl_ms=60_000)
    wait_until(lambda: len(read_records(consumers.record)) >= 5, 15, message="café handled")
    consumers.start("naïve", ttl_ms=60_000)
    keys = GroupKeys(stream, "g")
    wait_until(lambda: client.hexists(keys.members, "naïve"), 15, message="naïve standing by")
    owner.kill()
    fill(client, stream, 5, start=6)
    wait_until(lambda: len(read_records(consumers.record)) >= 10, 10, message="naïve took over")
    ids = park_directly(client, keys, [ParkedEntry(
        id="1-1", origin_id="1-1", group="g", reason="test",
        raw={b"seq": b"11", b"payload": b"CORRUPT:11-redro"})])
    fixer = _cli(server.url, stream, "fix", "--name", "my fixer")
    procs.append(fixer)
    wait_until(lambda: client.zcard(keys.delay) == 0, 15, message="my fixer re-streamed")
    wait_until(lambda: {r["seq"] for r in read_records(consumers.record)} >= {11}, 10,
               message="repaired copy handled")
    assert ids == ["1-1"] and fixer.poll() is None


def test_a_handler_raising_keyboardinterrupt_exits_in_one_line(
        server: ServerProcess, client: redis.Redis, stream: str) -> None:
    """``consume`` with a handler that raises KeyboardInterrupt: one line that says what
    happened, exit code 2, no traceback; the entry stays pending and the lease is handed over."""
    fill(client, stream, 1)
    proc = _cli(server.url, stream, "consume", "--name", "k",
                "--handler", "tests.handlers:interrupt")
    _out, err = proc.communicate(timeout=30)
    text = err.decode()
    assert proc.returncode == 2, text
    assert "Traceback" not in text and "KeyboardInterrupt" in text
    assert client.xpending(stream, "g")["pending"] == 1
    assert client.get(GroupKeys(stream, "g").lease) is None


@pytest.mark.slow
def test_a_restart_that_lost_the_data_heals_by_itself(tmp_path: Path) -> None:
    """A server restarted without persistence (stream, group, lease and epoch all gone) under a
    running owner and standby: both keep running, the group is created again, and entries
    produced afterwards are all handled, in order."""
    with ServerProcess() as srv:
        client = srv.client()
        group = Consumers(srv.url, "s", tmp_path / "record.jsonl")
        try:
            group.start("c1")
            group.start("c2")
            members = GroupKeys("s", "g").members
            wait_until(lambda: client.hlen(members) == 2, 15, message="owner and standby up")
            fill(client, "s", 20)
            wait_until(lambda: len(read_records(group.record)) >= 20, 15, message="20 handled")
            srv.restart()  # SIGKILL, then start again with no data
            client = srv.client()
            wait_until(lambda: client.exists(GroupKeys("s", "g").lease), 15,
                       message="an owner again")
            fill(client, "s", 20, start=21)
            wait_until(lambda: len(read_records(group.record)) >= 40, 15,
                       message="20 more handled")
            seqs = [r["seq"] for r in read_records(group.record)]
            assert seqs == list(range(1, 41))
            assert all(p.poll() is None for p in group.procs.values())
        finally:
            group.stop_all()
            client.close()


def test_after_the_server_changed_entries_up_to_its_tail_are_flagged(
        own_server: ServerProcess) -> None:
    """After the server's identity changed (here a restart; likewise a promoted replica), acks
    and deliveries the old server took may be gone: the new owner hands out every entry up to
    the stream's last one at its acquisition flagged as redelivered, and later ones unflagged."""
    client = own_server.client()
    stream = "changed"
    fill(client, stream, 10)
    seen: list[tuple[int, bool]] = []
    first = coordinator(client, stream, "a", lambda m: seen.append(
        (int(m.fields["seq"]), m.redelivered)))
    first.start()
    wait_until(lambda: len(seen) >= 10, 10, message="10 handled")
    first.stop(5)
    fill(client, stream, 5, start=11)  # produced while nobody consumes
    own_server.restart()  # SIGKILL, then start again from the AOF: a new run_id
    client = own_server.client()
    second = coordinator(client, stream, "b", lambda m: seen.append(
        (int(m.fields["seq"]), m.redelivered)))
    second.start()
    wait_until(lambda: len(seen) >= 15, 10, message="11..15 handled")
    fill(client, stream, 5, start=16)
    wait_until(lambda: len(seen) >= 20, 10, message="16..20 handled")
    second.stop(5)
    client.close()
    assert seen[:10] == [(s, False) for s in range(1, 11)]
    assert seen[10:] == [(s, s <= 15) for s in range(11, 21)]


@pytest.mark.slow
def test_a_read_only_replica_is_waited_out_until_promoted() -> None:
    """A coordinator pointed at a replica (as after a failover whose promotion has not happened
    yet) gets READONLY on every write: it says so once and waits; once the replica is promoted
    it owns and hands out every entry the primary had, in order."""
    if EXTERNAL_URL:
        pytest.skip("starts its own primary and replica")
    with ReplicatedServers() as servers:
        primary = servers.primary.client()
        fill(primary, "ro", 20)
        primary.xgroup_create("ro", "g", id="0")
        servers.wait_link_up()
        replica = servers.replica.client()
        wait_until(lambda: replica.xlen("ro") == 20, 5, message="replica has the entries")
        events: list[Event] = []
        seen: list[int] = []
        c = coordinator(replica, "ro", "a", lambda m: seen.append(int(m.fields["seq"])), events)
        c.start()
        try:
            wait_until(lambda: any(isinstance(e, ServerUnavailable) for e in events), 5,
                       message="ServerUnavailable")
            assert "READONLY" in next(e for e in events
                                      if isinstance(e, ServerUnavailable)).reason
            assert seen == [] and c.role is not Role.OWNER
            servers.kill_primary()
            servers.promote_replica()
            wait_until(lambda: len(seen) >= 20, 10, message="20 handled after the promotion")
        finally:
            c.stop(5)
            primary.close()
            replica.close()
        assert seen == list(range(1, 21))
        assert sum(isinstance(e, ServerUnavailable) for e in events) == 1
        assert sum(isinstance(e, ServerRecovered) for e in events) == 1
