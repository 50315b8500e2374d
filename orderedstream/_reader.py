"""The fenced reader: what one owner term hands to the handler, in order (DESIGN.md §5).

Two loops, one after the other:

* :meth:`FencedReader.replay` pages through this consumer's own pending list by last-seen id
  (what a takeover claimed, and what it had itself), with each entry's delivery count.  It ends
  on a page with neither entries nor trimmed ids: a page of only trimmed ids (a capped stream
  trims the oldest pending entries first) is not the end.
* :meth:`FencedReader.new_entries` reads new entries ahead: the fenced ``deliver`` script (ack
  the previous batch, deliver the next one, reply with ids only) and a plain ``XRANGE`` for the
  bodies, pipelined and sent before the handler works on the current batch.  When the bodies do
  not match what was delivered, or a reply was lost, it *resyncs*: it reads what was delivered
  to it back from its own pending list (after the last entry it handed out), then goes on.

Acks collect in :attr:`FencedReader.acks` (the handling loop appends to it) and ride on the next
read; XACK is idempotent, so acks whose fate is unknown after a lost reply are simply sent again.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import redis

from ._background import Waiter
from ._config import CoordinatorConfig
from ._keys import GroupKeys, id_order
from ._lease import Lease
from ._recovery import Outage, passing_fault
from ._scripts import DeliverReply, Scripts, pack_command, translate
from .exceptions import LeaseLost, NotOwner, ResyncNeeded, StopRequested


def check_lease(lease: Lease) -> None:
    """Raise :class:`LeaseLost` unless ``lease`` is still valid on this process's clock."""
    if not lease.valid():
        raise LeaseLost(lease.lost_reason)


class Page(NamedTuple):
    """One batch for the handling loop."""

    rows: list[Any]
    """``[(id, [field, value, ...]), ...]`` in id order."""
    counts: list[Any] | None
    """History reads: each row's delivery count (after this read); None for new entries."""
    rereading: int
    """How much this read itself added to each count that is not a delivery to the handler
    (1 when a resync re-reads entries our own ``>`` read delivered but never handed out)."""
    min_count: int
    """Counts are at least this (2 after the server's identity changed: acks may be gone)."""


class FencedReader:
    """Reads for one owner term; every read and ack is fenced by the term's token."""

    def __init__(self, scripts: Scripts, client: redis.Redis, keys: GroupKeys,
                 config: CoordinatorConfig, lease: Lease, waiter: Waiter, stop: threading.Event,
                 outage: Outage, on_trimmed: Callable[[list[str]], None]) -> None:
        self._scripts = scripts
        self._keys = keys
        self._config = config
        self._lease = lease
        self._waiter = waiter
        self._stop = stop
        self._outage = outage
        self._on_trimmed = on_trimmed
        self._ahead = _ReadAhead(scripts, client, keys, lease.token, config.consumer,
                                 config.batch_size)
        self.acks: list[Any] = []
        self.cursor: bytes | str = "0"
        """The last entry handed out (history reads continue after it)."""
        self._suspect: tuple[int, int] | None = None

    def suspect_up_to(self, tail: Any) -> None:
        """The server's identity changed since the last term (a restart, a promoted replica):
        acks and deliveries the old server took may be gone, so every entry up to the stream's
        present last one (``tail``: an XREVRANGE COUNT 1 reply) is handed out flagged as
        redelivered, from the replay or as a new entry."""
        self._suspect = id_order(tail[0][0].decode()) if tail else None

    def _take_acks(self) -> list[Any]:
        acks, self.acks = self.acks, []
        return acks

    def _halt(self) -> None:
        if self._stop.is_set():
            raise StopRequested
        check_lease(self._lease)

    def _history(self, rereading: int, min_count: int) -> Iterator[Page]:
        """Own pending entries after :attr:`cursor`, page by page, until a page with neither
        entries nor trimmed ids."""
        cfg = self._config
        while True:
            self._halt()
            acks = self._take_acks()
            try:
                got = self._scripts.read(self._keys, self._lease.token, cfg.consumer,
                                         cfg.batch_size, self.cursor, acks)
            except (redis.RedisError, OSError) as err:
                self.acks = acks + self.acks  # their fate is unknown: send them again
                self._wait_out(err)
                continue
            self._outage.ok()
            if got.trimmed:
                self._on_trimmed(got.trimmed)
            if not got.rows:
                if got.trimmed:
                    continue  # only trimmed ids on this page: more may follow
                return
            yield Page(got.rows, got.counts, rereading, min_count)
            self.cursor = got.rows[-1][0]

    def replay(self) -> Iterator[Page]:
        """This consumer's pending entries in id order, with their delivery counts."""
        self.cursor = "0"
        yield from self._history(0, 1 if self._suspect is None else 2)

    def new_entries(self) -> Iterator[Page]:
        """New entries, read ahead, for as long as the term lasts."""
        ahead = self._ahead
        cfg = self._config
        while True:
            self._halt()
            try:
                if not ahead.in_flight:
                    ahead.send(self._take_acks(), self.cursor)
                rows, tail = ahead.receive()
                if rows:
                    # ask for the next batch now, so the server prepares it while the handler
                    # works on this one (this batch's acks ride on the request after)
                    ahead.send(self._take_acks(), rows[-1][0])
            except ResyncNeeded:
                self.acks = ahead.reset() + self.acks
                yield from self._history(1, 1)
                continue
            except (redis.RedisError, OSError) as err:
                # A '>' read whose reply was lost still delivered its entries to us: find them
                # again in our own history, after the last entry we handed out.
                self.acks = ahead.reset() + self.acks
                self._wait_out(err)
                yield from self._history(1, 1)
                continue
            self._outage.ok()
            if rows:
                yield self._new_page(rows)
                self.cursor = rows[-1][0]
            elif not self.acks:
                try:
                    self._waiter.newest(cfg.stream, tail, cfg.block_ms)
                except (redis.RedisError, OSError) as err:
                    self._wait_out(err)

    def _new_page(self, rows: list[Any]) -> Page:
        suspect = self._suspect
        if suspect is None:
            return Page(rows, None, 0, 1)
        counts = [2 if id_order(row[0].decode()) <= suspect else 1 for row in rows]
        if counts[-1] == 1:
            self._suspect = None  # past the old server's last entry
        return Page(rows, counts, 0, 1)

    def _wait_out(self, err: BaseException) -> None:
        """A fault: re-raise what is not passing (NOTOWNER, NOGROUP, a bug), else back off."""
        mapped = translate(err) if isinstance(err, redis.ResponseError) else None
        if mapped is not None:
            raise mapped from err
        reason = passing_fault(err)
        if reason is None:
            raise err
        if self._stop.wait(self._outage.failed(reason)):
            raise StopRequested from None

    def flush_acks(self) -> None:
        """Acknowledge what is held now, in one fenced call (NotOwner once the term is over;
        after a connection fault they are kept, to ride on the next read)."""
        check_lease(self._lease)
        acks = self.acks
        try:
            self._scripts.ack(self._keys, self._lease.token, acks)
        except (redis.RedisError, OSError):
            return
        del acks[:]

    def close(self) -> None:
        """Collect an unanswered read, and send the acks still held while the term is valid."""
        self._ahead.close()
        if self.acks and self._lease.valid():
            with contextlib.suppress(NotOwner, LeaseLost):
                self.flush_acks()


