"""Frozen event records and the hook protocol.

Everything the coordinator and the fixer do that an operator, a metric or the CLI may care about
is one of these records.  Hooks receive them synchronously on the thread that produced them, so a
hook must be quick; the stdlib logger ``orderedstream`` receives each one too, with the record's
fields in ``extra``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import attrs

log = logging.getLogger("orderedstream")


@attrs.frozen(kw_only=True)
class Event:
    """Base of every event: which stream, group and consumer it concerns."""

    stream: str
    group: str
    consumer: str

    name = "event"
    level = logging.INFO

    def describe(self) -> str:
        fields = attrs.asdict(self)
        for key in ("stream", "group", "consumer"):
            fields.pop(key)
        return " ".join(f"{k}={round(v, 1) if isinstance(v, float) else v}"
                        for k, v in fields.items())


@attrs.frozen(kw_only=True)
class Standby(Event):
    """This consumer waits: another one owns the group."""

    owner: str
    epoch: int
    ttl_ms: int
    name = "standby"


@attrs.frozen(kw_only=True)
class LeaseAcquired(Event):
    """This consumer owns the group now, under a new fencing epoch."""

    epoch: int
    name = "lease_acquired"


@attrs.frozen(kw_only=True)
class AcquireRefused(Event):
    """This consumer acquired the lease but did not take ownership (e.g. too few replicas
    acknowledged the new term); it ended the term and retries after a pause."""

    reason: str
    name = "acquire_refused"
    level = logging.WARNING


@attrs.frozen(kw_only=True)
class OwnerConnectionGone(Event):
    """A standby saw the owner's heartbeat connection vanish and ended its term at once."""

    owner: str
    epoch: int
    via: str = "poll"
    """How it learned: ``"push"`` (the server's ``tracking-redir-broken`` push at the first write
    after the death) or ``"poll"`` (``CLIENT LIST ID``)."""
    name = "owner_connection_gone"
    level = logging.WARNING


@attrs.frozen(kw_only=True)
class TakeoverCompleted(Event):
    """Dead consumers' pending entries were claimed and the dead consumers deleted."""

    epoch: int
    claimed: int
    consumers_deleted: Sequence[str]
    trimmed: int
    duration_ms: float
    name = "takeover_completed"


@attrs.frozen(kw_only=True)
class ReplayCompleted(Event):
    """Every entry pending to this consumer was handed to the handler (in id order)."""

    epoch: int
    replayed: int
    duration_ms: float
    name = "replay_completed"


@attrs.frozen(kw_only=True)
class EntriesTrimmed(Event):
    """Pending entries whose stream entry was trimmed or deleted; they were acked."""

    ids: Sequence[str]
    name = "entries_trimmed"
    level = logging.WARNING


@attrs.frozen(kw_only=True)
class BatchHandled(Event):
    """The handler processed a batch (acked together with the next read)."""

    epoch: int
    count: int
    last_id: str
    redelivered: int
    handler_ms: float = 0.0
    """Time from handing out the batch's first entry to settling its last (handler calls,
    retries, parking), on this process's monotonic clock."""
    name = "batch_handled"
    level = logging.DEBUG


@attrs.frozen(kw_only=True)
class HandlerError(Event):
    """The handler raised; the entry is retried in place, parked or the coordinator stops."""

    entry_id: str
    attempt: int
    error: str
    action: str  # "retry" | "park" | "stop"
    backoff_ms: int
    name = "handler_failed"
    level = logging.WARNING


@attrs.frozen(kw_only=True)
class EntryParked(Event):
    """An entry moved to the delay set (handler Defer, retry budget spent, or malformed)."""

    entry_id: str
    reason: str
    due_ms: int
    """When the fixer may take it (server clock, ms); 0 for a follower (hold-key mode)."""
    held_key: str | None = None
    role: str = "plain"
    """'plain', 'holder' of held_key, or 'follower' parked behind that key's holder."""
    name = "entry_parked"


@attrs.frozen(kw_only=True)
class LeaseLostEvent(Event):
    """This consumer stopped being the owner (expired, taken over or unrenewable)."""

    epoch: int
    reason: str
    name = "lease_lost"
    level = logging.WARNING


@attrs.frozen(kw_only=True)
class LeaseReleased(Event):
    """A clean stop handed the lease over (standbys were woken)."""

    epoch: int
    name = "lease_released"


