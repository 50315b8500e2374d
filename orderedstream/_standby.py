"""The standby: wait until this consumer holds the group's lease (DESIGN.md §4).

A standby asks for the lease; while another consumer holds it, it waits on the group's events
stream (an owner's clean stop or a standby that ends a dead term appends to it, which wakes every
standby at once) until the holder's lease runs out on the server's clock.  With the connection
watch on, it also looks every ``watch_interval_ms`` whether the holder's heartbeat connection is
still listed by the server, and ends the term of a holder whose connection is gone (fenced: a
wrong guess costs at most a flagged redelivery, never disorder).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from ._background import Waiter
from ._config import LeaseConfig
from ._events import AcquireRefused, Emit, OwnerConnectionGone, Standby, WatchDisabled
from ._keys import GroupKeys
from ._lease import Holder, Lease, LeaseManager
from .exceptions import ReplicasNotAcknowledged


class StandbyWaiter:
    """Waits for the lease of one (stream, group) on behalf of one consumer."""

    def __init__(self, manager: LeaseManager, cmd: redis.Redis, waiter: Waiter, keys: GroupKeys,
                 config: LeaseConfig, emit: Emit, stop: threading.Event,
                 on_standby: Callable[[], None]) -> None:
        self._manager = manager
        self._cmd = cmd
        self._waiter = waiter
        self._keys = keys
        self._config = config
        self._emit = emit
        self._stop = stop
        self._on_standby = on_standby
        self.watch = config.watch_connection

    def wait(self) -> Lease | None:
        """Block until this consumer holds the lease (returned), or ``stop`` is set (None)."""
        events = self._keys.events
        last_signal = self._tail(events)
        announced = ""
        refused = ""
        while not self._stop.is_set():
            try:
                got = self._manager.try_acquire()
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
        watching = self.watch and bool(holder.conn_id)
        while not self._stop.is_set():
            if watching and not self._alive(holder):
                if self._manager.end_term(holder.token, "ended", "owner connection gone"):
                    self._emit(OwnerConnectionGone, owner=holder.consumer, epoch=holder.epoch)
                return None
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                return None
            if watching:
                block = min(left_ms, self._config.watch_interval_ms)
            elif left_ms > 120:
                block = left_ms - 100  # a server-side BLOCK times out up to ~100 ms late
            else:
                self._stop.wait(left_ms / 1000.0)  # (its cron): the last stretch is slept here
                return None
            entries = self._waiter.newest(self._keys.events, last_signal, block)
            if entries:
                return str(entries[-1][0].decode())
            watching = watching and self.watch
        return None

    def _alive(self, holder: Holder) -> bool:
        try:
            return self._manager.connection_alive(self._cmd, holder)
        except redis.ResponseError as err:  # NoPermissionError is a ResponseError
            self.watch = False
            self._emit(WatchDisabled, reason=f"CLIENT LIST not permitted ({err}); "
                       "failover waits for the lease TTL")
            return True

    def _tail(self, key: str) -> str:
        last: Any = self._cmd.xrevrange(key, count=1)
        return last[0][0].decode() if last else "0-0"
