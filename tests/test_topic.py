"""Topics: metadata created once, Kafka-compatible routing, producers on a cluster and on one
server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio

from orderedstream._assign import moves
from orderedstream._keys import TopicGroupKeys, TopicKeys
from orderedstream._server import AnyClient, connect_url
from orderedstream._target import Target, read_target, settle_target
from orderedstream._topic import (
    AsyncTopicProducer,
    TopicProducer,
    create_topic,
    describe_topic,
    load_topic,
    partition_for,
)
from orderedstream.exceptions import TopicMismatch, TopicMissing
from orderedstream.testing import ClusterServers, free_port, wait_until


def test_golden_routing() -> None:
    """Same key, same partition, forever: crc32 of the key's UTF-8 bytes modulo P, pinned on
    concrete keys (str and bytes keys alike)."""
    assert [partition_for(f"k{i}", 8) for i in range(10)] == [7, 1, 3, 5, 6, 0, 2, 4, 5, 3]
    assert partition_for("customer-42", 64) == 21
    assert partition_for("café", 12) == partition_for("café".encode(), 12) == 5
    assert partition_for(b"\xff\x00", 3) == 0
    assert partition_for("orders", 1000) == 3845127662 % 1000
    with pytest.raises(ValueError):
        partition_for("x", 0)


@pytest.fixture
def topic_name(any_client: AnyClient) -> Iterator[str]:
    """A fresh topic name; its metadata and partition streams are deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    yield name
    try:
        streams = load_topic(any_client, name).streams
    except TopicMissing:
        streams = ()
    for key in (TopicKeys(name).meta, *streams):
        any_client.delete(key)


def test_create_is_idempotent_and_refuses_another_count(any_client: AnyClient,
                                                        topic_name: str) -> None:
    """Creating a topic twice with the same P returns the same topic (names and creation time
    from the first); another P is refused with a message that says why."""
    first = create_topic(any_client, topic_name, 6)
    again = create_topic(any_client, topic_name, 6)
    assert again == first and first.partitions == 6 and len(set(first.streams)) == 6
    assert load_topic(any_client, topic_name) == first
    with pytest.raises(TopicMismatch, match=r"exists with 6 partitions, not 8.*per-key order"):
        create_topic(any_client, topic_name, 8)