@attrs.frozen(kw_only=True)
class WatchDisabled(Event):
    """The connection watch is off (e.g. ACL forbids CLIENT LIST): failover waits for the TTL."""

    reason: str
    name = "watch_disabled"
    level = logging.WARNING


@attrs.frozen(kw_only=True)
class PushWatchDisabled(Event):
    """Push detection of a dead owner is off (e.g. an ACL forbids ``CLIENT TRACKING`` or
    ``HELLO 3``): a crashed owner is noticed by the ``CLIENT LIST`` poll instead (every
    ``watch_interval_ms``), or by the lease TTL where that is denied too."""

    reason: str
    name = "push_watch_disabled"
    level = logging.WARNING


@attrs.frozen(kw_only=True)
class EntryHeld(Event):
    """Hold-key mode: an entry was parked behind the parked holder of its key ('follower'), or
    appended behind the holder's re-streamed copy ('forwarded'), instead of being handled."""

    entry_id: str
    key: str
    action: str
    new_id: str | None = None
    name = "entry_held"
    level = logging.DEBUG


@attrs.frozen(kw_only=True)
class FixerPass(Event):
    """One pass of a fixer (``consumer`` is the fixer's name): what it took and did, and what is
    left in the delay set.  Emitted for every pass that took something, and on idle ones only when
    the counts changed."""

    claimed: int
    restreamed: int
    rescheduled: int
    buried: int
    lost: int
    followers_released: int
    parked: int
    """Entries in the delay set after this pass (due or not)."""
    next_due_ms: int
    """Milliseconds until the next entry is due (-1: none parked)."""
    name = "fixer_pass"
    level = logging.DEBUG


@attrs.frozen(kw_only=True)
class RepairFailed(Event):
    """The repair function raised on an entry: rescheduled with backoff, or buried."""

    entry_id: str
    error: str
    fixer_attempts: int
    action: str  # "reschedule" | "bury"
    backoff_ms: int
    name = "repair_failed"
    level = logging.WARNING


@attrs.frozen(kw_only=True)
class ServerUnavailable(Event):
    """The server cannot serve this process right now (connection lost, OOM at maxmemory,
    LOADING, BUSY, MASTERDOWN, READONLY after a failover, ...): it backs off and tries again.
    Emitted once when this starts, and again only when the kind of failure changes."""

    reason: str
    name = "server_unavailable"
    level = logging.WARNING


@attrs.frozen(kw_only=True)
class ServerRecovered(Event):
    """The server serves this process again after :class:`ServerUnavailable`."""

    reason: str
    """The last reason it was unavailable."""
    down_ms: float
    """How long it was unavailable (from the first failure to the first success)."""
    name = "server_recovered"
    level = logging.WARNING


@attrs.frozen(kw_only=True)
class GroupRecreated(Event):
    """The consumer group (or the whole stream) was missing, e.g. after a server restart that
    lost its data or an operator's ``XGROUP DESTROY``; it was created again at ``start_id``."""

    start_id: str
    name = "group_recreated"
    level = logging.WARNING


@attrs.frozen(kw_only=True)
class HandlerStalled(Event):
    """A handler call has run longer than ``handler_timeout_ms``: the owner stopped renewing and
    gave the lease up, so a standby takes over; whatever the call does later is fenced by its
    old epoch, and nothing more of this term is handed out or acknowledged."""

    epoch: int
    entry_id: str
    running_ms: float
    name = "handler_stalled"
    level = logging.ERROR


class Hook(Protocol):
    """Anything callable with an :class:`Event`."""

    def __call__(self, event: Event) -> None: ...


Emit = Callable[..., None]
"""``emit(EventClass, **fields)``: how the parts of a coordinator or fixer report an event (the
owner fills in stream, group and consumer)."""


class Emitter:
    """Sends each event to the logger and every hook; a failing hook is logged, never fatal."""

    def __init__(self, hooks: Sequence[Hook]) -> None:
        self._hooks = tuple(hooks)

    def __call__(self, event: Event) -> None:
        if log.isEnabledFor(event.level):
            log.log(event.level, "%s %s", event.name, event.describe(),
                    extra={"os_event": event.name, "os_fields": attrs.asdict(event)})
        for hook in self._hooks:
            try:
                hook(event)
            except Exception:
                log.exception("hook %r failed on %s", hook, event.name)
