"""Mixed groups as processes: an asyncio owner (``consume --async``) and a sync standby of one
group, and the reverse, hand over to each other on SIGKILL, on SIGSTOP past the TTL and on a
graceful SIGTERM.  Each test judges loss, order and duplicates from the handlers' own record
(the sync ``record_handler`` and its ``async def`` twin write the same lines)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
import redis

from orderedstream.testing import process_stopped, verdict, wait_until

from .conftest import Consumers
from .test_failover import check, epoch_fenced, fill, handled, owner_pid, wait_owner

ASYNC = ("--async", "--handler", "tests.handlers:record_async")
SYNC: tuple[str, ...] = ()
DIRECTIONS = [pytest.param((ASYNC, SYNC), id="async-owner-sync-standby"),
              pytest.param((SYNC, ASYNC), id="sync-owner-async-standby")]


@pytest.mark.parametrize("engines", DIRECTIONS)
def test_graceful_stop_hands_over_between_engines(
        client: redis.Redis, stream: str, consumers: Consumers,
        engines: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
    """SIGTERM the owner: it finishes the entry in hand, acks, releases; the standby of the
    other engine takes over at once (a 10 s TTL: a handover, not an expiry); every entry is
    handled once, in order, by the two of them (no duplicates at all; entries added after the
    handover make sure the new owner has some)."""
    owner_args, standby_args = engines
    fill(client, stream, 600)
    a = consumers.start("a", ttl_ms=10_000, work_ms=1, extra=owner_args)
    wait_owner(client, stream, a.pid, timeout=15)
    b = consumers.start("b", ttl_ms=10_000, work_ms=1, extra=standby_args)
    wait_until(lambda: len(handled(consumers.record)) >= 150, 20, message="a handled 150")
    wait_until(lambda: (Path(consumers.record.parent / "b.log").exists() and
                        "consuming" in Path(consumers.record.parent / "b.log").read_text()),
               15, message="b started")
    t0 = time.monotonic()
    a.send_signal(signal.SIGTERM)
    wait_owner(client, stream, b.pid, timeout=5)
    took = time.monotonic() - t0
    assert a.wait(10) == 0
    fill(client, stream, 200, start=601)  # for the new owner, however far a had got
    wait_until(lambda: len({r["seq"] for r in handled(consumers.record)}) >= 800, 30,
               message="all handled")
    duplicates, recs = check(consumers.record, 800)
    assert duplicates == 0
    assert {r["pid"] for r in recs} == {a.pid, b.pid}
    assert took < 3, f"took {took:.1f} s over: the lease expired instead of being handed over"
    wait_until(lambda: client.xpending(stream, "g")["pending"] == 0, 10, message="all acked")


@pytest.mark.slow
@pytest.mark.parametrize("engines", DIRECTIONS)
def test_sigkill_owner_between_engines(client: redis.Redis, stream: str, consumers: Consumers,
                                       engines: tuple[tuple[str, ...], tuple[str, ...]]
                                       ) -> None:
    """SIGKILL the owner mid-batch: the standby of the other engine replays the dead owner's
    unacknowledged entries first, in order; nothing is lost or reordered; every duplicate is
    a flagged redelivery, at most the batch that was in flight."""
    owner_args, standby_args = engines
    fill(client, stream, 1500)
    a = consumers.start("a", work_ms=1, batch=100, extra=owner_args)
    wait_owner(client, stream, a.pid, timeout=15)
    b = consumers.start("b", work_ms=1, batch=100, extra=standby_args)
    wait_until(lambda: len(handled(consumers.record)) >= 400, 20, message="a handled 400")
    a.kill()
    a.wait()
    wait_until(lambda: len({r["seq"] for r in handled(consumers.record)}) >= 1500, 30,
               message="all 1500 handled")
    duplicates, recs = check(consumers.record, 1500)
    assert {r["pid"] for r in recs} == {a.pid, b.pid}
    assert duplicates <= 100
    assert b.poll() is None
    wait_until(lambda: client.xpending(stream, "g")["pending"] == 0, 10, message="all acked")


@pytest.mark.slow
@pytest.mark.parametrize("engines", DIRECTIONS)
def test_sigstop_owner_of_one_engine_is_fenced_by_the_other(
        client: redis.Redis, stream: str, consumers: Consumers,
        engines: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
    """SIGSTOP the owner past its TTL: the standby of the other engine takes over; SIGCONT:
    the woken owner hands out nothing more (beyond the one entry its handler was inside when
    frozen, whose write an epoch-fenced store refuses), reports its lease lost and holds no
    pending entry; what such a store accepted has nothing lost or reordered."""
    owner_args, standby_args = engines
    fill(client, stream, 600)
    a = consumers.start("a", ttl_ms=600, work_ms=2, batch=50, extra=owner_args)
    wait_owner(client, stream, a.pid, timeout=15)
    b = consumers.start("b", ttl_ms=600, work_ms=2, batch=50, extra=standby_args)
    wait_until(lambda: len(handled(consumers.record)) >= 100, 20, message="a handled 100")
    wait_until(lambda: "consuming" in (consumers.record.parent / "b.log").read_text(), 15,
               message="b started")
    a.send_signal(signal.SIGSTOP)
    wait_until(lambda: process_stopped(a.pid), 5, message="a stopped")
    at_stop = sum(1 for r in handled(consumers.record) if r["pid"] == a.pid)
    wait_owner(client, stream, b.pid, timeout=10)
    wait_until(lambda: any(r["pid"] == b.pid for r in handled(consumers.record)), 10,
               message="b handling")
    a.send_signal(signal.SIGCONT)
    fill(client, stream, 400, start=601)  # fresh entries the woken owner could try to take
    wait_until(lambda: len({r["seq"] for r in handled(consumers.record)}) >= 1000, 30,
               message="all 1000 handled")
    log = consumers.record.parent / "a.log"
    wait_until(lambda: "lease_lost" in log.read_text(), 10, message="a reports its lease lost")
    recs = handled(consumers.record)
    assert sum(1 for r in recs if r["pid"] == a.pid) - at_stop <= 1
    accepted, refused = epoch_fenced(recs)
    assert len(refused) <= 1 and all(r["pid"] == a.pid for r in refused)
    v = verdict(((int(r["seq"]), bool(r["red"])) for r in accepted), 1000)  # type: ignore[call-overload]
    assert v.ok, v
    assert owner_pid(client, stream) == b.pid
    assert all(c["name"] != b"a" for c in client.xpending(stream, "g")["consumers"])
