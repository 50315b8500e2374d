"""`orderedstream status --topic`: what an operator sees of a topic's group, read from real
members on one server and on a real 3+3 cluster; the panel's fit in 80x24; its round trips."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis
from rich.console import Console

from orderedstream import Defer, Message
from orderedstream._config import LeaseConfig, MemberConfig
from orderedstream._keys import GroupKeys
from orderedstream._member import TopicMember
from orderedstream._server import connect_url
from orderedstream._status import MemberState, PartitionState, TopicStatus, topic_status
from orderedstream._topic import TopicProducer, create_topic
from orderedstream.cli.topic_status import render_topic_status
from orderedstream.testing import ClusterServers, ServerProcess, wait_until


def _status_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orderedstream", "status", "--redis-url", url,
                           *args], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, COLUMNS="200"))


def _handler(message: Message) -> None:
    if message.fields.get("payload") == "bad":
        raise Defer("a bad payload", delay_ms=3_600_000)


def _exercise(url: str, partitions: int, members: int) -> tuple[dict[str, Any], Any]:
    """Members own every partition, one bad entry is parked, the members stop, entries arrive
    with nobody to handle them: the JSON of `status --topic` at both moments, checked."""
    client = connect_url(url)
    name = f"st{uuid.uuid4().hex[:6]}"
    topic = create_topic(client, name, partitions)
    names = [f"m{n}" for n in range(members)]
    running = [TopicMember(MemberConfig(topic=name, group="g", name=n,
                                        lease=LeaseConfig(ttl_ms=3000)), _handler, client)
               for n in names]
    producer = TopicProducer(client, name)
    try:
        for member in running:
            member.start()

        def settled() -> bool:
            status = topic_status(client, topic, "g")
            counts = Counter(p.owner for p in status.partitions)
            return (None not in counts and set(counts) == set(names)
                    and max(counts.values()) - min(counts.values()) <= 1)

        wait_until(settled, 30, 0.05, "every partition owned, balanced")
        producer.send({"payload": "bad"}, key="bad-key")
        bad = topic.partition_for("bad-key")
        wait_until(lambda: topic_status(client, topic, "g").partitions[bad].parked == 1, 10,
                   0.05, "the bad entry parked")
        out = _status_cli(url, "--topic", name, "--group", "g", "--json")
        assert out.returncode == 0, out.stderr
        live = json.loads(out.stdout)
        assert live["topic"] == name and live["partition_count"] == partitions
        assert live["owned"] == partitions and live["parked"] == 1
        for p in live["partitions"]:
            keys = GroupKeys(topic.streams[p["index"]], "g")
            token = client.get(keys.lease).decode()
            assert token.startswith(f"{p['owner']}:{p['epoch']}")  # from its lease
            assert p["owner_pid"] == os.getpid() and 0 < p["lease_remaining_ms"] <= 3000
            assert p["parked"] == (1 if p["index"] == bad else 0)
            assert p["lag"] == 0 and p["pending"] == 0
        by_member = {m["name"]: m for m in live["members"]}
        assert set(by_member) == set(names)
        for n in names:
            assert by_member[n]["live"] and 0 < by_member[n]["expires_in_ms"] <= 3000
            assert by_member[n]["owned"] == by_member[n]["target"]  # settled
            assert by_member[n]["owned"] == [p["index"] for p in live["partitions"]
                                             if p["owner"] == n]
        assert live["target_version"] >= 1 and sorted(live["target_members"]) == names
        kinds = [(e["type"], e["member"]) for e in live["timeline"]]
        assert {("joined", n) for n in names} <= set(kinds), kinds
        assert any(t == "acquired" for t, _ in kinds)
        stamps = [e["ts_ms"] for e in live["timeline"]]
        assert stamps == sorted(stamps)  # newest last
    finally:
        for member in running:
            member.stop(15)
    # nobody serves: entries wait, counted per partition
    sent = Counter()
    for n in range(40):
        producer.send({"n": str(n)}, key=f"k{n}")
        sent[topic.partition_for(f"k{n}")] += 1
    producer.close()
    out = _status_cli(url, "--topic", name, "--group", "g", "--json")
    assert out.returncode == 0, out.stderr
    idle = json.loads(out.stdout)
    assert idle["owned"] == 0 and all(p["owner"] is None for p in idle["partitions"])
    assert [p["lag"] for p in idle["partitions"]] == [sent[i] for i in range(partitions)]
    assert idle["lag"] == 40
    assert not any(m["live"] for m in idle["members"])  # they left
    assert {("left", n) for n in names} <= {(e["type"], e["member"])
                                             for e in idle["timeline"]}
    return live, client


def test_status_topic_on_one_server(server: ServerProcess) -> None:
    """On one server: `status --topic --json` shows an owner per partition (the holder of its
    lease, with its epoch and pid), each member's partitions equal to its stored target once
    settled, the parked count of the partition with a deferred entry, the timeline (joins,
    acquisitions; newest last), and once the members left, the lag of each partition equal to
    the entries sent to it; no node names."""
    live, client = _exercise(server.url, partitions=4, members=2)
    assert not live["cluster"] and all(p["node"] == "" for p in live["partitions"])
    client.close()


def test_status_topic_on_a_cluster(cluster: ClusterServers) -> None:
    """On a 3+3 cluster: the same, and each partition's node is the primary serving its slot."""
    live, client = _exercise(cluster.url, partitions=6, members=3)
    assert live["cluster"]
    for p in live["partitions"]:
        primary = cluster.primary_for(p["stream"])
        assert p["node"] == f"{primary.host}:{primary.port}"
    assert len({p["node"] for p in live["partitions"]}) == 3  # spread over the shards
    client.close()


