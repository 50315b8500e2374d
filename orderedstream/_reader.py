"""The fenced reader: what one owner term hands to the handler, in order (DESIGN.md §5).

Two loops, one after the other, each a step of the engine (:mod:`._engine`: they yield their
I/O to a driver) that returns one page at a time:

* :meth:`FencedReader.replay_page` pages through this consumer's own pending list by last-seen id
  (what a takeover claimed, and what it had itself), with each entry's delivery count.  It ends
  on a page with neither entries nor trimmed ids: a page of only trimmed ids (a capped stream
  trims the oldest pending entries first) is not the end.
* :meth:`FencedReader.new_page` reads new entries ahead, sent before the handler works on the
  current batch, fenced one of two ways:

  - *watched* (:class:`_WatchedAhead`, a connection of the term's own): ``MULTI`` / ``XACK`` /
    ``XREADGROUP`` / ``EXEC`` under a ``WATCH`` of the lease key, re-armed after each
    ``EXEC`` and read back with ``GET``: the server runs the read only if the lease key has not
    changed since the owner last saw its own token in it.  No Lua, so the entries are never
    converted into Lua tables: half the server CPU of the script (``benchmarks/fenced_read.py``);
  - *scripted* (:class:`_ScriptedAhead`, a connection shared with other partitions, where a
    ``WATCH`` could not be kept): the fenced ``deliver`` script (ack the previous batch, deliver
    the next one, reply with ids only) and a plain ``XRANGE`` for the bodies.

  When the bodies do not match what was delivered, or a reply was lost, it *resyncs*: it reads
  what was delivered to it back from its own pending list (after the last entry it handed out),
  then goes on.

Acks collect in :attr:`FencedReader.acks` (the handling loop appends to it) and ride on the next
read; XACK is idempotent, so acks whose fate is unknown after a lost reply are simply sent again.
The caller says when a page has been handled (:meth:`FencedReader.handed`): history reads go on
after the last entry handed out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import redis

from ._config import CoordinatorConfig
from ._engine import PIPE_DROP, PIPE_RELEASE, Block, Pause, PipeRecv, PipeSend, Plain, Step
from ._keys import GroupKeys, id_order
from ._lease import Lease
from ._recovery import Outage, passing_fault
from ._scripts import DeliverReply, ReadReply, Scripts, ack_op, read_op, translate
from .exceptions import LeaseLost, NotOwner, ResyncNeeded, StopRequested

ACK_LINGER_MS = 100
"""How long acks wait for the next read to ride on, when the stream has nothing more: at most
this long after a short page an idle partition's acks are sent on their own.  At rates below one
batch per read this makes one request per page instead of three (the read, a read ahead that
comes back empty, and the acks); what a crash costs is unchanged in kind (entries handled but
not yet acknowledged come again, flagged), and bounded by a batch."""


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

    def __init__(self, scripts: Scripts, keys: GroupKeys, config: CoordinatorConfig,
                 lease: Lease, stop: threading.Event, outage: Outage,
                 on_trimmed: Callable[[list[str]], None], *, watched: bool = True) -> None:
        self._keys = keys
        self._config = config
        self._lease = lease
        self._stop = stop
        self._outage = outage
        self._on_trimmed = on_trimmed
        self._scripts = scripts
        self._ahead: _ReadAhead = (_WatchedAhead if watched else _ScriptedAhead)(
            scripts, keys, lease.token, config.consumer, config.batch_size)
        self.acks: list[Any] = []
        self.cursor: bytes | str = "0"
        """The last entry handed out (history reads continue after it)."""
        self._suspect: tuple[int, int] | None = None
        self._resyncing = False
        self._min_count = 1
        self._drained: bytes | str | None = None
        """The last entry of a read that took all there was (a short page): the next read
        waits for a write after it."""

    def suspect_up_to(self, tail: Any) -> None:
        """The server's identity changed since the last term (a restart, a promoted replica):
        acks and deliveries the old server took may be gone, so every entry up to the stream's
        present last one (``tail``: an XREVRANGE COUNT 1 reply) is handed out flagged as
        redelivered, from the replay or as a new entry."""
        self._suspect = id_order(tail[0][0].decode()) if tail else None
        self._min_count = 1 if self._suspect is None else 2

    def suspect_up_to_id(self, last_id: str) -> None:
        """:meth:`suspect_up_to` with the stream's last id ('0-0': the stream is empty)."""
        self.suspect_up_to([(last_id.encode(), [])] if last_id != "0-0" else [])

    @property
    def watched(self) -> bool:
        """New entries are read under a ``WATCH`` fence (False: by the ``deliver`` script,
        asked for, or because the ACL does not allow transactions)."""
        return isinstance(self._ahead, _WatchedAhead)

    def _scripted(self) -> _ReadAhead:
        return _ScriptedAhead(self._scripts, self._keys, self._lease.token,
                              self._config.consumer, self._config.batch_size)

    def first_page(self, got: ReadReply, new: bool) -> Page | None:
        """The page the takeover script read (same fence, same round trip as the claims):
        a history read from the start, or (``new``: nothing was pending) new entries; None
        when it holds no entries (trimmed ids are reported)."""
        if got.trimmed:
            self._on_trimmed(got.trimmed)
        if not got.rows:
            return None
        if new:
            return self._new_page(got.rows)
        return Page(got.rows, got.counts, 0, self._min_count)

    def handed(self, page: Page) -> None:
        """``page`` has been handled: history reads go on after its last entry."""
        self.cursor = page.rows[-1][0]

    def _take_acks(self) -> list[Any]:
        acks, self.acks = self.acks, []
        return acks

    def _halt(self) -> None:
        if self._stop.is_set():
            raise StopRequested
        check_lease(self._lease)

    def _history_page(self, rereading: int, min_count: int) -> Step[Page | None]:
        """The next page of own pending entries after :attr:`cursor`; None at the end (a page
        with neither entries nor trimmed ids)."""
        cfg = self._config
        while True:
            self._halt()
            acks = self._take_acks()
            try:
                got = yield read_op(self._keys, self._lease.token, cfg.consumer,
                                    cfg.batch_size, self.cursor, acks)
            except (redis.RedisError, OSError) as err:
                self.acks = acks + self.acks  # their fate is unknown: send them again
                yield from self._wait_out(err)
                continue
            self._outage.ok()
            if got.trimmed:
                self._on_trimmed(got.trimmed)
            if got.rows:
                return Page(got.rows, got.counts, rereading, min_count)
            if not got.trimmed:
                return None
            # only trimmed ids on this page: more may follow

    def replay_page(self) -> Step[Page | None]:
        """The next page of this consumer's pending entries, in id order, with their delivery
        counts; None once they are all handed out (start with :attr:`cursor` at "0")."""
        return (yield from self._history_page(0, self._min_count))

    def new_page(self) -> Step[Page]:
        """The next page of new entries (waiting for them while there are none)."""
        ahead = self._ahead
        cfg = self._config
        while True:
            self._halt()
            if self._resyncing:  # read what was delivered to us back from our pending list
                page = yield from self._history_page(1, 1)
                if page is not None:
                    return page
                self._resyncing = False
                continue
            drained, self._drained = self._drained, None
            if drained is not None:
                # the last read took all there was: wait for a write before asking again, and
                # let the acks wait with it a little (they ride on that next request)
                linger = min(cfg.block_ms, ACK_LINGER_MS) if self.acks else cfg.block_ms
                try:
                    yield Block(cfg.stream, _text(drained), linger, due=bool(self.acks))
                except (redis.RedisError, OSError) as err:
                    yield from self._wait_out(err)
                continue
            try:
                if not ahead.in_flight:
                    try:
                        yield from ahead.send(self._take_acks(), self.cursor)
                    except Unwatchable:  # (its connection may hold a WATCH: not reused)
                        self.acks = ahead.forget() + self.acks
                        yield PIPE_DROP
                        ahead = self._ahead = self._scripted()
                        continue
                rows, tail = yield from ahead.receive()
                if len(rows) >= cfg.batch_size:
                    # more may be waiting: ask for the next batch now, so the server prepares
                    # it while the handler works on this one (this batch's acks ride on the
                    # request after)
                    yield from ahead.send(self._take_acks(), rows[-1][0], ahead=True)
                elif rows:
                    self._drained = rows[-1][0]
            except ResyncNeeded:
                self.acks = ahead.forget() + self.acks
                self._resyncing = True
                continue
            except (redis.RedisError, OSError) as err:
                # A '>' read whose reply was lost still delivered its entries to us: find them
                # again in our own history, after the last entry we handed out.
                self.acks = ahead.forget() + self.acks
                yield from self._wait_out(err)
                self._resyncing = True
                continue
            self._outage.ok()
            if rows:
                return self._new_page(rows)
            if not self.acks:
                try:
                    yield Block(cfg.stream, tail, cfg.block_ms)
                except (redis.RedisError, OSError) as err:
                    yield from self._wait_out(err)

    def _new_page(self, rows: list[Any]) -> Page:
        suspect = self._suspect
        if suspect is None:
            return Page(rows, None, 0, 1)
        counts = [2 if id_order(row[0].decode()) <= suspect else 1 for row in rows]
        if counts[-1] == 1:
            self._suspect = None  # past the old server's last entry
        return Page(rows, counts, 0, 1)

    def _wait_out(self, err: BaseException) -> Step[None]:
        """A fault: re-raise what is not passing (NOTOWNER, NOGROUP, a bug), else back off."""
        mapped = translate(err) if isinstance(err, redis.ResponseError) else None
        if mapped is not None:
            raise mapped from err
        reason = passing_fault(err)
        if reason is None:
            raise err
        if (yield Pause(self._outage.failed(reason), outage=True)):
            raise StopRequested from None

    def close(self) -> Step[None]:
        """Collect an unanswered read, and send the acks still held while the term is valid
        (best effort: the next owner replays what is not acknowledged)."""
        yield from self._ahead.close()
        acks = self.acks
        if acks and self._lease.valid():
            try:
                yield ack_op(self._keys, self._lease.token, acks)
                del acks[:]
            except (redis.RedisError, OSError, NotOwner):
                pass


