"""The fixer of a partitioned topic: every partition's parked entries, from one thread
(DESIGN.md §6, §7).

Each partition is an ordinary stream with its own delay set, parked records, graveyard and
hold-key state, all in the partition's slot; so a partition is fixed exactly as a
:class:`~orderedstream.Fixer` fixes one stream (:class:`~orderedstream._fixer.StreamRepairs`:
the same claim, re-stream, reschedule, bury and hold-key release scripts, the same visibility
lease per entry).  :class:`TopicFixer` runs one of those per partition, in turn, over one
command connection per node that serves a partition (a plain client of the node that owns the
partition's slot, so every script, WATCH transaction and keyless command stays on it; an entry
too big for a script takes a second one for its WATCH transaction): the connections are
bounded by the cluster's size, not by the number of partitions.

It has no wake-up connection: a cluster cannot block on keys of different slots in one command
(and a blocking read per partition would make the connections grow with P).  Each pass tells
how long until that partition's next parked entry is due; the fixer sleeps until the soonest of
them, and looks at every partition at least every ``max_wait_ms`` (so an entry parked with a
shorter delay than that, or made due by ``dlq retry``, waits for that look).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import attrs
import redis

from ._background import Background
from ._config import TopicFixerConfig
from ._events import Emitter, Event, Hook
from ._fixer import Repair, StreamRepairs
from ._keys import TopicKeys
from ._recovery import Outage, passing_cluster_fault
from ._scripts import Scripts
from ._server import AnyClient, NodeMap, connect_check, connect_url
from ._topic import Topic, load_topic


@attrs.define
class _Partition:
    """One partition's fixing: its work, its outage, when its next pass is due."""

    index: int
    work: StreamRepairs
    outage: Outage
    due: float = 0.0  # time.monotonic() of its next pass


