"""Prometheus metrics for coordinators and fixers (the optional extra ``prometheus``).

>>> registry = prometheus_client.CollectorRegistry()              # doctest: +SKIP
>>> hook = PrometheusHook(registry, client=redis.Redis())          # doctest: +SKIP
>>> Coordinator(config, handler, client, hooks=[hook])             # doctest: +SKIP

Everything derives from the event hooks (DESIGN.md §9): the hook counts what the coordinators
and fixers of this process report (handled entries, redeliveries, failovers, lost leases,
takeover and replay durations).  What no event carries (lag, the oldest pending entry's age,
parked and buried entries, the owner and its epoch) is read from the server when Prometheus
scrapes, at most once per ``min_interval_s`` per group, with read-only commands and only when
a ``client`` is given.  One hook serves every coordinator and fixer of a process (series are
labelled by stream, group and consumer); register one hook per registry.

Failovers are counted once, by the consumer that took over, by how the previous term ended:

* ``crash``: the previous owner's connection vanished (a standby saw it and ended the term);
* ``graceful``: the previous owner released the lease (a clean stop);
* ``stalled``: the previous owner's handler ran past ``handler_timeout_ms`` and it stepped down;
* ``ttl``: none of these: the lease ran out (a paused, partitioned or unwatched owner);
* ``unknown``: no ``client`` was given to read the group's timeline, and no crash was seen.

The per-entry handler duration histogram is opt-in, by wrapping the handler
(``hook.timed(handler)``): it costs two clock reads per entry, which matters only for handlers
that take a few microseconds.

Importing this module needs ``prometheus-client`` (``pip install 'orderedstream[prometheus]'``).
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
    )
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("orderedstream.metrics needs prometheus-client: "
                      "pip install 'orderedstream[prometheus]'") from err

import redis

from ._events import (
    BatchHandled,
    EntriesTrimmed,
    EntryParked,
    Event,
    FixerPass,
    GroupRecreated,
    HandlerError,
    HandlerStalled,
    LeaseAcquired,
    LeaseLostEvent,
    LeaseReleased,
    OwnerConnectionGone,
    RepairFailed,
    ReplayCompleted,
    ServerUnavailable,
    Standby,
    TakeoverCompleted,
)
from ._handling import Handler
from ._keys import GroupKeys, id_order
from ._lease import parse_token
from ._message import Message
from ._server import server_ms

__all__ = ["FAILOVER_REASONS", "SERIES", "PrometheusHook", "parse_listen", "read_group", "serve"]

FAILOVER_REASONS = ("crash", "graceful", "stalled", "ttl", "unknown")

# (name as exposed, type, help); the exporter's complete list (a test checks the dashboard's
# queries against it)
SERIES: tuple[tuple[str, str, str], ...] = (
    ("orderedstream_handled_total", "counter",
     "Entries dealt with by this consumer, by outcome (ok: the handler returned and the entry "
     "was acknowledged; parked: moved to the delay set)."),
    ("orderedstream_redeliveries_total", "counter",
     "Entries handed to the handler flagged redelivered (delivered before, not acknowledged)."),
    ("orderedstream_handler_errors_total", "counter",
     "Handler calls that raised, by what followed (retry, park, stop, block)."),
    ("orderedstream_failovers_total", "counter",
     "Terms this consumer took over from another consumer, by how the previous term ended."),
    ("orderedstream_lease_acquisitions_total", "counter",
     "Terms this consumer started (each under a new fencing epoch)."),
    ("orderedstream_lease_lost_total", "counter",
     "Terms this consumer lost while owning (expired, taken over, unrenewable)."),
    ("orderedstream_lease_releases_total", "counter",
     "Terms this consumer handed over on a clean stop."),
    ("orderedstream_owner_connections_gone_total", "counter",
     "Owners this standby saw vanish (connection gone) and whose term it ended."),
    ("orderedstream_handler_stalls_total", "counter",
     "Handler calls past handler_timeout_ms (the owner stepped down)."),
    ("orderedstream_takeover_claimed_total", "counter",
     "Pending entries claimed from other consumers at takeovers."),
    ("orderedstream_trimmed_total", "counter",
     "Pending entries found trimmed or deleted from the stream (acknowledged, not handled)."),
    ("orderedstream_server_unavailable_total", "counter",
     "Times the server became unavailable to this process."),
    ("orderedstream_group_recreated_total", "counter",
     "Times the consumer group was found missing and created again."),
    ("orderedstream_fixer_entries_total", "counter",
     "Parked entries a fixer dealt with, by action (restreamed, rescheduled, buried, lost)."),
    ("orderedstream_repair_failures_total", "counter",
     "Repairs that raised, by action (reschedule, bury)."),
    ("orderedstream_takeover_duration_seconds", "histogram",
     "Time to claim the previous owners' pending entries at the start of a term."),
    ("orderedstream_replay_duration_seconds", "histogram",
     "Time to hand this consumer's pending entries to the handler at the start of a term."),
    ("orderedstream_batch_duration_seconds", "histogram",
     "Time to handle one batch: its handler calls, retries and parking (no per-entry cost)."),
    ("orderedstream_handler_duration_seconds", "histogram",
     "Handler call duration (only with a handler wrapped by PrometheusHook.timed)."),
    ("orderedstream_is_owner", "gauge",
     "1 while this consumer owns the group, else 0."),
    ("orderedstream_owner_info", "gauge",
     "1 for the consumer that holds the group's lease (read from the server)."),
    ("orderedstream_epoch", "gauge",
     "The fencing epoch of the group's current term (read from the server; 0: no owner)."),
    ("orderedstream_lease_remaining_seconds", "gauge",
     "Time left on the group's lease (read from the server)."),
    ("orderedstream_lag_entries", "gauge",
     "Entries in the stream not yet delivered to the group (XINFO GROUPS lag)."),
    ("orderedstream_pending_entries", "gauge",
     "Entries delivered to the group and not yet acknowledged."),
    ("orderedstream_oldest_pending_age_seconds", "gauge",
     "Age of the oldest pending entry, by its id's timestamp (0: none pending)."),
    ("orderedstream_parked_entries", "gauge",
     "Entries in the delay set (dead-letter path), waiting for or held by a fixer."),
    ("orderedstream_graveyard_entries", "gauge",
     "Entries the fixer gave up on."),
    ("orderedstream_stream_entries", "gauge", "Entries in the stream (XLEN)."),
    ("orderedstream_scrape_errors_total", "counter",
     "Server reads for the group gauges that failed (the gauges are then left out)."),
)

_HELP = {name: text for name, _, text in SERIES}

# seconds; takeovers are milliseconds, a replay of a large backlog takes seconds
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0)
_HANDLER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                    0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = tuple[str, str, str]  # stream, group, consumer


def _base(name: str) -> str:
    """The family name (prometheus-client adds ``_total`` to counters itself)."""
    return name[:-len("_total")] if name.endswith("_total") else name


class _Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


class _Consumer:
    """Counts for one (stream, group, consumer) of this process."""

    def __init__(self) -> None:
        self.counters: dict[tuple[str, str], float] = {}
        self.takeover = _Histogram(_DURATION_BUCKETS)
        self.replay = _Histogram(_DURATION_BUCKETS)
        self.batch = _Histogram(_DURATION_BUCKETS)
        self.owner = False
        self.parked_in_batch = 0
        self.holder: tuple[str, int] | None = None  # the other consumer seen holding the lease
        self.gone: set[int] = set()  # epochs this standby ended (owner connection gone)

    def inc(self, name: str, label: str = "", by: float = 1.0) -> None:
        key = (name, label)
        self.counters[key] = self.counters.get(key, 0.0) + by


class _GroupRead:
    """The group's state as last read from the server."""

    def __init__(self) -> None:
        self.at = float("-inf")
        self.values: dict[str, float] = {}
        self.owner: str | None = None
        self.ok = False


