"""Many owner terms on few connections: the driver of a topic member (DESIGN.md §7).

A member of a partitioned topic owns many partitions at once.  Each owned partition runs exactly
the step a coordinator runs for one term (:meth:`~orderedstream._owner.Owner.serve`: takeover,
replay, new entries; :mod:`._engine`); :class:`Mux` drives them all from one thread, over one
command connection and one wake-up connection per cluster node, whatever the number of
partitions:

* :class:`~orderedstream._scripts.ScriptOp` / :class:`~orderedstream._engine.Plain`: packed into
  the node's outgoing buffer, sent once per round for every partition on that node; the replies
  come back in order (one connection answers in order), each to the step that asked;
* :class:`~orderedstream._engine.PipeSend`: sent at once when the step calls the handler before
  it reads the replies (a read ahead), else with the round; the replies wait for the step's
  :class:`~orderedstream._engine.PipeRecv`;
* :class:`~orderedstream._engine.Block`: the step sleeps until the server says its stream was
  written (one RESP3 connection per node with ``CLIENT TRACKING ON BCAST`` and every served
  partition's stream key as a prefix: the server pushes an invalidation at each write), or until
  ``block_ms`` passed, or its partition is asked to stop;
* :class:`~orderedstream._engine.Pause`: sleeps until its deadline or its partition's stop;
* any other op (an async member's handler calls): given to the mux's ``calls``
  (:class:`HandlerCalls`), which carries it out elsewhere (an event loop); the lane waits until
  :meth:`Mux.resume` gives its outcome back, and the other lanes go on meanwhile.

A plain handler is called by the step itself (no yield per entry), so handlers of different
partitions run one batch at a time, in turn.  A fault on a node's command connection closes it
(the replies still owed are unknown: it is never reused) and is thrown into every step that
awaited a reply on it: each waits it out and resyncs, as on a connection of its own.  A cluster
redirection (``MOVED``, ``ASK``) or a node's connection fault makes the lane look its node up
again, after the client refreshed its slot map.  Connections are opened on a thread of their own
(a handshake with a node that does not answer would hold every lane for the socket timeout); the
commands for that node wait meanwhile.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import logging
import math
import selectors
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis
import redis.exceptions as rex

from ._engine import (
    Block,
    Pause,
    PipeDrop,
    PipeRecv,
    PipeRelease,
    PipeSend,
    Plain,
    Step,
)
from ._recovery import CONNECTION_ERRORS
from ._scripts import ScriptOp, Scripts, pack_command
from ._server import NodeMap, resp3_connection
from .exceptions import OrderedStreamError

log = logging.getLogger("orderedstream")

INVALIDATE = (b"invalidate", "invalidate")
POLL_WITHOUT_PUSH_S = 0.05  # where the server will not push: look at an idle stream this often
BLOCK_WITH_PUSH_S = 30.0  # where it pushes: a sleeping lane looks anyway this often
OUTAGE_LOOK_S = 0.25  # lanes backing off from a failed node: read the slot map this often


class HandlerCalls(Protocol):
    """Where a member's handler calls run when not on the mux's thread (the event loop of an
    :class:`~orderedstream.AsyncTopicMember`)."""

    def relay(self, step: Step[None]) -> Step[None]:
        """The step a lane runs instead of ``step``: its handler calls come out as ops that the
        mux does not carry out itself, but hands to :meth:`__call__`."""

    def __call__(self, op: Any, lane: Lane, mux: Mux) -> None:
        """Start carrying ``op`` out elsewhere and return at once; ``mux.resume(lane, ...)``
        (from any thread) gives the step its outcome."""


class Lane:
    """One partition's step in the :class:`Mux`."""

    __slots__ = ("block_key", "deadline", "error", "key", "mailbox", "node", "on_done",
                 "outage", "pipe_owed", "sleeping", "step", "stop", "value", "want")

    def __init__(self, key: str, step: Step[None], stop: threading.Event,
                 on_done: Callable[[BaseException | None], None]) -> None:
        self.key = key  # routes the lane to the node that serves this key's slot
        self.step = step
        self.stop = stop
        self.on_done = on_done  # called on the mux's thread when the step ended
        self.value: Any = None
        self.error: BaseException | None = None
        self.mailbox: collections.deque[Any] = collections.deque()  # pipelined replies read
        self.pipe_owed = 0  # pipelined replies the node still owes this lane
        self.want = 0  # replies a PipeRecv waits for (0: not waiting on the pipe)
        self.sleeping = False  # in Block or Pause
        self.deadline = math.inf
        self.block_key: str | None = None  # Block: wake on a write to this key
        self.outage = False  # in an outage back-off's Pause
        self.node: _Node | None = None


