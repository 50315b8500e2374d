"""AsyncCoordinator and AsyncProducer on a real server: the same protocol as the sync
Coordinator (one engine), so an async and a sync consumer of one group hand over to each other;
cancelling never acknowledges the entry in flight."""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

import pytest
import redis
import redis.asyncio

from orderedstream import (
    AsyncCoordinator,
    AsyncProducer,
    ConfigError,
    Coordinator,
    CoordinatorConfig,
    Defer,
    Event,
    GroupKeys,
    HandlerError,
    HandlerFailed,
    LeaseConfig,
    Message,
    RetryPolicy,
    Role,
)
from orderedstream.testing import ServerProcess, read_records, verdict, wait_until

from .conftest import Consumers, External


def config(stream: str, name: str, **overrides: object) -> CoordinatorConfig:
    overrides.setdefault("lease", LeaseConfig(ttl_ms=1000))
    return CoordinatorConfig(stream=stream, group="g", consumer=name,
                             **overrides)  # type: ignore[arg-type]


async def until(predicate: object, timeout: float = 10.0, message: str = "condition") -> None:
    """``wait_until`` for coroutines: poll without blocking the loop."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.01)


def aclient(server: ServerProcess | External) -> redis.asyncio.Redis:
    return redis.asyncio.Redis.from_url(server.url)


def test_async_owner_hands_out_every_entry_in_order(server: ServerProcess | External,
                                                    client: redis.Redis, stream: str) -> None:
    """An AsyncCoordinator awaits its handler on every entry once, in stream order, and acks
    them; AsyncProducer appends them."""

    async def main() -> list[int]:
        seen: list[int] = []

        async def handle(message: Message) -> None:
            await asyncio.sleep(0)
            seen.append(int(message.fields["seq"]))

        producer = AsyncProducer(aclient(server), stream)
        await producer.send_many({"seq": s} for s in range(1, 501))
        async with AsyncCoordinator(config(stream, "a", batch_size=50), handle,
                                    aclient(server)) as c:
            await until(lambda: len(seen) >= 500, message="500 handled")
            await producer.send({"seq": 501})
            await until(lambda: len(seen) >= 501, message="the late one handled")
            assert c.role is Role.OWNER
        await producer.aclose()
        return seen

    assert asyncio.run(main()) == list(range(1, 502))
    wait_until(lambda: client.xpending(stream, "g")["pending"] == 0, 5, message="all acked")


def test_async_and_sync_consumers_hand_over_to_each_other(server: ServerProcess | External,
                                                          client: redis.Redis,
                                                          stream: str) -> None:
    """A sync owner's clean stop hands the group to an async standby at once, and the async
    owner's clean stop hands it back to a new sync standby; every entry is handled once, in
    order, across the three terms, with strictly growing epochs."""
    seen: list[tuple[str, int, int]] = []

    def sync_handle(message: Message) -> None:
        seen.append(("sync", int(message.fields["seq"]), message.epoch))

    async def async_handle(message: Message) -> None:
        seen.append(("async", int(message.fields["seq"]), message.epoch))

    def fill(start: int) -> None:
        pipe = client.pipeline(transaction=False)
        for s in range(start, start + 100):
            pipe.xadd(stream, {"seq": s})
        pipe.execute()

    async def main() -> None:
        first = Coordinator(config(stream, "s1"), sync_handle, client)
        first.start()
        fill(1)
        await until(lambda: len(seen) >= 100, message="sync owner handled 100")
        second = AsyncCoordinator(config(stream, "a1"), async_handle, aclient(server))
        await second.start()
        await until(lambda: second.role is Role.STANDBY, message="async standby")
        await asyncio.to_thread(first.stop, 5)
        fill(101)
        await until(lambda: len(seen) >= 200, message="async owner handled 100 more")
        third = Coordinator(config(stream, "s2"), sync_handle, client)
        third.start()
        await until(lambda: third.role is Role.STANDBY, message="sync standby")
        assert await second.stop(5)
        await second.aclose()
        fill(201)
        await until(lambda: len(seen) >= 300, message="sync owner handled 100 more")
        await asyncio.to_thread(third.stop, 5)

    asyncio.run(main())
    assert [s for _, s, _ in seen] == list(range(1, 301))
    assert [w for w, _, _ in seen] == ["sync"] * 100 + ["async"] * 100 + ["sync"] * 100
    epochs = [seen[0][2], seen[100][2], seen[200][2]]
    assert epochs == sorted(set(epochs))


def test_cancelling_run_never_acks_the_entry_in_flight(server: ServerProcess | External,
                                                       client: redis.Redis,
                                                       stream: str) -> None:
    """Cancelling the task that runs an AsyncCoordinator while its handler awaits: the entries
    handled before are acknowledged, the one in flight stays pending and the lease is handed
    over, so a sync standby takes over at once and hands that entry out again, flagged."""
    pipe = client.pipeline(transaction=False)
    for s in range(1, 11):
        pipe.xadd(stream, {"seq": s})
    pipe.execute()
    done: list[int] = []
    again: list[tuple[int, bool]] = []

    async def slow(message: Message) -> None:
        seq = int(message.fields["seq"])
        if seq == 5:
            await asyncio.sleep(60)
        done.append(seq)

    async def main() -> None:
        c = AsyncCoordinator(config(stream, "a", batch_size=10), slow, aclient(server))
        task = asyncio.get_running_loop().create_task(c.run())
        await until(lambda: len(done) >= 4, message="4 handled")
        await asyncio.sleep(0.05)  # let it enter the handler of entry 5 (nothing to assert)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await c.aclose()

    asyncio.run(main())
    assert done == [1, 2, 3, 4]
    pending = client.xpending_range(stream, "g", "-", "+", 100)
    assert [int(client.xrange(stream, p["message_id"], p["message_id"])[0][1][b"seq"])
            for p in pending][:1] == [5]
    standby = Coordinator(config(stream, "b"), lambda m: again.append(
        (int(m.fields["seq"]), m.redelivered)), client)
    standby.start()
    wait_until(lambda: len(again) >= 6, 5, message="the standby handled 5..10")
    standby.stop(5)
    assert again[0] == (5, True) and [s for s, _ in again] == list(range(5, 11))


def test_async_batch_handler(server: ServerProcess | External, client: redis.Redis,
                             stream: str) -> None:
    """AsyncCoordinator.batched awaits its handler once per batch, in order."""
    pipe = client.pipeline(transaction=False)
    for s in range(1, 301):
        pipe.xadd(stream, {"seq": s})
    pipe.execute()
    seen: list[int] = []
    sizes: list[int] = []

    async def handle(messages: Sequence[Message]) -> None:
        sizes.append(len(messages))
        seen.extend(int(m.fields["seq"]) for m in messages)

    async def main() -> None:
        async with AsyncCoordinator.batched(config(stream, "a", batch_size=100), handle,
                                            aclient(server)):
            await until(lambda: len(seen) >= 300, message="300 handled")

    asyncio.run(main())
    assert seen == list(range(1, 301)) and max(sizes) <= 100


def test_a_plain_function_is_refused_with_what_to_pass(server: ServerProcess | External,
                                                       stream: str) -> None:
    """AsyncCoordinator awaits its handler: a plain function is refused, saying what to pass."""
    with pytest.raises(ConfigError, match="async def"):
        AsyncCoordinator(config(stream, "a"), lambda m: None,  # type: ignore[arg-type,return-value]
                         aclient(server))


def test_a_handler_that_blocks_the_loop_does_not_let_the_lease_lapse(
        server: ServerProcess | External, client: redis.Redis, stream: str) -> None:
    """An async handler that blocks the event loop for 2 x the lease TTL (a blocking call by
    mistake): the lease is renewed from a thread of its own, so it does not lapse, the standby
    does not take over, and every entry is handled once, in order."""
    seen: list[tuple[str, int]] = []

    async def blocking(message: Message) -> None:
        if int(message.fields["seq"]) == 5:
            time.sleep(2.0)  # blocks the loop: 2 x the 1000 ms TTL
        seen.append(("async", int(message.fields["seq"])))

    async def main() -> None:
        standby = Coordinator(config(stream, "s"), lambda m: seen.append(
            ("sync", int(m.fields["seq"]))), client)
        async with AsyncCoordinator(config(stream, "a", batch_size=10), blocking,
                                    aclient(server)) as owner:
            await until(lambda: owner.role is Role.OWNER, message="async owner")
            standby.start()
            await until(lambda: standby.role is Role.STANDBY, message="sync standby")
            fill(client, stream, 20)  # now: the standby stands by while the loop is blocked
            await until(lambda: len(seen) >= 20, message="20 handled")
            assert owner.role is Role.OWNER and standby.role is Role.STANDBY
        await asyncio.to_thread(standby.stop, 5)

    asyncio.run(main())
    assert seen == [("async", s) for s in range(1, 21)]


@pytest.mark.slow
def test_cancelled_at_random_points_loses_and_reorders_nothing(
        server: ServerProcess | External, client: redis.Redis, stream: str) -> None:
    """The task running an AsyncCoordinator is cancelled at 200 random points while entries
    stream in, and a new one (same name) is started each time: from the handler's own record,
    nothing is lost, nothing is out of order, and every duplicate is flagged redelivered."""
    rng = random.Random(7)
    record: list[tuple[int, bool]] = []
    produced = 0

    async def handle(message: Message) -> None:
        await asyncio.sleep(rng.random() / 1000)
        record.append((int(message.fields["seq"]), message.redelivered))

    async def main() -> int:
        nonlocal produced
        producer = AsyncProducer(aclient(server), stream)
        for cycle in range(200):
            await producer.send_many({"seq": produced + i + 1} for i in range(5))
            produced += 5
            c = AsyncCoordinator(config(stream, "a", batch_size=3), handle, aclient(server))
            task = asyncio.get_running_loop().create_task(c.run())
            await asyncio.sleep(rng.random() * 0.03)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await c.aclose()
            assert cycle >= 0
        last = AsyncCoordinator(config(stream, "a"), handle, aclient(server))
        async with last:
            await until(lambda: {s for s, _ in record} >= set(range(1, produced + 1)),
                        message="everything handled")
        await producer.aclose()
        return produced

    total = asyncio.run(main())
    v = verdict(record, total)
    assert not v.lost and not v.out_of_order and v.unflagged_duplicates == 0, v.as_dict()
    wait_until(lambda: client.xpending(stream, "g")["pending"] == 0, 5, message="all acked")


def test_consume_async_from_the_command_line(server: ServerProcess | External,
                                             client: redis.Redis, stream: str,
                                             consumers: Consumers) -> None:
    """``consume --async --handler module:async_function`` runs the asyncio engine: every
    entry is recorded once, in order; a plain function is refused in one line (exit 2)."""
    pipe = client.pipeline(transaction=False)
    for s in range(1, 201):
        pipe.xadd(stream, {"seq": s})
    pipe.execute()
    consumers.start("c1", extra=("--async", "--handler", "tests.handlers:record_async"))
    wait_until(lambda: len(read_records(consumers.record)) >= 200, 15, message="200 handled")
    assert [r["seq"] for r in read_records(consumers.record)] == list(range(1, 201))
    out = subprocess.run([sys.executable, "-m", "orderedstream", "consume", "--async",
                          "--redis-url", server.url, "--stream", stream, "--group", "g",
                          "--handler", "tests.handlers:crash_on_poison"],
                         capture_output=True, timeout=30)
    text = out.stderr.decode()
    assert out.returncode == 2 and "async def" in text and "Traceback" not in text, text


def fill(client: redis.Redis, stream: str, n: int, start: int = 1) -> None:
    pipe = client.pipeline(transaction=False)
    for s in range(start, start + n):
        pipe.xadd(stream, {"seq": s})
    pipe.execute()


def test_messages_in_order_acked_when_the_body_ends(server: ServerProcess | External,
                                                    client: redis.Redis, stream: str) -> None:
    """``async for message in coordinator.messages()``: every entry once, in stream order; a
    body that ends normally acknowledges its message when the loop asks for the next, so
    stopping right after the last body leaves nothing pending; the loop ends
    (StopAsyncIteration) when the coordinator stops."""
    fill(client, stream, 300)
    seen: list[int] = []

    async def main() -> None:
        c = AsyncCoordinator(config(stream, "a", batch_size=50), None, aclient(server))
        async with c.messages() as stream_:
            async for message in stream_:
                await asyncio.sleep(0)
                seen.append(int(message.fields["seq"]))
                if seen[-1] == 300:  # stop once the loop asks for the next one
                    asyncio.get_running_loop().create_task(c.stop())

    asyncio.run(main())
    assert seen == list(range(1, 301))
    assert client.xpending(stream, "g")["pending"] == 0


def test_settle_acks_defer_parks_an_exception_is_retried_then_parked(
        server: ServerProcess | External, client: redis.Redis, stream: str) -> None:
    """``async with stream.settle(message)``: a normal exit acks; ``Defer`` parks the entry; an
    exception is retried per the RetryPolicy (the same entry comes back as the next message,
    attempt + 1) and succeeds or, after max_attempts, is parked; the next entry comes only
    after that; the exceptions do not leave the loop (HandlerError events report them)."""
    fill(client, stream, 20)
    seen: list[tuple[int, int]] = []
    events: list[Event] = []
    policy = RetryPolicy(max_attempts=3, initial_backoff_ms=10, multiplier=1.0)

    async def main() -> None:
        c = AsyncCoordinator(config(stream, "a", batch_size=8, retry=policy), None,
                             aclient(server), hooks=[events.append])
        async with c.messages() as messages:
            async for message in messages:
                seq = int(message.fields["seq"])
                seen.append((seq, message.attempt))
                async with messages.settle(message):
                    if seq == 3 and message.attempt == 1:
                        raise ValueError("3 fails once")
                    if seq == 5:
                        raise ValueError("5 always fails")
                    if seq == 7:
                        raise Defer("7 is parked", delay_ms=60_000)
                if seq == 20:
                    break  # settled already: acknowledged

    asyncio.run(main())
    assert seen == [(1, 1), (2, 1), (3, 1), (3, 2), (4, 1), (5, 1), (5, 2), (5, 3),
                    *[(s, 1) for s in range(6, 21)]]
    assert client.xpending(stream, "g")["pending"] == 0
    delay = {m.decode() for m in client.zrange(GroupKeys(stream, "g").delay, 0, -1)}
    parked = {client.xrange(stream, i, i)[0][1][b"seq"] for i in delay}
    assert parked == {b"5", b"7"}
    actions = [(e.attempt, e.action) for e in events if isinstance(e, HandlerError)]
    assert actions == [(1, "retry"), (1, "retry"), (2, "retry"), (3, "park")]


def test_leaving_the_loop_never_acks_the_message_in_hand(server: ServerProcess | External,
                                                         client: redis.Redis,
                                                         stream: str) -> None:
    """``break`` with a message in hand (its body done, but not settled): leaving ``async
    with`` stops the coordinator and hands the lease over at once (a 10 s TTL, taken over in
    well under it); that message was not acknowledged: the sync standby hands it out first,
    flagged redelivered, then the rest, in order."""
    fill(client, stream, 10)
    seen: list[int] = []
    again: list[tuple[int, bool]] = []
    long_ttl = LeaseConfig(ttl_ms=10_000)
    standby = Coordinator(config(stream, "s", lease=long_ttl),
                          lambda m: again.append((int(m.fields["seq"]), m.redelivered)), client)

    async def main() -> float:
        c = AsyncCoordinator(config(stream, "a", lease=long_ttl), None, aclient(server))
        async with c.messages() as messages:
            async for message in messages:
                seen.append(int(message.fields["seq"]))
                if seen[-1] == 1:
                    standby.start()
                    await until(lambda: standby.role is Role.STANDBY, message="standby")
                if seen[-1] == 4:
                    break
        return time.monotonic()

    left = asyncio.run(main())
    try:
        wait_until(lambda: len(again) >= 7, 5, message="the standby handled 4..10")
        assert time.monotonic() - left < 3, "handed over, not expired"
    finally:
        standby.stop(5)
    assert seen == [1, 2, 3, 4]
    assert again[0] == (4, True) and [s for s, _ in again] == list(range(4, 11))


def test_an_exception_that_leaves_the_loop(server: ServerProcess | External,
                                           client: redis.Redis, stream: str) -> None:
    """An exception that leaves the loop (no ``settle()``) is re-raised from ``async with``
    after the coordinator stopped: a ``Defer`` parked its message first; another exception
    left its message pending (not acknowledged) for the next owner; and with
    ``on_exhausted="stop"`` a settled failure ends the loop with HandlerFailed."""
    fill(client, stream, 6)
    keys = GroupKeys(stream, "g")

    async def leave(exc: Exception, at: int) -> None:
        c = AsyncCoordinator(config(stream, "a"), None, aclient(server))
        async with c.messages() as messages:
            async for message in messages:
                if int(message.fields["seq"]) == at:
                    raise exc

    def pending_seqs() -> list[int]:
        return [int(client.xrange(stream, p["message_id"], p["message_id"])[0][1][b"seq"])
                for p in client.xpending_range(stream, "g", "-", "+", 100)]

    with pytest.raises(Defer):
        asyncio.run(leave(Defer("no", delay_ms=60_000), 2))
    assert client.zcard(keys.delay) == 1
    assert 2 not in pending_seqs() and 1 not in pending_seqs()
    with pytest.raises(KeyError):
        asyncio.run(leave(KeyError("boom"), 4))
    assert pending_seqs()[:1] == [4] and 3 not in pending_seqs()

    async def stop_on_failure() -> None:
        strict = RetryPolicy(max_attempts=2, initial_backoff_ms=10, on_exhausted="stop")
        c = AsyncCoordinator(config(stream, "b", retry=strict), None, aclient(server))
        async with c.messages() as messages:
            async for message in messages:
                async with messages.settle(message):
                    raise ValueError(message.id)

    with pytest.raises(HandlerFailed):
        asyncio.run(stop_on_failure())
    assert pending_seqs()[:1] == [4]


def test_messages_needs_a_coordinator_without_a_handler(server: ServerProcess | External,
                                                        stream: str) -> None:
    """messages() on a coordinator that calls a handler is refused, saying what to build."""

    async def handle(message: Message) -> None:
        pass

    c = AsyncCoordinator(config(stream, "a"), handle, aclient(server))
    with pytest.raises(ConfigError, match="without a handler"):
        c.messages()


@pytest.mark.slow
def test_a_standby_blocked_30s_with_default_client_settings_raises_nothing(
        server: ServerProcess | External, client: redis.Redis, stream: str) -> None:
    """Two async standbys built with redis.asyncio's defaults (``redis.asyncio.Redis(host=,
    port=)`` and ``AsyncCoordinator.from_url``) wait 32 s behind an owner that keeps renewing:
    no exception, no fault event (only ``standby``), both still standing by; when the owner
    stops, one takes over at once (well inside the 10 s TTL: a handover, not an expiry), and
    when that one stops, the other does."""
    parsed = urllib.parse.urlparse(server.url)
    ten_s = LeaseConfig(ttl_ms=10_000)
    fill(client, stream, 1)
    seen: list[tuple[str, int]] = []
    events: dict[str, list[Event]] = {"defaults": [], "url": []}

    def handler(name: str) -> Any:
        async def handle(message: Message) -> None:
            seen.append((name, int(message.fields["seq"])))
        return handle

    async def main() -> None:
        owner = Coordinator(config(stream, "owner", lease=ten_s), lambda m: seen.append(
            ("owner", int(m.fields["seq"]))), client)
        owner.start()
        await until(lambda: len(seen) == 1, message="the owner handled 1")
        defaults = AsyncCoordinator(
            config(stream, "defaults", lease=ten_s), handler("defaults"),
            redis.asyncio.Redis(host=parsed.hostname or "localhost", port=parsed.port or 6379),
            hooks=[events["defaults"].append])
        by_url = AsyncCoordinator.from_url(server.url, config(stream, "url", lease=ten_s),
                                           handler("url"), hooks=[events["url"].append])
        standbys = [defaults, by_url]
        for c in standbys:
            await c.start()
        await until(lambda: all(c.role is Role.STANDBY for c in standbys), message="standbys")
        deadline = time.monotonic() + 32
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            assert all(c.role is Role.STANDBY and c._task is not None and not c._task.done()
                       for c in standbys)
        assert {type(e).__name__ for es in events.values() for e in es} == {"Standby"}
        t0 = time.monotonic()
        await asyncio.to_thread(owner.stop, 5)
        await until(lambda: any(c.role is Role.OWNER for c in standbys), 5, "a takeover")
        first = next(c for c in standbys if c.role is Role.OWNER)
        second = next(c for c in standbys if c is not first)
        took_first = time.monotonic() - t0
        await until(lambda: second.role is Role.STANDBY, message="the other stands by")
        fill(client, stream, 1, start=2)
        await until(lambda: len(seen) == 2, message="the new owner handled 2")
        t0 = time.monotonic()
        assert await first.stop(5)
        await until(lambda: second.role is Role.OWNER, 5, "the second takeover")
        took_second = time.monotonic() - t0
        fill(client, stream, 1, start=3)
        await until(lambda: len(seen) == 3, message="the last owner handled 3")
        assert await second.stop(5)
        for c in standbys:
            await c.join()  # re-raises any error that ended its loop
            await c.aclose()
        assert took_first < 3 and took_second < 3, (took_first, took_second)  # not the 10 s TTL

    asyncio.run(main())
    assert [s for _, s in seen] == [1, 2, 3] and len({n for n, _ in seen}) == 3


def test_stop_while_a_body_runs_ends_the_loop_without_an_ack(
        server: ServerProcess | External, client: redis.Redis, stream: str) -> None:
    """stop() (a SIGTERM handler, say) while the loop's body is inside ``settle()``: the body
    finishes without an error, its message is not acknowledged (the run ended under it: the
    next owner gets it), the entries before it are, and the loop ends."""
    fill(client, stream, 5)
    seen: list[int] = []

    async def main() -> None:
        c = AsyncCoordinator(config(stream, "a"), None, aclient(server))
        async with c.messages() as messages:
            async for message in messages:
                async with messages.settle(message):
                    seen.append(int(message.fields["seq"]))
                    if seen[-1] == 3:
                        await c.stop()
                        await asyncio.sleep(0.05)

    asyncio.run(main())
    assert seen == [1, 2, 3]
    pending = client.xpending_range(stream, "g", "-", "+", 10)
    assert [int(client.xrange(stream, p["message_id"], p["message_id"])[0][1][b"seq"])
            for p in pending][:1] == [3]


@pytest.mark.slow
def test_messages_loop_cancelled_at_random_points_loses_nothing(
        server: ServerProcess | External, client: redis.Redis, stream: str) -> None:
    """The task running an ``async for`` loop over messages() (with and without ``settle()``)
    is cancelled at 150 random points while entries stream in, and a new loop is started each
    time: from the loop's own record, nothing is lost, nothing is out of order, and every
    duplicate is flagged redelivered."""
    rng = random.Random(11)
    record: list[tuple[int, bool]] = []
    produced = 0

    async def consume(c: AsyncCoordinator, settle: bool) -> None:
        async with c.messages() as messages:
            async for message in messages:
                if settle:
                    async with messages.settle(message):
                        await asyncio.sleep(rng.random() / 1000)
                        record.append((int(message.fields["seq"]), message.redelivered))
                else:
                    await asyncio.sleep(rng.random() / 1000)
                    record.append((int(message.fields["seq"]), message.redelivered))

    async def main() -> int:
        nonlocal produced
        producer = AsyncProducer(aclient(server), stream)
        for cycle in range(150):
            await producer.send_many({"seq": produced + i + 1} for i in range(5))
            produced += 5
            c = AsyncCoordinator(config(stream, "a", batch_size=3), None, aclient(server))
            task = asyncio.get_running_loop().create_task(consume(c, cycle % 2 == 0))
            await asyncio.sleep(rng.random() * 0.03)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        last = AsyncCoordinator(config(stream, "a"), None, aclient(server))
        done = asyncio.get_running_loop().create_task(consume(last, True))
        await until(lambda: {s for s, _ in record} >= set(range(1, produced + 1)),
                    message="everything handled")
        await last.stop()
        await done
        await producer.aclose()
        return produced

    total = asyncio.run(main())
    v = verdict(record, total)
    assert not v.lost and not v.out_of_order and v.unflagged_duplicates == 0, v.as_dict()
    wait_until(lambda: client.xpending(stream, "g")["pending"] == 0, 5, message="all acked")


def test_messages_of_a_coordinator_run_by_hand(server: ServerProcess | External,
                                               client: redis.Redis, stream: str) -> None:
    """A coordinator without a handler run by ``await run()`` in a task of its own: a loop
    over messages() in another task takes its entries (no second run is started), and ends
    when the run ends (stop())."""
    fill(client, stream, 10)
    seen: list[int] = []

    async def main() -> None:
        c = AsyncCoordinator(config(stream, "a"), None, aclient(server))
        runner = asyncio.get_running_loop().create_task(c.run())

        async def loop() -> None:
            async for message in c.messages():
                seen.append(int(message.fields["seq"]))

        consumer = asyncio.get_running_loop().create_task(loop())
        await until(lambda: len(seen) >= 10, message="10 taken")
        await c.stop(5)
        await asyncio.wait_for(runner, 10)
        await asyncio.wait_for(consumer, 10)
        await c.aclose()

    asyncio.run(main())
    assert seen == list(range(1, 11))