class PrometheusHook:
    """An event hook that keeps Prometheus series, and the collector that exposes them.

    ``registry``: where to register (default: prometheus-client's global ``REGISTRY``).
    ``client``: a client for the group gauges and the failover reasons (read-only commands:
    GET, PTTL, XINFO GROUPS, XLEN, XPENDING, ZCARD, XLEN, XREVRANGE, TIME); without one, only
    event-derived series are exported.  ``min_interval_s``: scrapes closer together than this
    reuse the last server read.  Groups are learnt from the events; :meth:`watch` adds one
    before any event (e.g. for a fixer that has nothing to do yet).
    """

    def __init__(self, registry: CollectorRegistry | None = None, *,
                 client: redis.Redis | None = None, min_interval_s: float = 1.0) -> None:
        self._client = client
        self._min_interval = min_interval_s
        self._lock = threading.Lock()
        self._consumers: dict[Labels, _Consumer] = {}
        self._groups: dict[tuple[str, str], _GroupRead] = {}
        self._unresolved: list[tuple[Labels, str, int]] = []  # failovers to classify
        self._handler: dict[Labels, _Histogram] = {}
        self._handler_consumer: dict[tuple[str, str], str] = {}  # the term's consumer
        self._scrape_errors: dict[tuple[str, str], int] = {}
        self.registry = registry if registry is not None else REGISTRY
        self.registry.register(self)

    # -- the hook --------------------------------------------------------------------------

    def watch(self, stream: str, group: str) -> None:
        """Export the group gauges of (stream, group) from now on."""
        with self._lock:
            self._groups.setdefault((stream, group), _GroupRead())

    def __call__(self, event: Event) -> None:
        labels = (event.stream, event.group, event.consumer)
        with self._lock:
            state = self._consumers.get(labels)
            if state is None:
                state = self._consumers[labels] = _Consumer()
                self._groups.setdefault(labels[:2], _GroupRead())
            if isinstance(event, BatchHandled):
                state.batch.observe(event.handler_ms / 1000.0)
                state.inc("handled", "ok", max(event.count - state.parked_in_batch, 0))
                state.parked_in_batch = 0
                if event.redelivered:
                    state.inc("redeliveries", by=event.redelivered)
            elif isinstance(event, EntryParked):
                state.inc("handled", "parked")
                state.parked_in_batch += 1
            elif isinstance(event, HandlerError):
                state.inc("handler_errors", event.action)
            elif isinstance(event, Standby):
                state.holder = (event.owner, event.epoch)
            elif isinstance(event, OwnerConnectionGone):
                state.inc("owner_connections_gone")
                state.gone.add(event.epoch)
            elif isinstance(event, LeaseAcquired):
                self._acquired(labels, state)
            elif isinstance(event, TakeoverCompleted):
                state.takeover.observe(event.duration_ms / 1000.0)
                state.inc("takeover_claimed", by=event.claimed)
            elif isinstance(event, ReplayCompleted):
                state.replay.observe(event.duration_ms / 1000.0)
            elif isinstance(event, LeaseLostEvent):
                state.inc("lease_lost")
                state.owner = False
                state.parked_in_batch = 0
            elif isinstance(event, LeaseReleased):
                state.inc("lease_releases")
                state.owner = False
                state.parked_in_batch = 0
            elif isinstance(event, HandlerStalled):
                state.inc("handler_stalls")
            elif isinstance(event, EntriesTrimmed):
                state.inc("trimmed", by=len(event.ids))
            elif isinstance(event, ServerUnavailable):
                state.inc("server_unavailable")
            elif isinstance(event, GroupRecreated):
                state.inc("group_recreated")
            elif isinstance(event, FixerPass):
                for action in ("restreamed", "rescheduled", "buried", "lost"):
                    value = getattr(event, action)
                    if value:
                        state.inc("fixer_entries", action, value)
            elif isinstance(event, RepairFailed):
                state.inc("repair_failures", event.action)

    def _acquired(self, labels: Labels, state: _Consumer) -> None:
        state.inc("lease_acquisitions")
        state.owner = True
        state.parked_in_batch = 0
        self._handler_consumer[labels[:2]] = labels[2]
        holder = state.holder
        state.holder = None
        if holder is None or holder[0] == labels[2]:
            return  # the lease was free when this consumer asked: no failover
        owner, epoch = holder
        if epoch in state.gone:
            state.gone.discard(epoch)
            state.inc("failovers", "crash")
        elif self._client is None:
            state.inc("failovers", "unknown")
        else:  # how did that term end?  The group's timeline says (read on the next scrape)
            self._unresolved.append((labels, owner, epoch))
        state.gone.clear()

    # -- the per-entry handler histogram ----------------------------------------------------

    def timed(self, handler: Handler) -> Handler:
        """``handler``, timed into ``orderedstream_handler_duration_seconds``."""
        clock = time.perf_counter
        histograms = self._handler
        owners = self._handler_consumer
        lock = self._lock
        last: list[Any] = [None, None]  # the batch's Term, its histogram

        def timed_handler(message: Message) -> object:
            start = clock()
            try:
                return handler(message)
            finally:
                elapsed = clock() - start
                term = message._term
                if term is not last[0]:  # once per batch
                    with lock:
                        key = (term.stream, term.group,
                               owners.get((term.stream, term.group), ""))
                        hist = histograms.get(key)
                        if hist is None:
                            hist = histograms[key] = _Histogram(_HANDLER_BUCKETS)
                    last[0], last[1] = term, hist
                hist = last[1]
                hist.counts[bisect_left(hist.bounds, elapsed)] += 1
                hist.total += elapsed

        timed_handler.__wrapped__ = handler  # type: ignore[attr-defined]
        return timed_handler

    # -- the collector ---------------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        """The families (no samples), so a second hook on one registry is refused."""
        for name, kind, text in SERIES:
            if kind == "counter":
                yield CounterMetricFamily(_base(name), text)
            elif kind == "gauge":
                yield GaugeMetricFamily(name, text)
            else:
                yield HistogramMetricFamily(name, text)

    def collect(self) -> Iterator[Metric]:
        self._read_groups()
        with self._lock:
            consumers = {k: (dict(v.counters), v.owner, v.takeover.buckets(), v.takeover.total,
                             v.replay.buckets(), v.replay.total)
                         for k, v in self._consumers.items()}
            batches = {k: (v.batch.buckets(), v.batch.total) for k, v in self._consumers.items()}
            handlers = {k: (v.buckets(), v.total) for k, v in self._handler.items()}
            groups = {k: (dict(v.values), v.owner, v.ok) for k, v in self._groups.items()}
            # (values, owner, read ok)
            scrape_errors = dict(self._scrape_errors)
        names = ("stream", "group", "consumer")
        label_of = {"handled": "outcome", "handler_errors": "action", "failovers": "reason",
                    "fixer_entries": "action", "repair_failures": "action"}
        families: dict[str, Any] = {}
        for name, kind, _ in SERIES:
            if kind == "counter" and name != "orderedstream_scrape_errors_total":
                short = _base(name)[len("orderedstream_"):]
                extra = [label_of[short]] if short in label_of else []
                families[short] = CounterMetricFamily(_base(name), _HELP[name],
                                                      labels=[*names, *extra])
        for labels, (counters, _, _, _, _, _) in consumers.items():
            for reason in FAILOVER_REASONS:  # present from the start, so increase() sees 0 -> 1
                counters.setdefault(("failovers", reason), 0.0)
            for outcome in ("ok", "parked"):
                counters.setdefault(("handled", outcome), 0.0)
            for short in ("redeliveries", "lease_acquisitions", "lease_lost", "lease_releases",
                          "owner_connections_gone", "handler_stalls", "takeover_claimed",
                          "trimmed", "server_unavailable", "group_recreated"):
                counters.setdefault((short, ""), 0.0)
            for (short, label), value in sorted(counters.items()):
                families[short].add_metric([*labels, *([label] if label else [])], value)
        yield from families.values()
        takeover = HistogramMetricFamily("orderedstream_takeover_duration_seconds",
                                         _HELP["orderedstream_takeover_duration_seconds"],
                                         labels=list(names))
        replay = HistogramMetricFamily("orderedstream_replay_duration_seconds",
                                       _HELP["orderedstream_replay_duration_seconds"],
                                       labels=list(names))
        is_owner = GaugeMetricFamily("orderedstream_is_owner", _HELP["orderedstream_is_owner"],
                                     labels=list(names))
        for labels, (_, owner, t_buckets, t_sum, r_buckets, r_sum) in consumers.items():
            takeover.add_metric(list(labels), t_buckets, t_sum)
            replay.add_metric(list(labels), r_buckets, r_sum)
            is_owner.add_metric(list(labels), 1.0 if owner else 0.0)
        handler = HistogramMetricFamily("orderedstream_handler_duration_seconds",
                                        _HELP["orderedstream_handler_duration_seconds"],
                                        labels=list(names))
        for labels, (h_buckets, h_sum) in handlers.items():
            handler.add_metric(list(labels), h_buckets, h_sum)
        batch = HistogramMetricFamily("orderedstream_batch_duration_seconds",
                                      _HELP["orderedstream_batch_duration_seconds"],
                                      labels=list(names))
        for labels, (b_buckets, b_sum) in batches.items():
            batch.add_metric(list(labels), b_buckets, b_sum)
        yield from (takeover, replay, batch, handler, is_owner)
        gauges = {name: GaugeMetricFamily(name, _HELP[name], labels=["stream", "group"])
                  for name, kind, _ in SERIES
                  if kind == "gauge" and name not in ("orderedstream_is_owner",
                                                      "orderedstream_owner_info")}
        owner_info = GaugeMetricFamily("orderedstream_owner_info",
                                       _HELP["orderedstream_owner_info"],
                                       labels=["stream", "group", "consumer"])
        errors = CounterMetricFamily("orderedstream_scrape_errors",
                                     _HELP["orderedstream_scrape_errors_total"],
                                     labels=["stream", "group"])
        for (stream, group), (values, owner_name, ok) in groups.items():
            errors.add_metric([stream, group], scrape_errors.get((stream, group), 0))
            if not ok:
                continue
            for name, value in values.items():
                gauges[name].add_metric([stream, group], value)
            if owner_name is not None:
                owner_info.add_metric([stream, group, owner_name], 1.0)
        if self._client is not None:
            yield from gauges.values()
            yield owner_info
            yield errors

    # -- reading the server (on scrape, rate-limited) -----------------------------------------

    def _read_groups(self) -> None:
        client = self._client
        if client is None:
            return
        now = time.monotonic()
        with self._lock:
            due = [k for k, v in self._groups.items() if now - v.at >= self._min_interval]
            unresolved, self._unresolved = self._unresolved, []
        for stream, group in due:
            try:
                values, owner = read_group(client, stream, group)
            except (redis.RedisError, OSError, ValueError, KeyError, TypeError):
                with self._lock:
                    read = self._groups[(stream, group)]
                    read.at, read.ok = now, False
                    key = (stream, group)
                    self._scrape_errors[key] = self._scrape_errors.get(key, 0) + 1
                continue
            with self._lock:
                read = self._groups[(stream, group)]
                read.at, read.values, read.owner, read.ok = now, values, owner, True
        if unresolved:
            self._classify(client, unresolved)

    def _classify(self, client: redis.Redis, unresolved: list[tuple[Labels, str, int]]) -> None:
        """Failovers by how the previous term ended, from the group's timeline (end_term
        records a 'released', 'ended' or 'stalled' entry for the term it ends)."""
        kinds = {"released": "graceful", "ended": "crash", "stalled": "stalled"}
        for labels, _owner, epoch in unresolved:
            reason = "ttl"
            try:
                records: Any = client.xrevrange(GroupKeys(labels[0], labels[1]).events, count=50)
            except (redis.RedisError, OSError):
                with self._lock:  # try again on the next scrape
                    self._unresolved.append((labels, _owner, epoch))
                continue
            for _, fields in records:
                kind = _text(fields.get(b"type", b""))
                if kind in kinds and _text(fields.get(b"epoch", b"")) == str(epoch):
                    reason = kinds[kind]
                    break
            with self._lock:
                self._consumers[labels].inc("failovers", reason)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def read_group(client: redis.Redis, stream: str, group: str) -> tuple[dict[str, float], str | None]:
    """The group gauges of (stream, group), in two round trips of read-only commands."""
    keys = GroupKeys(stream, group)
    pipe = client.pipeline(transaction=False)
    pipe.get(keys.lease)
    pipe.pttl(keys.lease)
    pipe.xlen(stream)
    pipe.xinfo_groups(stream)
    pipe.zcard(keys.delay)
    pipe.xlen(keys.graveyard)
    pipe.time()
    replies = pipe.execute(raise_on_error=False)
    lease, pttl, length, groups, parked, graveyard, now_reply = replies
    if isinstance(groups, redis.ResponseError):  # no stream yet
        groups = []
    for reply in (lease, pttl, length, parked, graveyard, now_reply):
        if isinstance(reply, Exception):
            raise reply
    now = server_ms(client, now_reply)
    info: dict[str, Any] = {}
    for raw in groups:
        fields = raw if isinstance(raw, dict) else dict(zip(raw[::2], raw[1::2], strict=True))
        fields = {_text(k): v for k, v in fields.items()}
        if _text(fields.get("name", "")) == group:
            info = fields
            break
    owner: str | None = None
    epoch = 0
    if lease:
        owner, epoch, _ = parse_token(_text(lease))
    pending = int(info.get("pending", 0) or 0)
    oldest_age = 0.0
    if pending:
        summary: Any = client.xpending(stream, group)
        if summary.get("min"):
            oldest_age = max(now - id_order(_text(summary["min"]))[0], 0) / 1000.0
    values = {
        "orderedstream_epoch": float(epoch),
        "orderedstream_lease_remaining_seconds": max(int(pttl), 0) / 1000.0 if lease else 0.0,
        "orderedstream_pending_entries": float(pending),
        "orderedstream_oldest_pending_age_seconds": oldest_age,
        "orderedstream_parked_entries": float(parked),
        "orderedstream_graveyard_entries": float(graveyard),
        "orderedstream_stream_entries": float(length),
    }
    lag = info.get("lag")
    if lag is not None:  # None: the server cannot tell (e.g. after deletions)
        values["orderedstream_lag_entries"] = float(lag)
    return values, owner


def parse_listen(spec: str) -> tuple[str, int]:
    """``[HOST:]PORT`` (the CLI's ``--metrics-port``) -> (host, port); host defaults to all
    interfaces, as exporters do."""
    host, _, port = spec.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--metrics-port: expected [HOST:]PORT, got {spec!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(port: int, addr: str = "0.0.0.0", registry: CollectorRegistry | None = None
          ) -> Callable[[], None]:
    """Serve ``/metrics`` of ``registry`` on ``addr:port`` from a daemon thread; returns a
    function that stops the server."""
    server, thread = start_http_server(port, addr=addr,
                                       registry=registry if registry is not None else REGISTRY)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5.0)

    return stop
