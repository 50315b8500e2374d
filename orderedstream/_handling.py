"""The handling loop: each entry of a batch to the handler, in order, under the retry policy.

Per entry: skip a copy the fixer re-streamed for another group (ack it unseen), let the hold-key
gate decide (hold-key mode), park an entry delivered more than ``max_deliveries`` times (the
process handling it keeps dying on it), else call the handler.  A handler that raises is retried
in place with backoff (order is never skipped); ``Defer`` or a spent budget parks the entry (one
fenced script stores it and acks it); ``on_exhausted="stop"`` ends the loop with the entry still
pending.  The loop stops handing out entries as soon as the owner's own clock says its lease may
have lapsed, or ``stop()`` was asked for.

The per-entry loop is one function on purpose: it is the hot path (one check, one
:class:`Message`, one handler call per entry).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Any

import redis

from . import _wire as wire
from ._config import CoordinatorConfig
from ._deadletter import Parker
from ._events import BatchHandled, Emit, EntryParked, HandlerError, HandlerStalled
from ._lease import Lease, LeaseManager, Renewer
from ._message import Message, Term
from ._reader import FencedReader, Page, check_lease
from ._recovery import CONNECTION_ERRORS
from .exceptions import BudgetSpent, Defer, HandlerFailed, LeaseLost, StopRequested

if TYPE_CHECKING:
    from ._background import Background
    from ._holdkey import HoldGate

Handler = Callable[[Message], object]

_NO_LIMIT = 1 << 62


class Handling:
    """Hands entries to the handler for one coordinator (across its terms)."""

    def __init__(self, life: Background, handler: Handler, config: CoordinatorConfig,
                 parker: Parker, gate: HoldGate | None, emit: Emit,
                 emit_event: Callable[[EntryParked], None], stop: threading.Event) -> None:
        self._life = life
        self._handler = handler
        self._config = config
        self._parker = parker
        self._gate = gate
        self._emit = emit
        self._emit_event = emit_event
        self._stop = stop
        self._own_group = config.group.encode()
        self.budget: int | None = None
        """Entries still to handle before the coordinator ends (None: no limit)."""
        self.handled = 0
        self.retries = 0
        self.pausing = False
        """True while a retry waits out its backoff (not a stalled handler)."""
        self.busy: list[Any] | None = None
        """The rows of the batch being handled (None between batches); with ``handled`` and
        ``busy_from`` it tells a watchdog which entry the handler is on."""
        self.busy_from = 0

    def progress(self) -> int:
        """Grows with every handler call that returned or raised."""
        return self.handled + self.retries

    def current_entry(self) -> str:
        rows = self.busy
        index = self.handled - self.busy_from
        if rows is None or not 0 <= index < len(rows):
            return "?"
        entry_id = rows[index][0]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    def batch(self, lease: Lease, page: Page, reader: FencedReader) -> None:
        """Handle one page; the ids to acknowledge are appended to ``reader.acks`` (they ride
        on the next read)."""
        rows, counts, rereading, min_count = page
        acks = reader.acks
        cfg = self._config
        handler = self._handler
        life = self._life
        term = Term(cfg.stream, cfg.group, lease.epoch)
        ack = acks.append
        left = self.budget if self.budget is not None else -1
        own_group = self._own_group
        for_header = wire.FOR
        gate = self._gate
        limit = cfg.retry.max_deliveries or _NO_LIMIT
        count = 1
        redelivered = 0
        self.busy_from = self.handled
        self.busy = rows
        try:
            for index, row in enumerate(rows):
                # hot path: one check (stop asked, or lease past its deadline / lost), one
                # Message, one handler call per entry
                if life._halting or monotonic() >= lease.valid_until:
                    if life._halting:
                        raise StopRequested
                    raise LeaseLost(lease.lost_reason)
                entry_id, flat = row
                if flat[0] == for_header and flat[1] != own_group:
                    ack(entry_id)  # re-streamed for another group: ours handled the original
                    self.handled += 1
                    continue
                if gate is not None and not gate.admit(lease, entry_id, flat):
                    self.handled += 1
                    continue  # parked behind its key's holder, or moved behind it (acked)
                if counts is not None:
                    count = int(counts[index]) - rereading
                    if count < min_count:
                        count = min_count
                    redelivered += count > 1
                    if count > limit:
                        self._park(lease, Message(entry_id, flat, term, count),
                                   f"delivered {count} times without an ack (max_deliveries "
                                   f"{limit}): the process handling it may crash on it",
                                   cfg.retry.park_delay_ms)
                        self.handled += 1
                        continue
                message = Message(entry_id, flat, term, count)
                try:
                    handler(message)
                    ack(entry_id)
                except Exception as err:
                    if self._recover(lease, message, err):
                        ack(entry_id)
                self.handled += 1
                left -= 1
                if left == 0:
                    self.budget = 0
                    raise BudgetSpent
        finally:
            self.busy = None
        if self.budget is not None:
            self.budget = left
        last_id = rows[-1][0]
        self._emit(BatchHandled, epoch=lease.epoch, count=len(rows),
                   last_id=last_id.decode() if isinstance(last_id, bytes) else last_id,
                   redelivered=redelivered)

    def _recover(self, lease: Lease, message: Message, error: Exception) -> bool:
        """The handler raised on ``message``: park it (Defer), or retry it in place per the retry
        policy.  True: it was handled in the end, ack it; False: it was parked (and acked by the
        park script)."""
        policy = self._config.retry
        while True:
            self.retries += 1
            if isinstance(error, Defer):
                self._park(lease, message, error.reason, error.delay_ms)
                return False
            attempt = message.attempt
            spent = policy.max_attempts is not None and attempt >= policy.max_attempts
            action = policy.on_exhausted if spent else "retry"
            backoff = policy.backoff_ms(attempt) if action in ("retry", "block") else 0
            self._emit(HandlerError, entry_id=message.id, attempt=attempt, error=repr(error),
                       action=action, backoff_ms=backoff)
            if action == "park":
                self._park(lease, message, f"handler failed {attempt} times: {error!r}",
                           policy.park_delay_ms)
                return False
            if action == "stop":
                raise HandlerFailed(message.id, attempt, error) from error
            self.pausing = True
            try:
                if self._stop.wait(backoff / 1000.0):
                    raise StopRequested from None
            finally:
                self.pausing = False
            check_lease(lease)
            message = message.retry()
            try:
                self._handler(message)
                return True
            except Exception as err:
                error = err

    def _park(self, lease: Lease, message: Message, reason: str, delay_ms: int) -> None:
        check_lease(lease)
        cfg = self._config
        gate = self._gate
        hold_key = gate.key_of(message.raw) if gate is not None else None
        event = self._parker.park(lease.token, lease.epoch, cfg.consumer, message.id,
                                  message.wire_fields, reason, delay_ms, message.attempt,
                                  cfg.stream, hold_key=hold_key)
        if gate is not None and hold_key is not None:
            gate.parked(hold_key)
        self._emit_event(event)


class StallWatch(threading.Thread):
    """The handler timeout (Kafka's ``max.poll.interval.ms``): while a batch is being handled, a
    handler call that neither returns nor raises for ``timeout_ms`` (retry backoffs do not
    count) makes the owner step down once: it says so (:class:`HandlerStalled`), stops renewing
    and gives the lease up, so a standby takes over; the stuck call's later writes carry the old
    epoch, and the handling loop hands out nothing more of the term (its lease is lost)."""

    def __init__(self, handling: Handling, lease: Lease, timeout_ms: int,
                 manager: LeaseManager, renewer: Renewer, emit: Emit) -> None:
        super().__init__(name="orderedstream-stallwatch", daemon=True)
        self._handling = handling
        self._lease = lease
        self._timeout_ms = timeout_ms
        self._timeout = timeout_ms / 1000.0
        self._manager = manager
        self._renewer = renewer
        self._emit = emit
        self._halt = threading.Event()

    def run(self) -> None:
        handling = self._handling
        interval = min(self._timeout / 4, 1.0)
        last = handling.progress()
        since = monotonic()
        while not self._halt.wait(interval):
            if not self._lease.valid():
                return
            now = monotonic()
            progress = handling.progress()
            if handling.busy is None or handling.pausing or progress != last:
                last, since = progress, now
                continue
            if now - since >= self._timeout:
                self._step_down(handling.current_entry(), (now - since) * 1000.0)
                return

    def _step_down(self, entry_id: str, running_ms: float) -> None:
        lease = self._lease
        reason = (f"handler stalled: running {running_ms:.0f} ms on entry {entry_id} (handler "
                  f"timeout {self._timeout_ms} ms)")
        self._emit(HandlerStalled, epoch=lease.epoch, entry_id=entry_id,
                   running_ms=round(running_ms, 1))
        self._renewer.halt()
        lease.lose(reason)
        with contextlib.suppress(*CONNECTION_ERRORS, redis.ResponseError):
            self._manager.end_term(lease.token, "stalled", reason)

    def halt(self) -> None:
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5.0)
