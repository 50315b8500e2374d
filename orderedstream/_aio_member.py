"""asyncio: :class:`AsyncTopicMember`, a member of a partitioned topic's group whose handler is an
``async def``.

It is the sync :class:`~orderedstream.TopicMember` itself (one engine, DESIGN.md §8): the same
control thread (membership, assignment, handoff, renewals) and the same driver thread
(:class:`~orderedstream._mux.Mux`: every owned partition's term as a lane over one command and
one wake-up connection per node), with blocking connections of their own.  The only difference
is where the handler runs.  Each partition's step yields its handler calls
(:class:`~orderedstream._engine.Handle`, as it does for the asyncio driver of
:class:`~orderedstream.AsyncCoordinator`); :class:`_LoopCalls` relays the lane's first call of a
page to the user's event loop as one task, which awaits the handler and steps the lane on to the
next entry itself, until the step asks for anything else (a read, acks, a backoff); that op
goes back to the driver (a socketpair wakes it at once) and the lane is driven there again.
Meanwhile the driver goes on with the other lanes.  So:

* handlers of different partitions run concurrently on the loop, each partition's entries still
  strictly one after another (a partition has one such task at a time, and it awaits each call
  before it hands out the next entry);
* an entry is acknowledged only after its handler returned; one that raises is retried or
  parked by the retry policy, exactly as in the sync member;
* a handler call whose task is cancelled (by :meth:`AsyncTopicMember.stop`, by the handler
  timeout, by the application) is never acknowledged: its partition's term ends there (the
  acks of the entries before it are sent, the lease handed over), and unless the member is
  stopping it takes the partition again at once: the entry comes back, flagged
  ``redelivered``;
* renewals, heartbeats and the handler timeout live on the control thread: a handler that
  blocks the loop cannot let a lease or the membership lapse.

The handler timeout (``handler_timeout_ms``) works as in the sync member: a call stuck past it
makes the member step down (:class:`~orderedstream.HandlerStalled`; every lease given up, out of
the group, so the other members take every partition at once), and the member joins again
when the stuck call has ended.  The async member also cancels the stuck call, so it joins again
as soon as the cancellation lands, not whenever the call would have returned.  It steps down as
a whole, although its other partitions could go on: while the stuck partition's term runs, no
other member may take it, and the member stays its target (every member derives the same
assignment from the live members) until it leaves the group; a member cannot give up one
partition and keep the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis
import redis.asyncio
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from ._aio import AsyncHandler, blocking_twin
from ._config import MemberConfig
from ._engine import Handle, HandleBatch, Step
from ._events import Event, HandlerStalled, Hook
from ._member import TopicMember
from ._message import Message
from ._mux import Lane, Mux
from ._server import AnyClient, client_from_url, client_name, clone_client, connect_url
from .exceptions import ConfigError, OrderedStreamError, StopRequested

__all__ = ["AsyncTopicMember"]

AsyncAnyClient = redis.asyncio.Redis | redis.asyncio.RedisCluster


class _OnLoop:
    """The op a relayed step yields for a handler call (see :meth:`_LoopCalls.relay`)."""

    __slots__ = ("op", "step")

    def __init__(self, step: Step[None], op: Handle | HandleBatch) -> None:
        self.step, self.op = step, op


_END, _NEXT, _THROW = range(3)
"""What the loop gives a relayed step back: (_END, None or the step's error): the step ended;
(_NEXT, op): the step's next op, not a handler call; (_THROW, error): throw it into the step."""


class _Call:
    """A run of one lane's handler calls on the loop."""

    __slots__ = ("lane", "mux", "op", "resumed", "step")

    def __init__(self, on_loop: _OnLoop, lane: Lane, mux: Mux) -> None:
        self.step, self.op = on_loop.step, on_loop.op
        self.lane, self.mux = lane, mux
        self.resumed = False

    def back(self, outcome: tuple[int, Any]) -> None:
        """Give the lane back to the mux, with ``outcome``."""
        self.resumed = True
        self.mux.resume(self.lane, outcome)


class _LoopCalls:
    """The member's handler calls (:class:`~orderedstream._mux.HandlerCalls`), run on its event
    loop.  A lane's step is relayed (:meth:`relay`): the first handler call of a page goes to
    the loop as one task, which awaits the handler and steps the lane's step on to the next
    call itself, as the asyncio driver does (no thread crossing per entry), until the step asks
    for anything else (a read, an ack, a backoff); that op goes back to the mux.  A partition
    has at most one such task at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 handler: Callable[[Any], Awaitable[object]],
                 loop_gone: Callable[[], None]) -> None:
        self._loop = loop
        self._handler = handler
        self._loop_gone = loop_gone
        self._tasks: dict[str, asyncio.Task[None]] = {}  # by partition stream (on the loop)
        self._queue: list[_Call] = []  # runs asked for, not yet started (under _lock)
        self._lock = threading.Lock()

    def relay(self, step: Step[None]) -> Step[None]:
        """``step`` as the mux drives it: every op passed through, except a handler call, which
        becomes an :class:`_OnLoop` op (for :meth:`__call__`) and comes back with the op the
        step yielded after the calls the loop made (or its end)."""
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                op = step.send(value) if error is None else step.throw(error)
            except StopIteration:
                return
            value = error = None
            if type(op) is Handle or type(op) is HandleBatch:
                try:
                    kind, payload = yield _OnLoop(step, op)
                except GeneratorExit:
                    raise
                except BaseException as err:  # it never reached the loop (closed)
                    error = err
                    continue
                if kind == _END:
                    if payload is None:
                        return
                    raise payload
                if kind == _THROW:
                    error = payload
                    continue
                op = payload
            try:
                value = yield op
            except GeneratorExit:
                raise
            except BaseException as err:  # thrown by the mux: into the step
                error = err

    def __call__(self, op: Any, lane: Lane, mux: Mux) -> None:
        """On the driver's thread: hand ``lane``'s handler calls (``op``: an :class:`_OnLoop`)
        to the loop.  Runs asked for while the loop has not taken the last ones yet go with
        them (one wake-up of the loop)."""
        if type(op) is not _OnLoop:
            raise OrderedStreamError(f"the topic driver cannot carry out {op!r}")
        with self._lock:
            queue = self._queue
            queue.append(_Call(op, lane, mux))
            if len(queue) > 1:
                return
        try:
            self._loop.call_soon_threadsafe(self._start)
        except RuntimeError:  # the loop is closed: nothing can run the handler any more
            with self._lock:
                self._queue.clear()
            self._loop_gone()
            raise StopRequested from None

    def _start(self) -> None:
        """On the loop: a task for each run asked for."""
        with self._lock:
            queue, self._queue = self._queue, []
        for call in queue:
            task = self._loop.create_task(self._run(call))
            self._tasks[call.lane.key] = task
            task.add_done_callback(functools.partial(self._done, call))

    async def _run(self, call: _Call) -> None:
        """On the loop: the lane's handler calls, one after another, stepping its step from
        one to the next; the first other op (or the step's end) goes back to the mux.  A
        cancelled call is never acknowledged: the mux throws ``StopRequested`` into the step,
        which ends the term (the acks of the entries before it are sent, the lease handed
        over)."""
        step, op, handler = call.step, call.op, self._handler
        while True:
            value: Exception | None = None
            try:
                await handler(op.message if type(op) is Handle
                              else op.messages)  # type: ignore[union-attr]
            except asyncio.CancelledError:
                call.back((_THROW, StopRequested()))
                return
            except Exception as err:  # the step decides: retried, or parked
                value = err
            except BaseException:  # KeyboardInterrupt, SystemExit: for the loop's owner
                call.back((_THROW, StopRequested()))
                raise
            try:
                op = step.send(value)
            except StopIteration:
                call.back((_END, None))
                return
            except BaseException as err:
                call.back((_END, err))
                return
            if type(op) is not Handle and type(op) is not HandleBatch:
                call.back((_NEXT, op))
                return

    def _done(self, call: _Call, task: asyncio.Task[None]) -> None:
        """On the loop, once the run has really ended: a task cancelled before it started
        gives its lane back too (its call never made: nothing acknowledged)."""
        if self._tasks.get(call.lane.key) is task:
            del self._tasks[call.lane.key]
        if not call.resumed:
            call.back((_THROW, StopRequested()))

    def cancel(self, stream: str | None = None) -> None:
        """Cancel the handler call running for partition ``stream`` (None: every one).  From
        any thread; a closed loop has none."""
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._cancel, stream)

    def _cancel(self, stream: str | None) -> None:
        for key, task in list(self._tasks.items()):
            if stream is None or key == stream:
                task.cancel()


def _not_called(message: Message) -> None:  # pragma: no cover - its calls are yielded
    raise AssertionError("an async member's handler is run on its event loop")


def _is_async(handler: object) -> bool:
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(handler, "__call__", None)  # noqa: B004 - an object with an async __call__
    return call is not None and inspect.iscoroutinefunction(call)


def blocking_cluster_twin(client: redis.asyncio.RedisCluster, *, name: str | None = None,
                          socket_timeout_s: float = 5.0) -> redis.RedisCluster:
    """A blocking ``RedisCluster`` for the cluster ``client`` knows (its nodes, credentials and
    TLS), with our settings: RESP2 bytes replies, an explicit socket timeout, no automatic retry
    (MOVED / ASK redirections are still followed: nothing ran).  It reads the slot map from the
    nodes: blocking I/O, for a thread."""
    kwargs = {k: v for k, v in client.connection_kwargs.items()
              if k.startswith("ssl_") or k in (
                  "username", "password", "credential_provider", "socket_connect_timeout",
                  "socket_keepalive", "socket_keepalive_options", "health_check_interval")}
    accepted = inspect.signature(redis.RedisCluster).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted or k.startswith("ssl_")}
    if issubclass(client.connection_kwargs.get("connection_class", object),
                  redis.asyncio.connection.SSLConnection):
        kwargs["ssl"] = True
    known = client.get_nodes() or list(client.nodes_manager.startup_nodes.values())
    nodes = [redis.cluster.ClusterNode(n.host, n.port)  # type: ignore[no-untyped-call]
             for n in known]
    return redis.RedisCluster(
        startup_nodes=nodes, retry=Retry(NoBackoff(), 0), protocol=2, decode_responses=False,
        socket_timeout=socket_timeout_s,
        client_name=client_name(name) if name is not None else None, **kwargs)


class AsyncTopicMember:
    """One member of a consumer group of a partitioned topic, with an ``async def`` handler: the
    same protocol, keys and scripts as :class:`~orderedstream.TopicMember` (async and sync
    members of one group share its partitions and hand them over to each other), with handlers
    of different partitions running concurrently on the event loop; see the module's docstring.

    ``client``: a ``redis.asyncio.Redis`` or ``redis.asyncio.RedisCluster`` (its address,
    credentials and TLS are used for blocking connections of the member's own: its threads need
    them), or a blocking ``redis.Redis`` / ``redis.RedisCluster``.  Hooks are called on the
    member's threads, and on the loop for what happens between two handler calls
    (``BatchHandled``, ``HandlerError``): keep them short and thread-safe.

    >>> async with AsyncTopicMember(config, handle, client) as member:  # doctest: +SKIP
    ...     ...  # start() on enter; stop() on exit: every partition handed over
    """

    def __init__(self, config: MemberConfig, handler: AsyncHandler,
                 client: AsyncAnyClient | AnyClient, *, hooks: Sequence[Hook] = ()) -> None:
        if not _is_async(handler):
            raise ConfigError(f"{handler!r} is not an async function: AsyncTopicMember awaits "
                              "its handler; pass an `async def` one, or use TopicMember for a "
                              "plain function")
        self.config = config
        self._handler = handler
        self._client = client
        self._url: str | None = None
        self._hooks = (*hooks, self._on_event)
        self._member: TopicMember | None = None
        self._calls: _LoopCalls | None = None
        self._own: AnyClient | None = None  # a blocking client built here, closed at the end
        self._closed = False

    @classmethod
    def from_url(cls, url: str, config: MemberConfig, handler: AsyncHandler,
                 *, hooks: Sequence[Hook] = ()) -> AsyncTopicMember:
        """Build for ``url`` (any node of a cluster, or one server; connected by ``start()``)."""
        member = cls(config, handler, client_from_url(url), hooks=hooks)
        member._url = url
        return member

    # -- what it shows ------------------------------------------------------------------------

    @property
    def owned(self) -> dict[int, int]:
        """Partition -> epoch of every partition this member owns now."""
        return self._member.owned if self._member is not None else {}

    @property
    def members(self) -> tuple[str, ...]:
        """The live members, as this member last saw them (sorted)."""
        return self._member.members if self._member is not None else ()

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Join the group and serve on the running loop; returns at once (connecting runs on
        a thread).  Errors surface from :meth:`join` (and ``async with``)."""
        if self._member is not None:
            raise OrderedStreamError("topic member already started")
        calls = _LoopCalls(asyncio.get_running_loop(), self._handler, self._loop_gone)
        self._calls = calls
        member = await asyncio.to_thread(self._build, calls)
        self._member = member
        member.start()

    def _build(self, calls: _LoopCalls) -> TopicMember:
        timeout_s = self.config.socket_timeout_ms / 1000.0
        name = f"os:{self.config.name}:client"
        client: AnyClient
        if self._url is not None:
            if isinstance(self._client, redis.Redis):
                self._client.close()  # (only checked the URL)
            client = self._own = connect_url(self._url)
        elif isinstance(self._client, redis.asyncio.RedisCluster):
            client = self._own = blocking_cluster_twin(self._client, name=name,
                                                       socket_timeout_s=timeout_s)
        elif isinstance(self._client, redis.asyncio.Redis):
            twin = blocking_twin(self._client)
            client = self._own = clone_client(twin, name=name, socket_timeout_s=timeout_s)
            twin.close()
        else:
            client = self._client
        member = TopicMember(self.config, _not_called, client, hooks=self._hooks)
        member._calls = calls
        return member

    def _loop_gone(self) -> None:
        """The loop closed under a running member (it was never stopped): stop it."""
        member = self._member
        if member is not None:
            member.stop(timeout=0)

    def _on_event(self, event: Event) -> None:
        """On the control thread: a call stuck past the handler timeout made the member step
        down; cancel it (its entry is not acknowledged), so the member joins again."""
        calls = self._calls
        if isinstance(event, HandlerStalled) and calls is not None:
            calls.cancel(event.stream)

    async def stop(self, timeout: float = 10.0) -> bool:
        """Stop every partition after the entry in hand, hand them all over and leave the
        group; wait up to ``timeout`` seconds.  A handler call still running at half of
        ``timeout`` is cancelled (its entry is not acknowledged: the next owner gets it again,
        flagged ``redelivered``).  Idempotent; True once the member has ended."""
        member, calls = self._member, self._calls
        if member is None or calls is None:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ended = await asyncio.to_thread(member.stop, timeout / 2)
        if not ended:
            calls.cancel()
            ended = await asyncio.to_thread(member.stop, max(deadline - loop.time(), 0.0))
        if ended and not self._closed:
            self._closed = True
            own, self._own = self._own, None
            if own is not None:
                await asyncio.to_thread(own.close)
        return ended

    async def join(self, timeout: float | None = None) -> bool:
        """Wait for the member to end; re-raise the error that ended it.  True once ended."""
        member = self._member
        if member is None:
            return True
        return await asyncio.to_thread(member.join, timeout)

    async def __aenter__(self) -> AsyncTopicMember:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> None:
        """Stop; then re-raise the error that ended the member, if any (unless the body is
        raising already)."""
        ended = await self.stop()
        member = self._member
        if exc is None and ended and member is not None and member._error is not None:
            raise member._error
