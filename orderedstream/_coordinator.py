"""The embeddable owner loop for one (stream, group): single active consumer, ordered failover.

The protocol, in sequence (DESIGN.md §4-5), each step a part of its own:

1. **standby** (:mod:`._standby`): wait until this consumer holds the group's lease, under a new
   fencing epoch;
2. **takeover** (:mod:`._takeover`): claim every other consumer's pending entries;
3. **replay** (:mod:`._reader`): hand this consumer's pending entries to the handler in id order,
   before anything new;
4. **new entries** (:mod:`._reader`): read ahead, fenced, until the term ends;

with the handling loop and retry/park policy in :mod:`._handling`, hold-key mode in
:mod:`._holdkey`, and the lease (renewal thread, owner-side validity) in :mod:`._lease`.  A term
ends on ``stop()`` (the lease is handed over at once), when the lease is lost, or when the handler
stalls past ``handler_timeout_ms``; the loop then goes back to 1.  Passing faults (a lost
connection, OOM, LOADING, a missing group) are waited out and healed, and said once.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import redis

from ._background import Background, Waiter
from ._config import CoordinatorConfig
from ._engine import SyncDriver
from ._events import (
    Emitter,
    GroupRecreated,
    Hook,
    LeaseAcquired,
)
from ._handling import BatchHandler, Handler, StallWatch
from ._keys import GroupKeys
from ._lease import Lease, Renewer
from ._owner import OwnerView, Role, assemble
from ._recovery import passing_fault
from ._server import client_from_url, client_name, clone_client, connect_check
from ._status import record_member
from ._takeover import ensure_group
from .exceptions import BudgetSpent, ConfigError, GroupMissing

__all__ = ["BatchHandler", "Coordinator", "Handler", "Role"]


class Coordinator(Background, OwnerView):
    """Single active consumer for one (stream, group), with ordered failover.

    >>> coordinator = Coordinator(config, handler, redis.Redis())   # doctest: +SKIP
    >>> with coordinator:                                            # doctest: +SKIP
    ...     ...  # start() on enter, stop() on exit (re-raising the loop's error)

    ``start()`` runs the loop in a thread and returns; ``run()`` runs it in the caller's thread;
    ``stop(timeout)`` is idempotent, bounded, and hands the lease to a standby at once.
    """

    _kind = "coordinator"

    def __init__(self, config: CoordinatorConfig, handler: Handler, client: redis.Redis,
                 *, hooks: Sequence[Hook] = ()) -> None:
        if inspect.iscoroutinefunction(handler):
            raise ConfigError(f"{handler!r} is an async function: the Coordinator calls its "
                              "handler; use AsyncCoordinator for an `async def` one")
        self.config = config
        self._keys = keys = GroupKeys(config.stream, config.group)
        self._emitter = Emitter(hooks)
        base = f"os:{config.consumer}"
        timeout_s = config.socket_timeout_ms / 1000.0
        self._cmd_name = client_name(f"{base}:cmd")
        super().__init__(clone_client(client, name=self._cmd_name, socket_timeout_s=timeout_s))
        self._members_client = self._cmd
        waiter = Waiter(clone_client(client, name=f"{base}:wait", single=True,
                                     socket_timeout_s=timeout_s + config.block_ms / 1000.0))
        self._waiters.append(waiter)
        parts = assemble(self, config, keys, handler, self._cmd, waiter, self._event,
                         self._emitter, self._stop, lambda: self._set_role(Role.STANDBY))
        self._scripts, self._lease_mgr, self._outage = parts.scripts, parts.lease, parts.outage
        self._standby, self._handling, self._owner = parts.standby, parts.handling, parts.owner
        self._driver = SyncDriver(self._scripts, self._cmd, waiter, self._stop)
        self._role = Role.STARTING
        self._lease: Lease | None = None

    @classmethod
    def from_url(cls, url: str, config: CoordinatorConfig, handler: Handler,
                 *, hooks: Sequence[Hook] = ()) -> Coordinator:
        """Build with a client for ``url`` (redis://, rediss:// or unix://)."""
        return cls(config, handler, client_from_url(url), hooks=hooks)

    @classmethod
    def batched(cls, config: CoordinatorConfig, handler: BatchHandler, client: redis.Redis,
                *, hooks: Sequence[Hook] = ()) -> Coordinator:
        """A coordinator whose handler receives each batch (a sequence of :class:`Message`, in
        order, up to ``config.batch_size``), acknowledged together when it returns.  If it
        raises, the batch's entries are handed to it again one by one (a batch of one each),
        in order, under the retry policy: ``Defer`` parks that entry, order is kept."""
        coordinator = cls(config, lambda message: handler((message,)), client, hooks=hooks)
        coordinator._handling.batch_handler = handler
        return coordinator

    def start(self, *, max_messages: int | None = None) -> None:
        """Run in a background thread; returns at once.  Errors surface from ``join``."""
        self._handling.budget = max_messages
        self._start_thread()

    def run(self, *, max_messages: int | None = None) -> None:
        """Run in the caller's thread until ``stop()``, ``max_messages`` or a fatal error."""
        self._handling.budget = max_messages
        self._main()

    # -- the protocol ---------------------------------------------------------------------

    def _main(self) -> None:
        try:
            connect_check(self._cmd)
            while not self._stop.is_set() and self._handling.budget != 0:
                # the term's renewer, started now: its start is not on the way to the first entry
                renewer = Renewer(self._lease_mgr, None, self.config.lease)
                renewer.start()
                try:
                    self._ensure_group()
                    lease = self._standby.wait()             # 1. standby
                    if lease is None:
                        break
                    self._outage.ok()
                    self._serve(lease, renewer)              # 2-4. one term
                except BudgetSpent:
                    break
                except GroupMissing:
                    continue  # re-created (and said so) at the top of the loop
                except Exception as err:
                    reason = passing_fault(err)
                    if reason is None:
                        raise
                    self._stop.wait(self._outage.failed(reason))
                finally:
                    renewer.halt()
        finally:
            self._set_role(Role.STOPPED)
            self._lease = None
            self._cmd.close()
            for waiter in self._waiters:
                waiter.close()
            self._lease_mgr.close()
            self._stopped.set()

    def _serve(self, lease: Lease, renewer: Renewer) -> None:
        """One term (2-4: :meth:`Owner.serve`, driven here), with the lease renewed and the
        handler timeout watched from threads of their own.  No thread is started on the way
        to the first entry: ``renewer`` was started before the term, and the handler-timeout
        watch is started and the members record written from the renewer's thread."""
        self._lease = lease
        self._role = Role.OWNER
        self._event(LeaseAcquired, epoch=lease.epoch)
        watches: list[StallWatch] = []

        def first() -> None:  # on the renewer's thread
            record_member(self._cmd, self._keys, self.config.consumer, Role.OWNER.value,
                          self._cmd_name)
            watch = StallWatch(self._handling, lease, self.config.handler_timeout_ms,
                               self._lease_mgr, renewer, self._event)
            watches.append(watch)
            watch.start()

        renewer.begin(lease, first=first)
        try:
            self._driver.run(self._owner.serve(lease))
        finally:
            renewer.halt()  # (joined: ``first`` has run)
            for watch in watches:
                watch.halt()
            self._lease = None
            if self._role is Role.OWNER:
                self._set_role(Role.STANDBY)

    # -- healing and reporting ------------------------------------------------------------

    def _ensure_group(self) -> None:
        """Create the group if missing; found missing after the start, say so."""
        start = ensure_group(self._cmd, self.config, self._owner.cursor)
        if start is not None and self._role is not Role.STARTING:
            self._event(GroupRecreated, start_id=start)
