"""The life cycle the Coordinator and the Fixer share: a blocking ``_main`` run in the caller's
thread or a background one, a bounded idempotent ``stop`` that wakes a connection parked in a
blocking read (CLIENT UNBLOCK), ``join`` that re-raises what ended the loop, and ``with``."""

from __future__ import annotations

import contextlib
import logging
import threading
from types import TracebackType
from typing import Any, TypeVar

import redis

from ._recovery import CONNECTION_ERRORS
from .exceptions import OrderedStreamError

log = logging.getLogger("orderedstream")

_B = TypeVar("_B", bound="Background")


class Waiter:
    """A connection of its own for side-effect-free blocking reads (``XREAD BLOCK``); a
    :class:`Background` wakes it on ``stop()`` with ``CLIENT UNBLOCK``."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.conn_id: int | None = None  # its server-side id, while connected

    def newest(self, key: str, after: str, block_ms: int, count: int = 1) -> list[Any]:
        """Entries of ``key`` after ``after``, waiting up to ``block_ms`` for one ([] if none)."""
        if self.conn_id is None:
            self.conn_id = int(self.client.client_id())
        try:
            reply: Any = self.client.xread({key: after}, count=count, block=max(block_ms, 1))
        except CONNECTION_ERRORS:
            self.conn_id = None
            self.client.close()  # never reuse a connection interrupted mid-command
            raise
        return list(reply[0][1]) if reply else []

    def close(self) -> None:
        self.client.close()


class Background:
    """Base of :class:`~orderedstream.Coordinator` and :class:`~orderedstream.Fixer`."""

    _kind = "loop"

    def __init__(self, cmd: redis.Redis) -> None:
        self._cmd = cmd
        self._stop = threading.Event()
        self._halting = False  # mirrors _stop, for hot loops that read it without a call
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._wait_id: int | None = None  # server id of the connection parked in XREAD BLOCK
        self._waiters: list[Waiter] = []  # likewise, woken on stop()
        self._error: BaseException | None = None

    def _main(self) -> None:
        raise NotImplementedError

    def _start_thread(self) -> None:
        if self._thread is not None:
            raise OrderedStreamError(f"{self._kind} already started")
        self._thread = threading.Thread(target=self._thread_main,
                                        name=f"orderedstream-{self._kind}", daemon=True)
        self._thread.start()

    def _thread_main(self) -> None:
        try:
            self._main()
        except BaseException as err:
            self._error = err
            log.error("%s stopped on error: %r", self._kind, err)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the loop to end; re-raise the error that ended it.  True once ended."""
        ended = self._stopped.wait(timeout)
        if ended and self._error is not None:
            raise self._error
        return ended

    def stop(self, timeout: float = 10.0) -> bool:
        """Ask the loop to stop and wait up to ``timeout`` seconds.  Idempotent; True once the
        loop has ended."""
        self._halting = True
        self._stop.set()
        self._unblock()
        if self._thread is None or threading.current_thread() is self._thread:
            return self._stopped.is_set()
        return self._stopped.wait(timeout)

    def _unblock(self) -> None:
        """Wake the waiting connections (XREAD BLOCK) so stop() does not wait out the block."""
        cmd = self._cmd  # (read once: another thread may close and clear it meanwhile)
        if cmd is None:
            return
        for wait_id in (self._wait_id, *(w.conn_id for w in self._waiters)):
            if wait_id is None:
                continue
            with contextlib.suppress(redis.RedisError, OSError):
                cmd.execute_command(  # type: ignore[no-untyped-call]
                    "CLIENT", "UNBLOCK", wait_id)

    def __enter__(self: _B) -> _B:
        self._start_thread()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        """Stop; then re-raise the error that ended the loop, if any (unless the ``with`` body
        is raising already)."""
        self.stop()
        if exc is None and self._stopped.is_set() and self._error is not None:
            raise self._error
