"""A member of a consumer group of a partitioned topic (DESIGN.md §7).

Every member runs the same loop, with no leader:

1. **liveness**: it renews its own membership on the server's clock (``member_beat``: a sorted
   set of members scored by expiry, in the topic's slot), which also drops expired members and
   returns the live ones; it polls the heartbeat connections of the others (``CLIENT LIST ID``,
   every ``watch_interval_ms``), and ends the membership of one whose connection is gone
   (``member_leave`` ... ``gone``, compare-and-delete on the connection it saw);
2. **assignment**: it computes the target owner of every partition from the sorted live-member
   list (:func:`~orderedstream._assign.assign`), exactly as every other member does;
3. **handoff**: it hands a partition it owns but is not the target of over gracefully (the
   partition's term stops after the batch in hand and releases its lease; a ``released``
   record on the group's timeline wakes the target at once), and takes the partitions it is the
   target of: the lease of each (the same fenced lease as a single stream's, on the node that
   owns the partition's slot); a lease still held by a member that is no longer live is ended
   (compare-and-delete on its token) and taken in the same round trip;
4. **serving**: every owned partition runs the coordinator's term as it is (takeover, replay
   first, new entries: :meth:`~orderedstream._owner.Owner.serve`), all of them driven by one
   thread over one connection per node (:class:`~orderedstream._mux.Mux`); the leases are
   renewed from this member's control thread, pipelined per node.

Partitions that do not move never pause during a rebalance.  Connections per node: the driver's
command and wake-up connections, and the control thread's heartbeat connection (3), plus the
membership, waiting and wake-up (poke) connections on the node of the topic's slot: bounded,
whatever the number of partitions.  The control thread's I/O to the partitions' nodes
(acquisitions, renewals) runs on a worker per node and the driver reads each node's replies as
they come: a node that stops answering stalls only the partitions it serves.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import functools
import inspect
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import redis

from ._background import Background
from ._config import MemberConfig
from ._deadletter import Parker
from ._events import Emitter, Event, HandlerStalled, Hook, LeaseAcquired
from ._handling import Handler, Handling
from ._holdkey import HoldGate
from ._keys import GroupKeys, TopicGroupKeys
from ._lease import Lease, parse_token
from ._mux import HandlerCalls, Lane, Mux
from ._owner import Owner
from ._recovery import CONNECTION_ERRORS, Outage, passing_fault
from ._scripts import EVENTS_MAXLEN, AcquireReply, Scripts, take_over_command
from ._server import NodeMap, client_name, connect_url
from ._takeover import ensure_group
from ._target import Target, read_target, settle_target
from ._topic import Topic, load_topic
from ._wire import Rebalance as R
from .exceptions import ConfigError

log = logging.getLogger("orderedstream")

__all__ = ["TopicMember"]

RETRY_HELD_S = 0.1  # a target partition its live holder has not handed over yet: ask again
FAILED_RETRY_S = 0.5  # a term that ended on an error: ask again after this, doubled each time
FAILED_RETRY_MAX_S = 30.0
FAILED_RESET_S = 30.0  # ... counted from the start again once a term lived this long


class _Life:
    """One partition's term: ``_halting`` (read by the handling loop per entry) and the stop
    event the term's reader waits on."""

    def __init__(self) -> None:
        self._halting = False
        self.stop = threading.Event()

    def halt(self) -> None:
        self._halting = True
        self.stop.set()


@attrs.define
class _Served:
    """A partition this member owns now."""

    lease: Lease
    life: _Life
    handling: Handling
    handing_over: bool = False
    progress: int = 0  # the handling loop's progress when last seen to move
    since: float = 0.0  # ... and when


@attrs.define
class _Beat:
    """The control thread's heartbeat connection to one node: acquire, renew, end terms."""

    client: redis.Redis
    scripts: Scripts
    conn_id: int = 0


