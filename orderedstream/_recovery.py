"""Faults to wait out: which server errors are passing, and a backoff that says so once.

A lost connection, a server at ``maxmemory`` (OOM), one still ``LOADING`` its data, a replica that
is read-only after a failover, a busy script: the loops of the coordinator and the fixer back off
and try again, and tell operators once per change of reason (:class:`ServerUnavailable`), and once
when the server answers again (:class:`ServerRecovered`).  Anything else (a wrong password, an ACL
denial, a bug) is not waited out.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
import redis.exceptions as rex

from ._events import ServerRecovered, ServerUnavailable

CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)

# error codes of replies that say "not now" rather than "never"
_PASSING_CODES = frozenset({"OOM", "LOADING", "BUSY", "MASTERDOWN", "READONLY", "NOSCRIPT",
                            "TRYAGAIN", "CLUSTERDOWN", "MISCONF", "NOREPLICAS", "EXECABORT",
                            "UNBLOCKED"})
# redis-py strips the code from some replies and raises a class of its own instead
_CLASS_CODES: tuple[tuple[type[Exception], str], ...] = (
    (rex.OutOfMemoryError, "OOM"), (rex.BusyLoadingError, "LOADING"),
    (rex.ReadOnlyError, "READONLY"), (rex.NoScriptError, "NOSCRIPT"),
    (rex.MasterDownError, "MASTERDOWN"), (rex.ClusterDownError, "CLUSTERDOWN"),
    (rex.TryAgainError, "TRYAGAIN"), (rex.ExecAbortError, "EXECABORT"),
    # a cluster slot that moved (resharding) or whose primary changed: ask the new one
    (rex.MovedError, "MOVED"), (rex.AskError, "ASK"))


def passing_fault(err: BaseException) -> str | None:
    """``"<KIND> <text>"`` when ``err`` means the server cannot serve us *now* (connection lost,
    OOM, LOADING, READONLY after a failover, ...): back off and try again.  None for everything
    else, auth and ACL errors (NOPERM) included: those need a person."""
    if isinstance(err, rex.AuthenticationError | rex.AuthorizationError | rex.NoPermissionError):
        return None
    for cls, code in _CLASS_CODES:
        if isinstance(err, cls):
            return f"{code} {err}"
    if isinstance(err, CONNECTION_ERRORS):
        return f"CONNECTION {type(err).__name__}: {err}"
    if isinstance(err, redis.ResponseError):
        text = str(err)
        if text.split(" ", 1)[0] in _PASSING_CODES:
            return text
    return None


def passing_cluster_fault(err: BaseException) -> str | None:
    """:func:`passing_fault`, and a cluster client's own errors while a shard fails over (a
    slot no node serves yet, the cluster down): they pass too."""
    reason = passing_fault(err)
    if reason is None and isinstance(err, rex.RedisClusterException | rex.ClusterError):
        reason = f"CLUSTER {type(err).__name__}: {err}"
    return reason


class Outage:
    """Backoff for one loop, and the events that tell operators about it: one
    :class:`ServerUnavailable` per change of reason, one :class:`ServerRecovered` at the end."""

    def __init__(self, emit: Callable[..., None], *, first_ms: int = 50,
                 max_ms: int = 2_000) -> None:
        self._emit = emit  # emit(EventClass, **fields)
        self._first = first_ms
        self._max = max_ms
        self._since: float | None = None
        self._reason_kind = self._reason = ""
        self._next = first_ms

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, reason: str) -> float:
        """Record a failure; returns the seconds to wait before the next try."""
        kind = reason.split(" ", 1)[0]
        if self._since is None:
            self._since = time.monotonic()
            self._next = self._first
        if kind != self._reason_kind:
            self._reason_kind = kind
            self._emit(ServerUnavailable, reason=reason)
        self._reason = reason
        wait = self._next
        self._next = min(self._next * 2, self._max)
        return wait / 1000.0

    def ok(self) -> None:
        """The server answered: end the outage, if there was one."""
        if self._since is None:
            return
        down_ms = (time.monotonic() - self._since) * 1000.0
        self._since = None
        self._emit(ServerRecovered, reason=self._reason, down_ms=round(down_ms, 1))
        self._reason_kind = self._reason = ""