class TopicFixer(Background):
    """Repairs and re-streams the parked entries of one group on every partition of a topic,
    on a cluster or a single server; see the module's docstring.

    >>> config = TopicFixerConfig(topic="payments", group="billing")
    >>> with TopicFixer(config, repair, client):  # doctest: +SKIP
    ...     ...   # start() on enter, stop() on exit

    Any number of topic fixers (and :class:`~orderedstream.Fixer` instances on one partition's
    stream) may run side by side: each parked entry is taken by one at a time, under its
    visibility lease, so a fixer killed anywhere loses nothing and doubles nothing.  Hold-key
    mode needs nothing here: a parked entry carries its hold key, and its partition's
    followers are released behind it as on one stream.  The topic must exist
    (:func:`~orderedstream.create_topic`).
    """

    _kind = "topic fixer"

    def __init__(self, config: TopicFixerConfig, repair: Repair, client: AnyClient,
                 *, hooks: Sequence[Hook] = ()) -> None:
        self.config = config
        self._repair = repair
        self._client = client
        self._emit = Emitter(hooks)
        self._nodes = NodeMap(client, socket_timeout_s=config.socket_timeout_ms / 1000.0)
        self._by_node: dict[str, tuple[redis.Redis, Scripts]] = {}
        self._parts: list[_Partition] = []
        self._outage = Outage(self._event)
        self.topic: Topic | None = None
        """The topic's metadata, once the fixer has read it."""
        # the command client of the node of the topic's slot (no connection until used)
        super().__init__(self._node_client(TopicKeys(config.topic).meta)[0])

    @classmethod
    def from_url(cls, url: str, config: TopicFixerConfig, repair: Repair,
                 *, hooks: Sequence[Hook] = ()) -> TopicFixer:
        """Build with a client for ``url`` (any node of a cluster, or one server)."""
        return cls(config, repair, connect_url(url), hooks=hooks)

    @property
    def totals(self) -> dict[str, int]:
        """Entries re-streamed, rescheduled, buried and lost (a claim taken over) so far, over
        every partition."""
        out = {"restreamed": 0, "rescheduled": 0, "buried": 0, "lost": 0}
        for part in list(self._parts):
            for name, count in part.work.totals.items():
                out[name] += count
        return out

    # -- life cycle (Background: stop, join, with) -----------------------------------------

    def start(self) -> None:
        """Run in a background thread; returns at once.  Errors surface from ``join``."""
        self._start_thread()

    def run(self) -> None:
        """Fix until ``stop()``, in the caller's thread."""
        self._main()

    def _main(self) -> None:
        """Read the topic, then pass after pass over the partitions whose time came, sleeping
        until the soonest next one.  A partition whose node cannot serve it (connection lost, a
        shard failing over, a slot that moved: :func:`~orderedstream._recovery.passing_fault`)
        waits, 50 ms growing to 2 s, says so once (:class:`ServerUnavailable` with the
        partition's stream) and resumes (:class:`ServerRecovered`); the other partitions go
        on.  Any other error ends the fixer (``join`` re-raises it)."""
        try:
            while not self._stop.is_set() and not self._parts:
                try:
                    self._prepare()
                    self._outage.ok()
                except Exception as err:
                    reason = passing_cluster_fault(err)
                    if reason is None:
                        raise
                    self._nodes.refresh()
                    self._stop.wait(self._outage.failed(reason))
            while not self._stop.is_set():
                for part in self._parts:
                    if self._stop.is_set():
                        break
                    if part.due <= time.monotonic():
                        part.due = time.monotonic() + self._pass(part)
                wait = min(part.due for part in self._parts) - time.monotonic()
                if wait > 0:
                    self._stop.wait(wait)
        finally:
            for client, _ in self._by_node.values():
                with contextlib.suppress(Exception):
                    client.close()
            self._by_node.clear()
            with contextlib.suppress(Exception):
                self._cmd.close()
            self._nodes.close()
            self._stopped.set()

    def _prepare(self) -> None:
        cfg = self.config
        connect_check(self._cmd)
        topic = load_topic(self._client, cfg.topic)
        self._parts = [_Partition(index, work, Outage(work.event))
                       for index, stream in enumerate(topic.streams)
                       for work in [StreamRepairs(cfg.partition(stream), self._repair,
                                                  self._emit)]]
        self.topic = topic

    def _event(self, cls: type[Event], **fields: Any) -> None:
        cfg = self.config
        self._emit(cls(stream=cfg.topic, group=cfg.group, consumer=cfg.name, **fields))

    # -- one partition ----------------------------------------------------------------------

    def _pass(self, part: _Partition) -> float:
        """One pass over ``part``; returns the seconds until its next one."""
        cfg = self.config
        stream = part.work.keys.stream
        try:
            client, scripts = self._node_client(stream)
            done = part.work.fix_once(client, scripts)
        except Exception as err:
            reason = passing_cluster_fault(err)
            if reason is None:
                raise
            self._forget(stream)
            return part.outage.failed(reason)
        part.outage.ok()
        if done.claimed >= cfg.batch_size:
            return 0.0  # more may be due: again, after the other partitions' turn
        wait_ms = cfg.max_wait_ms if done.next_due_ms < 0 else min(done.next_due_ms,
                                                                    cfg.max_wait_ms)
        return wait_ms / 1000.0

    def _node_client(self, key: str) -> tuple[redis.Redis, Scripts]:
        """The command client (and its scripts) of the node serving ``key``'s slot: one per
        node, shared by the partitions it serves."""
        node = self._nodes.node_name(key)
        known = self._by_node.get(node)
        if known is None:
            _, client = self._nodes.node_for(key, f"os-fix:{self.config.name}")
            known = self._by_node[node] = (client, Scripts(client))
        return known

    def _forget(self, key: str) -> None:
        """After a fault on ``key``'s node: drop its client (a connection interrupted
        mid-command is never reused) and read the slot map again (the slot may have moved, or
        its primary changed)."""
        with contextlib.suppress(Exception):
            node = self._nodes.node_name(key)
            known = self._by_node.pop(node, None)
            if known is not None:
                with contextlib.suppress(Exception):
                    known[0].close()
        self._nodes.refresh()
