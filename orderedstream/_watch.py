"""Learning by push that another client's connection is gone (DESIGN.md §2, §4).

A client that turns on ``CLIENT TRACKING ON REDIRECT <id> BCAST PREFIX <p>`` (RESP3) is sent a
``tracking-redir-broken <id>`` push as soon as the server tries to send an invalidation for a key
under ``<p>`` to connection ``<id>`` and finds it closed: a standby that redirects to the owner's
heartbeat connection, with the stream key as the prefix, learns of the owner's death at the
producer's next write, without polling.  While the owner lives, the server sends it nothing (its
heartbeat connection speaks RESP2 and subscribes to nothing, so the invalidations are dropped).

One connection can redirect to one client id only: :class:`PushWatch` keeps one tracking
connection per watched client id (each with every prefix watched for it: the partitions that
client owns on this node) and one thread that waits on all of them.  A push is a strong fact
(client ids are not reused while the server runs) about a connection, not about a term: the
callback must end only the term it saw together with that connection id (compare-and-delete on
the token), so a push about an old term ends nothing.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from ._recovery import CONNECTION_ERRORS
from ._server import resp3_connection

log = logging.getLogger("orderedstream")

GONE_PUSH = b"tracking-redir-broken"
OnGone = Callable[[int], None]


class Arm(enum.Enum):
    """What :meth:`PushWatch.watch` achieved."""

    ARMED = "armed"
    """The server will push when the watched connection is gone and a prefix key is written."""
    GONE = "gone"
    """The server has no client with that id (the connection is gone already, or the id is
    stale, e.g. from before a server restart): check by other means."""
    REFUSED = "refused"
    """The server will not do it for this user (an ACL without ``CLIENT TRACKING`` or ``HELLO``,
    a proxy without RESP3): push detection is unavailable; say so once and poll."""
    FAILED = "failed"
    """A passing fault (connection): poll for now and try again later."""


def _is_gone_push(message: Any) -> bool:
    """``[b'tracking-redir-broken', id]``: as a push (hiredis >= 3.2, the Python parser) or a
    plain list (older hiredis hands pushes over as replies)."""
    return (isinstance(message, list) and len(message) == 2
            and message[0] in (GONE_PUSH, GONE_PUSH.decode()))


def _is_push(message: Any) -> bool:
    return isinstance(message, list) and bool(message) and message[0] in (
        GONE_PUSH, GONE_PUSH.decode(), b"invalidate", "invalidate")


class _Tracker:
    """One RESP3 connection with tracking redirected to one client id."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.lock = threading.Lock()
        self.redirect: int | None = None
        self.prefixes: dict[str, OnGone] = {}
        self.fired = False  # the gone push for this redirect was handed to the callbacks
        self.dead = False

    def arm(self, redirect: int | None, prefixes: list[str]) -> None:
        """Tracking off, then (if ``redirect``) on for ``redirect`` and ``prefixes``; the
        caller holds ``lock``.  Raises the server's error for ``ON``."""
        commands: list[tuple[Any, ...]] = [("CLIENT", "TRACKING", "OFF")]
        if redirect is not None:
            args: list[Any] = ["CLIENT", "TRACKING", "ON", "REDIRECT", redirect, "BCAST"]
            for prefix in prefixes:
                args += ["PREFIX", prefix]
            commands.append(tuple(args))
        self.redirect = None
        self.conn.send_packed_command(self.conn.pack_commands(commands))
        replies: list[Any] = []
        while len(replies) < len(commands):
            reply = self.conn.read_response(push_request=True)
            if _is_push(reply) or reply is None:  # about the previous redirect: stale
                continue
            replies.append(reply)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        self.redirect = redirect
        self.fired = False


