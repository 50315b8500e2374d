"""AsyncTopicMember on the session's 3+3 cluster and on a single server: the sync member's engine
with its handler calls run on the event loop, so handlers of different partitions run
concurrently (one partition's entries never overlap), an async and a sync member share a topic,
cancelling or raising never acknowledges, and a blocked loop does not lose the leases."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis
import redis.asyncio

from orderedstream import (
    AsyncTopicMember,
    ConfigError,
    Defer,
    Event,
    GroupKeys,
    HandlerStalled,
    LeaseConfig,
    LeaseLostEvent,
    MemberConfig,
    Message,
    RetryPolicy,
    TopicMember,
    TopicMissing,
    TopicProducer,
    connect_url,
    create_topic,
)
from orderedstream.testing import (
    ClusterServers,
    ServerProcess,
    newest_terms,
    topic_verdict,
)

from .conftest import External


async def until(predicate: Callable[[], object], timeout: float = 10.0,
                message: str = "condition") -> None:
    """``wait_until`` for coroutines: poll without blocking the loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(0.01)


class Topic:
    """A fresh topic, a keyed producer (``seq``, ``key``, ``kseq`` per key) and the handlers'
    shared record (judged by ``topic_verdict``)."""

    def __init__(self, client: Any, partitions: int, keys: int = 24) -> None:
        self.name = f"a{uuid.uuid4().hex[:6]}"
        self.topic = create_topic(client, self.name, partitions)
        self.producer = TopicProducer(client, self.topic)
        self.keys = keys
        self.seq = 0
        self.kseq = [0] * keys
        self.records: list[dict[str, Any]] = []

    def produce(self, count: int) -> None:
        batch = []
        for _ in range(count):
            self.seq += 1
            k = self.seq % self.keys
            self.kseq[k] += 1
            batch.append((f"k{k}", {"seq": self.seq, "key": f"k{k}", "kseq": self.kseq[k]}))
        self.producer.send_many(batch)

    def record(self, who: str, message: Message) -> None:
        fields = message.fields
        self.records.append({"seq": int(fields["seq"]), "key": fields["key"],
                             "kseq": int(fields["kseq"]), "red": message.redelivered,
                             "attempt": message.attempt, "p": message.partition,
                             "epoch": message.epoch, "pid": who, "t": time.monotonic()})

    def handler(self, who: str) -> Callable[[Message], Awaitable[None]]:
        async def handle(message: Message) -> None:
            await asyncio.sleep(0)
            self.record(who, message)
        return handle

    def handled(self) -> set[int]:
        return {r["seq"] for r in self.records}

    def all_handled(self) -> bool:
        return len(self.handled()) >= self.seq

    def config(self, name: str, **overrides: Any) -> MemberConfig:
        overrides.setdefault("lease", LeaseConfig(ttl_ms=1000))
        return MemberConfig(topic=self.name, group="g", name=name, batch_size=20, **overrides)


def _settled(members: list[Any], partitions: int) -> bool:
    counts = [len(m.owned) for m in members]
    return sum(counts) == partitions and max(counts) - min(counts) <= 1


def test_an_async_member_alone_handles_every_entry_in_key_order(
        cluster: ClusterServers) -> None:
    """An AsyncTopicMember built on a ``redis.asyncio.RedisCluster`` owns every partition of a
    topic spread over the shards, and handles every entry written before and while it runs,
    each key's entries in order, none twice."""
    client = connect_url(cluster.url)
    topic = Topic(client, partitions=8)
    topic.produce(400)

    async def main() -> None:
        aclient = redis.asyncio.RedisCluster.from_url(cluster.url)
        config = topic.config("solo")
        async with AsyncTopicMember(config, topic.handler("solo"), aclient) as member:
            await until(lambda: len(member.owned) == 8, 15, "every partition owned")
            assert member.members == ("solo",)
            await asyncio.to_thread(topic.produce, 400)
            await until(topic.all_handled, 15, "every entry handled")
        assert member.owned == {}
        await aclient.aclose()

    asyncio.run(main())
    client.close()
    result = topic_verdict(topic.records, topic.seq)
    assert result.ok and result.duplicates == 0, result.as_dict()


