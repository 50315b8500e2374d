"""Topic members in one process: balance, graceful handoff under load, a member whose connection
is gone, and the connections a member holds, on a single server and on a real 3+3 cluster."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from orderedstream._assign import assign
from orderedstream._config import LeaseConfig, MemberConfig
from orderedstream._engine import Pause
from orderedstream._events import ServerUnavailable
from orderedstream._keys import GroupKeys, TopicGroupKeys
from orderedstream._member import TopicMember
from orderedstream._mux import Lane, Mux
from orderedstream._scripts import EVENTS_MAXLEN, Scripts
from orderedstream._server import NodeMap
from orderedstream._topic import create_topic
from orderedstream.testing import (
    ClusterServers,
    ServerProcess,
    newest_terms,
    topic_verdict,
    wait_until,
)


class Topic:
    """A topic laid out by hand (P streams in different slots), a keyed producer thread and the
    handlers' shared record."""

    def __init__(self, client: Any, partitions: int, keys: int = 24) -> None:
        self.name = f"t{uuid.uuid4().hex[:6]}"
        self.topic = create_topic(client, self.name, partitions)
        self.streams = self.topic.streams
        self.client = client
        self.nodes = NodeMap(client)
        self.replicated = self.nodes.cluster
        self._clients: dict[str, redis.Redis] = {}
        self.keys = keys
        self.seq = 0
        self.kseq = [0] * keys
        self.records: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def produce(self, count: int) -> None:
        for _ in range(count):
            self.seq += 1
            k = self.seq % self.keys
            self.kseq[k] += 1
            self._send(self.topic.stream_for(f"k{k}"),
                       {"seq": self.seq, "key": f"k{k}", "kseq": self.kseq[k]})

    def _send(self, stream: str, fields: dict[str, Any]) -> None:
        """XADD, then WAIT for a replica where there is one (so a failover loses no entry the
        producer went on from); a send whose reply was lost is sent again only if the stream
        does not hold it (one producer: it would be the stream's last entry)."""
        while True:
            try:
                client = self._clients.get(stream)
                if client is None:
                    client = self.nodes.node_for(stream, "producer", single=True)[1]
                    self._clients[stream] = client
                try:
                    client.xadd(stream, fields)
                    if self.replicated:
                        client.execute_command("WAIT", 1, 200)
                    return
                except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                    while True:  # what does the stream hold, once its shard answers again?
                        time.sleep(0.1)
                        self.nodes.refresh()
                        try:
                            _, check = self.nodes.node_for(stream, "producer", single=True)
                            last = check.xrevrange(stream, count=1)
                            check.close()
                            break
                        except (redis.ConnectionError, redis.TimeoutError,
                                redis.ResponseError):
                            continue
                    client.close()
                    del self._clients[stream]
                    if last and int(last[0][1][b"seq"]) == fields["seq"]:
                        return
            except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                time.sleep(0.1)
                self.nodes.refresh()

    def produce_steadily(self, rate: float) -> None:
        def loop() -> None:
            while not self._stop.wait(1.0 / rate):
                self.produce(1)
        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()

    def stop_producing(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def handler(self, who: str) -> Callable[[Any], None]:
        def handle(message: Any) -> None:
            fields = message.fields
            with self.lock:
                self.records.append({
                    "seq": int(fields["seq"]), "key": fields["key"],
                    "kseq": int(fields["kseq"]), "red": message.redelivered,
                    "p": message.partition, "epoch": message.epoch, "pid": who,
                    "t": time.time()})
        return handle

    def partitions_handled_since(self, t: float) -> set[int]:
        with self.lock:
            return {r["p"] for r in self.records if r["t"] > t}

    def handled(self) -> set[int]:
        with self.lock:
            return {r["seq"] for r in self.records}

    def all_handled(self, timeout: float = 20.0) -> None:
        wait_until(lambda: len(self.handled()) >= self.seq, timeout)

    def member(self, client: Any, name: str, ttl_ms: int = 1000) -> TopicMember:
        config = MemberConfig(topic=self.name, group="g", name=name,
                              lease=LeaseConfig(ttl_ms=ttl_ms), batch_size=20)
        return TopicMember(config, self.handler(name), client)


@pytest.fixture
def single() -> Iterator[ServerProcess]:
    with ServerProcess() as server:
        yield server


def _settled(members: list[TopicMember], partitions: int) -> bool:
    counts = [len(m.owned) for m in members]
    return sum(counts) == partitions and max(counts) - min(counts) <= 1


def test_members_starting_together_never_end_a_live_members_term(single: ServerProcess) -> None:
    """Members started at once race for the partitions while their targets catch up with each
    other's joins: a term held by a member that joined after a target was derived is handed
    over, never ended as if its holder were gone (its handled, unacknowledged entries would
    come again), so nothing is handled twice."""
    topic = Topic(single.client(), partitions=16)
    topic.produce_steadily(rate=400)
    members = [topic.member(single.client(), f"s{i}", ttl_ms=3000) for i in range(4)]
    try:
        for member in members:
            member.start()
        wait_until(lambda: _settled(members, 16), 15)
        mark = topic.seq
        wait_until(lambda: topic.seq > mark + 100, 10)
        topic.stop_producing()
        topic.all_handled()
    finally:
        topic.stop_producing()
        for member in members:
            member.stop()
    client = single.client()
    gone = [(p, f) for p, stream in enumerate(topic.streams)
            for _, f in client.xrange(GroupKeys(stream, "g").events)
            if f.get(b"type") == b"ended"]
    assert not gone, [(p, f.get(b"consumer"), f.get(b"by"), f.get(b"reason")) for p, f in gone]
    result = topic_verdict(topic.records, topic.seq)
    assert result.ok and result.duplicates == 0, result.as_dict()


def test_members_balance_and_hand_over_under_load(single: ServerProcess) -> None:
    """Three members join one by one and leave again while a producer writes: ownership settles
    balanced (counts differ by at most 1) after every change, a graceful leave hands its
    partitions over, and the handlers' record shows nothing lost, per-key order kept, no
    unflagged duplicate and no term handed out twice."""
    topic = Topic(single.client(), partitions=12)
    topic.produce_steadily(rate=300)
    members = [topic.member(single.client(), f"m{i}") for i in range(3)]
    running: list[TopicMember] = []
    try:
        for member in members:
            member.start()
            running.append(member)
            wait_until(lambda: _settled(running, 12), 10)
            wait_until(lambda mark=topic.seq: topic.seq > mark + 60, 10)  # load on every layout
        moved_from = {p for p in members[0].owned}
        members[0].stop()
        running.remove(members[0])
        wait_until(lambda: _settled(running, 12), 10)
        mark = topic.seq
        wait_until(lambda: topic.seq > mark + 60, 10)
        assert moved_from <= set(members[1].owned) | set(members[2].owned)
        topic.stop_producing()
        topic.all_handled()
    finally:
        topic.stop_producing()
        for member in members:
            member.stop()
    result = topic_verdict(topic.records, topic.seq)
    assert result.ok, result.as_dict()
    assert result.handled >= topic.seq > 100


def test_a_member_connects_before_it_joins_and_announces_a_handover_once(
        single: ServerProcess) -> None:
    """A member opens its driver's connections before it joins (opening them while it takes
    its partitions would spend that CPU inside the rebalance): one that owns nothing yet holds
    them already.  Partitions handed over in one round of the driver are announced by one
    ``released`` record naming them all (each record wakes every member of the group)."""
    admin = single.client()
    topic = Topic(admin, partitions=1)
    a = topic.member(single.client(), "a")
    b = topic.member(single.client(), "b")
    try:
        a.start()
        wait_until(lambda: len(a.owned) == 1, 10)
        b.start()
        wait_until(lambda: b.members == ("a", "b") and a.members == ("a", "b"), 10)
        names = {c["name"] for c in admin.client_list()}
        assert not b.owned and {"os:b:wake", "os:b"} <= names, sorted(names)
    finally:
        a.stop()
        b.stop()

    many = Topic(admin, partitions=12)
    c = many.member(single.client(), "c")
    d = many.member(single.client(), "d")
    try:
        c.start()
        wait_until(lambda: len(c.owned) == 12, 10)  # idle: every lane asleep
        d.start()
        wait_until(lambda: _settled([c, d], 12), 10)
        moved = set(d.owned)
    finally:
        c.stop()
        d.stop()
    released = [f[b"partitions"].decode().split(",")
                for _, f in admin.xrange(TopicGroupKeys(many.name, "g").events)
                if f[b"type"] == b"released" and f[b"member"] == b"c"]
    assert {int(p) for names in released for p in names} >= moved
    assert len(moved) == 6 and len(released) < len(moved), released


def test_a_term_that_ends_on_an_error_is_asked_for_again_later_and_later(
        single: ServerProcess) -> None:
    """A partition whose every term fails at once (here the member's user may not run
    XREADGROUP) is asked for again after 0.5 s, then 1 s, 2 s ...: not at once, hundreds of
    times a second with a log line each (it once was)."""
    admin = single.client()
    admin.acl_setuser("noread", enabled=True, passwords=["+pw"], keys=["*"],
                      commands=["+@all", "-xreadgroup"])
    topic = Topic(admin, partitions=1)
    topic.produce(1)
    client = redis.Redis(port=single.port, username="noread", password="pw")
    member = topic.member(client, "m1")
    timeline = GroupKeys(topic.streams[0], "g").events

    def acquired() -> list[float]:
        return [int(i.split(b"-")[0]) / 1000.0 for i, f in admin.xrange(timeline)
                if f[b"type"] == b"acquired"]

    member.start()
    try:
        wait_until(lambda: len(acquired()) >= 3, 10, message="three terms")
        times = acquired()
        assert times[2] - times[0] >= 1.4, times  # 0.5 s, then 1 s (less scheduling)
        assert not topic.records
    finally:
        member.stop()
        client.close()


def test_a_lease_granted_before_its_job_failed_is_served(
        single: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node's acquisition job that fails after part of its leases were granted (a connection
    lost while it looks the live members up again, to end a gone member's term) still serves
    those: they were once dropped, held by this member on the server with no term running,
    until its next acquisition found them "held by ourselves", ended them as gone and took
    them again (a new epoch; a new target member would have waited for the TTL)."""
    import orderedstream._member as member_module

    admin = single.client()
    topic = Topic(admin, partitions=2)
    # partition 1 is held by a member that is gone: taking it reads the live members again
    admin.set(GroupKeys(topic.streams[1], "g").lease, "zombie:1:0", px=60_000)
    real = member_module.read_target
    failures: list[int] = []

    def read_target(*args: Any, **kwargs: Any) -> Any:
        if not failures:  # the first time only: its connection is lost
            failures.append(1)
            raise redis.ConnectionError("lost while reading the target")
        return real(*args, **kwargs)

    monkeypatch.setattr(member_module, "read_target", read_target)
    member = topic.member(single.client(), "a", ttl_ms=10_000)
    member.start()
    try:
        wait_until(lambda: len(member.owned) == 2, 10)
        assert failures
        ended = [f for _, f in admin.xrange(GroupKeys(topic.streams[0], "g").events)
                 if f.get(b"type") == b"ended"]
        assert not ended, ended  # (once: "member a is gone", by a)
    finally:
        member.stop()


def test_a_member_whose_connection_is_gone_is_replaced_at_once(single: ServerProcess) -> None:
    """Killing a member's heartbeat connection (as a crash would) makes the others end its
    membership and take its partitions well within the lease TTL (fenced: its terms are ended
    by compare-and-delete); nothing is lost or reordered, and its late work is refused."""
    admin = single.client()
    topic = Topic(admin, partitions=8)
    a = topic.member(single.client(), "a", ttl_ms=5000)
    b = topic.member(single.client(), "b", ttl_ms=5000)
    a.start()
    b.start()
    try:
        wait_until(lambda: _settled([a, b], 8), 10)
        topic.produce_steadily(rate=200)
        wait_until(lambda: len(topic.handled()) > 50, 10)
        killed = 0
        for client in admin.client_list():
            if client["name"] == "os:a:member":
                admin.client_kill_filter(_id=client["id"])
                killed += 1
        assert killed == 1
        started = time.monotonic()
        # b ends a's membership and takes a's partitions long before a's 5 s TTL
        wait_until(lambda: len(b.owned) == 8, 4)
        assert time.monotonic() - started < 2.5
        # a comes back on a new connection (its next heartbeat joins again): balanced again
        wait_until(lambda: _settled([a, b], 8), 15)
        topic.stop_producing()
        topic.all_handled()
    finally:
        topic.stop_producing()
        a.stop()
        b.stop()
    result = topic_verdict(topic.records, topic.seq)
    assert result.ok, result.as_dict()


def test_connections_do_not_grow_with_partitions(single: ServerProcess) -> None:
    """One member owning 64 partitions holds a bounded number of connections (driver command
    and wake-up, heartbeat, member, wait, poke: 6 on one server), not some per partition."""
    admin = single.client()
    topic = Topic(admin, partitions=64)
    member = topic.member(single.client(), "solo")
    member.start()
    try:
        wait_until(lambda: len(member.owned) == 64, 20)
        topic.produce(500)
        topic.all_handled()
        mine = [c for c in admin.client_list() if c["name"].startswith("os:solo:")]
        assert len(mine) <= 6, sorted(c["name"] for c in mine)
    finally:
        member.stop()
    assert topic_verdict(topic.records, topic.seq).ok


@pytest.mark.slow
def test_cluster_members_survive_a_primary_failover(own_cluster: Any) -> None:
    """On a 3+3 cluster, two members share 16 partitions spread over the shards while a
    producer writes; a primary is killed and its replica promoted: that shard's partitions
    pause and go on, the others do not stop, and the record shows nothing lost, per-key order
    kept and no (partition, epoch) handed out twice."""
    cluster = own_cluster
    client = cluster.client()
    topic = Topic(client, partitions=16)
    nodes = NodeMap(client)
    assert len({nodes.node_name(s) for s in topic.streams}) == 3  # spread over the shards
    # a TTL longer than the failover: the terms on the failed shard outlive it (their renewals
    # go to the promoted replica), so nothing but the mux itself gets their lanes going again
    members = [topic.member(cluster.client(), f"c{i}", ttl_ms=4000) for i in range(2)]
    for member in members:
        member.start()
    try:
        wait_until(lambda: _settled(members, 16), 15)
        topic.produce_steadily(rate=200)
        wait_until(lambda: len(topic.handled()) > 100, 10)
        victim = cluster.primary_for(topic.streams[0])
        on_victim = [p for p, s in enumerate(topic.streams) if cluster.primary_for(s) == victim]
        cluster.kill(victim)
        # the producer's writes to the dead shard fail until the replica is promoted
        def promoted() -> bool:
            try:
                return bool(cluster.primary_for(topic.streams[0]) != victim)
            except LookupError:  # no primary for that slot yet
                return False

        wait_until(promoted, 30)
        promoted_at = time.time()
        # every partition of the failed shard goes on within seconds (lanes asleep waiting
        # for a push from the dead node are woken, not left to their 30 s look)
        wait_until(lambda: topic.partitions_handled_since(promoted_at) >= set(on_victim), 10,
                   message="the failed shard's partitions handling again")
        cluster.restart(victim)  # back as a replica: the producer's WAIT is answered again
        before = topic.seq
        wait_until(lambda: topic.seq > before + 200, 30)
        topic.stop_producing()
        topic.all_handled(30)
    finally:
        topic.stop_producing()
        for member in members:
            member.stop()
    result = topic_verdict(topic.records, topic.seq)
    assert not result.out_of_order and not result.epochs_reused, result.as_dict()
    assert not result.unflagged_duplicates, result.as_dict()
    # writes the old primary acknowledged but never passed on are lost with it (the cluster's
    # asynchronous replication); anything the promoted replica holds is handled
    assert len(result.lost) <= 5, result.as_dict()


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["hung", "topic-node-killed"])
def test_a_failing_primary_stalls_only_its_own_shards_partitions(own_cluster: Any,
                                                                 fault: str) -> None:
    """A primary that stops answering (``hung``: SIGSTOP, its connections stay open, as in a
    network partition) stalls the partitions it serves, not the member's partitions on the
    other shards: the driver reads each node's replies as they come, never waiting on one
    node's socket while another node's replies are in (it once did, for the socket timeout,
    again at each of the stalled partitions' retries).  The primary of the topic's own slot
    (membership, target, timeline) SIGKILLed (``topic-node-killed``): the leases on the
    other shards are renewed all along (the control loop's back-off once stopped every
    renewal: the failover outlived the TTL and every term of the member ended)."""
    cluster = own_cluster
    client = cluster.client()
    topic = Topic(client, partitions=12)
    meta = cluster.primary_for(TopicGroupKeys(topic.name, "g").members)
    victim = (meta if fault == "topic-node-killed"
              else next(n for n in cluster.primaries_now() if n.port != meta.port))
    healthy = [s for s in topic.streams if cluster.primary_for(s).port != victim.port]
    assert healthy and len(healthy) < len(topic.streams)
    config = MemberConfig(topic=topic.name, group="g", name="h1", batch_size=20,
                          lease=LeaseConfig(ttl_ms=3000), socket_timeout_ms=3000)
    member = TopicMember(config, topic.handler("h1"), cluster.client())
    writer = NodeMap(client)
    sent: dict[str, float] = {}  # "<stream> <seq>" -> when written
    member.start()
    try:
        wait_until(lambda: len(member.owned) == 12, 15)
        healthy_terms = {p: e for p, e in member.owned.items() if topic.streams[p] in healthy}
        topic.produce_steadily(rate=200)  # every partition busy (acks owed) when it stops
        wait_until(lambda: len(topic.handled()) > 100, 10)
        if fault == "hung":
            cluster.pause(victim)
        else:
            cluster.kill(victim)
        paused_at = time.time()
        topic._stop.set()  # (joined once the shard answers again: its writes there wait)
        seq = 0
        while time.time() < paused_at + 4.0:  # writes to the healthy shards only
            seq += 1
            stream = healthy[seq % len(healthy)]
            _, own = writer.node_for(stream, "w", single=True)
            own.xadd(stream, {"seq": 10_000 + seq, "key": "h", "kseq": seq})
            own.close()
            sent[f"{topic.streams.index(stream)} {10_000 + seq}"] = time.time()
            time.sleep(0.02)
        wait_until(lambda: {r["seq"] for r in topic.records} >= {int(k.split()[1])
                                                                for k in sent}, 10,
                   message="every entry written to a healthy shard handled")
        # the control thread renewed the healthy shards' leases all along (its renewals of
        # one node do not wait for another node's replies): not one of those terms ended
        assert {p: member.owned.get(p) for p in healthy_terms} == healthy_terms
    finally:
        if fault == "hung":
            cluster.resume(victim)
        else:
            cluster.restart(victim)
        topic.stop_producing()
        member.stop(timeout=10)
    with topic.lock:
        handled = {f"{r['p']} {r['seq']}": r["t"] for r in topic.records if r["seq"] > 10_000}
    waits = sorted(handled[k] - t for k, t in sent.items())
    assert waits[-1] < 1.0, f"longest wait {waits[-1]:.2f} s (median {waits[len(waits) // 2]:.3f})"


@pytest.mark.slow
def test_a_primary_hung_past_the_socket_timeout_stalls_only_its_own_shard() -> None:
    """A primary that stops answering for longer than the member's socket timeout, with no
    failover meanwhile (a long ``cluster-node-timeout``): after the driver failed that node,
    its partitions' retries open connections to it again, and those (the command connection's
    handshake, the wake-up connection's ``CLIENT TRACKING``) wait on the hung node too.  They
    must not hold the driver's thread: the other shards' entries are handled within 1 s all
    along (each reconnection once held every partition of the member for the socket timeout,
    the wake-up connection's for 5 s)."""
    with ClusterServers(node_timeout_ms=30_000) as cluster:
        client = cluster.client()
        topic = Topic(client, partitions=12)
        meta = cluster.primary_for(TopicGroupKeys(topic.name, "g").members)
        victim = next(n for n in cluster.primaries_now() if n.port != meta.port)
        healthy = [s for s in topic.streams if cluster.primary_for(s).port != victim.port]
        assert healthy and len(healthy) < len(topic.streams)
        config = MemberConfig(topic=topic.name, group="g", name="h1", batch_size=20,
                              lease=LeaseConfig(ttl_ms=20_000), socket_timeout_ms=1000)
        member = TopicMember(config, topic.handler("h1"), cluster.client())
        writer = NodeMap(client)
        clients = {s: writer.node_for(s, "w", single=True)[1] for s in healthy}
        sent: dict[str, float] = {}  # "<partition> <seq>" -> when written
        member.start()
        try:
            wait_until(lambda: len(member.owned) == 12, 15)
            topic.produce(60)
            wait_until(lambda: len(topic.handled()) == 60, 10)
            cluster.pause(victim)
            paused_at = time.time()
            seq = 0
            while time.time() < paused_at + 6.0:  # several socket timeouts
                seq += 1
                stream = healthy[seq % len(healthy)]
                clients[stream].xadd(stream, {"seq": 10_000 + seq, "key": "h", "kseq": seq})
                sent[f"{topic.streams.index(stream)} {10_000 + seq}"] = time.time()
                time.sleep(0.02)
            wait_until(lambda: {r["seq"] for r in topic.records} >= {
                int(k.split()[1]) for k in sent}, 15,
                message="every entry written to a healthy shard handled")
        finally:
            cluster.resume(victim)
            member.stop(timeout=10)
            for own in clients.values():
                own.close()
            writer.close()
            topic.nodes.close()
            client.close()
    with topic.lock:
        handled = {f"{r['p']} {r['seq']}": r["t"] for r in topic.records if r["seq"] > 10_000}
    waits = sorted(handled[k] - t for k, t in sent.items())
    assert waits[-1] < 1.0, f"longest wait {waits[-1]:.2f} s (median {waits[len(waits) // 2]:.3f})"


class Ghosted:
    """A topic on a cluster of the test's own, in a group where a live member ('ghost') never
    runs: ``h1`` shares the partitions with it (``mine``: h1's target), and a lease set in the
    ghost's name is held for as long as the test says."""

    def __init__(self, cluster: ClusterServers, partitions: int) -> None:
        self.cluster = cluster
        self.client = cluster.client()
        self.topic = Topic(self.client, partitions=partitions)
        self.keys = TopicGroupKeys(self.topic.name, "g")
        self.meta = cluster.primary_for(self.keys.members)
        self.mine = assign(partitions, ["ghost", "h1"])["h1"]
        self.registry = cluster.server(self.meta).client()
        Scripts(self.registry).run(
            "member_beat", [self.keys.members, self.keys.conns, self.keys.events],
            ["ghost", 120_000, 0, "os:ghost:member", EVENTS_MAXLEN, "join"])

    def on(self, node: Any) -> list[int]:
        """h1's partitions served by ``node``."""
        return [p for p in self.mine
                if self.cluster.primary_for(self.topic.streams[p]).port == node.port]

    def close(self) -> None:
        self.registry.close()
        self.topic.nodes.close()
        self.client.close()


@pytest.mark.slow
def test_a_member_waiting_on_a_hung_node_does_not_spin() -> None:
    """While a partition's acquisition waits on a node that does not answer, the control
    thread sleeps until its next duty: it once woke at once, again and again until the job
    ended (the partition's retry time, passed, was left in place while it was asked for),
    each time with an ``XREAD BLOCK 1`` on the node of the topic's slot: hundreds a second
    where that node is busy."""
    with ClusterServers(node_timeout_ms=30_000) as cluster:
        group = Ghosted(cluster, 12)
        topic, meta, registry = group.topic, group.meta, group.registry
        victim = next(n for n in cluster.primaries_now() if n.port != meta.port)
        # the ghost holds one of h1's partitions on the hung node: h1 asks for it again
        # every RETRY_HELD_S
        held = group.on(victim)[0]
        cluster.server(victim).client().set(GroupKeys(topic.streams[held], "g").lease,
                                            "ghost:1:0", px=120_000)
        config = MemberConfig(topic=topic.name, group="g", name="h1",
                              lease=LeaseConfig(ttl_ms=1500, watch_connection=False),
                              socket_timeout_ms=1000)
        member = TopicMember(config, topic.handler("h1"), cluster.client())
        stop = threading.Event()

        def busy() -> None:  # other clients keep the node of the topic's slot busy
            other = cluster.server(meta).client()
            while not stop.is_set():
                other.ping()
            other.close()

        def xreads() -> int:
            stats: Any = registry.info("commandstats")
            return int(stats.get("cmdstat_xread", {}).get("calls", 0))

        member.start()
        pinger = threading.Thread(target=busy, daemon=True)
        try:
            wait_until(lambda: len(member.owned) == 5, 15)
            cluster.pause(victim)
            pinger.start()
            time.sleep(0.5)
            calls, since = xreads(), time.monotonic()
            stop.wait(3.0)
            rate = (xreads() - calls) / (time.monotonic() - since)
        finally:
            stop.set()
            cluster.resume(victim)
            if pinger.is_alive():
                pinger.join()
            member.stop(timeout=10)
            group.close()
    assert rate < 60, f"{rate:.0f} XREAD a second from the member's control thread"


@pytest.mark.slow
def test_a_renewal_that_finds_its_node_busy_runs_when_the_node_is_free() -> None:
    """A node's renewal due while that node's worker still waits on an acquisition (here a
    shard that stops answering for 1.1 s, less than the lease TTL) runs as soon as that job is
    done, not a whole renew interval later: two renewals skipped in a row once let the
    partitions there lapse on the member's clock, their terms ended."""
    with ClusterServers(node_timeout_ms=30_000) as cluster:
        group = Ghosted(cluster, 24)
        topic, mine = group.topic, group.mine
        victim, on_victim = max(((n, group.on(n)) for n in cluster.primaries_now()
                                 if n.port != group.meta.port), key=lambda pair: len(pair[1]))
        # the ghost holds one of h1's partitions there: h1 asks for it again every
        # RETRY_HELD_S, each time a job on that node's worker
        held, kept = on_victim[0], on_victim[1:]
        assert kept, on_victim
        node = cluster.server(victim).client()
        node.set(GroupKeys(topic.streams[held], "g").lease, "ghost:1:0", px=120_000)
        config = MemberConfig(topic=topic.name, group="g", name="h1",
                              lease=LeaseConfig(ttl_ms=1500, watch_connection=False),
                              socket_timeout_ms=3000)
        member = TopicMember(config, topic.handler("h1"), cluster.client())
        lease_key = GroupKeys(topic.streams[kept[0]], "g").lease
        member.start()
        try:
            wait_until(lambda: len(member.owned) == len(mine) - 1, 15)
            terms = {p: member.owned[p] for p in kept}
            last = node.pttl(lease_key)
            while True:  # right after a renewal: the next two fall in the pause
                now = node.pttl(lease_key)
                if now > last + 100:
                    break
                last = now
                time.sleep(0.002)
            cluster.pause(victim)
            time.sleep(1.1)  # the fault: the node answers nothing for 1.1 s
            cluster.resume(victim)
            # renewed there again (1.5 s TTL: at most 0.4 s were left when it resumed)
            wait_until(lambda: node.pttl(lease_key) > 1000, 5, message="renewed after it")
            assert {p: member.owned.get(p) for p in kept} == terms
        finally:
            cluster.resume(victim)
            member.stop(timeout=10)
            node.close()
            group.close()


@pytest.mark.slow
def test_a_lease_granted_while_the_member_stepped_down_is_given_up() -> None:
    """A lease granted to an acquisition that was under way when the member stepped down (a
    handler call stuck past the handler timeout) is given up at once, as the step-down gave up
    the others: it was once served, a term that could not run (the driver's thread is the
    stuck one), holding the partition from every other member for the lease TTL."""
    from orderedstream import HandlerStalled

    with ClusterServers(node_timeout_ms=30_000) as cluster:
        group = Ghosted(cluster, 24)
        topic, mine = group.topic, group.mine
        victim = next(n for n in cluster.primaries_now()
                      if n.port != group.meta.port and group.on(n))
        held = group.on(victim)[0]
        stuck_on = next(p for p in mine if p not in group.on(victim))
        node = cluster.server(victim).client()
        lease_key = GroupKeys(topic.streams[held], "g").lease
        node.set(lease_key, "ghost:1:0", px=120_000)  # h1 asks for it again and again
        release = threading.Event()
        events: list[Any] = []

        def handle(message: Any) -> None:
            if message.partition == stuck_on:
                release.wait(30)

        config = MemberConfig(topic=topic.name, group="g", name="h1", handler_timeout_ms=500,
                              lease=LeaseConfig(ttl_ms=20_000, watch_connection=False),
                              socket_timeout_ms=10_000)
        member = TopicMember(config, handle, cluster.client(), hooks=[events.append])
        member.start()
        try:
            wait_until(lambda: len(member.owned) == len(mine) - 1, 15)
            node.set(lease_key, "ghost:1:0", px=1000)  # runs out while its node is stopped
            cluster.pause(victim)  # the next acquisition there waits
            _, writer = topic.nodes.node_for(topic.streams[stuck_on], "w", single=True)
            writer.xadd(topic.streams[stuck_on], {"seq": 1, "key": "k", "kseq": 1})
            writer.close()
            wait_until(lambda: any(isinstance(e, HandlerStalled) for e in events), 10)
            time.sleep(1.2)  # (the ghost's lease is gone by now)
            cluster.resume(victim)  # the acquisition goes through: granted
            wait_until(lambda: node.get(lease_key) is None, 5,
                       message="the lease granted meanwhile given up")
            assert not release.is_set()  # (still stuck, stepped down)
        finally:
            release.set()
            cluster.resume(victim)
            member.stop(timeout=10)
            node.close()
            group.close()


@pytest.mark.slow
def test_a_lane_backing_off_from_a_failed_node_goes_on_when_the_primaries_change(
        own_cluster: Any) -> None:
    """A partition backing off from a node that did not answer (its outage back-off grows to
    2 s) tries again as soon as the slot map names another primary (a failover), not at the
    end of its back-off: the driver reads the slot map now and then while any lane backs off,
    and a change of primaries wakes them."""
    cluster = own_cluster
    client = cluster.client()
    nodes = NodeMap(client)
    scripts = Scripts(nodes.node_for("{x}", "os:t:scripts")[1])
    mux = Mux(nodes, scripts, "os:t")
    woke: list[float] = []

    def step() -> Any:
        yield Pause(30.0, outage=True)
        woke.append(time.monotonic())

    mux.add(Lane("{x}", step(), threading.Event(), lambda error: None))
    mux.start()
    try:
        primary = cluster.primary_for("{x}")
        replica = cluster.replicas_of(primary)[0]
        started = time.monotonic()
        cluster.promote(replica)  # a coordinated failover: the primaries change
        wait_until(lambda: bool(woke), 10, message="the lane woken by the new primary")
        assert woke[0] - started < 5.0  # (its back-off: 30 s)
    finally:
        mux.halt(timeout=5)
        nodes.close()
        client.close()


@pytest.mark.slow
def test_cluster_member_waits_out_a_cluster_with_no_node_up(own_cluster: Any) -> None:
    """Every node of the cluster gone at once: the member's driver waits it out (its
    partitions say ServerUnavailable) instead of dying when the slot map cannot be read from
    any node (it once did: RedisClusterException escaped the refresh)."""
    cluster = own_cluster
    topic = Topic(cluster.client(), partitions=6)
    seen: list[Any] = []
    config = MemberConfig(topic=topic.name, group="g", name="w1", batch_size=20)
    member = TopicMember(config, topic.handler("w1"), cluster.client(), hooks=[seen.append])
    member.start()
    try:
        wait_until(lambda: len(member.owned) == 6, 15)
        topic.produce(30)
        topic.all_handled(10)
        for server in cluster.servers:
            server.kill()
        gone_at = time.monotonic()
        wait_until(lambda: any(isinstance(e, ServerUnavailable) for e in seen), 10,
                   message="the partitions waiting the outage out")
        mux = member._mux
        assert mux is not None
        # through several of their retries (each one reads the slot map again)
        wait_until(lambda: not mux.is_alive() or time.monotonic() > gone_at + 3.0, 10)
        assert mux.is_alive() and mux.error is None, mux.error
    finally:
        member.stop(timeout=5)
    assert member._mux is None or member._mux.error is None


@pytest.mark.slow
def test_cluster_member_follows_a_slot_that_moves(own_cluster: Any) -> None:
    """Resharding: a partition's slot is migrated to another primary under load (its keys move,
    clients meet ASK, then MOVED): the member follows it (lease, reads, acks, renewals on the
    new node) and goes on handling that partition, in order, nothing lost."""
    from redis.crc import key_slot

    cluster = own_cluster
    client = cluster.client()
    topic = Topic(client, partitions=6)
    member = topic.member(cluster.client(), "solo", ttl_ms=2000)
    member.start()
    try:
        wait_until(lambda: len(member.owned) == 6, 15)
        topic.produce_steadily(rate=200)
        wait_until(lambda: len(topic.handled()) > 100, 10)
        stream = topic.streams[0]
        source = cluster.primary_for(stream)
        target = next(n for n in cluster.primaries_now() if n != source)
        cluster.move_slot(key_slot(stream.encode()), target)
        moved_at = topic.seq
        latest = moved_at
        # entries of partition 0 written after the move are handled by the same member
        epoch = member.owned[0]
        wait_until(lambda: any(r["p"] == 0 and r["seq"] > moved_at + 50
                               for r in list(topic.records)), 20)
        # past two lease TTLs: renewed on the new node, the same term goes on
        end = time.monotonic() + 4.5
        wait_until(lambda: time.monotonic() > end and 0 in member.owned, 10)
        assert member.owned[0] == epoch
        latest = moved_at
        wait_until(lambda: any(r["p"] == 0 and r["seq"] > latest + 600
                               for r in list(topic.records)), 20)
        topic.stop_producing()
        topic.all_handled(20)
    finally:
        topic.stop_producing()
        member.stop()
    result = topic_verdict(topic.records, topic.seq)
    assert result.ok, result.as_dict()


def test_a_stuck_handler_hands_every_partition_over(single: ServerProcess) -> None:
    """A handler call stuck past ``handler_timeout_ms`` stalls every partition of its member
    (they share one driver thread): the member steps down at once (HandlerStalled, every lease
    given up, out of the group), the other member takes all partitions well before the lease
    TTL, and once the stuck call returns the member joins again; what an epoch-keeping store
    accepts is complete and in per-key order."""
    from orderedstream import HandlerStalled, LeaseConfig, MemberConfig, TopicMember

    topic = Topic(single.client(), partitions=6)
    release = threading.Event()
    stuck_on: list[int] = []
    events: list[Any] = []

    def stuck(message: Any) -> None:
        if not stuck_on and int(message.fields["seq"]) >= 60:
            stuck_on.append(int(message.fields["seq"]))
            release.wait(30)
        topic.handler("a")(message)

    config = MemberConfig(topic=topic.name, group="g", name="a", handler_timeout_ms=500,
                          lease=LeaseConfig(ttl_ms=10_000), batch_size=10)
    a = TopicMember(config, stuck, single.client(), hooks=[events.append])
    b = topic.member(single.client(), "b", ttl_ms=10_000)
    a.start()
    try:
        wait_until(lambda: len(a.owned) == 6, 10)
        b.start()
        wait_until(lambda: _settled([a, b], 6), 10)
        topic.produce_steadily(rate=200)
        wait_until(lambda: bool(stuck_on), 10)
        started = time.monotonic()
        wait_until(lambda: len(b.owned) == 6, 5)
        assert time.monotonic() - started < 3.0  # handler timeout 0.5 s; the TTL is 10 s
        assert any(isinstance(e, HandlerStalled) for e in events)
        release.set()
        wait_until(lambda: _settled([a, b], 6), 15)  # a joined again
        topic.stop_producing()
        topic.all_handled()
    finally:
        release.set()
        topic.stop_producing()
        a.stop()
        b.stop()
    accepted = newest_terms(topic.records)
    assert len(topic.records) - len(accepted) <= 1  # the stuck call, finished late
    result = topic_verdict(accepted, topic.seq)
    assert result.ok, result.as_dict()