class PushWatch:
    """Calls ``on_gone(id)`` (from its own thread) once when the server pushes that client
    ``id`` is gone; see the module's docstring.  ``close()`` is bounded and closes every
    connection it opened."""

    def __init__(self, client: redis.Redis, name: str, *, socket_timeout_s: float = 5.0) -> None:
        self._client = client
        self._name = name
        self._timeout = socket_timeout_s
        self._trackers: dict[int, _Tracker] = {}  # by redirect id
        self._idle: list[_Tracker] = []  # armed for nothing, kept for the next redirect
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._thread: threading.Thread | None = None
        self._closing = False
        self._linger_s = 0.0

    # -- the caller's side ----------------------------------------------------------------

    def watch(self, redirect: int, prefix: str, on_gone: OnGone) -> Arm:
        """Watch client ``redirect`` through writes to keys under ``prefix``.  Watching the same
        pair again only replaces ``on_gone`` (while the tracking connection is healthy)."""
        with self._lock:
            if self._closing:
                return Arm.FAILED
            tracker = self._trackers.get(redirect)
            if tracker is not None and not tracker.dead and prefix in tracker.prefixes:
                if tracker.fired:  # its push came: that connection is gone
                    return Arm.GONE
                tracker.prefixes[prefix] = on_gone
                return Arm.ARMED
            if tracker is not None and tracker.dead:
                self._trackers.pop(redirect)
                tracker = None
            fresh = tracker is None
            if tracker is None:
                tracker = self._idle.pop() if self._idle else None
        try:
            if tracker is None:
                tracker = _Tracker(self._connect())
            with tracker.lock:
                prefixes = [*tracker.prefixes, prefix] if not fresh else [prefix]
                tracker.arm(redirect, prefixes)
                tracker.prefixes = {p: tracker.prefixes.get(p, on_gone) for p in prefixes}
                tracker.prefixes[prefix] = on_gone
        except redis.ResponseError as err:
            if tracker is not None:
                self._park(tracker)
            if "does not exist" in str(err).lower():
                return Arm.GONE
            return Arm.REFUSED
        except (*CONNECTION_ERRORS, OSError):
            if tracker is not None:
                tracker.dead = True
                self._discard(tracker)
            return Arm.FAILED
        with self._lock:
            if self._closing:
                self._discard(tracker)
                return Arm.FAILED
            self._trackers[redirect] = tracker
            self._start()
        self._wake()  # the arm's read may have buffered a push: the thread drains it
        return Arm.ARMED

    def armed(self, redirect: int, prefix: str) -> bool:
        """Is ``(redirect, prefix)`` watched on a healthy connection (its push not yet
        delivered)?"""
        tracker = self._trackers.get(redirect)
        return (tracker is not None and not tracker.dead and not tracker.fired
                and prefix in tracker.prefixes)

    def unwatch(self, redirect: int, prefix: str) -> None:
        """Stop watching ``(redirect, prefix)``; a connection left with no prefix is kept, armed
        for nothing, for the next :meth:`watch`."""
        with self._lock:
            tracker = self._trackers.get(redirect)
            if tracker is None or prefix not in tracker.prefixes:
                return
            del tracker.prefixes[prefix]
            if tracker.prefixes:
                left: list[str] | None = list(tracker.prefixes)
            else:
                self._trackers.pop(redirect)
                left = None
        try:
            with tracker.lock:
                tracker.arm(redirect if left else None, left or [])
        except (redis.RedisError, OSError):
            tracker.dead = True
            self._discard(tracker)
            return
        if left is None:
            self._park(tracker)

    def close(self, *, wait: bool = True, linger_s: float = 0.0) -> None:
        """Stop the thread and close every connection (idempotent, bounded).  ``wait=False``
        leaves that to the thread, which ends within a moment (off a caller's critical path),
        after ``linger_s`` (so that its work does not compete with the caller's next steps
        for the interpreter)."""
        with self._lock:
            self._closing = True
            self._linger_s = linger_s if not wait else 0.0
            thread = self._thread
        self._wake()
        if thread is not None and thread.is_alive():
            if not wait or thread is threading.current_thread():
                return  # the thread releases everything as it ends
            thread.join(timeout=5.0)
        self._release_all()

    # -- internals --------------------------------------------------------------------------

    def _connect(self) -> Any:
        """A RESP3 connection like the client's, named, without automatic retries."""
        return resp3_connection(self._client, self._name, socket_timeout_s=self._timeout)

    def _park(self, tracker: _Tracker) -> None:
        """Keep a healthy, disarmed connection for reuse."""
        with self._lock:
            if self._closing or tracker.dead:
                self._discard(tracker)
            else:
                tracker.prefixes = {}
                self._idle.append(tracker)

    @staticmethod
    def _discard(tracker: _Tracker) -> None:
        tracker.dead = True
        with contextlib.suppress(Exception):
            tracker.conn.disconnect()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="orderedstream-watch",
                                            daemon=True)
            self._thread.start()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _release_all(self) -> None:
        with self._lock:
            trackers = [*self._trackers.values(), *self._idle]
            self._trackers.clear()
            self._idle.clear()
        for tracker in trackers:
            self._discard(tracker)
        with contextlib.suppress(OSError):
            self._wake_r.close()
            self._wake_w.close()

    def _run(self) -> None:
        try:
            self._loop()
            if self._linger_s > 0:
                time.sleep(self._linger_s)
        except Exception:  # a socket closed under it by a close() that gave up waiting
            log.debug("push watch thread ended on error", exc_info=True)
        finally:
            self._release_all()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._closing:
                    return
                trackers = list(self._trackers.values())
            # drain first: a push may sit in a parser's buffer (read along with an arm's
            # reply), where select() cannot see it
            for tracker in trackers:
                for redirect, on_gone in self._drain(tracker):
                    try:
                        on_gone(redirect)
                    except Exception:
                        log.exception("push watch: the callback for client %s failed", redirect)
            with selectors.DefaultSelector() as selector:
                selector.register(self._wake_r, selectors.EVENT_READ)
                for tracker in trackers:
                    sock = getattr(tracker.conn, "_sock", None)
                    if sock is not None and not tracker.dead:
                        selector.register(sock, selectors.EVENT_READ, tracker)
                selector.select()  # no timeout: pushes and wake-ups only
            with contextlib.suppress(OSError):
                while self._wake_r.recv(4096):
                    pass

    def _drain(self, tracker: _Tracker) -> list[tuple[int, OnGone]]:
        """Read what the tracker's connection holds; the callbacks to run (once per arming)."""
        calls: list[tuple[int, OnGone]] = []
        if tracker.dead:
            return calls
        with tracker.lock:
            try:
                while tracker.conn.can_read(0):
                    message = tracker.conn.read_response(push_request=True)
                    if (_is_gone_push(message) and tracker.redirect is not None
                            and int(message[1]) == tracker.redirect and not tracker.fired):
                        tracker.fired = True
                        calls = [(tracker.redirect, cb) for cb in tracker.prefixes.values()]
            except (*CONNECTION_ERRORS, OSError, redis.RedisError):
                self._discard(tracker)
        return calls