class _ReadAhead:
    """New entries, read ahead: a request pipelined on a connection of the reader's own and sent
    without waiting, so the server works on batch N+1 while the handler works on batch N.  The
    two kinds differ only in how the request is fenced and its reply read."""

    def __init__(self, scripts: Scripts, keys: GroupKeys, token: str, consumer: str,
                 batch: int) -> None:
        self._scripts = scripts
        self._keys = keys
        self._token = token
        self._consumer = consumer
        self._batch = batch
        self._sent_acks: list[Any] = []
        self._replies = 0  # how many the request in flight gets
        self.in_flight = False

    def send(self, acks: list[Any], after: bytes | str, ahead: bool = False) -> Step[None]:
        """Ask for the entries after ``after`` (the last new entry delivered to us); ``ahead``:
        the handler works on a batch before the reply is read."""
        self._sent_acks = acks  # to send again if this request's fate turns out unknown
        commands = yield from self._request(acks, after)
        self._replies = len(commands)
        yield PipeSend(commands, ahead)
        self.in_flight = True  # only once sent: a send that failed left nothing to collect

    def receive(self) -> Step[tuple[list[Any], str]]:
        """(rows, tail): the delivered entries in id order; ``tail`` when there were none.
        Raises :class:`ResyncNeeded` when the bodies cannot be matched to what was delivered,
        :class:`NotOwner` when the fence refused the request."""
        self.in_flight = False  # read now, or its connection is dropped: nothing left either way
        got = yield from self._reply((yield PipeRecv(self._replies)))
        self._sent_acks = []
        return got

    def _request(self, acks: list[Any], after: bytes | str) -> Step[list[tuple[Any, ...]]]:
        raise NotImplementedError

    def _reply(self, replies: list[Any]) -> Step[tuple[list[Any], str]]:
        raise NotImplementedError

    def forget(self) -> list[Any]:
        """After a fault: the request is forgotten (the driver closed its connection); the
        acks it carried, to send again."""
        acks = self._sent_acks
        self._sent_acks = []
        self.in_flight = False
        return acks

    def close(self) -> Step[None]:
        """Collect an unanswered request (its entries stay pending: the next owner, or our own
        replay, gets them) and give the connection back."""
        try:
            if self.in_flight:
                self.in_flight = False
                yield PipeRecv(self._replies)
            yield from self._reset()
        except (redis.RedisError, OSError):
            return  # the driver dropped the connection
        yield PIPE_RELEASE

    def _reset(self) -> Step[None]:
        """Leave the connection as a pool gives it out."""
        return
        yield


