"""`orderedstream status --json` and group_status against states built on a real server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import redis

from orderedstream import (
    Coordinator,
    CoordinatorConfig,
    Defer,
    GroupKeys,
    LeaseConfig,
    Message,
    Producer,
    Role,
)
from orderedstream._status import group_status
from orderedstream.testing import ServerProcess, wait_until


def test_status_json_shows_owner_standby_dead_letters_and_timeline(
        server: ServerProcess, client: redis.Redis, stream: str) -> None:
    Producer(client, stream).send_many({"seq": str(s)} for s in range(1, 11))
    handled: list[int] = []

    def handler(message: Message) -> None:
        if message.fields["seq"] == "5":
            raise Defer("bad seq 5", delay_ms=3_600_000)
        handled.append(int(message.fields["seq"]))

    def make(name: str) -> Coordinator:
        config = CoordinatorConfig(stream=stream, group="g", consumer=name,
                                   lease=LeaseConfig(ttl_ms=5000))
        return Coordinator(config, handler, client)

    a, b = make("a"), make("b")
    keys = GroupKeys(stream, "g")
    # someone who was here once: its connection is gone
    client.hset(keys.members, "c", json.dumps({"role": "standby", "pid": 1, "host": "h",
                                                "conn_name": "os:c:cmd", "since": 0}))
    with a:
        wait_until(lambda: len(handled) == 9, 5, message="9 handled")
        with b:
            wait_until(lambda: b.role is Role.STANDBY, 5, message="b standby")
            wait_until(lambda: client.xpending(stream, "g")["pending"] == 0, 5, message="acked")
            out = subprocess.run(
                [sys.executable, "-m", "orderedstream", "status", "--redis-url", server.url,
                 "--stream", stream, "--group", "g", "--json"],
                capture_output=True, text=True, timeout=30, env=dict(os.environ, COLUMNS="200"))
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert (status["owner"], status["epoch"]) == ("a", int(client.get(keys.epoch)))
    assert 0 < status["lease_remaining_ms"] <= 5000
    states = {c["name"]: (c["state"], c["pid"]) for c in status["consumers"]}
    assert states == {"a": ("owner", os.getpid()), "b": ("standby", os.getpid()),
                      "c": ("dead", 1)}
    assert (status["stream_length"], status["lag"], status["pending"]) == (10, 0, 0)
    assert status["entries_read"] == 10
    assert status["dead_letters"]["parked"] == 1
    assert status["dead_letters"]["next_due_ms"] > 3_500_000
    assert [(e["type"], e["consumer"]) for e in status["timeline"]][:2] == [
        ("acquired", "a"), ("takeover", "a")]


def test_status_without_owner_shows_lag_and_oldest_pending(client: redis.Redis,
                                                            stream: str) -> None:
    producer = Producer(client, stream)
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    producer.send_many({"seq": str(s)} for s in range(1, 4))
    client.xreadgroup("g", "ghost", {stream: ">"}, count=2)  # read, never acked
    status = group_status(client, stream, "g")
    assert status.owner is None and status.lease_remaining_ms is None
    assert (status.lag, status.pending) == (1, 2)
    assert status.oldest_pending_age_ms is not None and status.oldest_pending_age_ms >= 0
    [ghost] = status.consumers
    assert (ghost.name, ghost.state, ghost.pending) == ("ghost", "gone", 2)
