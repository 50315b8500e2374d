"""The batch handler: a page of entries in one call, acknowledged together; a batch that
raises is handed out again one entry at a time, in order, under the retry policy."""

from __future__ import annotations

from collections.abc import Sequence

import redis

from orderedstream import (
    Coordinator,
    CoordinatorConfig,
    Defer,
    Event,
    GroupKeys,
    HandlerError,
    LeaseConfig,
    Message,
    Producer,
    RetryPolicy,
)
from orderedstream.testing import read_records, wait_until

from .conftest import Consumers


def batched(client: redis.Redis, stream: str, handler: object, events: list[Event],
            **overrides: object) -> Coordinator:
    config = CoordinatorConfig(stream=stream, group="g", consumer="b",
                               lease=LeaseConfig(ttl_ms=1000), **overrides)  # type: ignore[arg-type]
    return Coordinator.batched(config, handler, client, hooks=[events.append])  # type: ignore[arg-type]


def test_batches_arrive_in_order_and_are_acked_together(client: redis.Redis,
                                                        stream: str) -> None:
    """Every entry reaches the handler once, in stream order, in batches of at most
    batch_size; all are acknowledged."""
    Producer(client, stream).send_many({"seq": s} for s in range(1, 1235))
    sizes: list[int] = []
    seqs: list[int] = []

    def handle(messages: Sequence[Message]) -> None:
        sizes.append(len(messages))
        seqs.extend(int(m.fields["seq"]) for m in messages)

    events: list[Event] = []
    with batched(client, stream, handle, events, batch_size=100):
        wait_until(lambda: len(seqs) >= 1234, 10, message="1234 handled")
        wait_until(lambda: client.xpending(stream, "g")["pending"] == 0, 5, message="acked")
    assert seqs == list(range(1, 1235))
    assert max(sizes) <= 100 and len(sizes) >= 13


def test_a_failing_batch_is_split_and_retried_one_by_one(client: redis.Redis,
                                                         stream: str) -> None:
    """A batch holding a bad entry raises: its entries come again one at a time, in order;
    the good ones succeed, the bad one is parked (Defer) where it stands; nothing is handled
    twice successfully and nothing after the bad entry goes first."""
    Producer(client, stream).send_many({"seq": s} for s in range(1, 201))
    done: list[int] = []
    calls: list[int] = []

    def handle(messages: Sequence[Message]) -> None:
        calls.append(len(messages))
        seqs = [int(m.fields["seq"]) for m in messages]
        if 57 in seqs:
            if len(seqs) == 1:
                raise Defer("57 is bad", delay_ms=60_000)
            raise ValueError("a bad entry in this batch")
        done.extend(seqs)  # committed all at once, like one database statement

    events: list[Event] = []
    with batched(client, stream, handle, events, batch_size=50,
                 retry=RetryPolicy(max_attempts=3, initial_backoff_ms=10)):
        wait_until(lambda: len(done) >= 199, 10, message="199 handled")
        wait_until(lambda: client.xpending(stream, "g")["pending"] == 0, 5, message="acked")
    assert done == [s for s in range(1, 201) if s != 57]
    assert client.zcard(GroupKeys(stream, "g").delay) == 1
    splits = [e for e in events if isinstance(e, HandlerError) and e.action == "split"]
    assert len(splits) == 1 and "bad entry" in splits[0].error
    assert calls.count(1) == 50  # the split batch: 50 calls of one entry each


def test_consume_batch_handler_from_the_command_line(client: redis.Redis, stream: str,
                                                     consumers: Consumers) -> None:
    """``consume --batch-handler module:function`` hands batches to the function; every entry
    is recorded once, in order, and acknowledged."""
    Producer(client, stream).send_many({"seq": s} for s in range(1, 301))
    consumers.start("c1", batch=50, extra=("--batch-handler", "tests.handlers:record_batch"))
    wait_until(lambda: len(read_records(consumers.record)) >= 300, 15, message="300 handled")
    wait_until(lambda: client.xpending(stream, "g")["pending"] == 0, 5, message="acked")
    assert [r["seq"] for r in read_records(consumers.record)] == list(range(1, 301))
