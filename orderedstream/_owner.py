"""One owner term, as one step of the engine (:mod:`._engine`): takeover, replay, new entries,
then hand the lease over if it is still ours.  The sync :class:`~orderedstream.Coordinator`
and the :class:`~orderedstream.AsyncCoordinator` both run exactly this; only their drivers
differ.  The lease's renewal and the handler timeout watch run beside it on threads of their
own (:class:`~orderedstream._lease.Renewer`, :class:`~orderedstream._handling.StallWatch`), so a
handler that blocks an event loop cannot starve them.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs
import redis

from ._background import Waiter
from ._config import CoordinatorConfig
from ._deadletter import Parker
from ._engine import Plain, Step
from ._events import (
    Emit,
    Emitter,
    EntriesTrimmed,
    Event,
    LeaseLostEvent,
    LeaseReleased,
    ReplayCompleted,
    TakeoverCompleted,
)
from ._handling import Halting, Handler, Handling
from ._holdkey import HoldGate
from ._keys import GroupKeys
from ._lease import Lease, LeaseManager
from ._reader import FencedReader
from ._recovery import CONNECTION_ERRORS, Outage
from ._scripts import Scripts, end_term_op
from ._server import client_name, clone_client
from ._standby import StandbyWaiter
from ._status import record_member
from ._takeover import first_script, take_over
from .exceptions import LeaseLost, NotOwner, StopRequested


class Role(enum.Enum):
    """Where a coordinator (sync or async) is in its life."""

    STARTING = "starting"
    STANDBY = "standby"
    OWNER = "owner"
    STOPPED = "stopped"


class OwnerView:
    """What the sync and the async coordinator show of their state and tell about it
    (``_role``, ``_lease``, ``_handling`` and the rest below are theirs)."""

    _role: Role
    _lease: Lease | None
    _handling: Handling
    config: CoordinatorConfig
    _keys: GroupKeys
    _emitter: Emitter
    _cmd_name: str
    _members_client: redis.Redis
    """The blocking connection the role is recorded with (the members hash)."""

    def _set_role(self, role: Role) -> None:
        """Record the new role, and tell operators (members hash; best effort)."""
        self._role = role
        record_member(self._members_client, self._keys, self.config.consumer,
                      None if role is Role.STOPPED else role.value, self._cmd_name)

    def _event(self, cls: type[Event], **fields: Any) -> None:
        self._emitter(cls(stream=self.config.stream, group=self.config.group,
                          consumer=self.config.consumer, **fields))

    @property
    def role(self) -> Role:
        return self._role

    @property
    def epoch(self) -> int | None:
        """The fencing epoch while this consumer owns the group, else None."""
        lease = self._lease
        return lease.epoch if lease is not None and self._role is Role.OWNER else None

    @property
    def handled(self) -> int:
        """Entries this coordinator has dealt with: handled, parked, or passed over (a copy
        re-streamed for another group, an entry held behind its key)."""
        return self._handling.handled


class Owner:
    """What a coordinator does while it holds the lease."""

    def __init__(self, scripts: Scripts, keys: GroupKeys, config: CoordinatorConfig,
                 handling: Handling, gate: HoldGate | None, outage: Outage,
                 stop: threading.Event, emit: Emit, *, watched: bool = True) -> None:
        """``watched``: the read-ahead has a connection of its own for the term, so its reads
        are fenced by ``WATCH`` (see :mod:`._reader`); else by the ``deliver`` script."""
        self._scripts = scripts
        self._watched = watched
        self._keys = keys
        self._config = config
        self._handling = handling
        self._gate = gate
        self._outage = outage
        self._stop = stop
        self._emit = emit
        self.cursor: str | None = None
        """The last entry handed out (a group found missing is created again after it)."""

    def serve(self, lease: Lease) -> Step[None]:
        """One term: takeover, replay, new entries, until it ends (stop, lease lost); then the
        acks still held are sent and the lease handed over at once if it is still ours.
        Anything else (a handler's ``HandlerFailed``, a missing group, a server fault) is
        raised after that."""
        keys, cfg = self._keys, self._config
        reader = FencedReader(self._scripts, keys, cfg, lease, self._stop, self._outage,
                              lambda ids: self._emit(EntriesTrimmed, ids=tuple(ids)),
                              watched=self._watched)
        handle = self._handling.batch
        try:
            done, got = yield from take_over(keys, cfg, lease)                     # 2.
            if self._gate is not None:
                self._gate.refresh((yield Plain("HKEYS", keys.held)))
            if done.trimmed:
                self._emit(EntriesTrimmed, ids=done.trimmed)
            self._emit(TakeoverCompleted, epoch=lease.epoch, claimed=done.claimed,
                       consumers_deleted=done.deleted, trimmed=len(done.trimmed),
                       duration_ms=done.duration_ms)
            if lease.server_changed:  # acks the previous server took may be gone
                reader.suspect_up_to_id(got.tail)
            started = time.monotonic()
            replayed = 0
            # the takeover script's first page: the replay's first, or (nothing was pending)
            # the first new entries
            page = (reader.first_page(got.read, new=got.kind == "new") if got.kind != "none"
                    else None)
            if got.kind != "new":
                if page is not None:
                    yield from handle(lease, page, reader.acks)
                    reader.handed(page)
                    replayed += len(page.rows)
                while (page := (yield from reader.replay_page())) is not None:      # 3.
                    yield from handle(lease, page, reader.acks)
                    reader.handed(page)
                    replayed += len(page.rows)
                page = None
            self._emit(ReplayCompleted, epoch=lease.epoch, replayed=replayed,
                       duration_ms=(time.monotonic() - started) * 1000.0)
            if page is not None:  # new entries the takeover script read
                yield from handle(lease, page, reader.acks)
                reader.handed(page)
                self.cursor = _text(page.rows[-1][0])
            while True:                                                             # 4.
                page = yield from reader.new_page()
                yield from handle(lease, page, reader.acks)
                reader.handed(page)
                self.cursor = _text(page.rows[-1][0])
        except (LeaseLost, NotOwner) as err:
            lease.lose(str(err))
            self._emit(LeaseLostEvent, epoch=lease.epoch, reason=lease.lost_reason)
        except StopRequested:
            pass
        finally:
            self._watched = reader.watched  # (the ACL refused WATCH: not asked again)
            yield from reader.close()
            if (yield from self._release(lease)):  # handed over at once: standbys woken
                self._emit(LeaseReleased, epoch=lease.epoch)

    def _release(self, lease: Lease) -> Step[bool]:
        """End ``lease`` if it is still valid (compare-and-delete; wakes the standbys); True
        when this handed it over.  The lease is lost afterwards."""
        released = False
        if lease.valid():
            try:
                released = yield end_term_op(self._keys, lease.token, "released",
                                             self._config.consumer, "clean stop")
            except (*CONNECTION_ERRORS, redis.ResponseError):
                pass  # it expires on the server after its TTL
        lease.lose("released")
        return released


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@attrs.frozen
class Parts:
    """A coordinator's parts, sync or async alike (:func:`assemble`)."""

    scripts: Scripts
    lease: LeaseManager
    outage: Outage
    standby: StandbyWaiter
    gate: HoldGate | None
    handling: Handling
    owner: Owner


def assemble(life: Halting, config: CoordinatorConfig, keys: GroupKeys, handler: Handler,
             cmd: redis.Redis, waiter: Waiter, emit: Emit, emit_event: Callable[[Any], None],
             stop: threading.Event, on_standby: Callable[[], None]) -> Parts:
    """Wire the protocol's parts for one consumer: ``cmd`` and ``waiter`` are its blocking
    command and waiting connections (the heartbeat connection is cloned from ``cmd``)."""
    beat_name = client_name(f"os:{config.consumer}:beat")
    beat = clone_client(cmd, name=beat_name, single=True,
                        socket_timeout_s=max(config.lease.renew_interval_ms / 1000.0, 0.2))
    scripts = Scripts(cmd)
    lease = LeaseManager(scripts, keys, config.consumer, config.lease, beat, beat_name)
    outage = Outage(emit)
    standby = StandbyWaiter(lease, cmd, waiter, keys, config.lease, emit, stop, on_standby,
                            then=first_script(keys, config))
    parker = Parker(scripts, keys, config.group, config.retry.min_park_delay_ms)
    gate = (HoldGate(config.hold_key_field, scripts, keys, parker, config.consumer, emit)
            if config.hold_key_field is not None else None)
    handling = Handling(life, handler, config, parker, gate, emit, emit_event)
    owner = Owner(scripts, keys, config, handling, gate, outage, stop, emit)
    return Parts(scripts, lease, outage, standby, gate, handling, owner)
