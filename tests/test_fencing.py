"""Lease and fencing: a former owner can neither read, ack, claim nor park."""

from __future__ import annotations

import json

import pytest
import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from orderedstream import GroupKeys, LeaseConfig, NotOwner
from orderedstream._lease import Holder, Lease, LeaseManager
from orderedstream._scripts import Scripts
from orderedstream._server import clone_client
from orderedstream.testing import ServerProcess


def manager(client: redis.Redis, stream: str, name: str, ttl_ms: int = 5000) -> LeaseManager:
    beat = clone_client(client, name=f"os:{name}:beat", single=True)
    return LeaseManager(Scripts(clone_client(client)), GroupKeys(stream, "g"), name,
                        LeaseConfig(ttl_ms=ttl_ms), beat, f"os:{name}:beat")


def test_acquire_is_exclusive_and_epochs_increase(client: redis.Redis, stream: str) -> None:
    """A held lease is refused to others (who learn the holder); each term gets a new, greater
    epoch and a token ``consumer:epoch:nonce``."""
    a, b = manager(client, stream, "a"), manager(client, stream, "b")
    first = a.try_acquire()
    assert isinstance(first, Lease) and first.token.startswith(f"a:{first.epoch}:")
    seen = b.try_acquire()
    assert isinstance(seen, Holder) and seen.consumer == "a" and seen.epoch == first.epoch
    assert seen.conn_name == "os:a:beat" and 0 < seen.pttl_ms <= 5000
    assert a.end_term(first.token, "released", "test")
    second = b.try_acquire()
    assert isinstance(second, Lease) and second.epoch > first.epoch


def test_zombie_operations_are_refused(client: redis.Redis, stream: str) -> None:
    """After a takeover the old token fails every fenced script and changes nothing."""
    client.xgroup_create(stream, "g", id="0", mkstream=True)
    ids = [client.xadd(stream, {"seq": i}) for i in range(3)]
    keys = GroupKeys(stream, "g")
    a, b = manager(client, stream, "a"), manager(client, stream, "b")
    old = a.try_acquire()
    assert isinstance(old, Lease)
    scripts = Scripts(client)
    scripts.call("read", [stream, keys.lease], [old.token, "g", "a", 10, ">"])
    client.delete(keys.lease)  # the lease expires on the server
    new = b.try_acquire()
    assert isinstance(new, Lease)
    before = client.xpending(stream, "g")
    for name, args in [
        ("read", [old.token, "g", "a", 10, ">"]),
        ("read", [old.token, "g", "a", 10, "0", ids[0]]),
        ("ack", [old.token, "g", *ids]),
        ("claim", [old.token, "g", "a", "b", 100]),
        ("deliver", [old.token, "g", "a", 10, *ids]),
    ]:
        with pytest.raises(NotOwner, match=f"held by {new.token}"):
            scripts.call(name, [stream, keys.lease], args)
    with pytest.raises(NotOwner, match=f"held by {new.token}"):
        scripts.call("hold", [stream, keys.lease, keys.parked, keys.held, keys.followers("k")],
                     [old.token, "g", ids[1].decode(), "k", "", json.dumps({}),
                      ids[1].decode(), "seq", "1"])
    with pytest.raises(NotOwner):
        scripts.call("defer", [stream, keys.lease, keys.delay, keys.parked],
                     [old.token, "g", ids[0].decode(), json.dumps({}), 0])
    assert client.xpending(stream, "g") == before
    assert client.zcard(keys.delay) == 0
    assert not a.renew(old)
    assert not a.end_term(old.token, "released", "zombie")
    assert client.get(keys.lease) == new.token.encode()


def test_lease_expiry_is_on_the_server_clock(client: redis.Redis, stream: str) -> None:
    """The lease is a PX key: the server expires it, whatever the client believes."""
    a = manager(client, stream, "a", ttl_ms=400)
    lease = a.try_acquire()
    assert isinstance(lease, Lease)
    pttl = client.pttl(GroupKeys(stream, "g").lease)
    assert 0 < pttl <= 400
    assert lease.valid() and lease.remaining_s() < 0.4


class LeaseMachine(RuleBasedStateMachine):
    """Any interleaving of acquire / renew / release / server-side expiry / a lost epoch counter
    among three consumers: at most one owner at a time, every new term's epoch is higher than all
    before, and no token repeats."""

    def __init__(self) -> None:
        super().__init__()
        self.stream = f"hyp-{id(self)}"
        self.client = SERVER.client()
        self.client.delete(*GroupKeys(self.stream, "g").all())
        self.managers = {n: manager(self.client, self.stream, n) for n in "abc"}
        self.leases: dict[str, Lease] = {}
        self.max_epoch = 0
        self.tokens: set[str] = set()

    @rule(name=st.sampled_from("abc"))
    def acquire(self, name: str) -> None:
        got = self.managers[name].try_acquire()
        if isinstance(got, Lease):
            assert got.epoch > self.max_epoch and got.token not in self.tokens
            self.max_epoch = got.epoch
            self.tokens.add(got.token)
            self.leases = {name: got}  # every earlier term is over: the lease key was free

    @rule(name=st.sampled_from("abc"))
    def renew(self, name: str) -> None:
        lease = self.leases.get(name)
        if lease is not None:
            assert self.managers[name].renew(lease)

    @rule(name=st.sampled_from("abc"))
    def release(self, name: str) -> None:
        lease = self.leases.pop(name, None)
        if lease is not None:
            assert self.managers[name].end_term(lease.token, "released", "test")

    @precondition(lambda self: bool(self.leases))
    @rule()
    def expire_on_server(self) -> None:
        self.client.pexpire(GroupKeys(self.stream, "g").lease, 1)
        self.client.delete(GroupKeys(self.stream, "g").lease)
        self.leases.clear()

    @rule(also_owner=st.booleans())
    def lose_the_counter(self, also_owner: bool) -> None:
        """The epoch counter (and maybe the owner record) is deleted, as by a careless operator
        or a restart that lost it: the next epoch must still be higher than all before."""
        keys = GroupKeys(self.stream, "g")
        self.client.delete(keys.epoch, *([keys.owner] if also_owner else []))

    @rule(name=st.sampled_from("abc"))
    def stale_renew_fails(self, name: str) -> None:
        stale = Lease(f"{name}:0", 0, LeaseConfig(), 0.0)
        assert not self.managers[name].renew(stale)

    @invariant()
    def one_owner(self) -> None:
        value = self.client.get(GroupKeys(self.stream, "g").lease)
        if value is None:
            assert not self.leases
        else:
            assert len(self.leases) == 1
            assert next(iter(self.leases.values())).token == value.decode()

    def teardown(self) -> None:
        self.client.delete(*GroupKeys(self.stream, "g").all())
        for m in self.managers.values():
            m.close()
        self.client.close()


SERVER: ServerProcess


def test_lease_state_machine(server: ServerProcess) -> None:
    """Hypothesis drives the lease scripts on the real server (see LeaseMachine)."""
    global SERVER
    SERVER = server
    LeaseMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30,
                                              deadline=None)
    LeaseMachine.TestCase().runTest()
