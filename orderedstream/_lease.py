"""The lease: acquire under a new epoch, renew from a thread, release, and watch an owner's
heartbeat connection (DESIGN.md §4).

A term's token is ``consumer:epoch:nonce``: the epoch is a plain integer that only grows (see
``lua/acquire.lua``), the nonce is random per acquisition, so two terms never share a token even
if an epoch were handed out twice.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import redis

from ._config import LeaseConfig
from ._keys import GroupKeys
from ._recovery import CONNECTION_ERRORS
from ._scripts import EVENTS_MAXLEN, AcquireReply, Scripts, pack_command
from ._server import clone_client
from .exceptions import ReplicasNotAcknowledged

Then = Callable[[str], tuple[str, list[str], list[Any]]]
"""A script to pipeline right behind ``acquire``, built from the new term's nonce: (name, keys,
args).  It must be fenced by that nonce: it also runs when the lease was not granted."""


def parse_token(token: str) -> tuple[str, int, str]:
    """``consumer:epoch:nonce`` -> (consumer, epoch, nonce).  A token of an older release
    (``consumer:epoch``) has nonce ''; a value that is no token (set by hand) gives
    (value, 0, '')."""
    consumer, _, rest = token.partition(":")
    epoch_text, _, nonce = rest.partition(":")
    if not epoch_text.isdigit():
        return token, 0, ""
    return consumer, int(epoch_text), nonce


@attrs.frozen
class Holder:
    """Who holds the lease, as seen by a standby."""

    token: str
    pttl_ms: int
    conn_id: str
    conn_name: str

    @property
    def consumer(self) -> str:
        return parse_token(self.token)[0]

    @property
    def epoch(self) -> int:
        return parse_token(self.token)[1]


class Lease:
    """One term of ownership.  ``valid()`` is the owner's own view, on its monotonic clock: the
    send time of the last successful renew + ttl - margin.  Past that, it hands out nothing.

    ``valid_until`` is that deadline (``time.monotonic()`` seconds; minus infinity once the
    lease is lost), for hot loops: ``time.monotonic() < lease.valid_until`` is ``valid()``.

    ``server_changed``: the previous term was granted by another server process (a restart, a
    promoted replica), so acks taken there may be lost: entries replayed in this term must be
    flagged redelivered.

    ``head_start``: the raw reply of the ``take_over`` script when it rode in the same round
    trip as the acquisition (:data:`Then`), for the owner to take (None: it runs it itself).
    """

    def __init__(self, token: str, epoch: int, config: LeaseConfig, sent_at: float,
                 *, server_changed: bool = False) -> None:
        self.token = token
        self.epoch = epoch
        self.server_changed = server_changed
        self._config = config
        self._span = (config.ttl_ms - config.effective_margin_ms) / 1000.0
        self.valid_until = sent_at + self._span
        self.sent_at = sent_at  # when the acquisition was sent (``time.monotonic()``)
        self.head_start: Any = None
        self._lost_reason: str | None = None
        self._lock = threading.Lock()

    def valid(self) -> bool:
        return time.monotonic() < self.valid_until

    @property
    def lost_reason(self) -> str:
        if self._lost_reason is not None:
            return self._lost_reason
        return ("lease validity ran out on the owner's clock "
                "(renewals failed or the process was paused)")

    def renewed(self, sent_at: float) -> None:
        with self._lock:
            if self._lost_reason is None:
                self.valid_until = max(self.valid_until, sent_at + self._span)

    def lose(self, reason: str) -> None:
        with self._lock:
            if self._lost_reason is None:
                self._lost_reason = reason
            self.valid_until = float("-inf")

    def remaining_s(self) -> float:
        return max(self.valid_until - time.monotonic(), 0.0)


class LeaseManager:
    """Talks to the server about the lease for one (stream, group) and one consumer."""

    def __init__(self, scripts: Scripts, keys: GroupKeys, consumer: str, config: LeaseConfig,
                 beat: redis.Redis, beat_name: str) -> None:
        self._scripts = scripts
        self._keys = keys
        self._consumer = consumer
        self._config = config
        self._beat = beat
        self._beat_name = beat_name
        self._beat_id: int | None = None
        self._beat_sock: Any = None  # the socket the id was read on
        self._host = socket.gethostname()
        self._waiter: redis.Redis | None = None  # wait_replicas: acquire + WAIT on one connection

    def beat_id(self, *, fresh: bool = False) -> int:
        """The heartbeat connection's server-side id (it changes when it reconnects).

        ``fresh`` asks the server instead of trusting the cached id: a connection that silently
        went stale (server restart) would otherwise publish a dead id, and standbys would end
        the term at once - and the two would take the lease from each other in a loop.  It is
        not asked when the connection is provably the one the id was read on (:meth:`_same_beat`).
        """
        if self._beat_id is None or (fresh and not self._same_beat()):
            try:
                self._beat_id = int(self._beat.client_id())
            except CONNECTION_ERRORS:
                self._beat.close()  # drop the stale socket; the retry opens a new one
                self._beat_id = int(self._beat.client_id())
            self._beat_sock = getattr(getattr(self._beat, "connection", None), "_sock", None)
        return self._beat_id

    def _same_beat(self) -> bool:
        """True when the heartbeat connection still has the socket its id was read on, open,
        with nothing to read: a server that restarted, or closed the client (``CLIENT KILL``,
        its idle ``timeout``), closed that socket, which then reads end-of-file.  Costs no
        round trip (a graceful handover wakes a standby that acquires at once)."""
        conn: Any = getattr(self._beat, "connection", None)
        sock = getattr(conn, "_sock", None)
        if sock is None or sock is not self._beat_sock:
            return False
        try:
            return not conn.can_read(0)
        except (*CONNECTION_ERRORS, OSError):
            return False

    def try_acquire(self, then: Then | None = None) -> Lease | Holder:
        """Take the lease if it is free (a :class:`Lease`), else learn who holds it.

        ``then``: a script to run in the same round trip, right behind the acquisition (its
        reply becomes :attr:`Lease.head_start` when the lease was granted).  With
        ``wait_replicas`` set it is not sent, and a term that too few replicas acknowledged is
        ended again and :class:`~orderedstream.exceptions.ReplicasNotAcknowledged` is raised.
        """
        beat_id = self.beat_id(fresh=True)
        nonce = secrets.token_hex(6)
        args = (self._keys, self._consumer, self._config.ttl_ms, beat_id, self._beat_name,
                self._host, os.getpid(), nonce)
        sent = time.monotonic()
        acked: int | None = None
        head: Any = None
        if self._config.wait_replicas > 0:
            reply, acked = self._acquire_and_wait(self._scripts.acquire_command(*args))
        elif then is None:
            reply = self._scripts.acquire(*args)
        else:
            acquire = self._scripts.acquire_command(*args)
            sent, replies = self._pipelined(self._scripts.client,
                                            [("acquire", acquire[3:7], acquire[7:]),
                                             then(nonce)])
            reply = AcquireReply.parse(Scripts.reply(replies[0]))
            head = replies[1]
        if not reply.granted:
            return Holder(reply.holder, reply.pttl_ms, reply.conn_id, reply.conn_name)
        lease = Lease(reply.token, reply.epoch, self._config, sent,
                      server_changed=reply.server_changed)
        if not isinstance(head, redis.ResponseError):
            lease.head_start = head
        if acked is not None and acked < self._config.wait_replicas:
            required = self._config.wait_replicas
            timeout_ms = self._config.effective_wait_timeout_ms
            self.end_term(lease.token, "released",
                          f"only {acked} of {required} replicas acknowledged the term")
            raise ReplicasNotAcknowledged(lease.epoch, acked, required, timeout_ms)
        return lease

    def _pipelined(self, client: redis.Redis, calls: Sequence[tuple[str, Sequence[str],
                                                                    Sequence[Any]]],
                   ) -> tuple[float, list[Any]]:
        """Scripts ``calls`` ((name, keys, args) each) sent together on one connection of
        ``client``, in one round trip: (send time, their replies; an error reply is given as
        its exception).  A script missing from the server's cache (a restart, ``SCRIPT
        FLUSH``) did not run: it is loaded and sent again, alone."""
        pool = client.connection_pool
        conn: Any = pool.get_connection()
        sent = time.monotonic()
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        try:
            for attempt in range(2):
                commands = [self._scripts.command(*calls[i]) for i in todo]
                at = time.monotonic()
                conn.send_packed_command([pack_command(c) for c in commands]
                                         if pack_command is not None
                                         else conn.pack_commands(commands))
                if attempt == 0:
                    sent = at
                for i in todo:
                    try:
                        replies[i] = conn.read_response()
                    except redis.ResponseError as err:
                        replies[i] = err
                todo = [i for i in todo
                        if isinstance(replies[i], redis.exceptions.NoScriptError)]
                if not todo:
                    break
                for i in todo:
                    self._scripts.sha(calls[i][0])
        except BaseException:
            conn.disconnect()  # never reuse a connection whose reply may still be on the way
            raise
        finally:
            pool.release(conn)
        return sent, replies

    def _acquire_and_wait(self, command: tuple[Any, ...]) -> tuple[AcquireReply, int | None]:
        """The acquire script and, when it granted the lease, ``WAIT n timeout`` on the same
        connection (WAIT counts replicas that acknowledged this connection's writes; on another
        connection it would count the wrong ones).  Returns (script reply, replicas or None)."""
        if self._waiter is None:
            timeout_s = self._config.effective_wait_timeout_ms / 1000.0 + 5.0
            self._waiter = clone_client(self._beat, name=f"{self._beat_name}:acquire",
                                        socket_timeout_s=timeout_s)
        pool = self._waiter.connection_pool
        conn: Any = pool.get_connection()
        try:
            conn.send_command(*command)
            try:
                reply = AcquireReply.parse(conn.read_response())
            except redis.exceptions.NoScriptError:  # script cache flushed, or a new server
                self._scripts.sha("acquire")
                conn.send_command(*command)
                reply = AcquireReply.parse(conn.read_response())
            if not reply.granted:
                return reply, None
            conn.send_command("WAIT", self._config.wait_replicas,
                              self._config.effective_wait_timeout_ms)
            return reply, int(conn.read_response())
        except BaseException:
            conn.disconnect()  # never reuse a connection whose reply may still be on the way
            raise
        finally:
            pool.release(conn)

    def renew(self, lease: Lease) -> bool:
        """One compare-and-PEXPIRE on the heartbeat connection."""
        sent = time.monotonic()
        try:
            ok = self._scripts.renew(self._keys, lease.token, self._config.ttl_ms,
                                     self.beat_id(), client=self._beat)
        except CONNECTION_ERRORS:
            self._beat_id = None
            raise
        if ok:
            lease.renewed(sent)
            return True
        return False

    def end_term(self, token: str, kind: str, reason: str) -> bool:
        """Compare-and-delete the lease and wake standbys (``kind`` 'released' or 'ended')."""
        return self._scripts.end_term(self._keys, token, kind, self._consumer, reason)

    def end_and_acquire(self, client: redis.Redis, token: str, reason: str,
                        then: Then | None = None) -> tuple[bool, Lease | Holder | None]:
        """End the term ``token`` (its owner's connection is gone) and ask for the lease in the
        same round trip (the scripts pipelined on one connection of ``client``, with ``then``
        behind them, as in :meth:`try_acquire`): (ended, what :meth:`try_acquire` gives; None
        where it must run on its own: ``wait_replicas``, or no heartbeat id known yet).  The
        heartbeat id is the one the last :meth:`try_acquire` checked (no ``CLIENT ID`` round
        trip); the renewer corrects it if it changed since."""
        beat_id = self._beat_id
        if self._config.wait_replicas > 0 or beat_id is None:
            return self.end_term(token, "ended", reason), None
        nonce = secrets.token_hex(6)
        acquire = self._scripts.acquire_command(
            self._keys, self._consumer, self._config.ttl_ms, beat_id, self._beat_name,
            self._host, os.getpid(), nonce)
        calls: list[tuple[str, Sequence[str], Sequence[Any]]] = [
            ("end_term", [self._keys.lease, self._keys.events],
             [token, "ended", self._consumer, reason, EVENTS_MAXLEN]),
            ("acquire", acquire[3:7], acquire[7:])]
        if then is not None:
            calls.append(then(nonce))
        sent, replies = self._pipelined(client, calls)
        ended = int(Scripts.reply(replies[0])) == 1
        reply = AcquireReply.parse(Scripts.reply(replies[1]))
        if not reply.granted:
            return ended, Holder(reply.holder, reply.pttl_ms, reply.conn_id, reply.conn_name)
        lease = Lease(reply.token, reply.epoch, self._config, sent,
                      server_changed=reply.server_changed)
        if then is not None and not isinstance(replies[2], redis.ResponseError):
            lease.head_start = replies[2]
        return ended, lease

    def release(self, lease: Lease) -> bool:
        """End ``lease`` on a clean stop if it is still valid (compare-and-delete; standbys are
        woken at once); True when this call handed it over.  The lease is lost afterwards."""
        released = False
        if lease.valid():
            with contextlib.suppress(*CONNECTION_ERRORS, redis.ResponseError):
                released = self.end_term(lease.token, "released", "clean stop")
        lease.lose("released")
        return released

    def connection_alive(self, client: redis.Redis, holder: Holder) -> bool:
        """Is the holder's heartbeat connection still listed by the server?  The name is checked
        too, because client ids restart from 1 after a server restart."""
        listed: Any = client.execute_command(  # type: ignore[no-untyped-call]
            "CLIENT", "LIST", "ID", holder.conn_id)
        text = listed.decode() if isinstance(listed, bytes) else str(listed)
        return f" name={holder.conn_name} " in f" {text.strip()} "

    def close(self) -> None:
        self._beat.close()
        if self._waiter is not None:
            self._waiter.close()


class Renewer(threading.Thread):
    """Renews the lease every ttl/3 from its own thread and connection, so a slow handler cannot
    starve it.  Marks the lease lost when the server refuses a renewal or when the lease's
    validity runs out before a renewal gets through.

    Built without a lease, it can be started ahead of its term (a thread start is not on the
    way from an acquisition to the first entry) and is given the lease by :meth:`begin`;
    ``first`` runs on its thread before its first wait."""

    def __init__(self, manager: LeaseManager, lease: Lease | None, config: LeaseConfig,
                 *, first: Callable[[], None] | None = None) -> None:
        super().__init__(name="orderedstream-renew", daemon=True)
        self._manager = manager
        self._lease = lease
        self._first = first
        self._interval = config.renew_interval_ms / 1000.0
        self._halt = threading.Event()
        self._begun = threading.Event()
        if lease is not None:
            self._begun.set()

    def begin(self, lease: Lease, *, first: Callable[[], None] | None = None) -> None:
        """Start renewing ``lease`` (a renewer built without one)."""
        self._lease = lease
        self._first = first
        self._begun.set()

    def run(self) -> None:
        self._begun.wait()
        lease = self._lease
        if lease is None or self._halt.is_set():
            return
        if self._first is not None:
            self._first()
        wait = self._interval
        while not self._halt.wait(wait):
            if not lease.valid():
                lease.lose(lease.lost_reason)
                return
            try:
                if not self._manager.renew(lease):
                    lease.lose("the server refused the renewal: the lease expired or "
                               "another consumer took over")
                    return
                wait = self._interval
            except CONNECTION_ERRORS:
                wait = min(self._interval, 0.1)

    def halt(self, *, wait: bool = True) -> None:
        """Stop the thread (it ends within one interval); ``wait``: join it (up to 5 s)."""
        self._halt.set()
        self._begun.set()
        if wait and self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=5.0)