@pytest.mark.parametrize("where", ["cluster", "single"])
def test_an_async_and_a_sync_member_share_a_topic_and_hand_over(
        where: str, request: pytest.FixtureRequest) -> None:
    """An async and a sync member of one group settle balanced under load; a graceful stop of
    the async one hands its partitions to the sync one, and the handlers' record shows nothing
    lost, per-key order kept and no term handed out twice.  (The async member is built with
    ``from_url``.)"""
    url = str(request.getfixturevalue("cluster" if where == "cluster" else "server").url)
    client = connect_url(url)
    topic = Topic(client, partitions=8)
    def handle(message: Message) -> None:  # the sync member's: same record
        topic.record("sync", message)

    sync_member = TopicMember(topic.config("sync"), handle, connect_url(url))

    async def produce(stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.to_thread(topic.produce, 5)
            await asyncio.sleep(0.02)

    async def main() -> None:
        member = AsyncTopicMember.from_url(url, topic.config("async"), topic.handler("async"))
        stop = asyncio.Event()
        producing = asyncio.create_task(produce(stop))
        await member.start()
        try:
            await until(lambda: len(member.owned) == 8, 15, "the async member owns all")
            sync_member.start()
            await until(lambda: _settled([member, sync_member], 8), 15, "balanced")
            moved = set(member.owned)
            assert len(moved) == 4
            mark = topic.seq
            await until(lambda: topic.seq > mark + 100, 10, "load on the shared layout")
            assert await member.stop(5)
            assert member.owned == {}
            await until(lambda: len(sync_member.owned) == 8, 10, "handed over")
            mark = topic.seq
            await until(lambda: topic.seq > mark + 100, 10, "load after the handover")
        finally:
            stop.set()
            await producing
            await member.stop(5)
        await until(topic.all_handled, 15, "every entry handled")

    try:
        asyncio.run(main())
    finally:
        sync_member.stop()
        client.close()
    result = topic_verdict(topic.records, topic.seq)
    assert result.ok, result.as_dict()
    assert {r["pid"] for r in topic.records} == {"async", "sync"}


def test_partitions_run_concurrently_each_partition_serially(
        cluster: ClusterServers) -> None:
    """Handlers of different partitions run at the same time on the loop (the first calls of two
    partitions each wait for the other to have started: serial calls would deadlock), while one
    partition's calls never overlap and keep their order."""
    client = connect_url(cluster.url)
    topic = Topic(client, partitions=4, keys=16)
    topic.produce(200)
    first = {topic.topic.partition_for("k1"), topic.topic.partition_for("k2")}
    assert len(first) == 2
    waiter, setter = sorted(first)
    running: dict[int, int] = dict.fromkeys(range(4), 0)
    most = {"partition": 0, "all": 0}

    async def main() -> None:
        started = {waiter: asyncio.Event(), setter: asyncio.Event()}

        async def handle(message: Message) -> None:
            p = message.partition
            assert p is not None
            running[p] += 1
            most["partition"] = max(most["partition"], running[p])
            most["all"] = max(most["all"], sum(running.values()))
            try:
                if p in started and not started[p].is_set():
                    started[p].set()
                    other = setter if p == waiter else waiter
                    await asyncio.wait_for(started[other].wait(), 10)  # set by another partition
                await asyncio.sleep(0.001)
                topic.record("a", message)
            finally:
                running[p] -= 1

        async with AsyncTopicMember(topic.config("a"), handle, cluster.client()) as member:
            await until(topic.all_handled, 20, "every entry handled")
            assert len(member.owned) == 4

    asyncio.run(main())
    client.close()
    assert most["partition"] == 1, most
    assert most["all"] >= 2, most
    result = topic_verdict(topic.records, topic.seq)
    assert result.ok and result.duplicates == 0, result.as_dict()


def test_raising_or_cancelled_handler_calls_are_never_acknowledged(
        cluster: ClusterServers) -> None:
    """A handler that raises is retried in place (``attempt`` 2) before anything after it in
    its partition; one that raises ``Defer`` parks its entry (the park script acks it); a
    handler call whose task is cancelled ends its partition's term without acknowledging the
    entry: the member takes the partition again and the entry comes back, flagged
    ``redelivered``, before the entries behind it.  Nothing stays pending."""
    client = connect_url(cluster.url)
    topic = Topic(client, partitions=4, keys=8)
    topic.produce(80)
    raised: list[int] = []
    cancelled: list[int] = []

    async def main() -> None:
        hung: asyncio.Future[asyncio.Task[Any]] = asyncio.get_running_loop().create_future()

        async def handle(message: Message) -> None:
            seq = int(message.fields["seq"])
            if seq == 10 and not raised:
                raised.append(seq)
                raise RuntimeError("a passing fault")
            if seq == 30:
                raise Defer("not now", delay_ms=60_000)
            if seq == 20 and not cancelled:
                cancelled.append(seq)
                task = asyncio.current_task()
                assert task is not None
                hung.set_result(task)
                await asyncio.Event().wait()  # until cancelled
            topic.record("a", message)

        config = topic.config("a", retry=RetryPolicy(initial_backoff_ms=10))
        async with AsyncTopicMember(config, handle, cluster.client()) as member:
            (await hung).cancel()  # the application cancels the call's task
            await until(lambda: len(topic.handled()) >= topic.seq - 1, 15,
                        "every entry but the parked one handled")
            assert len(member.owned) == 4

    asyncio.run(main())
    parked = topic.topic.stream_for(f"k{30 % topic.keys}")
    assert client.zcard(GroupKeys(parked, "g").delay) == 1
    for stream in topic.topic.streams:
        assert client.xpending(stream, "g")["pending"] == 0
    client.close()
    by_seq = {r["seq"]: r for r in topic.records}
    assert by_seq[10]["attempt"] == 2
    assert by_seq[20]["red"], by_seq[20]
    for seq in (10, 20):  # nothing of its partition was handled before it
        p = by_seq[seq]["p"]
        later = [r["seq"] for r in topic.records if r["p"] == p]
        assert later.index(seq) == sorted(later).index(seq), (seq, later)
    result = topic_verdict(topic.records, topic.seq)
    assert result.lost == (30,), result.as_dict()  # parked
    assert result.duplicates == 0 and not result.epochs_reused, result.as_dict()
    key = f"k{30 % topic.keys}"  # its key's later entries went on past it (no hold key)
    kseqs = [r["kseq"] for r in topic.records if r["key"] == key]
    assert kseqs == sorted(kseqs) and len(kseqs) == topic.kseq[30 % topic.keys] - 1
    assert topic_verdict([r for r in topic.records if r["key"] != key], 0).ok


def test_hold_key_mode_holds_a_parked_entrys_key(server: ServerProcess | External) -> None:
    """Hold-key mode works as in the sync member (its gate's scripts come between two handler
    calls on the loop): an entry parked by ``Defer`` holds its key's later entries back (they
    are moved behind it, never handed to the handler), every other key goes on, and nothing
    stays pending."""
    client = connect_url(server.url)
    topic = Topic(client, partitions=4, keys=8)
    topic.produce(160)
    key = f"k{30 % topic.keys}"
    held = {r for r in range(31, 161) if r % topic.keys == 30 % topic.keys}

    async def main() -> None:
        async def handle(message: Message) -> None:
            if message.fields["seq"] == "30":
                raise Defer("not now", delay_ms=60_000)
            await asyncio.sleep(0)
            topic.record("a", message)

        config = topic.config("a", hold_key_field="key")
        async with AsyncTopicMember(config, handle, client):
            await until(lambda: len(topic.handled()) >= 160 - 1 - len(held), 10,
                        "every entry of the other keys handled")
            streams = topic.topic.streams
            await until(lambda: all(client.xpending(s, "g")["pending"] == 0 for s in streams),
                        10, "nothing pending")

    asyncio.run(main())
    client.close()
    assert not topic.handled() & (held | {30})
    assert topic_verdict([r for r in topic.records if r["key"] != key], 0).ok


def test_stop_cancels_a_call_still_running_and_never_acknowledges_it(
        server: ServerProcess | External) -> None:
    """``stop(timeout)`` lets the calls in flight finish for half of ``timeout``, then cancels
    those still running: the member still ends within ``timeout`` and hands every partition
    over, and the cancelled call's entry is not acknowledged: the sync member that takes over
    handles it, flagged ``redelivered``."""
    client = connect_url(server.url)
    topic = Topic(client, partitions=4)
    hung: list[int] = []

    def sync_handle(message: Message) -> None:
        topic.record("b", message)

    async def main() -> None:
        async def handle(message: Message) -> None:
            if int(message.fields["seq"]) == 15:
                hung.append(15)
                await asyncio.Event().wait()  # never returns by itself
            topic.record("a", message)

        a = AsyncTopicMember(topic.config("a"), handle, redis.asyncio.Redis.from_url(server.url))
        b = TopicMember(topic.config("b"), sync_handle, connect_url(server.url))
        await a.start()
        try:
            await until(lambda: len(a.owned) == 4, 10, "a owns all")
            await asyncio.to_thread(topic.produce, 40)
            stuck = topic.topic.partition_for("k15")
            free = {seq for seq in range(1, 41)
                    if seq < 15 or topic.topic.partition_for(f"k{seq % topic.keys}") != stuck}
            await until(lambda: bool(hung) and topic.handled() >= free, 10,
                        "every partition but the hung one handled")
            b.start()
            started = time.monotonic()
            assert await a.stop(1.0)
            assert time.monotonic() - started < 1.5
            await until(topic.all_handled, 10, "the hung entry handled by b")
        finally:
            await a.stop()
            await asyncio.to_thread(b.stop)

    asyncio.run(main())
    client.close()
    [again] = [r for r in topic.records if r["seq"] == 15]
    assert again["pid"] == "b" and again["red"], again
    result = topic_verdict(topic.records, topic.seq)
    assert result.ok and result.duplicates == 0, result.as_dict()


def test_a_blocked_loop_does_not_lose_the_leases(cluster: ClusterServers) -> None:
    """A handler that blocks the event loop (a sync sleep of 1.5 s, past the 600 ms lease TTL)
    stalls every partition's handling but not the renewals (the control thread's): the member
    keeps every lease and term (same epochs, no LeaseLost), then handles everything."""
    client = connect_url(cluster.url)
    topic = Topic(client, partitions=6)
    events: list[Event] = []
    blocked: list[float] = []

    async def main() -> None:
        async def handle(message: Message) -> None:
            if int(message.fields["seq"]) == 50 and not blocked:
                started = time.monotonic()
                time.sleep(1.5)  # blocks the loop
                blocked.append(time.monotonic() - started)
            topic.record("a", message)

        config = topic.config("a", lease=LeaseConfig(ttl_ms=600))
        async with AsyncTopicMember(config, handle, cluster.client(),
                                    hooks=[events.append]) as member:
            await until(lambda: len(member.owned) == 6, 15, "every partition owned")
            epochs = dict(member.owned)
            topic.produce(100)
            await until(topic.all_handled, 15, "every entry handled")
            assert blocked and blocked[0] >= 1.5
            assert member.owned == epochs

    asyncio.run(main())
    client.close()
    assert not [e for e in events if isinstance(e, LeaseLostEvent | HandlerStalled)], events
    result = topic_verdict(topic.records, topic.seq)
    assert result.ok and result.duplicates == 0, result.as_dict()


def test_a_stuck_call_steps_the_member_down_and_is_cancelled(
        server: ServerProcess | External) -> None:
    """A call stuck past ``handler_timeout_ms`` steps the async member down as the sync member
    does (HandlerStalled: every lease given up, out of the group), so its stuck entry is
    handled again long before the lease TTL; the stuck call is cancelled, so the member joins
    again at once and the partitions are shared again; an epoch-fencing store's record is
    complete and in key order."""
    client = connect_url(server.url)
    topic = Topic(client, partitions=6)
    events: list[Event] = []
    stuck: list[float] = []
    ended: list[str] = []

    def sync_handle(message: Message) -> None:
        topic.record("b", message)

    async def main() -> None:
        async def handle(message: Message) -> None:
            if int(message.fields["seq"]) == 30 and not stuck:
                stuck.append(time.monotonic())
                try:
                    await asyncio.Event().wait()  # never returns by itself
                except asyncio.CancelledError:
                    ended.append("cancelled")
                    raise
            topic.record("a", message)

        config = topic.config("a", handler_timeout_ms=500, lease=LeaseConfig(ttl_ms=10_000))
        b = TopicMember(topic.config("b", lease=LeaseConfig(ttl_ms=10_000)), sync_handle,
                        connect_url(server.url))
        try:
            async with AsyncTopicMember(config, handle, redis.asyncio.Redis.from_url(
                    server.url), hooks=[events.append]) as a:
                await until(lambda: len(a.owned) == 6, 10, "a owns all")
                b.start()
                await until(lambda: _settled([a, b], 6), 10, "balanced")
                await asyncio.to_thread(topic.produce, 60)
                await until(lambda: 30 in topic.handled(), 5, "the stuck entry handled")
                assert time.monotonic() - stuck[0] < 3.0  # timeout 0.5 s, TTL 10 s
                await until(lambda: ended == ["cancelled"], 5, "the stuck call cancelled")
                assert any(isinstance(e, HandlerStalled) for e in events)
                await until(lambda: _settled([a, b], 6) and len(a.owned) == 3, 15,
                            "a joined again")
                await asyncio.to_thread(topic.produce, 60)
                await until(topic.all_handled, 15, "every entry handled")
        finally:
            await asyncio.to_thread(b.stop)

    asyncio.run(main())
    client.close()
    accepted = newest_terms(topic.records)
    result = topic_verdict(accepted, topic.seq)
    assert result.ok, result.as_dict()
    assert {r["pid"] for r in topic.records if r["seq"] > 60} == {"a", "b"}


def test_a_plain_function_is_refused_with_what_to_pass(server: ServerProcess | External) -> None:
    """AsyncTopicMember awaits its handler: a plain function is refused at once, saying what to
    pass instead."""
    config = MemberConfig(topic="t", group="g", name="x")
    with pytest.raises(ConfigError, match="TopicMember"):
        AsyncTopicMember(config, lambda m: None, redis.Redis.from_url(server.url))  # type: ignore[arg-type,return-value]


def test_the_error_that_ends_the_member_comes_out_of_async_with(
        server: ServerProcess | External) -> None:
    """A member that cannot run (its topic does not exist) ends on its own: ``join()`` raises
    its error, and ``async with`` re-raises it when it leaves, as ``with TopicMember`` does."""

    async def handle(message: Message) -> None:
        pass

    async def main() -> None:
        config = MemberConfig(topic=f"none{uuid.uuid4().hex[:6]}", group="g", name="x")
        async with AsyncTopicMember.from_url(server.url, config, handle) as member:
            with pytest.raises(TopicMissing):
                await member.join(5)  # it ended on its own
            assert member.owned == {}

    with pytest.raises(TopicMissing):
        asyncio.run(main())