class _ScriptedAhead(_ReadAhead):
    """The fenced ``deliver`` script (ack the previous batch, deliver the next one to us, reply
    with ids only) and a plain ``XRANGE`` for the bodies.  XRANGE changes nothing; the fence is
    the script's."""

    def _request(self, acks: list[Any], after: bytes | str) -> Step[list[tuple[Any, ...]]]:
        start = after.decode() if isinstance(after, bytes) else after
        return [self._scripts.deliver_command(self._keys, self._token, self._consumer,
                                              self._batch, acks),
                ("XRANGE", self._keys.stream, f"({start}", "+", "COUNT", self._batch)]
        yield

    def _reply(self, replies: list[Any]) -> Step[tuple[list[Any], str]]:
        head, rows = replies
        if isinstance(head, redis.exceptions.NoScriptError):  # restarted, or SCRIPT FLUSH
            # the script did not run: the acks it carried are still to send (forget())
            yield Plain(*self._scripts.load_command("deliver"))
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


class _WatchedAhead(_ReadAhead):
    """``MULTI`` / ``XACK`` (the previous batch) / ``XREADGROUP COUNT n >`` / ``XREVRANGE COUNT 1``
    (the tail, to wait from when nothing is new) / ``EXEC``, then ``WATCH lease`` / ``GET lease``
    for the next request.

    The fence: a request is sent only after the ``GET`` that followed the last ``WATCH`` showed
    our token, and ``EXEC`` runs nothing if the lease key was written or expired after that
    ``WATCH`` (a takeover, an end of term; both servers abort on expiry too).  So a read runs
    only while the key holds our token unchanged since we saw it.  Our own renewer's
    ``PEXPIRE`` writes the key as well: that ``EXEC`` is refused, the ``GET`` behind it shows our
    token, and the same request is sent again (once per renewal, every ``ttl_ms / 3``).  A
    term's first request costs one round trip more (the first ``WATCH``)."""

    def __init__(self, scripts: Scripts, keys: GroupKeys, token: str, consumer: str,
                 batch: int) -> None:
        super().__init__(scripts, keys, token, consumer, batch)
        self._watching = False
        """A ``WATCH`` of the lease is on the connection and the ``GET`` after it was ours."""
        self._probed = False  # MULTI / EXEC are allowed
        self._read = ("XREADGROUP", "GROUP", keys.group, consumer, "COUNT", batch,
                      "STREAMS", keys.stream, ">")
        self._tail = ("XREVRANGE", keys.stream, "+", "-", "COUNT", 1)
        self._rewatch = (("WATCH", keys.lease), ("GET", keys.lease))

    def _watch(self, value: Any) -> None:
        """``value``: what ``GET lease`` answered after a ``WATCH``."""
        if isinstance(value, redis.ResponseError):
            raise value
        mine = value is not None and (value.decode() if isinstance(value, bytes) else
                                      str(value)) == self._token
        self._watching = mine
        if not mine:
            raise NotOwner("NOTOWNER the lease no longer holds this term's token")

    def _request(self, acks: list[Any], after: bytes | str) -> Step[list[tuple[Any, ...]]]:
        if not self._watching:
            # the term's first: an empty MULTI/EXEC too, so that a user the ACL does not allow
            # transactions is told before a MULTI refused mid-term could let the commands
            # queued behind it run unfenced
            probe = [] if self._probed else [("MULTI",), ("EXEC",)]
            replies = yield from self._roundtrip([*probe, *self._rewatch])
            refused = [r for r in replies[:-1] if isinstance(r, redis.ResponseError)]
            if refused:
                if isinstance(refused[0], redis.exceptions.NoPermissionError):
                    raise Unwatchable(str(refused[0]))
                raise refused[0]
            self._probed = True
            self._watch(replies[-1])
        keys = self._keys
        commands: list[tuple[Any, ...]] = [("MULTI",)]
        if acks:
            commands.append(("XACK", keys.stream, keys.group, *acks))
        commands += (self._read, self._tail, ("EXEC",), *self._rewatch)
        return commands

    def _roundtrip(self, commands: list[tuple[Any, ...]]) -> Step[list[Any]]:
        yield PipeSend(commands)
        return (yield PipeRecv(len(commands)))  # type: ignore[no-any-return]

    def _reply(self, replies: list[Any]) -> Step[tuple[list[Any], str]]:
        while True:
            done, value = replies[-3], replies[-1]
            self._watch(value)
            if done is not None:
                break
            # EXEC refused: the key was written after our WATCH and holds our token again (our
            # own renewal): the same request again, under the WATCH armed behind it
            replies = yield from self._roundtrip((yield from self._request(self._sent_acks, "")))
        if isinstance(done, redis.ResponseError):  # EXECABORT: a command was refused queued
            queued = [r for r in replies[:-3] if isinstance(r, redis.ResponseError)]
            raise queued[0] if queued else done  # OOM, MOVED, ...: what the command was told
        for result in done:
            if isinstance(result, redis.ResponseError):  # NOGROUP
                mapped = translate(result)
                raise mapped if mapped is not None else result
        read, tail = done[-2], done[-1]
        rows = _rows(read)
        if rows:
            return rows, ""
        return [], _text(tail[0][0]) if tail else "0-0"

    def forget(self) -> list[Any]:
        self._watching = False  # the driver dropped the connection, and its WATCH with it
        return super().forget()

    def _reset(self) -> Step[None]:
        if self._watching:
            self._watching = False
            yield from self._roundtrip([("UNWATCH",)])


class Unwatchable(Exception):
    """The server's ACL does not allow this user ``WATCH`` / ``MULTI`` / ``EXEC``: reads are
    fenced by the ``deliver`` script instead."""


def _rows(read: Any) -> list[Any]:
    """The entries of one stream's ``XREADGROUP`` reply: RESP2 ``[[key, rows]]``, RESP3
    ``{key: rows}``, or None."""
    if not read:
        return []
    if isinstance(read, dict):
        return list(next(iter(read.values())))
    return list(read[0][1])


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
