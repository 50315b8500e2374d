"""The fixer of a partitioned topic (TopicFixer, `fix --topic`, `dlq --topic`) on a single server
and on a real 3+3 cluster: every partition's parked entries re-streamed once, on one connection
per node; a fixer process killed mid-pass loses and doubles nothing; hold-key mode keeps each
key's order through a repair.  Judged from what the streams and the handler hold."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orderedstream import (
    DeadLetters,
    Defer,
    MemberConfig,
    Message,
    ParkedEntry,
    RetryPolicy,
    TopicFixer,
    TopicFixerConfig,
    TopicMember,
    TopicProducer,
    connect_url,
    create_topic,
)
from orderedstream._demo import demo_payload, demo_repair, is_corrupt
from orderedstream._keys import GroupKeys, TopicKeys
from orderedstream._server import AnyClient, NodeMap, node_client
from orderedstream._topic import Topic
from orderedstream.testing import ServerProcess, park_directly, wait_until


@pytest.fixture
def topic_of() -> Iterator[Any]:
    """``topic_of(url, P)`` creates a topic with a fresh name on the server or cluster at
    ``url``; its keys (group 'g') are deleted afterwards."""
    made: list[tuple[AnyClient, Topic]] = []

    def make(url: str, partitions: int) -> Topic:
        client = connect_url(url)
        made.append((client, create_topic(client, f"tf-{uuid.uuid4().hex[:8]}", partitions)))
        return made[-1][1]
    yield make
    for client, topic in made:
        client.delete(TopicKeys(topic.name).meta)
        for stream in topic.streams:
            client.delete(stream, *GroupKeys(stream, "g").all())
        client.close()


def park_in_every_partition(client: AnyClient, topic: Topic, per: int) -> dict[str, list[str]]:
    """``per`` corrupted demo entries written to each partition and parked (due now) as the
    defer script parks them; stream -> their ids."""
    parked = {}
    for index, stream in enumerate(topic.streams):
        node = node_client(client, stream)
        node.xgroup_create(stream, "g", id="$", mkstream=True)
        rows = [demo_payload(index * 1000 + n, True) for n in range(1, per + 1)]
        ids = [node.xadd(stream, row).decode() for row in rows]  # type: ignore[arg-type, union-attr]
        park_directly(node, GroupKeys(stream, "g"), (
            ParkedEntry(id=i, origin_id=i, group="g", reason="test",
                        raw={k.encode(): v.encode() for k, v in row.items()})
            for i, row in zip(ids, rows, strict=True)))
        parked[stream] = ids
    return parked


def settled(client: AnyClient, topic: Topic) -> bool:
    """Nothing parked, nothing held behind, on any partition."""
    return all(not d.counts().parked and not d.counts().followers
               for d in DeadLetters.of_topic(client, topic.streams, "g"))


def restreamed(client: AnyClient, stream: str) -> tuple[Counter[str], list[str]]:
    """Origin ids re-streamed to ``stream`` (with their count) and the copies' payloads."""
    origins: Counter[str] = Counter()
    payloads = []
    for _, fields in node_client(client, stream).xrange(stream):
        if b"os-origin-id" in fields:
            origins[fields[b"os-origin-id"].decode()] += 1
            payloads.append(fields[b"payload"].decode())
    return origins, payloads


def fixer_connections(client: AnyClient, name: str) -> list[int]:
    """Per primary (or the one server): connections named after fixer ``name``."""
    nodes = ([client.get_redis_connection(n) for n in client.get_primaries()]
             if hasattr(client, "get_primaries") else [client])
    return [sum(1 for c in node.client_list() if c["name"] == f"os-fix:{name}")
            for node in nodes]


