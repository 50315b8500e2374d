"""asyncio: :class:`AsyncCoordinator` and :class:`AsyncProducer`.

The owner's term is the same step the sync :class:`~orderedstream.Coordinator` runs
(:meth:`~orderedstream._owner.Owner.serve`, see :mod:`._engine`), carried out here by
:class:`AsyncDriver` with redis-py's asyncio client; an ``async def`` handler is awaited on the
event loop.  What must not depend on the loop runs on threads, with blocking clients of their own:
the lease's renewal (so a handler that blocks the loop cannot let the lease lapse unnoticed),
the handler-timeout watch, and the standby's wait for the lease (a blocking ``XREAD BLOCK`` on the
group's events stream).  Same keys, same scripts: async and sync consumers of one group hand over
to each other.

Instead of a handler, the entries can be taken with ``async for``
(:meth:`AsyncCoordinator.messages`, :class:`MessageStream`): the engine's handler call (its
:class:`~orderedstream._engine.Handle` op) is then a :class:`_Feed` that offers the entry to the
loop and awaits its outcome; the loop's body is the handler.

Cancelling :meth:`AsyncCoordinator.run` (or the task it runs in) never acknowledges the entry in
flight: the cancellation is thrown into the term where it waited, the acks of entries handled
before it are sent, the lease is handed over, and ``CancelledError`` goes on up.  A connection
interrupted mid-command is closed, never reused (redis-py's CVE-2023-28858/9).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio
import redis.asyncio.connection as aconn
import redis.connection
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._background import Waiter
from ._config import CoordinatorConfig
from ._engine import (
    Block,
    Handle,
    HandleBatch,
    Pause,
    PipeDrop,
    PipeRecv,
    PipeRelease,
    PipeSend,
    Plain,
    Step,
)
from ._events import Emitter, GroupRecreated, Hook, LeaseAcquired
from ._handling import StallWatch
from ._keys import GroupKeys
from ._lease import Lease, Renewer
from ._message import Message
from ._owner import OwnerView, Role, assemble
from ._recovery import passing_fault
from ._scripts import ScriptOp, Scripts, pack_command, translate
from ._server import client_name, clone_client, connect_check
from ._takeover import ensure_group
from .exceptions import BudgetSpent, ConfigError, GroupMissing, StopRequested

T = TypeVar("T")
AsyncHandler = Callable[[Message], Awaitable[object]]
AsyncBatchHandler = Callable[[Sequence[Message]], Awaitable[object]]

_SYNC_CLASSES: dict[type, type] = {
    aconn.Connection: redis.connection.Connection,
    aconn.SSLConnection: redis.connection.SSLConnection,
    aconn.UnixDomainSocketConnection: redis.connection.UnixDomainSocketConnection,
}


def blocking_twin(client: redis.asyncio.Redis) -> redis.Redis:
    """A blocking client for the server ``client`` talks to (same address, credentials, TLS)."""
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    for key in ("retry", "redis_connect_func", "parser_class"):
        kwargs.pop(key, None)
    sync_class = _SYNC_CLASSES.get(pool.connection_class, redis.connection.Connection)
    return redis.Redis(connection_pool=redis.ConnectionPool(connection_class=sync_class,
                                                            **kwargs))


def async_clone(client: redis.asyncio.Redis, *, name: str, socket_timeout_s: float,
                single: bool = False) -> redis.asyncio.Redis:
    """Like :func:`~orderedstream._server.clone_client`: our own pool, RESP2 bytes replies, an
    explicit socket timeout (above any BLOCK: redis-py's 5 s default breaks blocking reads) and
    no automatic retries."""
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    for key in ("retry", "retry_on_timeout", "retry_on_error", "client_name", "decode_responses",
                "protocol", "socket_timeout", "encoding_errors"):
        kwargs.pop(key, None)
    for key in list(kwargs):
        if key.startswith(("maint_notifications", "oss_cluster_maint")):
            del kwargs[key]
    new_pool = aconn.ConnectionPool(
        connection_class=pool.connection_class, retry=Retry(NoBackoff(), 0),
        client_name=client_name(name), protocol=2, decode_responses=False,
        socket_timeout=socket_timeout_s, **kwargs)
    clone = redis.asyncio.Redis(connection_pool=new_pool, single_connection_client=single)
    clone.auto_close_connection_pool = True
    return clone


async def _execute(client: redis.asyncio.Redis, command: Sequence[Any]) -> Any:
    return await client.execute_command(*command)  # type: ignore[no-untyped-call]


class AsyncDriver:
    """Carries a step's operations out with redis-py's asyncio client, on the event loop."""

    def __init__(self, scripts: Scripts, client: redis.asyncio.Redis,
                 waiter: redis.asyncio.Redis, stop: asyncio.Event,
                 handler: Callable[[Any], Awaitable[object]]) -> None:
        self._scripts = scripts
        self._client = client
        self._waiter = waiter
        self.waiter_id: int | None = None
        self._stop = stop
        self._handler = handler
        self._pipe: Any = None
        self._pending = 0  # replies the read-ahead connection owes: it is reused only at 0
        self._do: dict[type, Callable[[Any], Awaitable[Any]]] = {
            ScriptOp: self._script, Plain: self._plain, Block: self._block,
            Pause: self._pause, PipeSend: self._send, PipeRecv: self._recv,
            PipeDrop: self._drop, PipeRelease: self._release, Handle: self._handle,
            HandleBatch: self._handle_batch}

    async def run(self, step: Step[T]) -> T:
        """Drive ``step`` to its end; its value (or its exception).  A cancellation is thrown
        into the step too, so its clean-up runs before ``CancelledError`` goes on."""
        do = self._do
        handler = self._handler
        task = asyncio.current_task()
        cancelling: Callable[[], int] = getattr(task, "cancelling", None) or _no_cancelling
        cancelled = False  # a cancellation was thrown into the step already
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = step.send(value) if error is None else step.throw(error)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            value = error = None
            if type(op) is Handle:  # the per-entry call, without a dispatch
                try:
                    await handler(op.message)
                except StopRequested as err:
                    error = err  # a messages() loop was left: thrown into the step, never acked
                except Exception as err:
                    value = err
                except BaseException as err:
                    error = err
            else:
                try:
                    value = await do[type(op)](op)
                except BaseException as err:
                    error = err
            if isinstance(error, asyncio.CancelledError):
                cancelled = True
            elif not cancelled and cancelling():
                # redis-py writes under asyncio.wait_for, which on Python 3.11 can swallow a
                # cancellation that arrives as the write completes: deliver it here
                cancelled = True
                error = asyncio.CancelledError()

    async def _script(self, op: ScriptOp[Any]) -> Any:
        command = self._scripts.command(op.name, op.keys, op.args)
        for _ in range(2):
            try:
                return op.parse(await _execute(self._client, command))
            except redis.exceptions.NoScriptError:
                await _execute(self._client, self._scripts.load_command(op.name))
            except redis.ResponseError as err:
                mapped = translate(err)
                if mapped is not None:
                    raise mapped from err
                raise
        raise redis.exceptions.NoScriptError(f"script {op.name} vanished twice")

    async def _plain(self, op: Plain) -> Any:
        return await _execute(self._client, op.args)

    async def _block(self, op: Block) -> list[Any]:
        if self.waiter_id is None:
            self.waiter_id = int(await self._waiter.client_id())
        try:
            reply: Any = await self._waiter.xread({op.key: op.after}, count=1,
                                                  block=max(op.block_ms, 1))
        except BaseException:
            self.waiter_id = None
            await self._waiter.aclose()  # interrupted mid-command: never reuse it
            raise
        return list(reply[0][1]) if reply else []

    async def _pause(self, op: Pause) -> bool:
        if self._stop.is_set():
            return True
        # asyncio.wait, not wait_for: Python 3.11's wait_for can swallow a cancellation that
        # arrives as its timeout fires, and the task would go on as if never cancelled
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({stopped}, timeout=op.seconds)
        finally:
            stopped.cancel()
        return self._stop.is_set()

    async def _send(self, op: PipeSend) -> None:
        if self._pipe is None:
            self._pipe = await self._client.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        self._pending += len(op.commands)
        try:
            if pack_command is not None:
                await self._pipe.send_packed_command(
                    [pack_command(c) for c in op.commands], check_health=False)
            else:
                await self._pipe.send_packed_command(self._pipe.pack_commands(op.commands))
        except BaseException:
            await self._drop(op)
            raise

    async def _recv(self, op: PipeRecv) -> list[Any]:
        replies: list[Any] = []
        if self._pipe is None:
            raise redis.ConnectionError("the read-ahead has no request in flight")
        try:
            for _ in range(op.count):
                try:
                    replies.append(await self._pipe.read_response())
                except redis.ResponseError as err:
                    replies.append(err)
                self._pending -= 1
        except BaseException:
            await self._drop(op)
            raise
        return replies

    async def _drop(self, op: object) -> None:
        self._pending = 0
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            await pipe.disconnect()
            await self._client.connection_pool.release(pipe)

    async def _release(self, op: PipeRelease) -> None:
        if self._pending:  # replies still on their way: never hand it to another command
            await self._drop(op)
            return
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            await self._client.connection_pool.release(pipe)

    async def _handle(self, op: Handle) -> Exception | None:
        try:
            await self._handler(op.message)
        except Exception as err:
            return err
        return None

    async def _handle_batch(self, op: HandleBatch) -> Exception | None:
        try:
            await self._handler(op.messages)
        except Exception as err:
            return err
        return None


class AsyncCoordinator(OwnerView):
    """Single active consumer for one (stream, group), on an event loop: the same protocol,
    keys and guarantees as :class:`~orderedstream.Coordinator`, with an ``async def`` handler.

    >>> async with AsyncCoordinator(config, handler, redis.asyncio.Redis()) as c:  # doctest: +SKIP
    ...     ...  # start() on enter; stop() on exit (re-raising the loop's error)
    """

    def __init__(self, config: CoordinatorConfig, handler: AsyncHandler | None,
                 client: redis.asyncio.Redis, *, hooks: Sequence[Hook] = ()) -> None:
        feed = None
        if handler is None:  # the entries are taken with `async for` (messages())
            feed = _Feed()
            handler = feed
        elif not asyncio.iscoroutinefunction(handler) and not _is_async_callable(handler):
            raise ConfigError(f"{handler!r} is not an async function: AsyncCoordinator awaits "
                              "its handler; pass an `async def` one, or use Coordinator for a "
                              "plain function")
        self._feed = feed
        self.config = config
        self._keys = keys = GroupKeys(config.stream, config.group)
        self._emitter = Emitter(hooks)
        base = f"os:{config.consumer}"
        timeout_s = config.socket_timeout_ms / 1000.0
        self._cmd_name = client_name(f"{base}:cmd")
        blocking = blocking_twin(client)
        self._sync_cmd = clone_client(blocking, name=f"{base}:cmd", socket_timeout_s=timeout_s)
        self._members_client = self._sync_cmd
        sync_waiter = Waiter(clone_client(blocking, name=f"{base}:wait", single=True,
                                          socket_timeout_s=timeout_s + config.lease.ttl_ms / 1000))
        blocking.close()
        self._sync_waiter = sync_waiter
        self._cmd = async_clone(client, name=f"{base}:cmd", socket_timeout_s=timeout_s)
        self._wait = async_clone(client, name=f"{base}:wait", single=True,
                                 socket_timeout_s=timeout_s + config.block_ms / 1000.0)
        self._stop = threading.Event()
        self._astop = asyncio.Event()
        self._halting = False
        self._running = False  # run() was entered (by start(), or called directly)
        if feed is not None:
            feed.stop = self._astop
        parts = assemble(self, config, keys, _not_called, self._sync_cmd, sync_waiter,
                         self._event, self._emitter, self._stop,
                         lambda: self._set_role(Role.STANDBY))
        self._scripts, self._lease_mgr, self._outage = parts.scripts, parts.lease, parts.outage
        self._standby, self._handling, self._owner = parts.standby, parts.handling, parts.owner
        self._handling.is_async = True
        self._driver = AsyncDriver(self._scripts, self._cmd, self._wait, self._astop, handler)
        self._role = Role.STARTING
        self._lease: Lease | None = None
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    @classmethod
    def from_url(cls, url: str, config: CoordinatorConfig, handler: AsyncHandler | None = None,
                 *, hooks: Sequence[Hook] = ()) -> AsyncCoordinator:
        """Build with a client for ``url`` (redis://, rediss:// or unix://); without a handler,
        take the entries with :meth:`messages`."""
        return cls(config, handler, redis.asyncio.Redis.from_url(url), hooks=hooks)

    def messages(self) -> MessageStream:
        """The entries as an ``async for`` loop, for a coordinator built without a handler
        (``handler=None``): see :class:`MessageStream`.

        >>> async with coordinator.messages() as stream:  # doctest: +SKIP
        ...     async for message in stream:
        ...         async with stream.settle(message):
        ...             await handle(message)
        """
        if self._feed is None:
            raise ConfigError("messages() is for a coordinator built without a handler: "
                              "AsyncCoordinator(config, None, client); this one calls its "
                              "handler")
        return MessageStream(self, self._feed)

    @classmethod
    def batched(cls, config: CoordinatorConfig, handler: AsyncBatchHandler,
                client: redis.asyncio.Redis, *, hooks: Sequence[Hook] = ()
                ) -> AsyncCoordinator:
        """Batch mode, as :meth:`Coordinator.batched <orderedstream.Coordinator.batched>`."""
        if handler is None:
            raise ConfigError("AsyncCoordinator.batched needs a batch handler (messages() "
                              "hands out one entry at a time)")
        coordinator = cls(config, handler, client, hooks=hooks)  # type: ignore[arg-type]
        coordinator._handling.batch_handler = handler
        return coordinator

    async def start(self, *, max_messages: int | None = None) -> None:
        """Run in a task of the running loop; returns at once."""
        self._handling.budget = max_messages
        self._task = task = asyncio.get_running_loop().create_task(self._run_task())
        feed = self._feed
        if feed is not None:  # a loop waiting in messages() learns that the run ended
            task.add_done_callback(lambda _: feed.wake())

    async def _run_task(self) -> None:
        try:
            await self.run(max_messages=self._handling.budget)
        except asyncio.CancelledError:
            raise
        except BaseException as err:
            self._error = err

    async def run(self, *, max_messages: int | None = None) -> None:
        """Run until ``stop()``, ``max_messages`` or a fatal error (or until cancelled)."""
        self._handling.budget = max_messages
        self._running = True
        try:
            await asyncio.to_thread(connect_check, self._sync_cmd)
            while not self._stop.is_set() and self._handling.budget != 0:
                try:
                    lease = await asyncio.to_thread(self._wait_for_lease)     # 1. standby
                    if lease is None:
                        break
                    self._outage.ok()
                    await self._serve(lease)                                   # 2-4.
                except BudgetSpent:
                    break
                except GroupMissing:
                    continue
                except Exception as err:
                    reason = passing_fault(err)
                    if reason is None:
                        raise
                    await self._driver.run(_pause(self._outage.failed(reason)))
        finally:
            self._stop.set()
            self._astop.set()
            try:
                await asyncio.to_thread(self._close)
            finally:
                if self._feed is not None:
                    self._feed.halt()  # after _close: a waiting loop sees the run has ended

    def _wait_for_lease(self) -> Lease | None:
        start = ensure_group(self._sync_cmd, self.config, self._owner.cursor)
        if start is not None and self._role is not Role.STARTING:
            self._event(GroupRecreated, start_id=start)
        return self._standby.wait()

    async def _serve(self, lease: Lease) -> None:
        self._lease = lease
        self._set_role(Role.OWNER)
        self._event(LeaseAcquired, epoch=lease.epoch)
        renewer = Renewer(self._lease_mgr, lease, self.config.lease)
        renewer.start()
        watch = StallWatch(self._handling, lease, self.config.handler_timeout_ms,
                           self._lease_mgr, renewer, self._event)
        watch.start()
        try:
            await self._driver.run(self._owner.serve(lease))
        finally:
            watch.halt(wait=False)  # daemon threads that end within one interval: never block
            renewer.halt(wait=False)  # the loop joining them
            self._lease = None
            if self._role is Role.OWNER:
                self._set_role(Role.STANDBY)

    async def stop(self, timeout: float = 10.0) -> bool:
        """Ask the loop to stop, hand the lease over, and wait up to ``timeout`` seconds.
        Idempotent; True once the loop has ended."""
        self._halting = True
        self._stop.set()
        self._astop.set()
        if self._feed is not None:
            self._feed.halt()
        await asyncio.to_thread(self._unblock)
        task = self._task
        if task is None:
            return self._role is Role.STOPPED
        done, _ = await asyncio.wait({task}, timeout=timeout)
        return bool(done)

    def _unblock(self) -> None:
        """Wake the connections parked in XREAD BLOCK (CLIENT UNBLOCK)."""
        for conn_id in (self._sync_waiter.conn_id, self._driver.waiter_id):
            if conn_id is not None:
                with contextlib.suppress(redis.RedisError, OSError):
                    self._sync_cmd.execute_command(  # type: ignore[no-untyped-call]
                        "CLIENT", "UNBLOCK", conn_id)

    async def join(self) -> None:
        """Wait for the loop's task to end; re-raise the error that ended it."""
        if self._task is not None:
            await asyncio.shield(self._task)
        if self._error is not None:
            raise self._error

    def _close(self) -> None:
        self._set_role(Role.STOPPED)
        self._sync_cmd.close()
        self._sync_waiter.close()
        self._lease_mgr.close()

    async def aclose(self) -> None:
        """Close the asyncio clients (after the loop ended)."""
        await self._cmd.aclose()
        await self._wait.aclose()

    async def __aenter__(self) -> AsyncCoordinator:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
        await self.aclose()
        if exc[1] is None and self._error is not None:
            raise self._error


_STOPPED: Any = object()  # the outcome of an entry whose loop was left: not acknowledged


class _Feed:
    """The handler of a coordinator whose entries are taken with ``async for``: the engine calls
    it on each entry (and on each retry of one); it offers the entry to the loop and awaits its
    outcome, so the engine goes on (acks, parks, retries, hands out the next) only once the loop
    has settled it.  One entry at a time: order by construction."""

    def __init__(self) -> None:
        self.stop: asyncio.Event | None = None
        self.offer: Message | None = None
        """Offered by the engine, not yet taken by the loop."""
        self.in_hand: Message | None = None
        """Taken by the loop, not yet settled."""
        self.outcome: asyncio.Future[Any] | None = None
        """What the engine awaits: None (acknowledge), the exception the body raised, or
        ``_STOPPED``."""
        self.waiter: asyncio.Future[None] | None = None
        """The loop's wait for an offer (or for the end of the run)."""
        self.taken: Message | None = None
        """The last message the loop took."""

    async def __call__(self, message: Message) -> None:
        stop = self.stop
        if stop is not None and stop.is_set():
            raise StopRequested
        outcome: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.offer, self.outcome = message, outcome
        self.wake()
        try:
            result = await outcome
        finally:
            self.offer = self.outcome = None
            if self.in_hand is message:
                self.in_hand = None  # cancelled or stopped: the loop's message is not settled
        if result is _STOPPED:
            raise StopRequested
        if result is not None:
            raise result  # to the engine: Defer parks, another exception is retried

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def settle(self, message: Message, error: BaseException | None) -> None:
        if self.in_hand is not message:
            if message is self.taken:
                return  # settled already, or the run ended under it (not acknowledged)
            raise ConfigError(f"settle({message!r}): not the message in hand (each message is "
                              "settled once, inside the loop that took it)")
        self.in_hand = None
        outcome = self.outcome
        if outcome is not None and not outcome.done():
            outcome.set_result(error)

    def halt(self) -> None:
        """The run ends: the entry in hand, if any, is not acknowledged."""
        outcome = self.outcome
        if outcome is not None and not outcome.done():
            outcome.set_result(_STOPPED)
        self.wake()


class MessageStream:
    """The entries of an :class:`AsyncCoordinator` built without a handler, as an ``async for``
    loop (:meth:`AsyncCoordinator.messages`)::

        async with coordinator.messages() as stream:  # starts the coordinator; stops it on exit
            async for message in stream:              # standby until it owns the group
                async with stream.settle(message):    # the body's outcome: see below
                    await handle(message)

    The loop's body is the handler: the next message is handed out only once the one before is
    settled (order by construction), and the same guarantees hold as for a handler (fencing,
    retry policy, parking, ``handler_timeout_ms`` for a body that never ends).

    * ``stream.settle(message)`` gives the body's outcome, as aio-pika's ``message.process()``:
      a normal exit acknowledges; :class:`~orderedstream.Defer` parks the entry; another
      exception is retried per the :class:`~orderedstream.RetryPolicy` (the same entry comes
      back as the next message, ``attempt`` + 1, after the backoff) and parked when the
      attempts are spent (``on_exhausted="stop"``: the loop ends with
      :class:`~orderedstream.HandlerFailed`).  The exception is not re-raised (a
      :class:`~orderedstream.HandlerError` event reports it, as for a handler); a cancellation
      or ``KeyboardInterrupt`` settles nothing and goes on.
    * Without ``settle()``: a body that ends normally acknowledges its message when the loop
      asks for the next one.
    * Leaving the loop with a message in hand (``break``, ``return``, an exception, a
      cancellation) never acknowledges it.  Leaving ``async with`` stops the coordinator and
      hands the lease over: the entry comes again to the next owner, flagged ``redelivered``.
      An exception that leaves it is first given to the engine as the message's outcome
      (``Defer`` parks it; a retry is left to the next owner) and then re-raised.

    The loop ends (``StopAsyncIteration``) when the coordinator is stopped, or raises the error
    that ended it.  One loop at a time takes from a coordinator.
    """

    def __init__(self, coordinator: AsyncCoordinator, feed: _Feed) -> None:
        self._coordinator = coordinator
        self._feed = feed

    def settle(self, message: Message) -> Settling:
        """The scope of ``message``'s handling: its exit settles it (see the class)."""
        return Settling(self._feed, message)

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> Message:
        feed = self._feed
        in_hand = feed.in_hand
        if in_hand is not None:  # the body ended normally: acknowledge
            feed.settle(in_hand, None)
        coordinator = self._coordinator
        if not coordinator._running and coordinator._task is None:
            await coordinator.start()
        while (message := feed.offer) is None:
            task = coordinator._task
            if task.done() if task is not None else coordinator._role is Role.STOPPED:
                if coordinator._error is not None:
                    raise coordinator._error
                raise StopAsyncIteration
            if feed.waiter is not None and not feed.waiter.done():
                raise ConfigError("another loop is already waiting on this coordinator's "
                                  "messages (one loop at a time)")
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            feed.waiter = waiter
            try:
                await waiter
            finally:
                feed.waiter = None
        feed.offer = None
        feed.in_hand = feed.taken = message
        return message

    async def __aenter__(self) -> MessageStream:
        coordinator = self._coordinator
        if not coordinator._running and coordinator._task is None:
            await coordinator.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: object) -> None:
        feed = self._feed
        in_hand = feed.in_hand
        if in_hand is not None and isinstance(exc, Exception):
            feed.settle(in_hand, exc)  # Defer parks it; a retry is left to the next owner
        coordinator = self._coordinator
        await coordinator.stop()
        await coordinator.aclose()
        if exc is None and coordinator._error is not None:
            raise coordinator._error


class Settling:
    """``async with stream.settle(message)`` (or ``with``): the exit settles ``message``."""

    __slots__ = ("_feed", "_message")

    def __init__(self, feed: _Feed, message: Message) -> None:
        self._feed, self._message = feed, message

    def __enter__(self) -> Message:
        return self._message

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> bool:
        if exc is None:
            self._feed.settle(self._message, None)
            return False
        if isinstance(exc, Exception):
            self._feed.settle(self._message, exc)
            return True  # the engine deals with it: parked, or retried as the next message
        return False  # a cancellation, KeyboardInterrupt: nothing settled

    async def __aenter__(self) -> Message:
        return self._message

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> bool:
        return self.__exit__(exc_type, exc, tb)


def _no_cancelling() -> int:
    """``Task.cancelling()`` where there is none (Python < 3.11, or no task): never."""
    return 0


def _not_called(message: Message) -> None:  # pragma: no cover - async handlers are yielded
    raise AssertionError("an async coordinator's handler is awaited by its driver")


def _pause(seconds: float) -> Step[bool]:
    return (yield Pause(seconds))  # type: ignore[no-any-return]


def _is_async_callable(obj: object) -> bool:
    call = getattr(obj, "__call__", None)  # noqa: B004 - an object with an async __call__
    return call is not None and asyncio.iscoroutinefunction(call)


class AsyncProducer:
    """``await send(fields)`` one entry, or ``await send_many(batch)`` in one pipelined round
    trip; no automatic retry (a retried XADD can write an entry twice)."""

    def __init__(self, client: redis.asyncio.Redis, stream: str, *,
                 maxlen: int | None = None, socket_timeout_s: float = 5.0) -> None:
        self.stream = stream
        self._maxlen = maxlen
        self.client = async_clone(client, name="os:producer", socket_timeout_s=socket_timeout_s)

    @classmethod
    def from_url(cls, url: str, stream: str, *, maxlen: int | None = None) -> AsyncProducer:
        return cls(redis.asyncio.Redis.from_url(url), stream, maxlen=maxlen)

    async def send(self, fields: Any) -> str:
        """Append one entry; returns its id."""
        entry_id: Any = await self.client.xadd(self.stream, dict(fields), maxlen=self._maxlen,
                                               approximate=True)
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def send_many(self, batch: Iterable[Any]) -> list[str]:
        """Append many entries, in order, in one pipelined round trip (no MULTI)."""
        pipe = self.client.pipeline(transaction=False)
        for fields in batch:
            pipe.xadd(self.stream, dict(fields), maxlen=self._maxlen, approximate=True)
        return [i.decode() if isinstance(i, bytes) else str(i) for i in await pipe.execute()]

    async def aclose(self) -> None:
        await self.client.aclose()
