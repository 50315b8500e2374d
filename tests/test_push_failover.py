"""Push detection of a dead owner (CLIENT TRACKING REDIRECT, DESIGN.md §2 and §4), on real
servers: a SIGKILLed owner's term ends at the producer's next write, long before the poll would
look; a push about an old term ends nothing; an ACL without CLIENT TRACKING falls back to the
poll, said once; an idle stream still fails over by the poll."""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from orderedstream import (
    Coordinator,
    CoordinatorConfig,
    Event,
    GroupKeys,
    LeaseConfig,
    OwnerConnectionGone,
    Producer,
    PushWatchDisabled,
    Role,
)
from orderedstream.testing import ServerProcess, wait_until

from .conftest import Consumers, External

SLOW_POLL = LeaseConfig(ttl_ms=30_000, watch_interval_ms=60_000, watch_push_interval_ms=60_000)


class Standby:
    """An in-process coordinator that records what it handled and the events it emitted."""

    def __init__(self, client: redis.Redis, stream: str, lease: LeaseConfig,
                 name: str = "standby") -> None:
        self.handled: list[tuple[float, int]] = []
        self.events: list[Event] = []
        self.name = name
        config = CoordinatorConfig(stream=stream, group="g", consumer=name, lease=lease)
        self.coordinator = Coordinator(config, self._handle, client, hooks=[self.events.append])

    def _handle(self, message: Any) -> None:
        self.handled.append((time.time(), int(message.fields["seq"])))

    def gone(self) -> list[OwnerConnectionGone]:
        return [e for e in self.events if isinstance(e, OwnerConnectionGone)]


@pytest.fixture
def standbys() -> Iterator[list[Standby]]:
    running: list[Standby] = []
    yield running
    for s in running:
        assert s.coordinator.stop(10), "stop() is bounded"


def start_standby(standbys: list[Standby], client: redis.Redis, stream: str,
                  lease: LeaseConfig, name: str = "standby") -> Standby:
    s = Standby(client, stream, lease, name)
    s.coordinator.start()
    standbys.append(s)
    wait_until(lambda: s.coordinator.role is Role.STANDBY, 10, message="standby")
    return s


def tracking(client: redis.Redis, name: str) -> dict[str, Any] | None:
    """The CLIENT LIST entry of the connection named ``name`` (None if not listed)."""
    return next((c for c in client.client_list() if c.get("name") == name), None)


def owned_by(client: redis.Redis, stream: str, consumer: str) -> bool:
    keys = GroupKeys(stream, "g")
    return bool(client.exists(keys.lease)) and client.hget(keys.owner, "consumer") == (
        consumer.encode())


def test_push_ends_a_killed_owner_term_long_before_the_poll(
        client: redis.Redis, stream: str, consumers: Consumers,
        standbys: list[Standby]) -> None:
    """With the poll set to once a minute and a 30 s lease, a SIGKILLed owner (a real process)
    under load is still replaced within a fraction of a second: the server's push at the
    producer's next write ends its term (event ``via='push'``); nothing is lost or reordered;
    stop() closes the watch connection."""
    owner = consumers.start("owner", ttl_ms=30_000)
    wait_until(lambda: owned_by(client, stream, "owner"), 15, message="owner owns")
    standby = start_standby(standbys, client, stream, SLOW_POLL)
    wait_until(lambda: tracking(client, "os:standby:watch") is not None, 10,
               message="the watch connection")
    produced = [0]
    stop = threading.Event()

    def produce() -> None:
        producer = Producer(client, stream)
        while not stop.wait(0.002):
            produced[0] += 1
            producer.send({"seq": produced[0]})

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        wait_until(lambda: produced[0] > 100, 10)
        t_kill = time.time()
        owner.send_signal(signal.SIGKILL)
        wait_until(lambda: standby.handled, 5, interval=0.001, message="the standby handles")
        took_ms = (standby.handled[0][0] - t_kill) * 1000.0
    finally:
        stop.set()
        thread.join()
    assert took_ms < 500, f"failover took {took_ms:.0f} ms: the push did not end the term"
    assert [e.via for e in standby.gone()] == ["push"]
    assert standby.coordinator.role is Role.OWNER
    wait_until(lambda: len({s for _, s in standby.handled}) > 0 and
               max(s for _, s in standby.handled) == produced[0], 10, message="all handled")
    assert standby.coordinator.stop(10)
    wait_until(lambda: tracking(client, "os:standby:watch") is None, 5,
               message="the watch connection closed")