class _Owed:
    """One reply a node's connection owes, and where it goes."""

    __slots__ = ("command", "kind", "lane", "parse", "script")

    def __init__(self, kind: str, lane: Lane | None, parse: Callable[[Any], Any] | None = None,
                 command: tuple[Any, ...] = (), script: str = "") -> None:
        self.kind = kind  # "reply" | "script" | "pipe" | "drop"
        self.lane = lane
        self.parse = parse
        self.command = command  # "script": the EVALSHA, sent again after a NOSCRIPT
        self.script = script  # its name ('' once sent again: a second NOSCRIPT is an error)


class _Node:
    """One cluster node (or the single server): the mux's command connection to it, the replies
    it owes in order, and its wake-up connection."""

    def __init__(self, name: str, client: redis.Redis) -> None:
        self.name = name
        self.client = client
        self.conn: Any = None
        self.owed: collections.deque[_Owed] = collections.deque()
        self.out: list[tuple[Any, ...]] = []
        # while it owes replies: when it last sent one (or was sent the first owed); it
        # is failed once it has sent nothing for its socket timeout
        self.heard: float | None = None
        self.timeout = float(client.connection_pool.connection_kwargs.get("socket_timeout")
                             or 5.0)
        self.conn_fd = -1  # the command connection's socket, as registered with the selector
        self.opening: set[str] = set()  # "conn", "wake": being opened (:meth:`Mux._open`)
        self.lanes: set[Lane] = set()
        self.wake: Any = None  # RESP3 connection with CLIENT TRACKING BCAST
        self.wake_sock: Any = None  # its socket, as registered with the mux's selector
        self.prefixes: set[str] = set()  # armed on ``wake``
        self.wake_ok = True  # False: the server will not push (ACL, RESP2 proxy): poll
        self.wake_retry_at = 0.0

    def connection(self) -> Any:
        """The command connection, opened here if it is not (blocking: not on the driver's
        thread once it runs, see :meth:`Mux._open`)."""
        if self.conn is None:
            self.conn = self.client.connection_pool.get_connection()
        return self.conn

    def new_wake(self, name: str, prefixes: list[str]) -> Any:
        """A new wake-up connection (blocking), tracking ``prefixes``."""
        wake = resp3_connection(self.client, name, socket_timeout_s=self.timeout)
        try:
            # redis-py swallows invalidation pushes unless a handler takes them
            wake._parser.set_invalidation_push_handler(_same)
            if prefixes:
                wake.send_command(*_tracking(prefixes))
                reply = wake.read_response(push_request=True)
                while _is_push(reply):  # (none can come before tracking is on)
                    reply = wake.read_response(push_request=True)
        except BaseException:
            wake.disconnect()
            raise
        return wake


class _CommandsOf:
    """What the selector holds for a node's command connection."""

    __slots__ = ("node",)

    def __init__(self, node: _Node) -> None:
        self.node = node


