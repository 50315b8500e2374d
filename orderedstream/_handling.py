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
from collections.abc import Callable, Sequence
from time import monotonic
from typing import TYPE_CHECKING, Any, Protocol

import redis

from . import _wire as wire
from ._config import CoordinatorConfig
from ._deadletter import Parker
from ._engine import Handle, HandleBatch, Pause, Step
from ._events import BatchHandled, Emit, EntryParked, HandlerError, HandlerStalled
from ._lease import Lease, LeaseManager, Renewer
from ._message import Message, Term
from ._reader import Page, check_lease
from ._recovery import CONNECTION_ERRORS
from .exceptions import BudgetSpent, Defer, HandlerFailed, LeaseLost, StopRequested

if TYPE_CHECKING:
    from ._holdkey import HoldGate


class Halting(Protocol):
    """The owner of a handling loop: ``_halting`` turns True when ``stop()`` is asked (read
    once per entry, without a call)."""

    _halting: bool

Handler = Callable[[Message], object]
BatchHandler = Callable[[Sequence[Message]], object]

_NO_LIMIT = 1 << 62


class Handling:
    """Hands entries to the handler for one coordinator (across its terms)."""

    def __init__(self, life: Halting, handler: Handler, config: CoordinatorConfig,
                 parker: Parker, gate: HoldGate | None, emit: Emit,
                 emit_event: Callable[[EntryParked], None]) -> None:
        self._life = life
        self._handler = handler
        self._config = config
        self._parker = parker
        self._gate = gate
        self._emit = emit
        self._emit_event = emit_event
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
        self.batch_handler: BatchHandler | None = None
        """Batch mode: the handler gets each page's entries in one call (see :meth:`_whole`)."""
        self.is_async = False
        """The handler is an ``async def``: each call is yielded to the driver."""
        self.partition: int | None = None
        """The topic partition this loop serves (:attr:`Message.partition`)."""

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

    def batch(self, lease: Lease, page: Page, acks: list[Any]) -> Step[None]:
        """Handle one page; the ids to acknowledge are appended to ``acks`` (they ride on the
        next read).  A step (:mod:`._engine`): a plain handler is called right here, with no
        yield per entry; an ``async def`` one is yielded to the driver (:class:`Handle`)."""
        if self.batch_handler is not None:
            yield from self._whole(lease, page, acks, self.batch_handler)
            return
        rows, counts, rereading, min_count = page
        cfg = self._config
        call = self._handler if not self.is_async else None
        life = self._life
        term = Term(cfg.stream, cfg.group, lease.epoch, self.partition)
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
        started = monotonic()
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
                if gate is not None and not (yield from gate.admit(lease, entry_id, flat)):
                    self.handled += 1
                    continue  # parked behind its key's holder, or moved behind it (acked)
                if counts is not None:
                    count = int(counts[index]) - rereading
                    if count < min_count:
                        count = min_count
                    redelivered += count > 1
                    if count > limit:
                        yield from self._park_poisoned(lease, Message(entry_id, flat, term,
                                                                      count))
                        self.handled += 1
                        continue
                message = Message(entry_id, flat, term, count)
                if call is not None:
                    try:
                        call(message)
                        ack(entry_id)
                    except Exception as err:
                        if (yield from self._recover(lease, message, err)):
                            ack(entry_id)
                else:
                    error = yield Handle(message)
                    if error is None or (yield from self._recover(lease, message, error)):
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
        self._emit(BatchHandled, epoch=lease.epoch, count=len(rows),
                   last_id=_text(rows[-1][0]), redelivered=redelivered,
                   handler_ms=(monotonic() - started) * 1000.0)

    def _whole(self, lease: Lease, page: Page, acks: list[Any],
               handler: BatchHandler) -> Step[None]:
        """Batch mode: the page's entries in one handler call, acknowledged together when it
        returns.  If it raises, the entries are handed out again one by one, in order, each as a
        batch of one under the retry policy (so parking and order keep their meaning).  The same
        entries are passed over as in :meth:`batch`: copies for another group, entries held
        behind their key, entries past ``max_deliveries`` (parked)."""
        rows, counts, rereading, min_count = page
        cfg = self._config
        term = Term(cfg.stream, cfg.group, lease.epoch, self.partition)
        limit = cfg.retry.max_deliveries or _NO_LIMIT
        gate = self._gate
        messages: list[Message] = []
        ids: list[Any] = []
        redelivered = 0
        own_group = self._own_group
        for_header = wire.FOR
        if counts is None and gate is None:
            # hot path (new entries, no hold key): one Message per entry, no other work;
            # only a copy re-streamed for another group is passed over (acked unseen)
            messages = [Message(entry_id, flat, term) for entry_id, flat in rows
                        if flat[0] != for_header or flat[1] == own_group]
            if len(messages) == len(rows):
                ids = [row[0] for row in rows]
            else:
                ids = [m._id for m in messages]
                kept = set(ids)
                acks.extend(row[0] for row in rows if row[0] not in kept)
            rows = []  # done: the loop below has nothing left to look at
        for index, (entry_id, flat) in enumerate(rows):
            if flat[0] == for_header and flat[1] != own_group:
                acks.append(entry_id)
                continue
            if gate is not None and not (yield from gate.admit(lease, entry_id, flat)):
                continue
            count = max(int(counts[index]) - rereading, min_count) if counts is not None else 1
            redelivered += count > 1
            if count > limit:
                yield from self._park_poisoned(lease, Message(entry_id, flat, term, count))
                continue
            messages.append(Message(entry_id, flat, term, count))
            ids.append(entry_id)
        if self.budget is not None:
            messages = messages[:self.budget]
            ids = ids[:self.budget]
        self.busy_from = self.handled
        self.busy = [(entry_id, None) for entry_id in ids]
        started = monotonic()
        try:
            self._halt_check(lease)
            error = (yield from self._call(messages, handler)) if messages else None
            if error is None:
                acks.extend(ids)
                self.handled += len(messages)
            else:
                self.retries += 1
                self._emit(HandlerError, entry_id=messages[0].id, attempt=1, error=repr(error),
                           action="split", backoff_ms=0)
                # one by one, in order, each under the retry policy
                for entry_id, message in zip(ids, messages, strict=True):
                    self._halt_check(lease)
                    again = message.retry()
                    error = yield from self._call((again,), handler)
                    if error is None or (yield from self._recover(lease, again, error, handler)):
                        acks.append(entry_id)
                    self.handled += 1
        finally:
            self.busy = None
        if self.budget is not None:
            self.budget -= len(messages)
            if self.budget <= 0:
                raise BudgetSpent
        if page.rows:
            self._emit(BatchHandled, epoch=lease.epoch, count=len(page.rows),
                       last_id=_text(page.rows[-1][0]), redelivered=redelivered,
                       handler_ms=(monotonic() - started) * 1000.0)

    def _call(self, messages: Sequence[Message], handler: BatchHandler
              ) -> Step[Exception | None]:
        """One call of the batch handler: the exception it raised, or None."""
        if self.is_async:
            return (yield HandleBatch(messages))  # type: ignore[no-any-return]
        try:
            handler(messages)
        except Exception as err:
            return err
        return None

    def _halt_check(self, lease: Lease) -> None:
        if self._life._halting:
            raise StopRequested
        check_lease(lease)

    def _recover(self, lease: Lease, message: Message, error: Exception,
                 batch_handler: BatchHandler | None = None) -> Step[bool]:
        """The handler raised on ``message``: park it (Defer), or retry it in place per the retry
        policy.  True: it was handled in the end, ack it; False: it was parked (and acked by the
        park script).  ``batch_handler``: retry by calling it with ``message`` alone."""
        policy = self._config.retry
        while True:
            self.retries += 1
            if isinstance(error, Defer):
                yield from self._park(lease, message, error.reason, error.delay_ms)
                return False
            attempt = message.attempt
            spent = policy.max_attempts is not None and attempt >= policy.max_attempts
            action = policy.on_exhausted if spent else "retry"
            backoff = policy.backoff_ms(attempt) if action in ("retry", "block") else 0
            self._emit(HandlerError, entry_id=message.id, attempt=attempt, error=repr(error),
                       action=action, backoff_ms=backoff)
            if action == "park":
                yield from self._park(lease, message, f"handler failed {attempt} times: "
                                      f"{error!r}", policy.park_delay_ms)
                return False
            if action == "stop":
                raise HandlerFailed(message.id, attempt, error) from error
            self.pausing = True
            try:
                if (yield Pause(backoff / 1000.0)):
                    raise StopRequested from None
            finally:
                self.pausing = False
            check_lease(lease)
            message = message.retry()
            if batch_handler is not None:
                failed = yield from self._call((message,), batch_handler)
            elif self.is_async:
                failed = yield Handle(message)
            else:
                try:
                    self._handler(message)
                    failed = None
                except Exception as err:
                    failed = err
            if failed is None:
                return True
            error = failed

    def _park_poisoned(self, lease: Lease, message: Message) -> Step[None]:
        """Park an entry delivered more than ``max_deliveries`` times without an ack."""
        retry = self._config.retry
        yield from self._park(
            lease, message, f"delivered {message.delivery_count} times without an ack "
            f"(max_deliveries {retry.max_deliveries}): the process handling it may crash on it",
            retry.park_delay_ms)

    def _park(self, lease: Lease, message: Message, reason: str, delay_ms: int) -> Step[None]:
        check_lease(lease)
        cfg = self._config
        gate = self._gate
        hold_key = gate.key_of(message.raw) if gate is not None else None
        event = yield self._parker.park(lease.token, lease.epoch, cfg.consumer, message.id,
                                        message.wire_fields, reason, delay_ms, message.attempt,
                                        cfg.stream, hold_key=hold_key)
        if gate is not None and hold_key is not None:
            gate.parked(hold_key)
        self._emit_event(event)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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

    def halt(self, *, wait: bool = True) -> None:
        """Stop the thread (it ends within one interval); ``wait``: join it (up to 5 s)."""
        self._halt.set()
        if wait and self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5.0)
