"""One engine, two drivers: the owner's side of the protocol is written once, as generators
that *yield* the I/O they need (sans-IO) and get its result back; a driver carries the I/O out,
with redis-py's blocking client (:class:`SyncDriver`) or its asyncio client
(:class:`~orderedstream._aio.AsyncDriver`).  The drivers hold no decision of the protocol: a
reader of either finds only I/O in it.

A step is ``Generator[op, result, value]``; steps compose with ``yield from``.  An error of an
operation is thrown into the step where it yielded it, so ``try``/``except`` around a ``yield``
works as around a call.  The operations:

* :class:`~orderedstream._scripts.ScriptOp`: one Lua script (EVALSHA; loaded again on NOSCRIPT;
  NOTOWNER / NOGROUP raised as :class:`NotOwner` / :class:`GroupMissing`), reply parsed;
* :class:`Plain`: one command on the command connection, reply parsed by redis-py;
* :class:`Block`: ``XREAD BLOCK`` on the waiting connection, which ``stop()`` wakes;
* :class:`Pause`: wait, or until ``stop()`` (True then);
* :class:`PipeSend` / :class:`PipeRecv` / :class:`PipeDrop` / :class:`PipeRelease`: the
  read-ahead's own connection, commands sent now and replies read later; a connection a fault
  interrupted is closed by the driver, never reused;
* :class:`Handle` / :class:`HandleBatch`: call an ``async def`` handler (the asyncio driver;
  a plain handler is called by the step itself, with no yield per entry).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar

import redis

from ._background import Waiter
from ._message import Message
from ._scripts import ScriptOp, Scripts, pack_command

T = TypeVar("T")
Step = Generator[Any, Any, T]


class Plain:
    """One command on the command connection (reply parsed by redis-py's callbacks)."""

    __slots__ = ("args",)

    def __init__(self, *args: Any) -> None:
        self.args = args


class Block:
    """``XREAD COUNT 1 BLOCK block_ms STREAMS key after`` on the waiting connection: the
    entries after ``after`` ([] when none came); ``stop()`` wakes it.  ``due``: the step has
    work at ``block_ms`` (acks to send), so a driver that is told of writes and would
    otherwise sleep longer must wake it by then."""

    __slots__ = ("after", "block_ms", "due", "key")

    def __init__(self, key: str, after: str, block_ms: int, due: bool = False) -> None:
        self.key, self.after, self.block_ms, self.due = key, after, block_ms, due


class Pause:
    """Wait ``seconds``; True when ``stop()`` was asked meanwhile.  ``outage``: the wait of a
    back-off from a server that did not answer; a driver may end it early once the server
    that serves the key may have changed (a failover)."""

    __slots__ = ("outage", "seconds")

    def __init__(self, seconds: float, *, outage: bool = False) -> None:
        self.seconds = seconds
        self.outage = outage


class PipeSend:
    """Send ``commands`` on the read-ahead connection without waiting for the replies;
    ``ahead``: the step works (calls the handler) before it reads them, so a driver that
    gathers commands should send these at once."""

    __slots__ = ("ahead", "commands")

    def __init__(self, commands: Sequence[tuple[Any, ...]], ahead: bool = False) -> None:
        self.commands = commands
        self.ahead = ahead


class PipeRecv:
    """Read ``count`` replies from the read-ahead connection (an error reply comes back as a
    :class:`redis.ResponseError` value, in its place)."""

    __slots__ = ("count",)

    def __init__(self, count: int) -> None:
        self.count = count


class PipeDrop:
    """Close the read-ahead connection (its replies are unknown) and forget it."""

    __slots__ = ()


class PipeRelease:
    """Give the read-ahead connection back, nothing pending on it."""

    __slots__ = ()


class Handle:
    """Call the (``async def``) handler on ``message``: the exception it raised, or None."""

    __slots__ = ("message",)

    def __init__(self, message: Message) -> None:
        self.message = message


class HandleBatch:
    """Call the (``async def``) batch handler on ``messages``: its exception, or None."""

    __slots__ = ("messages",)

    def __init__(self, messages: Sequence[Message]) -> None:
        self.messages = messages


PIPE_DROP = PipeDrop()
PIPE_RELEASE = PipeRelease()


class SyncDriver:
    """Carries a step's operations out with redis-py's blocking client, in the calling thread."""

    def __init__(self, scripts: Scripts, client: redis.Redis, waiter: Waiter,
                 stop: threading.Event) -> None:
        self._scripts = scripts
        self._client = client
        self._pool = client.connection_pool
        self._waiter = waiter
        self._stop = stop
        self._pipe: Any = None
        self._pending = 0  # replies the read-ahead connection owes: it is reused only at 0
        self._do: dict[type, Callable[[Any], Any]] = {
            ScriptOp: self._script, Plain: self._plain, Block: self._block,
            Pause: self._pause, PipeSend: self._send, PipeRecv: self._recv,
            PipeDrop: self._drop, PipeRelease: self._release}

    def run(self, step: Step[T]) -> T:
        """Drive ``step`` to its end; its value (or its exception)."""
        do = self._do
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = step.send(value) if error is None else step.throw(error)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            value = error = None
            try:
                value = do[type(op)](op)
            except BaseException as err:  # thrown into the step, where it yielded the op
                error = err

    def _script(self, op: ScriptOp[Any]) -> Any:
        return self._scripts.do(op)

    def _plain(self, op: Plain) -> Any:
        return self._client.execute_command(*op.args)  # type: ignore[no-untyped-call]

    def _block(self, op: Block) -> list[Any]:
        return self._waiter.newest(op.key, op.after, op.block_ms)

    def _pause(self, op: Pause) -> bool:
        return self._stop.wait(op.seconds)

    def _send(self, op: PipeSend) -> None:
        if self._pipe is None:
            self._pipe = self._pool.get_connection()
        self._pending += len(op.commands)
        try:
            if pack_command is not None:  # hiredis, without redis-py's per-argument checks
                self._pipe.send_packed_command([pack_command(c) for c in op.commands])
            else:
                self._pipe.send_packed_command(self._pipe.pack_commands(op.commands))
        except BaseException:
            self._drop(PIPE_DROP)
            raise

    def _recv(self, op: PipeRecv) -> list[Any]:
        replies: list[Any] = []
        if self._pipe is None:
            raise redis.ConnectionError("the read-ahead has no request in flight")
        try:
            for _ in range(op.count):
                try:
                    replies.append(self._pipe.read_response())
                except redis.ResponseError as err:
                    replies.append(err)
                self._pending -= 1
        except BaseException:
            self._drop(PIPE_DROP)
            raise
        return replies

    def _drop(self, op: PipeDrop) -> None:
        self._pending = 0
        if self._pipe is not None:
            self._pipe.disconnect()
            self._pool.release(self._pipe)
            self._pipe = None

    def _release(self, op: PipeRelease) -> None:
        if self._pending:  # replies still on their way: never hand it to another command
            self._drop(PIPE_DROP)
        elif self._pipe is not None:
            self._pool.release(self._pipe)
            self._pipe = None