class Mux(threading.Thread):
    """Drives the partition steps of one member; see the module's docstring."""

    def __init__(self, nodes: NodeMap, scripts: Scripts, name: str,
                 calls: HandlerCalls | None = None) -> None:
        super().__init__(name="orderedstream-mux", daemon=True)
        self._nodes = nodes
        self._scripts = scripts
        self._prefix = name  # client name prefix of its connections (not ``_name``: the
        # thread's own)
        self._calls = calls
        self._resumed: list[tuple[Lane, Any, BaseException | None]] = []  # calls returned
        self._by_name: dict[str, _Node] = {}
        self._lanes: set[Lane] = set()
        self._ready: collections.deque[Lane] = collections.deque()
        self._added: collections.deque[Lane] = collections.deque()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        # made once: the wake-up connections' sockets are added and taken out as they change
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._halt = False
        self._dirty: set[str] = set()  # keys written since their lane last slept on them
        # the lanes asleep, found without looking at every lane: by the key their Block waits
        # on, and by deadline (a heap; an entry whose lane woke meanwhile is dropped when met)
        self._blocked: dict[str, Lane] = {}
        self._timers: list[tuple[float, int, Lane]] = []
        self._order = itertools.count()  # ties in the heap
        self._round_end: list[Callable[[], None]] = []
        # lanes backing off from a node that did not answer: while there are any, the slot
        # map is read again now and then, and a change of primaries (a failover) wakes them
        self._outages: set[Lane] = set()
        self._next_look = 0.0
        nodes.on_change.append(self._slots_changed)
        # connections opened on a thread (:meth:`_open`): (node, kind, connection, error)
        self._opened: list[tuple[_Node, str, Any, BaseException | None]] = []
        self._closed = False
        self.error: BaseException | None = None

    # -- the control thread's side --------------------------------------------------------

    def add(self, lane: Lane) -> None:
        """Start driving ``lane`` (from any thread)."""
        with self._lock:
            self._added.append(lane)
        self.poke()

    def prepare(self, keys: list[str]) -> None:
        """Before :meth:`start`: open the command and wake-up connections to every node that
        serves one of ``keys`` now (best effort), so that a member that joins has them before
        it takes a partition (opening one costs a handshake of several round trips)."""
        assert not self.is_alive(), "prepare() before start()"
        for key in keys:
            try:
                node = self._node(key)
                node.connection().connect()
                if node.wake is None and node.wake_ok:
                    node.wake = node.new_wake(f"{self._prefix}:wake", [])
            except (*CONNECTION_ERRORS, redis.RedisError):
                continue  # made on first use instead

    def post(self, key: str, command: tuple[Any, ...]) -> None:
        """Send ``command`` (about ``key``) with the next write to the node serving ``key``, its
        reply ignored: called on the driver's own thread (a lane's ``on_done``)."""
        node = self._node(key)
        node.out.append(command)
        node.owed.append(_Owed("drop", None))

    def at_round_end(self, call: Callable[[], None]) -> None:
        """Call ``call`` once, on the driver's own thread, when the lanes ready now have run
        and before the round's writes go out (what it posts goes with them)."""
        self._round_end.append(call)

    def _run_round_end(self) -> None:
        calls, self._round_end = self._round_end, []
        for call in calls:
            try:
                call()
            except Exception:
                log.exception("topic member: a round's end was not carried out")

    def poke(self) -> None:
        """Wake the mux: a lane was added or asked to stop."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def resume(self, lane: Lane, value: Any, error: BaseException | None = None) -> None:
        """The op ``lane`` gave to :class:`HandlerCalls` is done: its step goes on with
        ``value`` (or ``error`` thrown into it).  From any thread; wakes the mux at once."""
        with self._lock:
            resumed = self._resumed
            resumed.append((lane, value, error))
            first = len(resumed) == 1  # else the mux was woken already and takes them all
        if first:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"r")  # not a poke: no lane's stop to look for

    def halt(self, timeout: float = 5.0) -> None:
        """End the thread once every lane has ended (their stops must have been set)."""
        self._halt = True
        self.poke()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    @property
    def lanes(self) -> int:
        return len(self._lanes)

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as err:  # a bug: every lane is ended with it
            self.error = err
            log.exception("topic member driver failed")
            for lane in list(self._lanes):
                self._finish(lane, err)
        finally:
            self._close()

    def _loop(self) -> None:
        while True:
            self._take_added()
            if self._halt and not self._lanes:
                return
            while self._ready:
                self._advance(self._ready.popleft())
            if self._round_end:
                self._run_round_end()
            self._flush()
            self._collect()
            if not self._ready and not (self._halt and not self._lanes):
                self._sleep()

    def _take_added(self) -> None:
        with self._lock:
            added, self._added = self._added, collections.deque()
            resumed, self._resumed = self._resumed, []
            opened, self._opened = self._opened, []
        for node, kind, conn, error in opened:
            self._take_opened(node, kind, conn, error)
        for lane in added:
            self._lanes.add(lane)
            self._ready.append(lane)
        for lane, value, error in resumed:
            if lane in self._lanes:
                lane.value, lane.error = value, error
                self._ready.append(lane)

    def _route(self, lane: Lane) -> _Node:
        node = lane.node
        if node is None:
            node = self._node(lane.key)
            node.lanes.add(lane)
            lane.node = node
            self._arm(node)
        return node

    def _node(self, key: str) -> _Node:
        """The node serving ``key`` now (its connections made on first use)."""
        name = self._nodes.node_name(key)
        node = self._by_name.get(name)
        if node is None:
            name, client = self._nodes.node_for(key, self._prefix)
            node = self._by_name[name] = _Node(name, client)
        return node

    def _unroute(self, lane: Lane) -> None:
        node = lane.node
        if node is None:
            return
        lane.node = None
        node.lanes.discard(lane)
        for owed in node.owed:  # replies on their way to it are read and dropped
            if owed.lane is lane:
                owed.kind = "drop"
        lane.want = 0
        lane.pipe_owed = 0
        lane.mailbox.clear()

    def _advance(self, lane: Lane) -> None:
        """Run ``lane``'s step until it needs a reply or sleeps (or ends)."""
        step = lane.step
        while True:
            value, error = lane.value, lane.error
            lane.value = lane.error = None
            try:
                op = step.send(value) if error is None else step.throw(error)
            except StopIteration:
                self._finish(lane, None)
                return
            except BaseException as err:
                self._finish(lane, err)
                return
            kind = type(op)
            try:
                if kind is ScriptOp:
                    node = self._route(lane)
                    command = self._scripts.command(op.name, op.keys, op.args)
                    node.out.append(command)
                    node.owed.append(_Owed("script", lane, op.parse, command, op.name))
                    return
                if kind is Plain:
                    node = self._route(lane)
                    node.out.append(op.args)
                    node.owed.append(_Owed("reply", lane, _plain_parser(node.client, op.args)))
                    return
                if kind is PipeSend:
                    node = self._route(lane)
                    node.out.extend(op.commands)
                    for _ in op.commands:
                        node.owed.append(_Owed("pipe", lane))
                    lane.pipe_owed += len(op.commands)
                    if op.ahead:  # at once: the server works while the handler does
                        self._send(node)
                    # else with the round's other commands for this node (one write per node
                    # and round): the reply is read no sooner than the round's end anyway
                    continue
                if kind is PipeRecv:
                    if len(lane.mailbox) >= op.count:
                        lane.value = self._take_mail(lane, op.count)
                        continue
                    if len(lane.mailbox) + lane.pipe_owed < op.count:
                        raise redis.ConnectionError("the read-ahead has no request in flight")
                    lane.want = op.count
                    return
                if kind is PipeDrop or kind is PipeRelease:
                    held = lane.node
                    if held is not None:
                        for owed in held.owed:
                            if owed.lane is lane and owed.kind == "pipe":
                                owed.kind = "drop"
                    lane.pipe_owed = 0
                    lane.mailbox.clear()
                    continue
                if kind is Block:
                    self._route(lane)
                    if lane.stop.is_set() or op.key in self._dirty:
                        self._dirty.discard(op.key)
                        lane.value = []
                        continue
                    routed = lane.node
                    # a write wakes it (the push); its partition's stop, or a lease lost, is
                    # told by a poke from the control thread
                    wait_s = (op.block_ms / 1000.0 if op.due
                              else max(op.block_ms / 1000.0, BLOCK_WITH_PUSH_S))
                    if routed is None or not routed.wake_ok or routed.wake is None:
                        wait_s = min(wait_s, POLL_WITHOUT_PUSH_S)
                    self._doze(lane, wait_s, op.key)
                    return
                if kind is Pause:
                    if lane.stop.is_set():
                        lane.value = True
                        continue
                    self._doze(lane, op.seconds, None)
                    if op.outage:
                        lane.outage = True
                        self._outages.add(lane)
                    return
                if self._calls is None:
                    raise OrderedStreamError(f"the topic driver cannot carry out {op!r}")
                self._calls(op, lane, self)  # elsewhere: the lane waits for resume()
                return
            except BaseException as err:  # thrown into the step where it yielded the op
                lane.error = err

    @staticmethod
    def _take_mail(lane: Lane, count: int) -> list[Any]:
        return [lane.mailbox.popleft() for _ in range(count)]

    def _finish(self, lane: Lane, error: BaseException | None) -> None:
        self._outages.discard(lane)
        self._unroute(lane)
        self._lanes.discard(lane)
        with contextlib.suppress(ValueError):
            self._ready.remove(lane)
        try:
            lane.on_done(error)
        except Exception:
            log.exception("topic member: a partition's end was not recorded")

    # -- I/O ----------------------------------------------------------------------------------

    def _send(self, node: _Node) -> None:
        if not node.out:
            return
        conn = node.conn
        if conn is None:  # the commands go once it is open
            self._open(node, "conn")
            return
        commands, node.out = node.out, []
        if node.heard is None:
            node.heard = time.monotonic()
        try:
            if pack_command is not None and all(" " not in str(c[0]) for c in commands):
                conn.send_packed_command([pack_command(c) for c in commands])
            else:  # redis-py splits a command name like "XINFO CONSUMERS"
                conn.send_packed_command(conn.pack_commands(commands))
        except BaseException as err:
            self._fail(node, err)

    def _flush(self) -> None:
        for node in list(self._by_name.values()):
            self._send(node)

    def _collect(self) -> None:
        """Read every reply already here, from every node, without waiting for any: a node
        that is slow to answer (busy, or hung) holds up only the lanes that wait on it
        (:meth:`_sleep` waits for the first node to answer, each at most its socket
        timeout)."""
        now = time.monotonic()
        for node in list(self._by_name.values()):
            conn = node.conn
            if conn is None or not node.owed:
                continue
            try:
                read = False
                while node.owed and conn.can_read(0):
                    try:
                        reply: Any = conn.read_response()
                    except redis.ResponseError as err:
                        reply = err
                    read = True
                    self._deliver(node, node.owed.popleft(), reply)
                if read or node.heard is None:
                    node.heard = now if node.owed else None
                elif now - node.heard >= node.timeout:
                    raise redis.TimeoutError(f"{node.name} sent no reply for {node.timeout} s")
            except BaseException as err:
                self._fail(node, err)

    def _deliver(self, node: _Node, owed: _Owed, reply: Any) -> None:
        lane = owed.lane
        if owed.kind == "drop" or lane is None:
            return
        if owed.kind == "pipe":
            lane.pipe_owed -= 1
            lane.mailbox.append(reply)
            if lane.want and len(lane.mailbox) >= lane.want:
                lane.value = self._take_mail(lane, lane.want)
                lane.want = 0
                self._ready.append(lane)
            return
        if owed.kind == "script" and owed.script and isinstance(reply, rex.NoScriptError):
            # the server lost its script cache (restart, SCRIPT FLUSH): load it, send again
            node.out += [self._scripts.load_command(owed.script), owed.command]
            node.owed += [_Owed("drop", None), _Owed("script", lane, owed.parse, owed.command)]
            self._send(node)
            return
        try:
            if isinstance(reply, redis.ResponseError):
                if owed.kind == "script":
                    Scripts.reply(reply)  # raises ours (NotOwner, GroupMissing) or the error
                raise reply
            lane.value = owed.parse(reply) if owed.parse is not None else reply
        except BaseException as err:
            lane.error = err
            if isinstance(err, rex.MovedError | rex.AskError | rex.ClusterDownError):
                self._nodes.refresh()
                self._unroute(lane)
        self._ready.append(lane)

    def _fail(self, node: _Node, err: BaseException) -> None:
        """``node``'s command connection failed: close it, throw ``err`` into every lane that
        waited on it, and let every lane routed there look its node up again."""
        conn, node.conn = node.conn, None
        self._unwatch_conn(node)
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.disconnect()
            with contextlib.suppress(Exception):
                node.client.connection_pool.release(conn)
        owed, node.owed = node.owed, collections.deque()
        node.out = []
        node.heard = None
        error = err if isinstance(err, CONNECTION_ERRORS) else redis.ConnectionError(str(err))
        for item in owed:
            lane = item.lane
            if lane is None or item.kind == "drop":
                continue
            if item.kind == "pipe":
                lane.pipe_owed -= 1
                if lane.want:
                    lane.want = 0
                    lane.error = error
                    self._ready.append(lane)
                continue
            lane.error = error
            self._ready.append(lane)
        self._close_wake(node)
        for lane in list(node.lanes):
            lane.node = None
            node.lanes.discard(lane)
        self._nodes.refresh()

    # -- sleeping and waking ------------------------------------------------------------------

    def _arm(self, node: _Node) -> None:
        """Have ``node`` push at every write to a served partition's stream (best effort;
        a new wake-up connection is opened on a thread: :meth:`_open`)."""
        wanted = {lane.key for lane in node.lanes}
        if not node.wake_ok or wanted <= node.prefixes:
            return
        if node.wake is None:
            if time.monotonic() >= node.wake_retry_at:
                self._open(node, "wake")
            return
        new = sorted(wanted - node.prefixes)
        try:  # its reply is read (and dropped) with the pushes
            node.wake.send_command(*_tracking(new))
            node.prefixes |= set(new)
        except BaseException:
            self._close_wake(node)
            node.wake_retry_at = time.monotonic() + 1.0
        # every write since the lanes' reads may have gone unseen: look once more
        self._dirty |= set(new)

    def _open(self, node: _Node, kind: str) -> None:
        """Open ``node``'s command connection (``kind`` "conn") or its wake-up connection
        ("wake", tracking the prefixes its lanes want now) on a thread of its own: a node that
        does not answer holds that thread for its socket timeout, never the driver's.  The
        outcome comes back through :meth:`_take_added` (:meth:`_take_opened`)."""
        if kind in node.opening:
            return
        node.opening.add(kind)
        prefixes = sorted({lane.key for lane in node.lanes})
        name = f"{self._prefix}:wake"

        def run() -> None:
            conn: Any = None
            error: BaseException | None = None
            try:
                conn = (node.client.connection_pool.get_connection() if kind == "conn"
                        else node.new_wake(name, prefixes))
            except BaseException as err:
                error = err
            with self._lock:
                closed = self._closed
                if not closed:
                    self._opened.append((node, kind, (conn, prefixes), error))
            if closed:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.disconnect()
                return
            with contextlib.suppress(OSError):
                self._wake_w.send(b"o")

        threading.Thread(target=run, name=f"{self._prefix}:open", daemon=True).start()

    def _take_opened(self, node: _Node, kind: str, got: Any, error: BaseException | None
                     ) -> None:
        node.opening.discard(kind)
        conn, prefixes = got
        if kind == "conn":
            if error is not None:
                self._fail(node, error)  # its lanes wait it out and route again
                return
            node.conn = conn
            node.heard = None  # it answered: its replies are waited for from now
            self._send(node)
            return
        if isinstance(error, redis.ResponseError):  # CLIENT TRACKING refused
            log.info("topic member: no push from %s (%s); idle partitions are polled",
                     node.name, error)
            node.wake_ok = False
        elif error is not None:
            node.wake_retry_at = time.monotonic() + 1.0
        elif node.wake is None:
            node.wake, node.prefixes = conn, set(prefixes)
            self._drain_wake(node)  # pushes read behind the reply (the selector cannot tell)
            self._arm(node)  # the prefixes of lanes routed there since
        else:  # (cannot happen: one opening at a time, and none while it has one)
            with contextlib.suppress(Exception):
                conn.disconnect()
        # every write since the lanes' reads may have gone unseen: look once more
        self._dirty |= set(prefixes)

    def _watch_conn(self, node: _Node) -> None:
        """Have the selector watch ``node``'s command connection, the one it has now: its
        replies wake the driver (and, while it owes none, its end: the server closed it)."""
        sock = getattr(node.conn, "_sock", None) if node.conn is not None else None
        fd = sock.fileno() if sock is not None else -1
        if fd != node.conn_fd:
            self._unwatch_conn(node)
            if fd >= 0:
                self._selector.register(fd, selectors.EVENT_READ, _CommandsOf(node))
                node.conn_fd = fd

    def _unwatch_conn(self, node: _Node) -> None:
        fd, node.conn_fd = node.conn_fd, -1
        if fd >= 0:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(fd)

    def _unwatch(self, node: _Node) -> None:
        sock, node.wake_sock = node.wake_sock, None
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)

    def _close_wake(self, node: _Node) -> None:
        """Close ``node``'s wake-up connection; its lanes cannot be told of writes any more, so
        those asleep in a Block wake now (a read tells them whether their node still serves
        them: a failed primary is found, not waited out for ``BLOCK_WITH_PUSH_S``)."""
        self._unwatch(node)
        self._dirty |= {lane.key for lane in node.lanes}
        wake, node.wake = node.wake, None
        node.prefixes = set()
        if wake is not None:
            with contextlib.suppress(Exception):
                wake.disconnect()

    def _pushed(self, message: Any) -> None:
        keys = message[1]
        if keys is None:  # FLUSHALL / FLUSHDB: every key
            self._dirty |= {lane.key for lane in self._lanes}
            return
        for key in keys:
            self._dirty.add(key.decode() if isinstance(key, bytes) else str(key))

    def _sleep(self) -> None:
        """Nothing is ready: wait for a push, a poke or the first deadline; wake the lanes
        whose time came, whose stream was written, or (after a poke) whose partition must
        stop."""
        now = time.monotonic()
        deadline = self._next_deadline(now + 1.0)
        for node in self._by_name.values():
            if node.lanes and node.wake is None and node.wake_ok:
                self._arm(node)
        for node in self._by_name.values():
            sock = getattr(node.wake, "_sock", None) if node.wake is not None else None
            if sock is not node.wake_sock:  # (re)connected, or closed: watch the one it has
                self._unwatch(node)
                if sock is not None:
                    self._selector.register(sock, selectors.EVENT_READ, node)
                    node.wake_sock = sock
            self._watch_conn(node)
            if node.heard is not None and node.conn is not None:  # replies owed: wake in
                # time to give up on them (an opening connection has a deadline of its own)
                deadline = min(deadline, node.heard + node.timeout)
        if self._outages:  # look at the slot map now and then meanwhile
            if now >= self._next_look:
                self._nodes.refresh()
                self._next_look = now + OUTAGE_LOOK_S
            deadline = min(deadline, self._next_look)
        if self._woken(False):  # a deadline passed, or a push came while arming
            return
        poked = False
        for key, _ in self._selector.select(max(deadline - now, 0.0)):
            data = key.data
            if data is None:  # the socketpair: poked, or a handler call returned
                with contextlib.suppress(OSError):
                    while chunk := self._wake_r.recv(4096):
                        poked = poked or b"x" in chunk  # (b"r": a handler call returned)
                        if b"m" in chunk:  # the primaries changed: try again now
                            for lane in list(self._outages):
                                self._wake(lane)
            elif type(data) is _CommandsOf:  # replies: read by the next round's _collect
                node = data.node
                if not node.owed and node.conn is not None:  # nothing it could say
                    self._fail(node, redis.ConnectionError(f"{node.name} closed the connection"))
            else:  # a wake-up connection: pushes
                self._drain_wake(data)
        self._woken(poked)

    def _drain_wake(self, node: _Node) -> None:
        """Read the pushes waiting on ``node``'s wake-up connection."""
        wake = node.wake
        if wake is None:
            return
        try:
            while wake.can_read(0):
                message = wake.read_response(push_request=True)
                if _is_push(message):
                    self._pushed(message)
        except BaseException:
            self._close_wake(node)
            node.wake_retry_at = time.monotonic() + 1.0

    def _doze(self, lane: Lane, seconds: float, key: str | None) -> None:
        """Put ``lane`` to sleep for ``seconds``, or (``key``) until that key is written."""
        lane.sleeping = True
        lane.deadline = time.monotonic() + seconds
        heapq.heappush(self._timers, (lane.deadline, next(self._order), lane))
        if key is not None:
            lane.block_key = key
            self._blocked[key] = lane
        if len(self._timers) > 4 * len(self._lanes) + 64:  # mostly lanes woken early: rebuild
            self._timers = [t for t in self._timers if _current(t)]
            heapq.heapify(self._timers)

    def _next_deadline(self, default: float) -> float:
        timers = self._timers
        while timers and not _current(timers[0]):
            heapq.heappop(timers)  # its lane woke before its time
        return timers[0][0] if timers else default

    def _slots_changed(self) -> None:
        """(The slot-map thread) the primaries changed: wake the driver."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"m")

    def _wake(self, lane: Lane) -> None:
        if lane.outage:
            lane.outage = False
            self._outages.discard(lane)
        key = lane.block_key
        if key is not None:  # a Block: nothing read ([]); the step reads again
            self._dirty.discard(key)
            if self._blocked.get(key) is lane:
                del self._blocked[key]
            lane.value = []
        else:  # a Pause: whether it was asked to stop
            lane.value = lane.stop.is_set()
        lane.sleeping = False
        lane.block_key = None
        lane.deadline = math.inf
        self._ready.append(lane)

    def _woken(self, poked: bool) -> bool:
        """Make ready every sleeping lane whose stream was written or whose time came, and
        (``poked``: the control thread asked, or the mux halts) whose partition must stop;
        True if any."""
        woke = False
        dirty, blocked = self._dirty, self._blocked
        if dirty and blocked:
            keys = dirty if len(dirty) <= len(blocked) else list(blocked)
            for key in [k for k in keys if k in dirty and k in blocked]:
                self._wake(blocked[key])
                woke = True
        now = time.monotonic()
        while self._next_deadline(math.inf) <= now:
            self._wake(heapq.heappop(self._timers)[2])
            woke = True
        if self._halt:
            for lane in self._lanes:
                lane.stop.set()
        if poked or self._halt:
            for lane in self._lanes:
                if lane.sleeping and lane.stop.is_set():
                    self._wake(lane)
                    woke = True
        return woke

    def _close(self) -> None:
        with self._lock:  # what is opened from now on is closed at once
            self._closed = True
            opened, self._opened = self._opened, []
        for _, _, (conn, _), _ in opened:
            if conn is not None:
                with contextlib.suppress(Exception):
                    conn.disconnect()
        for node in self._by_name.values():
            self._unwatch_conn(node)
            if node.conn is not None:
                with contextlib.suppress(Exception):
                    node.conn.disconnect()
            self._close_wake(node)
            with contextlib.suppress(Exception):
                node.client.close()
        self._selector.close()
        with contextlib.suppress(OSError):
            self._wake_r.close()
            self._wake_w.close()


def _current(timer: tuple[float, int, Lane]) -> bool:
    """The timer's lane still sleeps until that deadline (it did not wake before)."""
    return timer[2].sleeping and timer[2].deadline == timer[0]


def _same(message: Any) -> Any:
    return message


def _tracking(prefixes: list[str]) -> list[Any]:
    """``CLIENT TRACKING ON BCAST`` for ``prefixes``."""
    args: list[Any] = ["CLIENT", "TRACKING", "ON", "BCAST"]
    for prefix in prefixes:
        args += ["PREFIX", prefix]
    return args


def _is_push(message: Any) -> bool:
    return isinstance(message, list) and len(message) == 2 and message[0] in INVALIDATE


def _plain_parser(client: redis.Redis, args: tuple[Any, ...]) -> Callable[[Any], Any] | None:
    """redis-py's parsing of the reply to ``args`` (as ``execute_command`` would)."""
    callbacks: dict[str, Callable[[Any], Any]] = client.response_callbacks
    callback = callbacks.get(str(args[0]).upper())
    if callback is None:
        return None
    return lambda reply: callback(reply)
