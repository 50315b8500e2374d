"""The standby: wait until this consumer holds the group's lease (DESIGN.md §4).

A standby asks for the lease; while another consumer holds it, it waits on the group's events
stream (an owner's clean stop or a standby that ends a dead term appends to it, which wakes every
standby at once) until the holder's lease runs out on the server's clock.

With the connection watch on, it also watches the holder's heartbeat connection, and ends the
term of a holder whose connection is gone (fenced: compare-and-delete on the token it saw together
with that connection, so a wrong guess costs at most a flagged redelivery, never disorder):

* **by push** (``watch_push``): one RESP3 connection with ``CLIENT TRACKING ON REDIRECT <the
  holder's heartbeat connection> BCAST PREFIX <stream key>`` (:mod:`._watch`); the server pushes
  ``tracking-redir-broken`` at the first write to the stream after the owner died, and the
  watcher's thread ends the term at once (its ``end_term`` appends to the events stream, which
  wakes this standby and every other one);
* **by poll**: ``CLIENT LIST ID`` every ``watch_interval_ms`` (``watch_push_interval_ms`` while
  the push is armed: the poll then only covers a stream nobody writes to).

Where an ACL forbids ``CLIENT TRACKING`` (or RESP3) or ``CLIENT LIST``, the standby says so once
and relies on what is left: the poll, the push, or the lease TTL.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from ._background import Waiter
from ._config import LeaseConfig
from ._events import (
    AcquireRefused,
    Emit,
    OwnerConnectionGone,
    PushWatchDisabled,
    Standby,
    WatchDisabled,
)
from ._keys import GroupKeys
from ._lease import Holder, Lease, LeaseManager, Then
from ._watch import Arm, PushWatch
from .exceptions import ReplicasNotAcknowledged

PUSH_RETRY_S = 1.0  # after a passing fault, arm the push watch again no sooner than this
LINGER_S = 0.05  # a push watch closed on a takeover releases its connections this much later


class StandbyWaiter:
    """Waits for the lease of one (stream, group) on behalf of one consumer."""

    def __init__(self, manager: LeaseManager, cmd: redis.Redis, waiter: Waiter, keys: GroupKeys,
                 config: LeaseConfig, emit: Emit, stop: threading.Event,
                 on_standby: Callable[[], None], *, watch_name: str | None = None,
                 then: Then | None = None) -> None:
        self._manager = manager
        self._then = then  # the owner's first script, sent right behind each acquisition
        self._cmd = cmd
        self._waiter = waiter
        self._keys = keys
        self._config = config
        self._emit = emit
        self._stop = stop
        self._on_standby = on_standby
        self.watch = config.watch_connection  # CLIENT LIST may be polled
        self.push = config.watch_connection and config.watch_push  # push may be armed
        if watch_name is None:
            cmd_name = cmd.connection_pool.connection_kwargs.get("client_name") or "os"
            watch_name = f"{cmd_name.removesuffix(':cmd')}:watch"
        self._watch_name = watch_name
        self._push_watch: PushWatch | None = None
        self._watched: Holder | None = None  # the holder the push watch is armed for
        self._pushed = threading.Event()  # a push came that ended nothing: look again
        self._push_lock = threading.Lock()  # held while a push is acted on
        self._taken: Lease | None = None  # the lease a push got us (the watcher's thread)
        self._push_retry_at = 0.0
        self._next_poll = 0.0
        # a BLOCK must end before the waiting connection's socket timeout
        timeout_s = waiter.client.connection_pool.connection_kwargs.get("socket_timeout")
        self._max_block_ms = (max(int((timeout_s - 1.0) * 1000), 100) if timeout_s
                              else 1 << 30)

    def wait(self) -> Lease | None:
        """Block until this consumer holds the lease (returned), or ``stop`` is set (None)."""
        lease: Lease | None = None
        try:
            lease = self._wait()
            return lease
        finally:
            self._close_push(wait=lease is None)  # (taking over: do not wait for its thread)

    def _wait(self) -> Lease | None:
        events = self._keys.events
        last_signal = self._tail(events)
        announced = ""
        refused = ""
        while not self._stop.is_set():
            taken = self._take()
            if taken is not None:
                return taken
            try:
                got = self._manager.try_acquire(self._then)
            except ReplicasNotAcknowledged as err:
                if str(err) != refused:  # say it once per reason, not on every retry
                    refused = str(err)
                    self._emit(AcquireRefused, reason=refused)
                self._stop.wait(self._config.ttl_ms / 1000.0)
                continue
            if isinstance(got, Lease):
                return got
            if got.token != announced:
                announced = got.token
                self._on_standby()
                self._emit(Standby, owner=got.consumer, epoch=got.epoch, ttl_ms=got.pttl_ms)
            signal = self._until_free(got, last_signal)
            if signal is not None:
                last_signal = signal
        return None

    def _until_free(self, holder: Holder, last_signal: str) -> str | None:
        """Wait while ``holder`` may still hold the lease: until its TTL runs out, a wake-up on
        the events stream (returned: the newest signal id), or its connection is gone."""
        # the acquire script gives a lease without expiry one (never -1 here); 0 means it ends
        # within this millisecond: look again at once
        deadline = time.monotonic() + max(holder.pttl_ms, 1) / 1000.0
        watchable = self._config.watch_connection and bool(holder.conn_id)
        pushed = watchable and self._arm(holder)
        if not pushed:
            self._next_poll = time.monotonic()  # no push: look at once, as every time
        while not self._stop.is_set():
            if self._pushed.is_set() or self._taken is not None:
                self._pushed.clear()
                return None
            polling = watchable and self.watch
            now = time.monotonic()
            if polling and now >= self._next_poll:
                if not self._alive(holder):
                    if self._manager.end_term(holder.token, "ended", "owner connection gone"):
                        self._emit(OwnerConnectionGone, owner=holder.consumer,
                                   epoch=holder.epoch, via="poll")
                    return None
                interval = (self._config.watch_push_interval_ms if pushed
                            else self._config.watch_interval_ms)
                self._next_poll = now + interval / 1000.0
                polling = self.watch
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                return None
            if polling:
                block = min(left_ms, max(int((self._next_poll - now) * 1000), 1))
            elif left_ms > 120:
                block = left_ms - 100  # a server-side BLOCK times out up to ~100 ms late
            else:
                self._stop.wait(left_ms / 1000.0)  # (its cron): the last stretch is slept here
                return None
            entries = self._waiter.newest(self._keys.events, last_signal,
                                          min(block, self._max_block_ms))
            if entries:
                return str(entries[-1][0].decode())
            if pushed and not self._armed(holder):  # its connection was lost: arm again
                pushed = self._arm(holder)
                if not pushed:
                    self._next_poll = min(self._next_poll,
                                          time.monotonic() + self._config.watch_interval_ms / 1e3)
        return None

    def _alive(self, holder: Holder) -> bool:
        try:
            return self._manager.connection_alive(self._cmd, holder)
        except redis.ResponseError as err:  # NoPermissionError is a ResponseError
            self.watch = False
            then = ("a crashed owner is still noticed by push at the next write to the stream, "
                    "an idle stream's at the lease TTL" if self.push
                    else "failover waits for the lease TTL")
            self._emit(WatchDisabled, reason=f"CLIENT LIST not permitted ({err}); {then}")
            return True

    # -- push detection -------------------------------------------------------------------

    def _armed(self, holder: Holder) -> bool:
        watch = self._push_watch
        return (watch is not None and self._watched is not None
                and self._watched.conn_id == holder.conn_id
                and watch.armed(int(holder.conn_id), self._keys.stream))

    def _arm(self, holder: Holder) -> bool:
        """Have the server push when ``holder``'s heartbeat connection is gone; True when it
        will.  A newly armed connection id is also polled at once (an id from before a server
        restart may name another client: the poll checks the name)."""
        if not self.push or not holder.conn_id.isdigit():
            return False
        if self._armed(holder):
            self._watched = holder  # the same connection, maybe a newer term of it
            return True
        now = time.monotonic()
        if now < self._push_retry_at:
            return False
        if self._push_watch is None:
            self._push_watch = PushWatch(self._cmd, self._watch_name)
        watch = self._push_watch
        stream = self._keys.stream
        if self._watched is not None and self._watched.conn_id != holder.conn_id:
            watch.unwatch(int(self._watched.conn_id), stream)
        self._watched = holder  # before arming: a push that races the arm finds it
        result = watch.watch(int(holder.conn_id), stream, self._on_push)
        self._next_poll = now
        if result is Arm.ARMED:
            return True
        self._watched = None
        if result is Arm.REFUSED:
            self.push = False
            self._close_push()
            then = ("a crashed owner is noticed by the CLIENT LIST poll every "
                    f"{self._config.watch_interval_ms} ms" if self.watch
                    else "failover waits for the lease TTL")
            self._emit(PushWatchDisabled,
                       reason=f"CLIENT TRACKING (RESP3) not permitted; {then}")
        elif result is Arm.FAILED:
            self._push_retry_at = now + PUSH_RETRY_S
        return False  # Arm.GONE: the poll looks at once

    def _on_push(self, conn_id: int) -> None:
        """The server says client ``conn_id`` is gone (called on the watcher's thread): end the
        term seen together with it, if it still holds the lease, and ask for the lease in the
        same round trip; a lease got is handed to the standby's thread (:meth:`_take`)."""
        holder = self._watched
        if holder is None or holder.conn_id != str(conn_id):
            return
        ended = False
        got: Lease | Holder | None = None
        with self._push_lock:
            if self._watched is not holder:  # closing, or watching another term now
                return
            try:
                ended, got = self._manager.end_and_acquire(self._cmd, holder.token,
                                                           "owner connection gone", self._then)
            except Exception:  # any failure: the standby's thread looks again
                ended, got = False, None
            if isinstance(got, Lease):
                self._taken = got
        if ended:
            self._emit(OwnerConnectionGone, owner=holder.consumer, epoch=holder.epoch,
                       via="push")
        if ended or isinstance(got, Lease):
            return  # the scripts appended to the events stream: every standby wakes up
        self._pushed.set()  # that term had ended already, or the scripts failed: look again
        wait_id = self._waiter.conn_id
        if wait_id is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                self._cmd.execute_command("CLIENT", "UNBLOCK", wait_id)  # type: ignore[no-untyped-call]

    def _take(self) -> Lease | None:
        """The lease a push got us, if any (waits for a push being acted on)."""
        with self._push_lock:
            taken, self._taken = self._taken, None
        return taken

    def _close_push(self, *, wait: bool = True) -> None:
        with self._push_lock:
            watch, self._push_watch = self._push_watch, None
            self._watched = None
        self._pushed.clear()
        if watch is not None:  # (taking over: its connections are closed a little later, not
            watch.close(wait=wait, linger_s=LINGER_S)  # while the new owner hands out its first)
        taken = self._take()
        if taken is not None:  # got by a push while stopping: hand it on at once
            self._manager.release(taken)

    def _tail(self, key: str) -> str:
        last: Any = self._cmd.xrevrange(key, count=1)
        return last[0][0].decode() if last else "0-0"