def test_status_topic_missing_topic_is_one_line(server: ServerProcess) -> None:
    """A topic that does not exist: exit 2, one line saying how to create it."""
    out = _status_cli(server.url, "--topic", "no-such-topic", "--group", "g")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0, out.stderr
    assert "orderedstream topic create no-such-topic --partitions" in out.stderr


def test_status_topic_reads_256_partitions_in_few_round_trips(
        cluster: ClusterServers, monkeypatch: pytest.MonkeyPatch) -> None:
    """256 partitions on 3 primaries: one status read sends a handful of packets (the clock,
    then one pipeline per node), not one per partition (``--watch`` refreshes every 0.5 s)."""
    client = connect_url(cluster.url)
    topic = create_topic(client, f"big{uuid.uuid4().hex[:6]}", 256)
    topic_status(client, topic, "g")  # connections open, slot map known
    sends = []
    original = redis.connection.AbstractConnection.send_packed_command

    def counted(self: Any, command: Any, check_health: bool = True) -> None:
        sends.append(1)
        original(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counted)
    status = topic_status(client, topic, "g")
    monkeypatch.undo()
    assert len(status.partitions) == 256
    assert len(sends) <= 1 + 3 + 1, len(sends)  # TIME, one pipeline per node (+1 spare)
    client.close()


def _fits(panel: Any, width: int = 80, height: int = 24) -> list[str]:
    console = Console(width=width, height=height, record=True, force_terminal=True,
                      color_system=None)
    console.print(panel)
    lines = console.export_text().rstrip("\n").split("\n")
    assert len(lines) <= height - 1, "\n".join(lines)
    assert all(len(line) <= width for line in lines)
    return lines