def test_a_push_about_an_old_term_ends_nothing(own_server: ServerProcess,
                                               standbys: list[Standby]) -> None:
    """A standby armed for term 1 (connection X) gets the push for X after term 2 (another
    connection Y) has begun: it ends nothing (compare-and-delete on term 1's token), looks
    again and watches Y; when Y goes, term 2 is ended by push and the standby takes over.
    (On a server of its own: it reads the server's whole client list.)"""
    server = own_server
    client = server.client()
    stream = "old-term"
    keys = GroupKeys(stream, "g")
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    x = server.client(single_connection_client=True)
    y = server.client(single_connection_client=True)
    x.client_setname("ghost-x")
    y.client_setname("ghost-y")
    x_id, y_id = int(x.client_id()), int(y.client_id())
    term1, term2 = "ghost:1:aaaa", "ghost:2:bbbb"
    client.set(keys.lease, term1, px=60_000)
    client.hset(keys.owner, mapping={"consumer": "ghost", "epoch": 1, "token": term1,
                                     "conn_id": x_id, "conn_name": "ghost-x"})
    standby = start_standby(standbys, client, stream, SLOW_POLL)
    wait_until(lambda: (tracking(client, "os:standby:watch") or {}).get("redir") == str(x_id),
               10, message="tracking redirected to X")
    # term 2 begins on connection Y, unseen by the standby (no wake-up on the events stream)
    client.set(keys.lease, term2, px=60_000)
    client.hset(keys.owner, mapping={"epoch": 2, "token": term2, "conn_id": y_id,
                                     "conn_name": "ghost-y"})
    x.close()
    wait_until(lambda: tracking(client, "ghost-x") is None, 5)
    client.xadd(stream, {"seq": 1})  # the write that makes the server push "X is gone"
    wait_until(lambda: (tracking(client, "os:standby:watch") or {}).get("redir") == str(y_id),
               10, message="the standby looked again and watches Y")
    assert client.get(keys.lease) == term2.encode()
    assert standby.gone() == []
    y.close()
    wait_until(lambda: tracking(client, "ghost-y") is None, 5)
    client.xadd(stream, {"seq": 2})
    wait_until(lambda: standby.coordinator.role is Role.OWNER, 5, message="taken over")
    assert [(e.owner, e.epoch, e.via) for e in standby.gone()] == [("ghost", 2, "push")]


@pytest.fixture
def pushless_url(server: ServerProcess | External, client: redis.Redis) -> Iterator[str]:
    """A user that may do everything but ``CLIENT TRACKING``."""
    user = f"pushless{uuid.uuid4().hex[:6]}"
    client.execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "&*", "+@all",
                           "-client|tracking")
    host_port = server.url.split("//", 1)[1]
    yield f"redis://{user}:pw@{host_port}"
    client.execute_command("ACL", "DELUSER", user)


def test_acl_without_client_tracking_falls_back_to_the_poll(
        client: redis.Redis, stream: str, consumers: Consumers, standbys: list[Standby],
        pushless_url: str) -> None:
    """Where an ACL forbids CLIENT TRACKING, the standby says so once (``PushWatchDisabled``)
    and a SIGKILLed owner is still noticed by the CLIENT LIST poll (``via='poll'``)."""
    owner = consumers.start("owner", ttl_ms=30_000)
    wait_until(lambda: owned_by(client, stream, "owner"), 15, message="owner owns")
    standby = start_standby(standbys, redis.Redis.from_url(pushless_url), stream,
                            LeaseConfig(ttl_ms=30_000))
    wait_until(lambda: any(isinstance(e, PushWatchDisabled) for e in standby.events), 10,
               message="PushWatchDisabled")
    owner.send_signal(signal.SIGKILL)
    client.xadd(stream, {"seq": 1})
    wait_until(lambda: standby.coordinator.role is Role.OWNER, 5, message="taken over")
    assert [e.via for e in standby.gone()] == ["poll"]
    disabled = [e for e in standby.events if isinstance(e, PushWatchDisabled)]
    assert len(disabled) == 1 and "CLIENT TRACKING" in disabled[0].reason
    assert tracking(client, "os:standby:watch") is None


def test_an_idle_stream_still_fails_over_by_the_poll(
        client: redis.Redis, stream: str, consumers: Consumers,
        standbys: list[Standby]) -> None:
    """No write after the owner's SIGKILL means no push: the poll (every
    ``watch_push_interval_ms`` while the push is armed) still ends the dead term, well before
    the lease's 30 s, and the dead owner's pending entries are handled."""
    Producer(client, stream).send_many({"seq": s} for s in range(1, 4))
    owner = consumers.start("owner", ttl_ms=30_000, work_ms=60_000)  # stuck on entry 1
    wait_until(lambda: owned_by(client, stream, "owner"), 15, message="owner owns")
    wait_until(lambda: client.xpending(stream, "g")["pending"] > 0, 10, message="in flight")
    standby = start_standby(standbys, client, stream,
                            LeaseConfig(ttl_ms=30_000, watch_push_interval_ms=200))
    wait_until(lambda: tracking(client, "os:standby:watch") is not None, 10)
    started = time.monotonic()
    owner.send_signal(signal.SIGKILL)
    wait_until(lambda: standby.coordinator.role is Role.OWNER, 5, message="taken over")
    assert time.monotonic() - started < 2.0
    assert [e.via for e in standby.gone()] == ["poll"]
    wait_until(lambda: [s for _, s in standby.handled] == [1, 2, 3], 5,
               message="the dead owner's entries handled, in order")