class TopicMember(Background):
    """One member of a consumer group of a partitioned topic; see the module's docstring.

    ``start()`` returns, ``stop(timeout)`` hands every owned partition over and leaves the group,
    ``run()`` blocks, and ``with`` works as for a :class:`~orderedstream.Coordinator`.
    The topic must exist (:func:`~orderedstream.create_topic`).
    """

    def __init__(self, config: MemberConfig, handler: Handler, client: Any,
                 *, hooks: Sequence[Hook] = ()) -> None:
        if inspect.iscoroutinefunction(handler):
            raise ConfigError(f"{handler!r} is an async function: a TopicMember calls its "
                              "handler; pass a plain function")
        self.config = config
        self._handler = handler
        self._client = client
        self._streams: list[str] = []  # the topic's partition streams (read at the start)
        self._topic: Topic | None = None
        self._target: Target | None = None
        self._target_stale = True
        self._emitter = Emitter(hooks)
        self._keys = TopicGroupKeys(config.topic, config.group)
        timeout_s = config.socket_timeout_ms / 1000.0
        self._nodes = NodeMap(client, socket_timeout_s=timeout_s)
        self._base = f"os:{config.name}"
        # the command connection that wakes the control thread (CLIENT UNBLOCK), on the node
        # of the topic's slot
        # (one connection: the driver and the node workers poke it from their threads)
        super().__init__(self._nodes.node_for(self._keys.members, f"{self._base}:poke",
                                              single=True)[1])
        self._served: dict[int, _Served] = {}
        self._ended: collections.deque[tuple[int, BaseException | None]] = collections.deque()
        self._handed: list[int] = []  # handed over in the driver's current round (its thread)
        self._live: tuple[str, ...] = ()
        self._conns: dict[str, str] = {}  # other members' connection records
        self._run_id = ""
        self._beats: dict[str, _Beat] = {}
        self._beats_lock = threading.Lock()
        # the control thread's I/O to the partitions' nodes (acquire, renew) runs on worker
        # threads, one job per node at a time: a node that stops answering holds up its own
        # partitions only; what a job found is applied on the control thread (``_inbox``)
        self._workers: concurrent.futures.ThreadPoolExecutor | None = None
        self._node_jobs: dict[str, concurrent.futures.Future[None]] = {}
        self._busy: set[str] = set()  # nodes whose job's result is not applied yet
        self._renew_owed: set[str] = set()  # nodes whose renewal found them busy
        self._acquire_owed: set[str] = set()  # ... whose acquisition found them busy
        self._inbox: collections.deque[Callable[[], None]] = collections.deque()
        self._acquiring: set[int] = set()  # asked for by a job not applied yet
        self._failed: dict[int, int] = {}  # partition -> terms in a row that ended on an error
        self._next_renew = 0.0  # when the owned leases are renewed next
        self._retry_at: dict[int, float] = {}
        self._registry: _Beat | None = None
        self._waiter: redis.Redis | None = None
        self._mux: Mux | None = None
        self._scripts: Scripts | None = None
        self._host = socket.gethostname()
        self._last_event = "0-0"  # the newest timeline record seen (set at the start)
        self._outage = Outage(self._event)
        self._stalled: int | None = None  # the partition whose handler is stuck
        self._next_poll = 0.0  # when to look at the other members' connections next
        self._next_expiry = math.inf  # when the first other membership runs out
        self._calls: HandlerCalls | None = None
        """Set before ``start()`` (:class:`~orderedstream.AsyncTopicMember`): the handler calls
        are yielded by the steps and carried out there (on an event loop), not made by the
        driver's thread."""

    @classmethod
    def from_url(cls, url: str, config: MemberConfig, handler: Handler,
                 *, hooks: Sequence[Hook] = ()) -> TopicMember:
        """Build with a client for ``url`` (any node of a cluster, or one server)."""
        return cls(config, handler, connect_url(url), hooks=hooks)

    # -- what it shows ------------------------------------------------------------------------

    @property
    def owned(self) -> dict[int, int]:
        """Partition -> epoch of every partition this member owns now."""
        return {p: s.lease.epoch for p, s in list(self._served.items()) if s.lease.valid()}

    @property
    def members(self) -> tuple[str, ...]:
        """The live members, as this member last saw them (sorted)."""
        return self._live

    # -- life cycle (Background: stop, join, with) -----------------------------------------

    _kind = "topic member"

    def start(self) -> None:
        """Run in a background thread; returns at once.  Errors surface from ``join``."""
        self._start_thread()

    def run(self) -> None:
        """Run in the caller's thread until ``stop()`` or a fatal error."""
        self._main()

    # -- the control loop -------------------------------------------------------------------

    def _main(self) -> None:
        cfg = self.config
        try:
            self._topic = load_topic(self._client, cfg.topic)
            self._streams = list(self._topic.streams)
            self._connect()
            for stream in self._streams:
                ensure_group(self._client, cfg.partition(stream), None)
            mux = self._mux
            assert mux is not None
            self._prepare(mux)
            mux.start()
            self._last_event = self._tail_id()  # every record from here on wakes us
            self._beat("join")
            next_beat = 0.0
            stall_check = min(cfg.handler_timeout_ms / 4000.0, 1.0)
            while not self._stop.is_set():
                try:
                    if self._registry is None:
                        self._connect()
                    self._take_inbox()
                    now = time.monotonic()
                    self._renew_due(now)  # first: it needs nothing of the topic's node
                    self._watch_stalls(now)
                    if self._stalled is not None:  # out of the group until the handler returns
                        self._reap()
                        self._wait_events(cfg.lease.renew_interval_ms / 1000.0)
                        continue
                    if now >= min(next_beat, self._next_expiry):
                        self._beat("renew")
                        next_beat = now + cfg.lease.renew_interval_ms / 1000.0
                    if cfg.lease.watch_connection and now >= self._next_poll:
                        alone = not self._poll()  # alone: nobody to watch until the next beat
                        self._next_poll = (next_beat if alone else
                                           now + cfg.lease.watch_interval_ms / 1000.0)
                    self._reap()
                    self._reconcile()
                    self._outage.ok()
                    wake = min(next_beat, self._next_expiry, self._next_renew,
                               *self._retry_at.values(),
                               self._next_poll if cfg.lease.watch_connection else next_beat,
                               now + stall_check if self._served else next_beat)
                    self._wait_events(max(wake - time.monotonic(), 0.001))
                except Exception as err:
                    reason = passing_fault(err)
                    if reason is None:
                        raise
                    self._reset_connections()
                    self._wait_out(self._outage.failed(reason))
        finally:
            self._shutdown()
            self._stopped.set()

    def _renew_due(self, now: float) -> None:
        if now >= self._next_renew:
            self._renew()
            self._next_renew = now + self.config.lease.renew_interval_ms / 1000.0

    def _wait_out(self, seconds: float) -> None:
        """The back-off after a fault on the node of the topic's slot (membership, target,
        timeline): the leases of the partitions on the other nodes are renewed meanwhile, as
        their terms need nothing of that node (a primary failing over there took every lease
        of the member with it, through the TTL, when this was a plain wait)."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            try:
                self._take_inbox()
                now = time.monotonic()
                if now >= deadline:
                    return
                self._renew_due(now)
            except Exception as err:
                if passing_fault(err) is None:
                    raise
                now = time.monotonic()
            self._stop.wait(max(min(deadline, self._next_renew) - now, 0.001))

    def _connect(self) -> None:
        """Connections to the node of the topic's slot (again after a fault: it may have
        moved, or its primary changed)."""
        registry_key = self._keys.members
        _, client = self._nodes.node_for(registry_key, f"{self._base}:member", single=True)
        self._registry = _Beat(client, Scripts(client))
        # the waiting connection's BLOCK is at most a renew interval: below its socket timeout
        _, self._waiter = self._nodes.node_for(registry_key, f"{self._base}:wait", single=True)
        if self._cmd is None:
            self._cmd = self._nodes.node_for(registry_key, f"{self._base}:poke", single=True)[1]
        self._wait_id = None
        if self._scripts is None:
            self._scripts = Scripts(client)
            self._mux = Mux(self._nodes, self._scripts, self._base, self._calls)

    def _prepare(self, mux: Mux) -> None:
        """Before joining: the connections this member will serve partitions over, to every
        node that serves one (a member that opens them while taking its partitions spends
        that CPU inside the rebalance, where every member's partitions feel it)."""
        mux.prepare(self._streams)
        ready: set[int] = set()
        for stream in self._streams:
            with contextlib.suppress(*CONNECTION_ERRORS, redis.RedisError):
                beat = self._node_beat(stream)
                if id(beat) not in ready:  # its pipelines' connection (acquire, renew)
                    ready.add(id(beat))
                    pipe = beat.client.pipeline(transaction=False)
                    pipe.execute_command("PING")  # type: ignore[no-untyped-call]
                    pipe.execute()

    def _close_registry(self) -> None:
        for client in (self._registry.client if self._registry else None, self._waiter,
                       self._cmd):
            if client is not None:
                with contextlib.suppress(Exception):
                    client.close()
        self._registry = self._waiter = self._cmd = None  # type: ignore[assignment]
        self._wait_id = None

    def _reset_connections(self) -> None:
        """After a fault of the control loop (the node of the topic's slot): its connections
        there are opened again on next use (on the node that serves the slot by then).  The
        partitions' nodes are the node jobs' business (:meth:`_node_failed_later`)."""
        self._close_registry()
        self._nodes.refresh()

    def _close_beats(self) -> None:
        with self._beats_lock:
            beats, self._beats = list(self._beats.values()), {}
        for beat in beats:
            with contextlib.suppress(Exception):
                beat.client.close()

    # -- liveness -------------------------------------------------------------------------------

    def _beat(self, mode: str) -> None:
        """Renew (or join) this membership; learn the live members."""
        if self._stalled is not None and mode == "renew":
            return  # out of the group until the stuck handler returns
        registry = self._registry
        assert registry is not None
        if not registry.conn_id:
            registry.conn_id = int(registry.client.client_id())
        keys = self._keys
        reply = registry.scripts.run(
            "member_beat", [keys.members, keys.conns, keys.events],
            [self.config.name, self.config.lease.ttl_ms, registry.conn_id,
             client_name(f"{self._base}:member"), EVENTS_MAXLEN, mode])
        self._run_id = _text(reply[1])
        if int(reply[2]) == -1:  # dropped (expired while paused, or found gone): join again
            self._beat("join")
            return
        flat = [_text(v) for v in reply[3:]]
        names = tuple(sorted(flat[0::3]))
        if names != self._live:
            self._next_poll = 0.0  # other members now: watch them from now on
        self._live = names
        self._conns = dict(zip(flat[0::3], flat[1::3], strict=True))
        # beat again right after the first other member's membership runs out (a paused
        # member): its partitions are then taken at once, not at our next beat
        now_ms = int(reply[0])
        others = [int(float(e)) for n, e in zip(flat[0::3], flat[2::3], strict=True)
                  if n != self.config.name]
        self._next_expiry = (time.monotonic() + (min(others) - now_ms + 5) / 1000.0
                             if others else math.inf)
        self._target_stale = True  # (cheap: one script per beat)

    def _poll(self) -> bool:
        """End the membership of every other member whose heartbeat connection is gone; False
        when there is no other member to watch."""
        registry = self._registry
        assert registry is not None
        others = {}
        for name, record in self._conns.items():
            conn_id, _, rest = record.partition(" ")
            conn_name, _, run_id = rest.partition(" ")
            # only ids the server we ask handed out mean anything to it
            if name != self.config.name and conn_id.isdigit() and run_id == self._run_id:
                others[name] = (conn_id, conn_name, record)
        if not others:
            return False
        try:
            listed: Any = registry.client.execute_command(  # type: ignore[no-untyped-call]
                "CLIENT", "LIST", "ID", *[c[0] for c in others.values()])
        except redis.ResponseError:  # not permitted: liveness by expiry only
            self._conns = {}
            return False
        text = " " + _text(listed).replace("\n", " \n ")
        gone = False
        for name, (conn_id, conn_name, record) in others.items():
            if f" id={conn_id} " in text and f" name={conn_name} " in text:
                continue
            keys = self._keys
            registry.scripts.run(
                "member_leave", [keys.members, keys.conns, keys.events],
                [name, "gone", self.config.name, "heartbeat connection gone", EVENTS_MAXLEN,
                 record])
            gone = True  # ended by us or by another member: learn the members again
        if gone:
            self._beat("renew")
        return True

    def _wait_events(self, seconds: float) -> None:
        """Block on the group's timeline until something happens (a member joins, leaves, a
        partition is released) or ``seconds`` passed; learn the members again if it did."""
        waiter = self._waiter
        assert waiter is not None
        if self._wait_id is None:
            self._wait_id = int(waiter.client_id())
        if self._ended or self._inbox or self._stop.is_set():
            return
        try:
            got: Any = waiter.xread({self._keys.events: self._last_event}, count=100,
                                    block=max(int(seconds * 1000), 1))
        except CONNECTION_ERRORS:
            self._wait_id = None
            waiter.connection_pool.disconnect()  # never reuse a connection cut mid-command
            raise
        if got:
            entries = got[0][1]
            self._last_event = _text(entries[-1][0])
            kinds = {fields.get(R.TYPE.encode()) for _, fields in entries}
            if kinds - {b"released", b"assigned"}:
                self._beat("renew")
            if b"assigned" in kinds:
                # the target stored since ours, if any (every member wakes to the record of a
                # target that most of them derived or read already)
                newest = max(int(fields.get(R.VERSION.encode(), b"0") or 0)
                             for _, fields in entries
                             if fields.get(R.TYPE.encode()) == b"assigned")
                if self._target is None or not newest or newest > self._target.version:
                    self._target_stale = True
            self._retry_at = {p: 0.0 for p in self._retry_at}  # look again at once

    def _tail_id(self) -> str:
        """The id of the group timeline's newest record ('0-0' when empty)."""
        registry = self._registry
        assert registry is not None
        last: Any = registry.client.xrevrange(self._keys.events, count=1)
        return _text(last[0][0]) if last else "0-0"

    def _poke(self) -> None:
        """Wake the control thread (parked in its XREAD BLOCK)."""
        if self._cmd is not None:
            self._unblock()

    # -- partitions ---------------------------------------------------------------------------

    def _node_beat(self, stream: str) -> _Beat:
        """The heartbeat connection to the node serving ``stream`` (made on first use; on a
        node's worker thread, or the control thread before any worker runs)."""
        name = self._nodes.node_name(stream)
        with self._beats_lock:
            beat = self._beats.get(name)
        if beat is None:
            _, client = self._nodes.node_for(stream, f"{self._base}:beat", single=True)
            beat = _Beat(client, Scripts(client))
            with self._beats_lock:
                beat = self._beats.setdefault(name, beat)
            if beat.client is not client:  # made meanwhile by another thread
                client.close()
        if not beat.conn_id:
            beat.conn_id = int(beat.client.client_id())
        return beat

    def _on_node(self, name: str, work: Callable[[], Callable[[], None]]) -> bool:
        """Run ``work`` (I/O to node ``name``) on a worker thread; the function it returns
        runs on the control thread, which it wakes.  One job per node at a time: False when
        that node is still busy with an earlier one (slow, or not answering at all), until
        that one's result is applied."""
        if name in self._busy:
            return False
        if self._workers is None:
            self._workers = concurrent.futures.ThreadPoolExecutor(
                max_workers=16, thread_name_prefix=f"{self._base}:node")

        def job() -> None:
            try:
                then = work()
            except Exception as err:
                then = self._node_failed_later(name, err)
            # (the node is busy until this is applied; a renewal that found nothing to do
            # wakes nobody, unless a renewal waits for the node: then it runs at once)
            self._inbox.append(functools.partial(self._job_done, name, then))
            if then is not _nothing or name in self._renew_owed or name in self._acquire_owed:
                self._poke()

        self._busy.add(name)
        self._node_jobs[name] = self._workers.submit(job)
        return True

    def _job_done(self, name: str, then: Callable[[], None]) -> None:
        """On the control thread: apply what node ``name``'s job found; the node is free
        again, and a renewal that found it busy runs now (not a renew interval later: two
        skipped in a row let its leases lapse)."""
        self._busy.discard(name)
        self._acquire_owed.discard(name)  # (this round's reconcile asks)
        try:
            then()
        finally:
            if name in self._renew_owed:
                self._renew_owed.discard(name)
                self._renew(only=name)

    def _node_failed_later(self, name: str, err: BaseException) -> Callable[[], None]:
        def failed() -> None:  # on the control thread
            if isinstance(err, CONNECTION_ERRORS):  # asked again on the node serving it then
                with self._beats_lock:
                    beat = self._beats.pop(name, None)
                if beat is not None:
                    with contextlib.suppress(Exception):
                        beat.client.close()
                self._nodes.refresh()
                return
            raise err
        return failed

    def _take_inbox(self) -> None:
        """Apply what the node jobs found (on the control thread)."""
        while self._inbox:
            self._inbox.popleft()()

    def _reconcile(self) -> None:
        """Hand over what is no longer ours; take what is."""
        me = self.config.name
        settled = self._next_target()
        # the members the target was derived for: live on the server's clock at that moment
        # (fresher than this member's own view between two heartbeats)
        live = set(settled.members) | {me}
        target = set(settled.partitions_of(me))
        for partition, served in self._served.items():
            if partition not in target and not served.handing_over:
                served.handing_over = True
                served.life.halt()
                assert self._mux is not None
                self._mux.poke()
        now = time.monotonic()
        wanted = [p for p in sorted(target) if p not in self._served
                  and p not in self._acquiring and self._retry_at.get(p, 0.0) <= now]
        for partition in list(self._retry_at):
            if partition not in target or partition in self._served:
                del self._retry_at[partition]
        if wanted and not self._stop.is_set():
            self._acquire(wanted, live)

    def _next_target(self) -> Target:
        """The group's target for the live members (:func:`~._target.settle_target`: the
        stored one when it was made for them, else the next one, derived from it and stored
        with a compare-and-set), read again after every heartbeat or rebalance record."""
        if self._target is None or self._target_stale:
            registry = self._registry
            assert registry is not None and self._topic is not None
            self._target = settle_target(registry.client, self._topic, self.config.group,
                                         by=self.config.name)
            self._target_stale = False
        return self._target

    def _acquire(self, partitions: list[int], live: set[str]) -> None:
        """Ask for the leases of ``partitions``: one job per node (:meth:`_acquire_on`)."""
        by_node: dict[str, list[int]] = collections.defaultdict(list)
        for partition in partitions:
            by_node[self._nodes.node_name(self._streams[partition])].append(partition)
        for name, group in by_node.items():
            if self._on_node(name, self._acquire_job(name, group, live)):
                self._acquiring.update(group)
                for partition in group:  # its time came: the job says when to ask again (a
                    # time left past would wake the control thread at once until it is done)
                    self._retry_at.pop(partition, None)
            else:  # that node is still busy: asked for again as soon as its job is done
                self._acquire_owed.add(name)

    def _acquire_job(self, name: str, group: list[int], live: set[str]
                     ) -> Callable[[], Callable[[], None]]:
        def work() -> Callable[[], None]:
            granted: list[tuple[int, Lease]] = []
            try:
                return self._acquire_on(name, group, live, granted)
            except Exception as err:
                failed = self._node_failed_later(name, err)

                def then() -> None:  # what was granted before the fault is served all the
                    # same (dropped, it stayed ours on the server with no term running)
                    self._acquiring.difference_update(group)
                    self._take_granted(name, granted)
                    failed()
                return then
        return work

    def _take_granted(self, name: str, granted: list[tuple[int, Lease]]) -> None:
        """On the control thread: serve the leases a job on node ``name`` was granted; while
        the member is stepped down (a handler call stuck), give them up at once instead, as
        the step-down gave up the others (their terms could not run: the driver's thread is
        the stuck one)."""
        if self._stalled is None:
            for partition, lease in granted:
                self._serve(partition, lease)
        elif granted:  # (that node's worker is free: its job's result is being applied)
            self._on_node(name, functools.partial(self._give_up_on, granted))

    def _give_up_on(self, granted: list[tuple[int, Lease]]) -> Callable[[], None]:
        """On a worker thread: end the terms of ``granted`` (one node's), unserved."""
        beat = self._node_beat(self._streams[granted[0][0]])
        self._pipeline(beat, [self._end_command(
            beat, partition, lease.token, "stalled", "granted while the member stepped down "
            "(a handler call stuck past the handler timeout)") for partition, lease in granted])
        return _nothing

    def _acquire_on(self, name: str, group: list[int], live: set[str],
                    granted: list[tuple[int, Lease]]) -> Callable[[], None]:
        """On a worker thread: ask for the leases of ``group`` (partitions on one node,
        pipelined), each with its term's ``take_over`` script right behind (fenced by the new
        term's nonce: the takeover and first page come in the same round trip); a lease
        still held by a member that is not live is ended and taken in the next round trip.
        Returns what the control thread then does: serve what was granted (``granted``, as
        it comes), and say when to ask again for the rest."""
        cfg = self.config
        fresh = False
        again: dict[int, float] = {}
        beat = self._node_beat(self._streams[group[0]])
        ends: list[tuple[Any, ...]] = []
        retry: list[int] = []
        for partition, got in self._ask(beat, group, []):
            if isinstance(got, Lease):
                granted.append((partition, got))
                continue
            holder = parse_token(got.holder)[0]
            if holder not in live and holder != cfg.name and not fresh:
                # the target's members may be older than the holder's term (it joined,
                # and acquired, since): only the members live now say it is gone (it
                # joined before it acquired, so it is among them unless it is gone)
                registry = self._registry
                if registry is None or self._topic is None:  # reconnecting meanwhile
                    raise redis.ConnectionError("the member's own connections are reset")
                live = set(read_target(registry.client, self._topic, cfg.group).live) | {
                    cfg.name}
                fresh = True
            if holder in live and holder != cfg.name:
                # the holder hands it over when it sees the same target; its 'released'
                # record wakes us; look again meanwhile now and then
                again[partition] = time.monotonic() + RETRY_HELD_S
                continue
            ends.append(self._end_command(beat, partition, got.holder, "ended",
                                          f"member {holder} is gone"))
            retry.append(partition)
        for partition, got in self._ask(beat, retry, ends):
            if isinstance(got, Lease):
                granted.append((partition, got))
            else:
                again[partition] = time.monotonic() + 0.05

        def then() -> None:  # on the control thread
            self._acquiring.difference_update(group)
            self._take_granted(name, granted)
            self._retry_at.update(again)
            if fresh and again:
                self._target_stale = True  # derived for fewer members than live now
        return then

    def _ask(self, beat: _Beat, partitions: list[int], first: list[tuple[Any, ...]]
             ) -> list[tuple[int, Lease | AcquireReply]]:
        """One round trip: ``first``, then ``acquire`` + ``take_over`` of each partition:
        (partition, its lease, or the refusal) each (a granted one is not served yet)."""
        if not partitions:
            return []
        cfg = self.config
        commands = list(first)
        for partition in partitions:
            keys = GroupKeys(self._streams[partition], cfg.group)
            nonce = secrets.token_hex(6)
            commands.append(beat.scripts.acquire_command(
                keys, cfg.name, cfg.lease.ttl_ms, beat.conn_id,
                client_name(f"{self._base}:beat"), self._host, os.getpid(), nonce))
            commands.append(beat.scripts.command(*take_over_command(
                keys, cfg.name, nonce, cfg.claim_page, cfg.batch_size)))
        replies = self._pipeline(beat, commands)[len(first):]
        out: list[tuple[int, Lease | AcquireReply]] = []
        for n, partition in enumerate(partitions):
            sent, reply = replies[2 * n]
            got = AcquireReply.parse(Scripts.reply(reply))
            if not got.granted:
                out.append((partition, got))
                continue
            lease = Lease(got.token, got.epoch, cfg.lease, sent,
                          server_changed=got.server_changed)
            head = replies[2 * n + 1][1]
            if not isinstance(head, redis.ResponseError):
                lease.head_start = head
            out.append((partition, lease))
        return out

    @staticmethod
    def _pipeline(beat: _Beat, commands: list[tuple[Any, ...]]) -> list[tuple[float, Any]]:
        """Run ``commands`` (EVALSHA) in one round trip on ``beat``; (send time, reply or
        error) each.  Scripts missing from the server's cache are loaded, and the commands
        that found them missing (only those: the others ran) sent again."""
        out: list[tuple[float, Any]] = [(0.0, None)] * len(commands)
        todo = list(range(len(commands)))
        for attempt in range(2):
            pipe = beat.client.pipeline(transaction=False)
            for i in todo:
                pipe.execute_command(*commands[i])  # type: ignore[no-untyped-call]
            sent = time.monotonic()
            for i, reply in zip(todo, pipe.execute(raise_on_error=False), strict=True):
                out[i] = (sent, reply)
            todo = [i for i in todo if isinstance(out[i][1], redis.exceptions.NoScriptError)]
            if attempt or not todo:
                break
            for name in ("acquire", "renew", "end_term", "take_over"):
                beat.scripts.sha(name)
        return out

    def _serve(self, partition: int, lease: Lease) -> None:
        """Start serving ``partition`` under ``lease`` (its term runs on the driver)."""
        cfg = self.config
        stream = self._streams[partition]
        pcfg = cfg.partition(stream)
        keys = GroupKeys(stream, cfg.group)
        scripts = self._scripts
        assert scripts is not None and self._mux is not None
        life = _Life()

        def emit(cls: type[Event], **fields: Any) -> None:
            self._emitter(cls(stream=stream, group=cfg.group, consumer=cfg.name, **fields))

        parker = Parker(scripts, keys, cfg.group, cfg.retry.min_park_delay_ms)
        gate = (HoldGate(cfg.hold_key_field, scripts, keys, parker, cfg.name, emit)
                if cfg.hold_key_field is not None else None)
        handling = Handling(life, self._handler, pcfg, parker, gate, emit, self._emitter)
        handling.partition = partition
        handling.is_async = self._calls is not None
        # the mux pipelines every partition's reads on one connection per node, where no
        # partition's WATCH could be kept: its reads are fenced by the deliver script
        owner = Owner(scripts, keys, pcfg, handling, gate, Outage(emit), life.stop, emit,
                      watched=False)
        self._served[partition] = _Served(lease, life, handling, since=time.monotonic())
        self._retry_at.pop(partition, None)
        emit(LeaseAcquired, epoch=lease.epoch)

        def done(error: BaseException | None) -> None:  # on the driver's thread
            served = self._served.get(partition)
            if served is not None and served.handing_over and self._mux is not None:
                # announce the handover from here, in the driver's next write: the target
                # member wakes without waiting for this member's control thread
                if not self._handed:
                    self._mux.at_round_end(self._announce_handed)
                self._handed.append(partition)
            self._ended.append((partition, error))
            # wake the control thread with the driver's next write (the 'released' record
            # does, where there is one), never by a round trip of the driver's own: that
            # would hold every partition of the member meanwhile
            wait_id = self._wait_id
            if wait_id is not None and self._mux is not None:
                self._mux.post(self._keys.members, ("CLIENT", "UNBLOCK", wait_id))

        step = owner.serve(lease)
        calls = self._calls
        self._mux.add(Lane(stream, step if calls is None else calls.relay(step), life.stop,
                           done))

    def _announce_handed(self) -> None:
        """On the driver's thread, as its round ends: one ``released`` record for every
        partition handed over in that round (each record wakes every member of the group)."""
        handed, self._handed = self._handed, []
        if handed and self._mux is not None:
            self._mux.post(self._keys.events, (
                "XADD", self._keys.events, "MAXLEN", "~", EVENTS_MAXLEN, "*", R.TYPE,
                "released", R.MEMBER, self.config.name, R.PARTITIONS, ",".join(map(str, handed))))

    def _watch_stalls(self, now: float) -> None:
        """The handler timeout: every partition's handler runs on the driver's one thread, so a
        handler call stuck past ``handler_timeout_ms`` stalls every partition of this member.
        Step down at once (:class:`HandlerStalled`): every lease is given up (compare-and-delete,
        so the other members take the partitions without waiting for the TTL) and the member
        leaves the group; it joins again once the stuck call has returned."""
        if self._stalled is not None:
            served = self._served.get(self._stalled)
            if served is None or served.handling.progress() != served.progress:
                self._stalled = None  # it returned: its terms end (lost) and we join again
                self._beat("join")
            return
        timeout = self.config.handler_timeout_ms / 1000.0
        for partition, served in self._served.items():
            handling = served.handling
            progress = handling.progress()
            if handling.busy is None or handling.pausing or progress != served.progress:
                served.progress, served.since = progress, now
            elif now - served.since >= timeout:
                self._step_down(partition, served, (now - served.since) * 1000.0)
                return

    def _step_down(self, stuck: int, served: _Served, running_ms: float) -> None:
        cfg = self.config
        entry = served.handling.current_entry()
        reason = (f"handler stalled: running {running_ms:.0f} ms on entry {entry} of partition "
                  f"{stuck} (handler timeout {cfg.handler_timeout_ms} ms)")
        self._stalled = stuck
        stream = self._streams[stuck]
        self._emitter(HandlerStalled(stream=stream, group=cfg.group, consumer=cfg.name,
                                     epoch=served.lease.epoch, entry_id=entry,
                                     running_ms=round(running_ms, 1)))
        by_node: dict[str, list[int]] = collections.defaultdict(list)
        for partition, other in self._served.items():
            other.lease.lose(reason)
            other.life.halt()
            by_node[self._nodes.node_name(self._streams[partition])].append(partition)
        if self._mux is not None:
            self._mux.poke()  # (its lanes asleep wake when the stuck call returns)
        for group in by_node.values():
            beat = self._node_beat(self._streams[group[0]])
            with contextlib.suppress(*CONNECTION_ERRORS, redis.ResponseError):
                self._pipeline(beat, [self._end_command(
                    beat, p, self._served[p].lease.token, "stalled", reason) for p in group])
        registry = self._registry
        if registry is not None:
            keys = self._keys
            with contextlib.suppress(*CONNECTION_ERRORS, redis.ResponseError):
                registry.scripts.run(
                    "member_leave", [keys.members, keys.conns, keys.events],
                    [cfg.name, "left", cfg.name, reason, EVENTS_MAXLEN, ""])

    def _end_command(self, beat: _Beat, partition: int, token: str, kind: str,
                     reason: str) -> tuple[Any, ...]:
        """``end_term`` of ``partition``'s term ``token`` (compare-and-delete), for a pipeline."""
        keys = GroupKeys(self._streams[partition], self.config.group)
        return beat.scripts.command("end_term", [keys.lease, keys.events],
                                    [token, kind, self.config.name, reason, EVENTS_MAXLEN])

    def _reap(self) -> None:
        """Forget the partitions whose term ended (a handover was announced by the driver as
        the term ended: ``released`` on the group's timeline wakes the target at once)."""
        while self._ended:
            partition, error = self._ended.popleft()
            served = self._served.pop(partition, None)
            if error is None:
                self._failed.pop(partition, None)
                continue
            # asked for again after 0.5 s, 1 s, 2 s ... 30 s (a refused command fails every
            # term at once: not a new term, and a log line, hundreds of times a second)
            lived = time.monotonic() - served.lease.sent_at if served is not None else 0.0
            failed = self._failed.get(partition, 0) if lived < FAILED_RESET_S else 0
            self._failed[partition] = failed + 1
            delay = min(FAILED_RETRY_S * 2 ** failed, FAILED_RETRY_MAX_S)
            self._retry_at[partition] = time.monotonic() + delay
            log.error("partition %s of topic %s: its term ended on error (asking for it again "
                      "in %.1f s): %s: %s", partition, self.config.topic, delay,
                      type(error).__name__, error)

    def _renew(self, only: str | None = None) -> None:
        """Renew every owned lease (``only``: those on that node): one pipeline per node,
        each on its node's worker (a node that does not answer holds up the renewals of its
        own partitions only); a node still busy with an earlier job is renewed once that job
        is done (:meth:`_job_done`)."""
        by_node: dict[str, list[tuple[int, Lease]]] = collections.defaultdict(list)
        for partition, served in self._served.items():
            name = self._nodes.node_name(self._streams[partition])
            if only is not None and name != only:
                continue
            if served.lease.valid():
                by_node[name].append((partition, served.lease))
            elif not served.life.stop.is_set():  # lapsed on our clock: end that term now
                served.life.halt()
                assert self._mux is not None
                self._mux.poke()
        for name, group in by_node.items():
            if not self._on_node(name, functools.partial(self._renew_on, name, group)):
                self._renew_owed.add(name)

    def _renew_on(self, name: str, group: list[tuple[int, Lease]]) -> Callable[[], None]:
        """On a worker thread: renew the leases of ``group`` (one node's), in one round trip;
        the leases take the replies at once (a lease is safe to touch from any thread)."""
        cfg = self.config
        beat = self._node_beat(self._streams[group[0][0]])
        commands = []
        for partition, lease in group:
            keys = GroupKeys(self._streams[partition], cfg.group)
            commands.append(beat.scripts.command(
                "renew", [keys.lease, keys.owner], [lease.token, cfg.lease.ttl_ms, beat.conn_id]))
        replies = self._pipeline(beat, commands)
        moved = False
        for (_, lease), (sent, reply) in zip(group, replies, strict=True):
            if isinstance(reply, Exception):
                if isinstance(reply, redis.exceptions.AskError):  # MOVED too: resharded
                    moved = True
                elif passing_fault(reply) is None:
                    lease.lose(f"renewal failed: {reply}")
            elif int(reply) == 1:
                lease.renewed(sent)
            else:
                lease.lose("the server refused the renewal: the lease expired or another "
                           "member took the partition over")
        if moved:  # asked again on the node serving it then
            return self._node_failed_later(name, redis.ConnectionError("the slot moved"))
        return _nothing

    # -- the end --------------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Hand every partition over (their terms release their leases), leave the group,
        close every connection."""
        workers = self._workers
        if workers is not None:  # leases granted meanwhile are served, then handed over
            concurrent.futures.wait(list(self._node_jobs.values()),
                                    timeout=self.config.socket_timeout_ms / 1000.0)
            with contextlib.suppress(Exception):
                self._take_inbox()
            workers.shutdown(wait=False, cancel_futures=True)
        for served in self._served.values():
            served.life.halt()
        mux = self._mux
        if mux is not None:
            mux.poke()
            if mux.is_alive():
                mux.halt(timeout=self.config.socket_timeout_ms / 1000.0 + 5.0)
        self._served.clear()
        registry = self._registry
        if registry is not None:
            keys = self._keys
            with contextlib.suppress(redis.RedisError, OSError):
                registry.scripts.run(
                    "member_leave", [keys.members, keys.conns, keys.events],
                    [self.config.name, "left", self.config.name, "clean stop",
                     EVENTS_MAXLEN, ""])
        self._close_beats()
        self._close_registry()
        self._nodes.close()

    def _event(self, cls: type[Event], **fields: Any) -> None:
        self._emitter(cls(stream=self.config.topic, group=self.config.group,
                          consumer=self.config.name, **fields))


def _nothing() -> None:
    """A node job's result when there is nothing left to do."""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
