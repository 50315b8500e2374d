"""`message.fields` and `message.raw` are the producer's fields only; orderedstream's `os-*`
headers are attributes (`headers`, `repaired`, `origin_id`), also on a repaired copy handled
on a real server, and a copy that fails again is parked with its origin and park count."""

from __future__ import annotations

import redis

from orderedstream import (
    Coordinator,
    CoordinatorConfig,
    Defer,
    Fixer,
    FixerConfig,
    GroupKeys,
    Message,
    ParkedEntry,
)
from orderedstream._message import Term
from orderedstream.testing import wait_until


def test_headers_are_not_fields() -> None:
    """An entry whose first fields are os-* headers: fields/raw hold the rest; headers them."""
    flat = [b"os-for", b"g", b"os-origin-id", b"1-1", b"os-parked", b"1", b"os-repaired", b"1",
            b"payload", b"x", b"os-user", b"mine"]
    message = Message(b"2-1", flat, Term("s", "g", 7))
    assert dict(message.fields) == {"payload": "x", "os-user": "mine"}
    assert dict(message.raw) == {b"payload": b"x", b"os-user": b"mine"}
    assert message.headers[b"os-origin-id"] == b"1-1"
    assert message.repaired and message.origin_id == "1-1"
    plain = Message.from_fields("3-1", {"payload": "y"})
    assert dict(plain.headers) == {} and not plain.repaired and plain.origin_id == "3-1"


def test_repaired_copy_has_only_user_fields_and_parks_again_with_its_origin(
        client: redis.Redis, stream: str) -> None:
    """On a real server: a deferred entry, repaired by the fixer, reaches the handler with
    exactly the producer's fields; deferred again, its record keeps the first id and counts
    the second park."""
    first = client.xadd(stream, {"payload": "bad", "n": "1"}).decode()
    seen: list[tuple[dict[str, str], bool, str]] = []

    def handler(message: Message) -> None:
        seen.append((dict(message.fields), message.repaired, message.origin_id))
        raise Defer("still bad", delay_ms=3_600_000 if message.repaired else 0)

    config = CoordinatorConfig(stream=stream, group="g", consumer="c")
    fixer = Fixer(FixerConfig(stream=stream, group="g"), lambda e: e.fields, client)
    keys = GroupKeys(stream, "g")
    with Coordinator(config, handler, client):
        wait_until(lambda: client.zcard(keys.delay) == 1, 10, message="parked once")
        wait_until(lambda: fixer.fix_once().restreamed == 1, 10, message="re-streamed")
        wait_until(lambda: len(seen) == 2, 10, message="the repaired copy handled")
        wait_until(lambda: client.zcard(keys.delay) == 1, 10, message="parked again")
    assert seen[1] == ({"payload": "bad", "n": "1"}, True, first)
    [member] = client.zrange(keys.delay, 0, -1)
    record = ParkedEntry.from_json(member.decode(), client.hget(keys.parked, member))
    assert (record.origin_id, record.parked) == (first, 2)
    assert dict(record.raw) == {b"payload": b"bad", b"n": b"1"}
