"""The embedded cluster the topic tests run on (``ClusterServers``), and connecting to a cluster."""

from __future__ import annotations

import os
import time

import pytest
import redis

from orderedstream._server import (
    clone_client,
    connect_check,
    connect_url,
    describe_url,
    node_client,
    resp3_connection,
)
from orderedstream.exceptions import ConnectionFailed
from orderedstream.testing import ClusterServers, free_port, wait_until


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_cluster_comes_up_fast_with_three_shards() -> None:
    """A fresh 3 + 3 cluster is serving (state ok on every node, replicas in sync, every slot
    covered by one of three primaries) within a few seconds, and every process is gone after
    the context manager ends."""
    started = time.monotonic()
    with ClusterServers() as servers:
        took = time.monotonic() - started
        nodes = servers.nodes
        primaries = [n for n in nodes if n.role == "primary"]
        replicas = [n for n in nodes if n.role == "replica"]
        assert len(primaries) == 3 and len(replicas) == 3
        assert sum(hi - lo + 1 for p in primaries for lo, hi in p.slots) == 16384
        assert {r.primary_id for r in replicas} == {p.node_id for p in primaries}
        client = servers.client()
        try:
            for n in range(30):  # keys on every shard
                client.set(f"k{n}", n)
            assert int(client.get("k7")) == 7  # type: ignore[arg-type]
        finally:
            client.close()
        pids = [s.proc.pid for s in servers.servers if s.proc is not None]
        assert len(pids) == 6
    assert took < 15, f"cluster took {took:.1f}s to come up"
    wait_until(lambda: not any(_alive(pid) for pid in pids), 5, message="every node gone")


def test_killed_primary_is_replaced_by_its_replica(own_cluster: ClusterServers) -> None:
    """SIGKILL of a primary: its replica is promoted (takes over its slots) within the node
    timeout plus the election, the data written before is there, the other shards keep
    serving, and the killed node restarted rejoins as a replica of its replacement."""
    client = own_cluster.client()
    try:
        client.set("before", "1")
        victim = own_cluster.primary_for("before")
        (replica,) = own_cluster.replicas_of(victim)
        on_replica = own_cluster.server(replica).client()
        on_replica.execute_command("READONLY")  # type: ignore[no-untyped-call]
        wait_until(lambda: on_replica.get("before") == b"1", 5, message="write replicated")
        on_replica.close()
        other_key = next(f"o{n}" for n in range(100)
                         if own_cluster.primary_for(f"o{n}").port != victim.port)
        started = time.monotonic()
        own_cluster.kill(victim)
        client.set(other_key, "still")  # another shard serves meanwhile
        new = own_cluster.wait_failover(victim)
        failover_s = time.monotonic() - started
        assert new.port == replica.port and new.role == "primary"
        assert new.slots == victim.slots
        assert own_cluster.node(victim.port).role == "down"

        def read_before() -> bytes | None:
            try:
                return client.get("before")  # type: ignore[return-value]
            except (redis.ConnectionError, redis.ClusterDownError, redis.TimeoutError):
                return None

        assert wait_until(read_before, 10, 0.05, "the key readable on the new primary") == b"1"
        own_cluster.restart(victim)
        own_cluster.wait_healthy()
        back = own_cluster.node(victim.port)
        assert back.role == "replica" and back.primary_id == new.node_id
        assert failover_s < 10, f"failover took {failover_s:.1f}s"
    finally:
        client.close()


def test_session_cluster_fixture_serves(cluster: ClusterServers) -> None:
    """The session-wide ``cluster`` fixture is a healthy 3 + 3 cluster reachable at ``url``."""
    client = redis.RedisCluster.from_url(cluster.url)
    try:
        assert len(client.get_primaries()) == 3
        assert client.ping()
    finally:
        client.close()


def test_promote_switches_roles() -> None:
    """``promote`` (CLUSTER FAILOVER on a replica) makes that replica the primary of its
    shard and its old primary a replica of it, without a kill."""
    with ClusterServers() as servers:
        primary = servers.primaries_now()[0]
        (replica,) = servers.replicas_of(primary)
        promoted = servers.promote(replica)
        assert promoted.slots == primary.slots
        servers.wait_healthy()
        assert wait_until(lambda: servers.node(primary.port).role == "replica", 5)


def test_connect_url_detects_cluster_mode(cluster: ClusterServers, server: object) -> None:
    """``connect_url`` gives a ``RedisCluster`` for the URL of any cluster node (a replica's
    too) and the plain client for a single server; ``node_client`` is a plain client to the
    primary serving a key's slot (the client itself on a single server)."""
    for node in cluster.nodes:
        client = connect_url(f"redis://127.0.0.1:{node.port}/0")
        try:
            assert isinstance(client, redis.RedisCluster)
            for key in ("a", "b", "orders", "{x}y"):
                plain = node_client(client, key)
                assert isinstance(plain, redis.Redis)
                assert plain.connection_pool.connection_kwargs["port"] == \
                    cluster.primary_for(key).port
                plain.set(key, "1")  # no MOVED: it is the slot's primary
            own = clone_client(node_client(client, "a"), name="os:test", single=True)
            try:  # a clone of a node's client: named, on that node, not tied to the cluster
                assert own.client_getname() == "os:test"
                assert own.connection_pool.connection_kwargs["port"] == \
                    cluster.primary_for("a").port
                assert "redis_connect_func" not in own.connection_pool.connection_kwargs
            finally:
                own.close()
            assert connect_check(client).name in ("valkey", "redis")
            assert describe_url(client).endswith("(cluster)")
        finally:
            client.close()
    single = connect_url(server.url)  # type: ignore[attr-defined]
    try:
        assert type(single) is redis.Redis
        assert node_client(single, "a") is single
    finally:
        single.close()