def test_status_topic_panel_fits_80x24(cluster: ClusterServers) -> None:
    """8 partitions and 4 members on the cluster, the live panel (``--watch``'s, drawn for
    80x24): every partition and member row and some timeline rows fit, lines cut not wrapped."""
    client = connect_url(cluster.url)
    name = f"fit{uuid.uuid4().hex[:6]}"
    topic = create_topic(client, name, 8)
    running = [TopicMember(MemberConfig(topic=name, group="g", name=f"member-{n}"),
                           _handler, client) for n in range(4)]
    try:
        for member in running:
            member.start()
        wait_until(lambda: topic_status(client, topic, "g").owned == 8
                   and len({p.owner for p in topic_status(client, topic, "g").partitions})
                   == 4, 30, 0.05, "8 partitions owned by 4 members")
        status = topic_status(client, topic, "g")
    finally:
        for member in running:
            member.stop(15)
    text = "\n".join(_fits(render_topic_status(status, rate=1234.0, height=23)))
    for p in status.partitions:
        assert f"  {p.owner}  " in text.split("\n")[3 + p.index], text
    for n in range(4):
        assert f"member-{n} " in text
    assert len(re.findall(r"^│ \d\d:\d\d:\d\d\.\d{3} ", text, re.M)) >= 4, text  # timeline
    client.close()


def test_status_topic_compact_form_for_many_partitions() -> None:
    """With more partitions than rows (256 in 80x24), the panel shows the partitions that need
    a look first (no owner, then the most entries waiting) and sums up the rest in one line."""
    parts = tuple(PartitionState(
        index=i, stream=f"{{t:p{i}}}", node="127.0.0.1:7000", owner=None if i == 200 else "m1",
        epoch=None if i == 200 else 1000 + i, lease_remaining_ms=None if i == 200 else 900,
        owner_pid=None, owner_since_ms=None, length=10, entries_read=10,
        lag=50 if i == 17 else 0, pending=0, parked=0, graveyard=0) for i in range(256))
    status = TopicStatus(topic="t", group="g", cluster=True, server_ms=0, target_version=3,
                         target_members=("m1",), partitions=parts,
                         members=(MemberState(name="m1", live=True, expires_in_ms=800,
                                              owned=tuple(range(256)), target=tuple(range(256))),),
                         timeline=())
    text = "\n".join(_fits(render_topic_status(status, height=23)))
    assert "255/256 owned" in text
    assert "nobody" in text  # partition 200, shown first
    assert " 17 " in text and " 50 " in text  # the one with lag next
    assert "more partitions (owned" in text


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_status_topic_watch_in_a_terminal(server: ServerProcess, tmp_path: Path) -> None:
    """`status --topic --watch` in a real 80x24 terminal (tmux): before the topic exists it
    says so and waits; once created and a member runs, the panel shows that member owning
    every partition, and its join in the timeline; Ctrl+C ends it."""
    name = f"w{uuid.uuid4().hex[:6]}"
    session = f"ostopic{os.getpid()}"
    cmd = (f"{sys.executable} -m orderedstream status --redis-url {server.url} --topic {name} "
           f"--group g --watch --interval 0.2; sleep 30")
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "80", "-y", "24", cmd],
                   check=True, env=dict(os.environ, TERM="xterm-256color"))
    screens: list[str] = []

    def screen() -> str:
        screens.append(subprocess.run(["tmux", "capture-pane", "-p", "-t", session],
                                      capture_output=True, text=True).stdout)
        return screens[-1]

    client = connect_url(server.url)
    member = None
    try:
        wait_until(lambda: "does not exist" in " ".join(screen().split()), 30, 0.1,
                   message="the missing topic on screen")
        create_topic(client, name, 3)
        member = TopicMember(MemberConfig(topic=name, group="g", name="solo"), _handler,
                             client)
        member.start()
        wait_until(lambda: "3/3 owned" in screen() and screens[-1].count(" solo ") >= 4, 30,
                   0.1, message="the panel: solo owns the 3 partitions")
        assert re.search(r"joined\s+solo", screens[-1]), screens[-1]
        assert all(len(line) <= 80 for line in screens[-1].splitlines())
        subprocess.run(["tmux", "send-keys", "-t", session, "C-c"], check=True)
        wait_until(lambda: "stopping" in screen(), 10, 0.1, message="Ctrl+C ends it")
    finally:
        (tmp_path / "screen.txt").write_text(screens[-1] if screens else "")
        subprocess.run(["tmux", "kill-session", "-t", session], check=False)
        if member is not None:
            member.stop(15)
        client.close()