def test_every_partition_is_fixed_once_on_one_connection_per_node(
        any_url: str, any_client: AnyClient, topic_of: Any) -> None:
    """A TopicFixer re-streams the parked entries of every partition exactly once, repaired,
    from one thread on one command connection per node (the cluster's three primaries, or
    the one server), whatever the number of partitions."""
    topic = topic_of(any_url, 6)
    parked = park_in_every_partition(any_client, topic, 5)
    name = f"tf-{uuid.uuid4().hex[:6]}"
    config = TopicFixerConfig(topic=topic.name, group="g", name=name)
    with TopicFixer(config, demo_repair, any_client) as fixer:
        wait_until(lambda: settled(any_client, topic), 15, message="every partition fixed")
        connections = fixer_connections(any_client, name)
        assert fixer.totals["restreamed"] == 30 and fixer.totals["lost"] == 0
    serving = {NodeMap(any_client).node_name(stream) for stream in topic.streams}
    assert all(n <= 1 for n in connections) and sum(connections) == len(serving), connections
    for stream, ids in parked.items():
        origins, payloads = restreamed(any_client, stream)
        assert set(origins) == set(ids) and max(origins.values()) == 1, stream
        assert not any(is_corrupt(p) for p in payloads)


def _fix(url: str, topic: str, name: str, log: Path, *extra: str,
         env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - closed by the OS when the child exits
    return subprocess.Popen(
        [sys.executable, "-m", "orderedstream", "fix", "--redis-url", url, "--topic", topic,
         "--group", "g", "--name", name, "--visibility-ms", "1000", "--quiet", *extra],
        env=dict(os.environ, **(env or {})), stdout=out, stderr=out)


def test_fixer_process_killed_mid_pass_on_a_cluster_loses_nothing(
        cluster: Any, topic_of: Any, tmp_path: Path,
        procs: list[subprocess.Popen[bytes]]) -> None:
    """`fix --topic` on the cluster, SIGKILLed while it holds claimed entries (inside its slow
    repair); a second one gets them once the visibility lease (1 s) runs out: every parked
    entry of every partition re-streamed exactly once."""
    client = connect_url(cluster.url)
    try:
        topic = topic_of(cluster.url, 4)
        parked = park_in_every_partition(client, topic, 8)
        letters = DeadLetters.of_topic(client, topic.streams, "g")
        slow = _fix(cluster.url, topic.name, "f1", tmp_path / "f1.log", "--batch", "4",
                    "--repair", "orderedstream.testing:slow_repair",
                    env={"ORDEREDSTREAM_REPAIR_MS": "150"})
        procs.append(slow)
        wait_until(lambda: sum(d.counts().claimed for d in letters) > 0, 15,
                   message="f1 claimed a batch")
        slow.send_signal(signal.SIGKILL)
        slow.wait(5)
        # the kill landed between a claim and its re-stream: entries held under f1's lease
        assert sum(d.counts().claimed for d in letters) > 0
        procs.append(_fix(cluster.url, topic.name, "f2", tmp_path / "f2.log"))
        wait_until(lambda: settled(client, topic), 20, message="all re-streamed")
        for stream, ids in parked.items():
            origins, _ = restreamed(client, stream)
            assert set(origins) == set(ids) and max(origins.values()) == 1, stream
    finally:
        client.close()


def test_hold_key_order_across_partitions_through_repairs(server: ServerProcess,
                                                          topic_of: Any) -> None:
    """A member in hold-key mode parks a key's later entries behind its corrupted one; the
    TopicFixer repairs it and releases them behind it: every key's entries are handled in
    the order they were sent, each once, the repaired ones among them, on every partition."""
    client = connect_url(server.url)
    topic = topic_of(server.url, 4)
    seen: list[tuple[str, int, bool]] = []
    held: list[str] = []  # followers: parked behind a corrupted entry, released after it
    lock = threading.Lock()

    def handle(message: Message) -> None:
        fields = message.fields
        if is_corrupt(fields["payload"]):
            raise Defer("corrupted payload", delay_ms=0)
        with lock:
            seen.append((fields["key"], int(fields["kseq"]), message.repaired))
            if message.origin_id != message.id and not message.repaired:
                held.append(message.origin_id)

    keys, total = 8, 160
    member = TopicMember(MemberConfig(topic=topic.name, group="g", name="m1",
                                      hold_key_field="key",
                                      retry=RetryPolicy(min_park_delay_ms=50)),
                         handle, client)
    fixer = TopicFixer(TopicFixerConfig(topic=topic.name, group="g", max_wait_ms=100),
                       demo_repair, client)
    producer = TopicProducer(client, topic)
    try:
        member.start()
        fixer.start()
        wait_until(lambda: len(member.owned) == 4, 10, message="the member owns all four")
        batch = []
        for seq in range(1, total + 1):
            fields = demo_payload(seq, seq % 9 == 0)
            key = f"k{(seq - 1) % keys}"
            fields.update(key=key, kseq=str((seq - 1) // keys + 1))
            batch.append((key, fields))
        producer.send_many(batch)
        wait_until(lambda: len(seen) >= total, 20, message="every entry handled")
        wait_until(lambda: settled(client, topic), 5, message="nothing left parked")
    finally:
        producer.close()
        fixer.stop()
        member.stop()
        client.close()
    assert len(seen) == total
    for key in {k for k, _, _ in seen}:
        kseqs = [n for k, n, _ in seen if k == key]
        assert kseqs == list(range(1, total // keys + 1)), (key, kseqs)
    assert sum(1 for _, _, repaired in seen if repaired) == total // 9
    assert held  # the order was kept by holding later entries, not by luck


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orderedstream", *args], capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, COLUMNS="200"))


def test_dlq_over_a_topic(server: ServerProcess, topic_of: Any) -> None:
    """`dlq list --topic` counts and lists every partition's parked entries (with their
    partition); `show` finds an id in every partition that has it (partitions written in the
    same millisecond hand out the same ids), `--partition` picks one; acting on an id found in
    two partitions is refused without --partition."""
    client = connect_url(server.url)
    try:
        topic = topic_of(server.url, 3)
        parked = park_in_every_partition(client, topic, 2)
        for d in DeadLetters.of_topic(client, topic.streams, "g"):  # not due for a while
            client.zadd(d.keys.delay, {i: 10**13 for i in parked[d.stream]})
        where = ("--redis-url", server.url, "--topic", topic.name, "--group", "g")
        listed = json.loads(_cli("dlq", "list", *where, "--json").stdout)
        assert listed["counts"]["parked"] == 6
        assert [p["parked"] for p in listed["partitions"]] == [2, 2, 2]
        assert sorted((e["partition"], e["id"]) for e in listed["entries"]) == sorted(
            (i, entry_id) for i, s in enumerate(topic.streams) for entry_id in parked[s])
        table = _cli("dlq", "list", *where).stdout
        assert "6 scheduled" in table and parked[topic.streams[2]][0] in table
        one = parked[topic.streams[1]][0]
        shown = json.loads(_cli("dlq", "show", *where, one).stdout)
        assert 1 in {e["partition"] for e in shown}, shown  # (and any other that has the id)
        shown = json.loads(_cli("dlq", "show", *where, "--partition", "1", one).stdout)
        assert [(e["partition"], e["id"]) for e in shown] == [(1, one)]
        retried = _cli("dlq", "retry", *where, "--partition", "1", one)
        assert retried.returncode == 0 and "1 parked entry due now" in retried.stdout
        wanted = {one}
        for d in DeadLetters.of_topic(client, topic.streams, "g"):
            due = {i.id for i in d.entries() if i.due_in_ms is not None and i.due_in_ms <= 0}
            assert due == (wanted if d.stream == topic.streams[1] else set())
        # the same id parked in two partitions: which one is meant must be said
        twice = topic.streams[0]
        client.hset(GroupKeys(twice, "g").parked, one, client.hget(  # type: ignore[arg-type]
            GroupKeys(topic.streams[1], "g").parked, one))
        client.zadd(GroupKeys(twice, "g").delay, {one: 10**13})
        refused = _cli("dlq", "purge", *where, one)
        assert refused.returncode == 2 and "--partition" in refused.stderr, refused.stderr
        purged = _cli("dlq", "purge", *where, "--partition", "0", one)
        assert purged.returncode == 0 and "1 parked entry purged" in purged.stdout
        assert _cli("dlq", "retry", *where, "--all").returncode == 0
    finally:
        client.close()