def test_our_node_connections_do_not_look_up_the_library_version(
        cluster: ClusterServers, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections we open to a cluster's nodes (a member opens a dozen as it joins) carry
    redis-py's client description made once: redis-py >= 8 would otherwise search the installed
    packages' metadata for its own version at every connection a node's client opens."""
    pytest.importorskip("redis.driver_info")
    import redis.utils

    client = connect_url(cluster.url)
    calls: list[int] = []
    real = redis.utils.get_lib_version
    monkeypatch.setattr(redis.utils, "get_lib_version", lambda: calls.append(1) or real())
    try:
        own = clone_client(node_client(client, "a"), name="os:test", single=True)
        push = resp3_connection(node_client(client, "a"), "os:test:push")
        try:
            assert own.client_getname() == "os:test"
            assert calls == []
        finally:
            own.close()
            push.disconnect()
    finally:
        client.close()


def test_connect_url_refuses_in_one_line_when_nothing_listens() -> None:
    """A cluster URL that nobody answers is refused like a single server's: ConnectionFailed
    saying what to check."""
    with pytest.raises(ConnectionFailed, match="cannot reach a Redis server"):
        connect_url(f"redis://127.0.0.1:{free_port()}")


def test_cli_server_cluster_runs_until_ctrl_c() -> None:
    """`orderedstream server --cluster` prints a URL where a 3 + 3 cluster answers; Ctrl+C
    (SIGINT to its process group) stops it with exit 0 and no node left running."""
    import signal
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "orderedstream", "server", "--cluster"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    pids: list[int] = []
    try:
        assert proc.stdout is not None
        url = None
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            if "ready at" in line:
                url = line.split("ready at ")[1].split()[0]
        assert url is not None and url.startswith("redis://127.0.0.1:"), \
            proc.stderr.read() if proc.stderr else ""
        client = connect_url(url)
        try:
            assert isinstance(client, redis.RedisCluster)
            assert len(client.get_primaries()) == 3
            nodes = client.get_redis_connection(client.get_default_node()).execute_command(
                "CLUSTER", "NODES").decode()  # Redis 7.0 lists a replica in CLUSTER SLOTS
            assert nodes.count("slave") == 3, nodes  # only once it replicated something
            for line in nodes.splitlines():
                port = int(line.split()[1].split("@")[0].rsplit(":", 1)[1])
                node = redis.Redis(port=port)
                pids.append(int(node.info("server")["process_id"]))  # type: ignore[index]
                node.close()
        finally:
            client.close()
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wait_until(lambda: not any(_alive(pid) for pid in pids), 5, message="every node gone")
    assert len(pids) == 6


def test_cli_server_cluster_refuses_single_server_options() -> None:
    """--cluster with --port / --dir / --appendonly: one line, exit 2."""
    from .test_cli import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("server", "--cluster", "--port", "7000"),
                          r"--cluster .* leave out --port")


def test_cluster_with_a_password() -> None:
    """On a cluster that requires a password: a wrong one is refused in one line like on a
    single server; the right one in the URL of any node reaches every shard, and so do the
    clients orderedstream makes from it (a topic producer's own cluster client)."""
    from orderedstream._keys import TopicKeys
    from orderedstream._topic import TopicProducer, create_topic, load_topic

    with ClusterServers(password="s3cret-Pa55") as servers:
        port = servers.nodes[4].port
        with pytest.raises(ConnectionFailed, match="refused the credentials"):
            connect_url(f"redis://:wrong@127.0.0.1:{port}")
        with pytest.raises(ConnectionFailed, match=r"refused the credentials|NOAUTH"):
            connect_url(f"redis://127.0.0.1:{port}")
        client = connect_url(f"redis://:s3cret-Pa55@127.0.0.1:{port}")
        try:
            assert isinstance(client, redis.RedisCluster)
            create_topic(client, "paid", 6)
            producer = TopicProducer(client, "paid")
            producer.send_many([(f"k{n}", {"n": n}) for n in range(60)])
            producer.close()
            topic = load_topic(client, "paid")
            assert sum(client.xlen(s) for s in topic.streams) == 60
            assert len({servers.primary_for(s).port for s in topic.streams}) == 3
            client.delete(TopicKeys("paid").meta)
        finally:
            client.close()


def test_move_slot_reshards_and_clients_follow(own_cluster: ClusterServers) -> None:
    """``move_slot`` moves a slot with its keys to another primary; a cluster client follows
    (MOVED) and ``node_client`` then names the new primary."""
    from redis.crc import key_slot

    client = connect_url(own_cluster.url)
    try:
        assert isinstance(client, redis.RedisCluster)
        stream = "{moving}:s"
        for n in range(250):
            client.xadd(stream, {"n": n})
        before = own_cluster.primary_for(stream)
        dest = next(p for p in own_cluster.primaries_now() if p.port != before.port)
        own_cluster.move_slot(key_slot(stream.encode()), dest)
        assert own_cluster.primary_for(stream).port == dest.port
        assert client.xlen(stream) == 250  # followed the MOVED reply
        assert node_client(client, stream).connection_pool.connection_kwargs["port"] == dest.port
        assert own_cluster.server(dest).client().xlen(stream) == 250
    finally:
        client.close()