class _ReadAhead:
    """New entries, read ahead: the fenced ``deliver`` script (ack the previous batch, deliver the
    next one to us, reply with ids only) and a plain ``XRANGE`` for the bodies, pipelined on a
    connection of its own and sent without waiting, so the server works on batch N+1 while the
    handler works on batch N.  XRANGE changes nothing; the fence is the script's."""

    def __init__(self, scripts: Scripts, client: redis.Redis, keys: GroupKeys, token: str,
                 consumer: str, batch: int) -> None:
        self._scripts = scripts
        self._pool = client.connection_pool
        self._conn: Any = None
        self._keys = keys
        self._token = token
        self._consumer = consumer
        self._batch = batch
        self._sent_acks: list[Any] = []
        self.in_flight = False
        scripts.sha("deliver")  # loaded before the first pipelined EVALSHA

    def send(self, acks: list[Any], after: bytes | str) -> None:
        """Ask for the entries after ``after`` (the last new entry delivered to us)."""
        if self._conn is None:
            self._conn = self._pool.get_connection()
        start = after.decode() if isinstance(after, bytes) else after
        commands = [self._scripts.deliver_command(self._keys, self._token, self._consumer,
                                                  self._batch, acks),
                    ("XRANGE", self._keys.stream, f"({start}", "+", "COUNT", self._batch)]
        self._sent_acks = acks
        self.in_flight = True
        try:
            if pack_command is not None:  # hiredis, without redis-py's per-argument checks
                self._conn.send_packed_command([pack_command(c) for c in commands])
            else:
                self._conn.send_packed_command(self._conn.pack_commands(commands))
        except BaseException:
            self._drop()
            raise

    def receive(self) -> tuple[list[Any], str]:
        """(rows, tail): the delivered entries in id order; ``tail`` when there were none.
        Raises :class:`ResyncNeeded` when the bodies cannot be matched to what was delivered."""
        head: Any
        try:
            try:
                head = self._conn.read_response()
            except redis.ResponseError as err:
                head = err
            rows = self._conn.read_response()
        except BaseException:
            self._drop()
            raise
        self.in_flight = False
        self._sent_acks = []
        if isinstance(head, redis.exceptions.NoScriptError):  # restarted, or SCRIPT FLUSH
            self._scripts.sha("deliver")
            raise ResyncNeeded
        got = DeliverReply.parse(self._scripts.reply(head))
        if not got.count:
            return [], got.tail
        start = 0
        while start < len(rows) and rows[start][0] != got.first:
            start += 1
        rows = rows[start:start + got.count]
        if len(rows) != got.count or rows[-1][0] != got.last:
            raise ResyncNeeded
        return rows, ""

    def reset(self) -> list[Any]:
        """After a fault: forget the request; return the acks it carried."""
        acks = self._sent_acks
        self._sent_acks = []
        self._drop()
        return acks

    def _drop(self) -> None:
        """Close the connection (never reuse one interrupted mid-command) and give it back."""
        self.in_flight = False
        if self._conn is not None:
            self._conn.disconnect()
            self._pool.release(self._conn)
            self._conn = None

    def close(self) -> None:
        """Collect an unanswered request (its entries stay pending: the next owner, or our own
        replay, gets them) and give the connection back."""
        if self._conn is None:
            return
        if self.in_flight:
            try:
                self._conn.read_response()
                self._conn.read_response()
                self.in_flight = False
            except (redis.RedisError, OSError):
                self._drop()
                return
        self._pool.release(self._conn)
        self._conn = None
