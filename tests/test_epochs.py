"""Epochs that never go backwards and are never handed out twice (DESIGN.md §4): across a deleted
counter, a server restart that lost the data, and a replica promotion; tokens unique per term;
opt-in WAIT for replicas; a lease without expiry is never spun on."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import redis

from orderedstream import (
    ConfigError,
    GroupKeys,
    LeaseConfig,
    NotOwner,
    ReplicasNotAcknowledged,
)
from orderedstream._lease import Holder, Lease, LeaseManager, parse_token
from orderedstream._scripts import Scripts
from orderedstream._server import clone_client
from orderedstream.testing import ReplicatedServers, ServerProcess, read_records, wait_until

from .conftest import EXTERNAL_URL, Consumers

MAX_SAFE = 2**53 - 1


def manager(client: redis.Redis, stream: str, name: str, **lease: int) -> LeaseManager:
    beat = clone_client(client, name=f"os:{name}:beat", single=True)
    config = LeaseConfig(ttl_ms=lease.pop("ttl_ms", 5000), **lease)  # type: ignore[arg-type]
    return LeaseManager(Scripts(clone_client(client)), GroupKeys(stream, "g"), name, config,
                        beat, f"os:{name}:beat")


def acquire(m: LeaseManager) -> Lease:
    got = m.try_acquire()
    assert isinstance(got, Lease), got
    return got


def terms(m: LeaseManager, n: int) -> list[Lease]:
    """``n`` terms one after another (acquire, release)."""
    out = []
    for _ in range(n):
        lease = acquire(m)
        assert m.end_term(lease.token, "released", "test")
        out.append(lease)
    return out


def fenced_store(records: list[dict[str, object]]) -> list[dict[str, object]]:
    """The writes a downstream store that refuses epochs older than its newest one refuses
    (``demos/embed.py``), in the order they were handled."""
    newest = 0
    refused = []
    for r in records:
        epoch = int(r["epoch"])  # type: ignore[call-overload]
        if epoch < newest:
            refused.append(r)
        newest = max(newest, epoch)
    return refused


# -- tokens and counters (in-process, one server) -----------------------------------------------

def test_token_carries_a_nonce_so_a_repeated_epoch_is_not_a_repeated_token(
        client: redis.Redis, stream: str) -> None:
    """Every term's token is ``consumer:epoch:nonce`` with a fresh nonce; a token that shares
    consumer and epoch with the current term but not its nonce (what a zombie would hold had an
    epoch been handed out twice) is refused by the fence; Holder still parses consumer/epoch."""
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    a = manager(client, stream, "a")
    first, second = terms(a, 2)
    for lease in (first, second):
        consumer, epoch, nonce = lease.token.split(":")
        assert (consumer, int(epoch)) == ("a", lease.epoch) and len(nonce) == 12
    assert first.token != second.token
    current = acquire(a)
    holder = manager(client, stream, "b").try_acquire()
    assert isinstance(holder, Holder)
    assert (holder.consumer, holder.epoch, holder.token) == ("a", current.epoch, current.token)
    twin = f"a:{current.epoch}:{'0' * 12}"
    with pytest.raises(NotOwner):
        Scripts(client).call("read", [stream, GroupKeys(stream, "g").lease],
                             [twin, "g", "a", 10, ">"])


def test_parse_token_reads_new_old_and_foreign_values() -> None:
    """``consumer:epoch:nonce``, an older release's ``consumer:epoch``, and a value set by hand
    (no epoch: 0) all parse without raising."""
    assert parse_token("c-1:1790000000000123:ab12") == ("c-1", 1790000000000123, "ab12")
    assert parse_token("c-1:7") == ("c-1", 7, "")
    assert parse_token("garbage") == ("garbage", 0, "")
    assert Holder("x:y", 1, "", "").epoch == 0


def test_epoch_is_a_safe_integer_that_grows_past_a_deleted_counter(
        client: redis.Redis, stream: str) -> None:
    """Epochs strictly grow and stay below 2^53; after the epoch counter (and the owner record)
    is deleted, the next epoch is still greater than every one before."""
    keys = GroupKeys(stream, "g")
    a = manager(client, stream, "a")
    before = [lease.epoch for lease in terms(a, 3)]
    assert before == sorted(set(before)) and before[-1] < MAX_SAFE
    client.delete(keys.epoch)
    after = [lease.epoch for lease in terms(a, 2)]
    client.delete(keys.epoch, keys.owner)
    after += [lease.epoch for lease in terms(a, 2)]
    assert min(after) > max(before), (before, after)
    assert after == sorted(set(after)) and after[-1] < MAX_SAFE


def test_counter_beyond_2_53_is_refused_with_a_reason(client: redis.Redis, stream: str) -> None:
    """A counter set by hand past 2^53 (where Lua's doubles lose integers) is refused, loudly,
    instead of handing out an epoch that may equal an earlier one."""
    client.set(GroupKeys(stream, "g").epoch, str(2**53))
    with pytest.raises(redis.ResponseError, match="EPOCHRANGE"):
        manager(client, stream, "a").try_acquire()


def test_server_changed_only_when_another_server_granted_the_last_term(
        own_server: ServerProcess) -> None:
    """``Lease.server_changed`` is False for terms granted by the same server process, and True
    for the first term after a restart (the old process's acks may not have survived)."""
    stream = f"t-{uuid.uuid4().hex[:8]}"
    client = own_server.client()
    a = manager(client, stream, "a")
    assert [lease.server_changed for lease in terms(a, 3)] == [False, False, False]
    own_server.restart()  # AOF: the counter and owner record survive, the process does not
    a.close()
    a = manager(own_server.client(), stream, "a")
    first, later = terms(a, 2)
    assert first.server_changed and not later.server_changed
    a.close()
    client.close()


def test_acquire_works_for_a_user_denied_info(server: ServerProcess, stream: str) -> None:
    """An ACL user without @dangerous (no INFO) still acquires; the server's identity is then
    unknown, so a later term counts as server_changed (replays flagged: the safe side)."""
    if EXTERNAL_URL:
        pytest.skip("creates an ACL user")
    admin = server.client()
    user = f"u{uuid.uuid4().hex[:6]}"
    admin.acl_setuser(user, enabled=True, nopass=True, keys=["*"], channels=["*"],
                      commands=["+@all", "-@dangerous"])
    limited = server.client(username=user)
    try:
        with pytest.raises(redis.exceptions.NoPermissionError):
            limited.info("server")
        first, second = terms(manager(limited, stream, "a"), 2)
        assert second.epoch > first.epoch
        assert (first.server_changed, second.server_changed) == (False, True)
    finally:
        limited.close()
        admin.acl_deluser(user)
        admin.close()


def test_lease_config_validates_wait_replicas() -> None:
    """wait_replicas >= 0; its timeout defaults to ttl/3 and must fit in half the TTL."""
    assert LeaseConfig(ttl_ms=3000).effective_wait_timeout_ms == 1000
    assert LeaseConfig(ttl_ms=3000, wait_replicas_timeout_ms=200).effective_wait_timeout_ms == 200
    with pytest.raises(ConfigError, match="wait_replicas"):
        LeaseConfig(wait_replicas=-1)
    with pytest.raises(ConfigError, match="wait_replicas_timeout_ms"):
        LeaseConfig(ttl_ms=1000, wait_replicas_timeout_ms=600)


# -- a lease without expiry -----------------------------------------------------------------------

def evalsha_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.mark.slow
def test_lease_without_expiry_is_waited_out_not_spun_on(tmp_path: Path) -> None:
    """A lease key someone SET without PX: two standby processes do not spin on it (a bounded
    number of scripts a second, not thousands) and one of them owns within about a TTL."""
    if EXTERNAL_URL:
        pytest.skip("counts the server's commands: needs a private server")
    stream = "ghost-stream"
    with ServerProcess() as srv:
        client = srv.client()
        keys = GroupKeys(stream, "g")
        client.xgroup_create(stream, "g", id="0", mkstream=True)
        client.set(keys.lease, "ghost:5:abcdef")
        client.xadd(stream, {"seq": 1})
        group = Consumers(srv.url, stream, tmp_path / "record.jsonl")
        try:
            for name in ("s1", "s2"):
                group.start(name, ttl_ms=1000)
            wait_until(lambda: evalsha_calls(client) >= 2, 15, message="standbys polling")
            calls, started = evalsha_calls(client), time.monotonic()
            time.sleep(1.0)  # measuring a rate over a second: the sleep is the measurement
            rate = (evalsha_calls(client) - calls) / (time.monotonic() - started)
            assert rate < 50, f"standbys ran {rate:.0f} scripts/s against a lease without expiry"
            wait_until(lambda: read_records(group.record), 5, message="a standby owns")
            assert (client.get(keys.lease) or b"").startswith((b"s1:", b"s2:"))
        finally:
            group.stop_all()
            client.close()


# -- restart without persistence (process level) ------------------------------------------------

def run_term(group: Consumers, client: redis.Redis, name: str, seq: int) -> int:
    """Add entry ``seq``, start consumer ``name``, wait until it handled something, SIGKILL it.
    Returns the epoch it handled under."""
    client.xadd(group.stream, {"seq": seq, "payload": f"p{seq}"})
    proc = group.start(name, ttl_ms=1000)

    def its_epoch() -> int | None:
        mine = [int(r["epoch"]) for r in read_records(group.record) if r["pid"] == proc.pid]
        return mine[0] if mine else None

    epoch = wait_until(its_epoch, 20, message=f"{name} handles an entry")
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    return int(epoch)


@pytest.mark.slow
def test_epochs_after_a_restart_without_persistence_pass_a_fenced_store(
        tmp_path: Path) -> None:
    """A server restart that lost every key (no AOF, no RDB): the epochs owners get afterwards
    are greater than every epoch before, so a store that refuses older epochs accepts every
    write made after the restart."""
    if EXTERNAL_URL:
        pytest.skip("restarts the server")
    stream = "restart-stream"
    with ServerProcess(appendonly=False) as srv:
        group = Consumers(srv.url, stream, tmp_path / "record.jsonl")
        try:
            client = srv.client()
            before = [run_term(group, client, name, seq)
                      for seq, name in enumerate(["c1", "c2", "c1"], start=1)]
            client.close()
            srv.restart()
            client = srv.client()
            assert not client.exists(GroupKeys(stream, "g").epoch)
            after = [run_term(group, client, name, seq)
                     for seq, name in enumerate(["c1", "c2"], start=10)]
            client.close()
        finally:
            group.stop_all()
    assert min(after) > max(before), (before, after)
    records = read_records(group.record)
    assert not fenced_store(records), fenced_store(records)


# -- a replica promoted (process level and in-process) ------------------------------------------

def replicated(client: redis.Redis, replicas: int = 1) -> None:
    assert int(client.execute_command("WAIT", replicas, 5000)) >= replicas  # type: ignore[no-untyped-call]


@pytest.mark.slow
def test_epochs_after_a_replica_promotion_are_greater_and_tokens_unique(
        tmp_path: Path) -> None:
    """Primary + replica; the replica is cut off and paused (SIGSTOP) while owners with stable
    names take several terms on the primary; the primary is SIGKILLed (the replica never
    received those terms), the replica resumed and promoted, and consumers pointed at it: every
    epoch handed out after is greater than every epoch before, no epoch (and so no token)
    repeats, and a fenced store refuses nothing."""
    if EXTERNAL_URL:
        pytest.skip("starts its own primary and replica")
    stream = "promote-stream"
    record = tmp_path / "record.jsonl"
    with ReplicatedServers() as rs:
        primary = rs.primary.client()
        primary.xgroup_create(stream, "g", id="0", mkstream=True)
        on_primary = Consumers(rs.primary.url, stream, record)
        on_replica = Consumers(rs.replica.url, stream, record)
        try:
            before = [run_term(on_primary, primary, "c1", 1)]
            replicated(primary)  # the replica has the group and the first term
            rs.partition()  # a paused replica alone would still receive it all (kernel buffers)
            rs.pause_replica()
            before += [run_term(on_primary, primary, name, seq)
                       for seq, name in enumerate(["c1", "c2", "c1"], start=2)]
            primary.close()
            rs.kill_primary()
            rs.resume_replica()
            rs.promote_replica()
            replica = rs.replica.client()
            after = [run_term(on_replica, replica, name, seq)
                     for seq, name in enumerate(["c1", "c2", "c1"], start=10)]
            replica.close()
        finally:
            on_primary.stop_all()
            on_replica.stop_all()
    assert min(after) > max(before), (before, after)
    assert len(set(before + after)) == len(before + after)
    assert max(after) < MAX_SAFE
    assert not fenced_store(read_records(record))


def test_promotion_in_process_epoch_token_and_server_changed() -> None:
    """The same in one process: a stable consumer name acquires on the primary while the replica
    is cut off; after the promotion its next term has a greater epoch, a different token, and
    ``server_changed`` set (acks taken by the dead primary may be gone)."""
    if EXTERNAL_URL:
        pytest.skip("starts its own primary and replica")
    stream = f"t-{uuid.uuid4().hex[:8]}"
    with ReplicatedServers() as rs:
        primary = rs.primary.client()
        on_primary = manager(primary, stream, "c")
        first = terms(on_primary, 1)
        replicated(primary)
        rs.partition()
        lost = terms(on_primary, 3)
        on_primary.close()
        primary.close()
        rs.kill_primary()
        rs.resume_replica()
        rs.promote_replica()
        replica = rs.replica.client()
        on_replica = manager(replica, stream, "c")
        after = acquire(on_replica)
        on_replica.close()
        replica.close()
    before = first + lost
    assert after.epoch > max(lease.epoch for lease in before)
    assert after.token not in {lease.token for lease in before}
    assert after.server_changed and not any(lease.server_changed for lease in before)


# -- WAIT for replicas ---------------------------------------------------------------------------

def test_wait_replicas_refuses_to_own_until_the_replica_acknowledges() -> None:
    """With ``wait_replicas=1`` and the replica paused, acquiring raises ReplicasNotAcknowledged
    (saying how many acknowledged and what to check) after about the wait timeout and leaves
    the lease free; once the replica is back, the same manager owns."""
    if EXTERNAL_URL:
        pytest.skip("starts its own primary and replica")
    stream = f"t-{uuid.uuid4().hex[:8]}"
    with ReplicatedServers() as rs:
        primary = rs.primary.client()
        m = manager(primary, stream, "c", ttl_ms=1200, wait_replicas=1,
                    wait_replicas_timeout_ms=300)
        try:
            assert isinstance(m.try_acquire(), Lease)  # replica up: owns at once
            primary.delete(GroupKeys(stream, "g").lease)
            rs.pause_replica()
            started = time.monotonic()
            with pytest.raises(ReplicasNotAcknowledged, match=r"0 of 1 replica.*INFO replication"):
                m.try_acquire()
            assert 0.25 < time.monotonic() - started < 2.0
            assert not primary.exists(GroupKeys(stream, "g").lease)
            rs.resume_replica()
            assert isinstance(m.try_acquire(), Lease)
        finally:
            m.close()
            primary.close()


@pytest.mark.slow
def test_consumer_with_wait_replicas_owns_only_once_the_replica_is_back(tmp_path: Path) -> None:
    """``consume --wait-replicas 1`` while the replica is paused: no entry is handled, the
    process stays up and says why; after the replica resumes it owns and handles."""
    if EXTERNAL_URL:
        pytest.skip("starts its own primary and replica")
    stream = "wait-stream"
    with ReplicatedServers() as rs:
        primary = rs.primary.client()
        primary.xgroup_create(stream, "g", id="0", mkstream=True)
        primary.xadd(stream, {"seq": 1})
        replicated(primary)
        rs.pause_replica()
        group = Consumers(rs.primary.url, stream, tmp_path / "record.jsonl")
        try:
            proc: subprocess.Popen[bytes] = group.start(
                "c1", ttl_ms=900, extra=("--wait-replicas", "1"))
            log = tmp_path / "c1.log"
            wait_until(lambda: log.exists() and "replica" in log.read_text(), 20,
                       message="the consumer says why it does not own")
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:  # it keeps retrying, and never owns meanwhile
                assert proc.poll() is None, log.read_text()
                assert not read_records(group.record)
                time.sleep(0.05)
            rs.resume_replica()
            wait_until(lambda: read_records(group.record), 15, message="owns after resume")
        finally:
            group.stop_all()
            primary.close()