def test_racing_creators_agree(any_client: AnyClient, topic_name: str) -> None:
    """Creators racing with different counts: exactly one count wins, every creator with it
    gets the same topic, every other one is refused."""
    results: list[Any] = []
    barrier = threading.Barrier(6)

    def create(p: int) -> None:
        barrier.wait()
        try:
            results.append(create_topic(any_client, topic_name, p))
        except TopicMismatch as err:
            results.append(err)

    threads = [threading.Thread(target=create, args=(p,)) for p in (3, 4, 3, 4, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    topics = [r for r in results if not isinstance(r, TopicMismatch)]
    refused = [r for r in results if isinstance(r, TopicMismatch)]
    assert len(topics) == 3 and len(refused) == 3 and len(set(topics)) == 1


def test_unknown_topic_is_refused(any_client: AnyClient) -> None:
    """Producing to a topic never created says how to create it."""
    with pytest.raises(TopicMissing, match="topic create nope-"):
        TopicProducer(any_client, f"nope-{uuid.uuid4().hex[:6]}")


def test_partitions_spread_over_the_shards(cluster: ClusterServers) -> None:
    """On a 3-primary cluster a 6-partition topic puts two partitions on each primary, and
    ``describe`` names the node serving each partition's slot."""
    client = connect_url(cluster.url)
    name = f"t-{uuid.uuid4().hex[:8]}"
    try:
        topic = create_topic(client, name, 6)
        desc = describe_topic(client, name)
        assert desc.cluster
        nodes = [p.node for p in desc.partitions]
        for p in desc.partitions:
            assert p.node == f"127.0.0.1:{cluster.primary_for(p.stream).port}"
            assert p.stream == topic.streams[p.index] and p.length == 0
        assert sorted(nodes.count(n) for n in set(nodes)) == [2, 2, 2]
    finally:
        client.delete(TopicKeys(name).meta)
        client.close()


def _entries(client: AnyClient, stream: str) -> list[dict[str, str]]:
    rows: Any = client.xrange(stream)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in rows]


def test_producer_routes_each_key_to_its_partition_in_order(any_client: AnyClient,
                                                            topic_name: str) -> None:
    """``send`` and ``send_many`` put every entry in its key's partition, a key's entries in the
    order sent; describe counts them."""
    topic = create_topic(any_client, topic_name, 4)
    producer = TopicProducer(any_client, topic_name)
    try:
        sent: dict[str, int] = {}
        batch = []
        for seq in range(1, 201):
            key = f"k{seq % 7}"
            sent[key] = sent.get(key, 0) + 1
            batch.append((key, {"seq": seq, "key": key, "kseq": sent[key]}))
        for key, fields in batch[:20]:
            producer.send(fields, key=key)
        ids = producer.send_many(batch[20:])
        assert len(ids) == 180
    finally:
        producer.close()
    total = 0
    for index, stream in enumerate(topic.streams):
        entries = _entries(any_client, stream)
        total += len(entries)
        per_key: dict[str, list[int]] = {}
        for e in entries:
            assert partition_for(e["key"], 4) == index
            per_key.setdefault(e["key"], []).append(int(e["kseq"]))
        for kseqs in per_key.values():
            assert kseqs == list(range(1, len(kseqs) + 1))
    assert total == 200
    assert sum(p.length for p in describe_topic(any_client, topic_name).partitions) == 200


def test_async_producer_routes_like_the_sync_one(any_url: str, any_client: AnyClient,
                                                 topic_name: str) -> None:
    """AsyncTopicProducer (redis.asyncio, cluster or not) puts each entry where the sync
    producer would."""
    topic = create_topic(any_client, topic_name, 3)

    async def main() -> list[str]:
        aclient: Any = (redis.asyncio.RedisCluster.from_url(any_url)
                        if isinstance(any_client, redis.RedisCluster)
                        else redis.asyncio.Redis.from_url(any_url))
        producer = AsyncTopicProducer(aclient, topic_name)
        try:
            ids = [await producer.send({"n": 0}, key="alpha")]
            ids += await producer.send_many([(f"key{n}", {"n": n}) for n in range(1, 30)])
            return ids
        finally:
            await producer.aclose()
            await aclient.aclose()

    ids = asyncio.run(main())
    assert len(ids) == 30
    found = {int(e["n"]): i for i, s in enumerate(topic.streams) for e in _entries(any_client, s)}
    assert found[0] == partition_for("alpha", 3)
    assert all(found[n] == partition_for(f"key{n}", 3) for n in range(1, 30))


# -- the command line ---------------------------------------------------------------------------

def _partition_records(client: AnyClient, topic: str) -> dict[int, list[dict[str, str]]]:
    t = load_topic(client, topic)
    return {i: _entries(client, s) for i, s in enumerate(t.streams)}


def _check_demo_entries(client: AnyClient, topic: str, count: int | None) -> list[int]:
    """Every partition holds only its keys' entries, each key's kseq 1, 2, 3... in order, no
    seq twice; returns the seqs found."""
    t = load_topic(client, topic)
    seqs: list[int] = []
    for index, entries in _partition_records(client, topic).items():
        last: dict[str, int] = {}
        for e in entries:
            assert partition_for(e["key"], t.partitions) == index
            kseq = int(e["kseq"])
            assert kseq > last.get(e["key"], 0), (e, last)
            last[e["key"]] = kseq
            seqs.append(int(e["seq"]))
    assert len(seqs) == len(set(seqs)), "a seq written twice"
    if count is not None:
        assert sorted(seqs) == list(range(1, count + 1))
    return seqs


def test_cli_topic_create_describe_produce(cluster: ClusterServers) -> None:
    """`topic create` (again: fine; another P: one line, exit 2), `produce --topic` (seq, key,
    kseq per key in order in its partition), `produce --key-field` (JSON lines routed by that
    field), `topic describe [--json]` (slot, node, length of each partition)."""
    from .test_cli import assert_one_line_error, run_cli

    url = cluster.url
    name = f"t-{uuid.uuid4().hex[:8]}"
    client = connect_url(url)
    try:
        out = run_cli("topic", "create", name, "--partitions", "6", "--redis-url", url)
        assert out.returncode == 0 and "6 partitions" in out.stdout, out.stdout + out.stderr
        assert run_cli("topic", "create", name, "--partitions", "6",
                       "--redis-url", url).returncode == 0
        assert_one_line_error(run_cli("topic", "create", name, "--partitions", "7",
                                      "--redis-url", url), r"exists with 6 partitions.*order")
        out = run_cli("produce", "--topic", name, "--keys", "5", "--count", "300", "--rate",
                      "0", "--redis-url", url)
        assert out.returncode == 0 and "produced 300 entries" in out.stdout, out.stderr
        _check_demo_entries(client, name, 300)
        lines = "".join(json.dumps({"customer": f"c{n % 3}", "n": n, "nested": {"a": n},
                                    "ok": True, "none": None}) + "\n" for n in range(9))
        out = subprocess.run([sys.executable, "-m", "orderedstream", "produce", "--topic", name,
                              "--key-field", "customer", "--redis-url", url], input=lines,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "produced 9 entries" in out.stdout, out.stderr
        users = [e for es in _partition_records(client, name).values() for e in es
                 if "customer" in e]
        assert len(users) == 9
        for e in users:
            assert e in _partition_records(client, name)[partition_for(e["customer"], 6)]
            assert json.loads(e["nested"]) == {"a": int(e["n"])}
            assert e["ok"] == "true" and e["none"] == "null"
        out = run_cli("topic", "describe", name, "--json", "--redis-url", url)
        desc = json.loads(out.stdout)
        assert desc["partitions"] == 6 and desc["cluster"] is True
        assert sum(p["length"] for p in desc["partition_list"]) == 309
        for p in desc["partition_list"]:
            assert p["node"] == f"127.0.0.1:{cluster.primary_for(p['stream']).port}"
        out = run_cli("topic", "describe", name, "--redis-url", url)
        assert out.returncode == 0 and "partition" in out.stdout and name in out.stdout
    finally:
        t = load_topic(client, name)
        for key in (TopicKeys(name).meta, *t.streams):
            client.delete(key)
        client.close()


def test_cli_topic_errors_are_one_line(cluster: ClusterServers) -> None:
    """A topic never created, a server that is down, --key-field without --topic, a stdin line
    that is not JSON or lacks the field: one `error:` line each, exit 2."""
    from .test_cli import assert_one_line_error, run_cli

    url = cluster.url
    assert_one_line_error(run_cli("topic", "describe", "nope", "--redis-url", url),
                          r"topic 'nope' does not exist.*topic create")
    assert_one_line_error(run_cli("produce", "--topic", "nope", "--redis-url", url),
                          r"does not exist")
    assert_one_line_error(run_cli("topic", "create", "x", "--partitions", "2", "--redis-url",
                                  f"redis://127.0.0.1:{free_port()}"), r"cannot reach")
    assert_one_line_error(run_cli("topic", "create", "a{b}", "--partitions", "2",
                                  "--redis-url", url), r"topic name")
    assert_one_line_error(run_cli("produce", "--key-field", "k", "--redis-url", url),
                          r"--key-field .* --topic")
    name = f"t-{uuid.uuid4().hex[:8]}"
    client = connect_url(url)
    try:
        create_topic(client, name, 2)
        for text, match in (("not json\n", r"line 1 is not JSON"),
                            ('{"other": 1}\n', r"line 1: .*no field 'customer'")):
            out = subprocess.run([sys.executable, "-m", "orderedstream", "produce", "--topic",
                                  name, "--key-field", "customer", "--redis-url", url],
                                 input=text, capture_output=True, text=True, timeout=60)
            assert_one_line_error(out, match)
    finally:
        client.delete(TopicKeys(name).meta)
        client.close()


@pytest.mark.slow
def test_cli_produce_goes_on_through_a_primary_failover(own_cluster: ClusterServers) -> None:
    """`produce --topic` while the primary of some partitions is SIGKILLed: it waits for the
    replica's promotion and goes on; per-key order holds in every partition and no entry is
    written twice (an entry the old primary acknowledged but never replicated can be lost:
    replication is asynchronous)."""
    url = own_cluster.url
    name = f"t-{uuid.uuid4().hex[:8]}"
    client = connect_url(url)
    topic = create_topic(client, name, 6)
    victim = own_cluster.primary_for(topic.streams[5])
    if victim.port == int(url.rsplit(":", 1)[1]):
        url = next(f"redis://127.0.0.1:{n.port}" for n in own_cluster.primaries_now()
                   if n.port != victim.port)
    proc = subprocess.Popen([sys.executable, "-m", "orderedstream", "produce", "--topic", name,
                             "--keys", "12", "--count", "3000", "--rate", "1000", "--quiet",
                             "--redis-url", url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: client.xlen(topic.streams[5]) > 50, 10,
                   message="entries on the victim's partition")
        own_cluster.kill(victim)
        own_cluster.wait_failover(victim)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "server unavailable" in err and "available again" in err, err
    client.close()
    client = connect_url(url)
    seqs = _check_demo_entries(client, name, None)
    assert len(seqs) >= 2990, f"{3000 - len(seqs)} lost"
    client.close()


# -- the stored target --------------------------------------------------------------------------

def _live(client: AnyClient, topic: str, group: str, members: dict[str, int]) -> None:
    """Set members' expiry: +60 s from the server's now (live) or -1 s (expired)."""
    seconds, micros = client.time()  # type: ignore[misc]
    now = int(seconds) * 1000 + int(micros) // 1000
    client.zadd(TopicGroupKeys(topic, group).members,
                {m: now + (60_000 if alive else -1_000) for m, alive in members.items()})


def test_target_follows_joins_and_leaves_stickily(any_client: AnyClient,
                                                  topic_name: str) -> None:
    """settle_target: a first target for the live members (version 1); the same members again:
    the same version, nothing written; a join: version 2 moving only the newcomer's share; an
    expired member: version 3 moving only its partitions."""
    topic = create_topic(any_client, topic_name, 12)
    group = "g"
    try:
        _live(any_client, topic_name, group, {"a": True, "b": True, "c": True})
        first = settle_target(any_client, topic, group)
        assert first.version == 1 and first.members == ("a", "b", "c")
        assert sorted(len(first.partitions_of(m)) for m in "abc") == [4, 4, 4]
        assert settle_target(any_client, topic, group) == first
        _live(any_client, topic_name, group, {"d": True})
        second = settle_target(any_client, topic, group)
        assert second.version == 2 and second.members == ("a", "b", "c", "d")
        assert set(moves(first.assignment, second.assignment)) == set(second.partitions_of("d"))
        assert len(second.partitions_of("d")) == 3
        _live(any_client, topic_name, group, {"b": False})
        third = settle_target(any_client, topic, group)
        assert third.version == 3 and third.members == ("a", "c", "d")
        assert set(moves(second.assignment, third.assignment)) == \
            set(second.partitions_of("b"))
        assert read_target(any_client, topic, group).stored == third
    finally:
        any_client.delete(*TopicGroupKeys(topic_name, group).all())


def test_racing_members_store_one_target(any_client: AnyClient, topic_name: str) -> None:
    """Eight members settling the target at once after a change: one stores it (the version
    moves by one) and all of them return that same target."""
    topic = create_topic(any_client, topic_name, 16)
    group = "g"
    try:
        _live(any_client, topic_name, group, {f"m{n}": True for n in range(4)})
        before = settle_target(any_client, topic, group)
        _live(any_client, topic_name, group, {"m4": True})
        results: list[Target] = []
        barrier = threading.Barrier(8)

        def settle() -> None:
            barrier.wait()
            results.append(settle_target(any_client, topic, group))

        threads = [threading.Thread(target=settle) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(results) == 8 and len(set(map(repr, results))) == 1
        assert results[0].version == before.version + 1
    finally:
        any_client.delete(*TopicGroupKeys(topic_name, group).all())
