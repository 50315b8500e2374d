"""The embeddable owner loop: wait as a standby, take over, replay pending entries first, then
read new ones; every read and ack fenced by the lease (DESIGN.md §4-5)."""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from time import monotonic
from typing import Any

import redis

from ._background import Background
from ._config import CoordinatorConfig
from ._deadletter import Parker
from ._events import (
    BatchHandled,
    Emitter,
    EntriesTrimmed,
    EntryHeld,
    Event,
    HandlerError,
    Hook,
    LeaseAcquired,
    LeaseLostEvent,
    LeaseReleased,
    OwnerConnectionGone,
    ReplayCompleted,
    Standby,
    TakeoverCompleted,
    WatchDisabled,
)
from ._keys import GroupKeys
from ._lease import CONNECTION_ERRORS, Holder, Lease, LeaseManager, Renewer
from ._message import Message, Term
from ._scripts import EVENTS_MAXLEN, Scripts, pack_command, translate
from ._server import client_from_url, clone_client, connect_check
from .exceptions import Defer, HandlerFailed, LeaseLost, NotOwner

log = logging.getLogger("orderedstream")

Handler = Callable[[Message], object]

_HOST = socket.gethostname()


class Role(enum.Enum):
    """Where a coordinator is in its life."""

    STARTING = "starting"
    STANDBY = "standby"
    OWNER = "owner"
    STOPPED = "stopped"


class _Stopping(Exception):
    """Internal: unwind the owner loop because stop() was called."""


class _Done(Exception):
    """Internal: the max_messages budget is spent."""


def _safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_.:{}" else "_" for ch in text)


class Coordinator(Background):
    """Single active consumer for one (stream, group), with ordered failover.

    >>> coordinator = Coordinator(config, handler, redis.Redis())   # doctest: +SKIP
    >>> with coordinator:                                            # doctest: +SKIP
    ...     ...  # start() on enter, stop() on exit

    ``start()`` runs the loop in a thread and returns; ``run()`` runs it in the caller's thread;
    ``stop(timeout)`` is idempotent, bounded, and hands the lease to a standby at once.
    """

    _kind = "coordinator"

    def __init__(self, config: CoordinatorConfig, handler: Handler, client: redis.Redis,
                 *, hooks: Sequence[Hook] = ()) -> None:
        self.config = config
        self._handler = handler
        self._keys = GroupKeys(config.stream, config.group)
        self._emit = Emitter(hooks)
        base = _safe_name(f"os:{config.consumer}")
        timeout_s = config.socket_timeout_ms / 1000.0
        self._cmd_name = f"{base}:cmd"
        super().__init__(clone_client(client, name=self._cmd_name, socket_timeout_s=timeout_s))
        self._wait = clone_client(client, name=f"{base}:wait", single=True,
                                  socket_timeout_s=timeout_s + config.block_ms / 1000.0)
        beat_timeout = max(config.lease.renew_interval_ms / 1000.0, 0.2)
        beat_name = f"{base}:beat"
        beat = clone_client(client, name=beat_name, single=True, socket_timeout_s=beat_timeout)
        self._scripts = Scripts(self._cmd)
        self._lease_mgr = LeaseManager(self._scripts, self._keys, config.consumer, config.lease,
                                       beat, beat_name)
        self._parker = Parker(self._scripts, self._keys, config.group)
        self._group_bytes = config.group.encode()
        self._hold_field = (config.hold_key_field.encode()
                            if config.hold_key_field is not None else None)
        self._held: set[str] = set()  # hold-key mode: keys that may be held (a superset)
        self._watch = config.lease.watch_connection
        self._role = Role.STARTING
        self._lease: Lease | None = None
        self._handled = 0
        self._max_messages: int | None = None

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_url(cls, url: str, config: CoordinatorConfig, handler: Handler,
                 *, hooks: Sequence[Hook] = ()) -> Coordinator:
        """Build with a client for ``url`` (redis://, rediss:// or unix://)."""
        return cls(config, handler, client_from_url(url), hooks=hooks)

    # -- state ----------------------------------------------------------------------------

    @property
    def role(self) -> Role:
        return self._role

    @property
    def epoch(self) -> int | None:
        """The fencing epoch while this consumer owns the group, else None."""
        lease = self._lease
        return lease.epoch if lease is not None and self._role is Role.OWNER else None

    @property
    def handled(self) -> int:
        """Entries handled (or parked) by this coordinator so far."""
        return self._handled

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, *, max_messages: int | None = None) -> None:
        """Run in a background thread; returns at once.  Server errors surface from ``join``."""
        self._max_messages = max_messages
        self._start_thread()

    def run(self, *, max_messages: int | None = None) -> None:
        """Run in the caller's thread until ``stop()``, ``max_messages`` or a fatal error."""
        self._max_messages = max_messages
        self._main()

    def stop(self, timeout: float = 10.0) -> bool:
        """Ask the loop to stop, hand the lease over, and wait up to ``timeout`` seconds.
        Idempotent; returns True once the loop has ended."""
        return super().stop(timeout)

    # -- main loop ------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            connect_check(self._cmd)
            self._ensure_group()
            while not self._stop.is_set():
                try:
                    lease = self._wait_for_lease()
                    if lease is None:
                        break
                    self._own(lease)
                except CONNECTION_ERRORS as err:
                    log.warning("lost the connection to the server: %r; retrying", err)
                    self._stop.wait(0.2)
                except _Done:
                    break
        finally:
            self._set_role(Role.STOPPED)
            self._lease = None
            for client in (self._cmd, self._wait):
                client.close()
            self._lease_mgr.close()
            self._stopped.set()

    def _ensure_group(self) -> None:
        try:
            self._cmd.xgroup_create(self.config.stream, self.config.group,
                                    id=self.config.create_group_from, mkstream=True)
        except redis.ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise

    def _set_role(self, role: Role) -> None:
        """Record the new role, and tell operators (members hash; best effort)."""
        self._role = role
        if role is Role.STOPPED:
            with contextlib.suppress(redis.RedisError, OSError):
                self._cmd.hdel(self._keys.members, self.config.consumer)
            return
        record = json.dumps({"role": role.value, "pid": os.getpid(), "host": _HOST,
                             "conn_name": self._cmd_name, "since": time.time()})
        with contextlib.suppress(redis.RedisError, OSError):
            self._cmd.hset(self._keys.members, self.config.consumer, record)

    def _event(self, cls: type[Event], **fields: Any) -> None:
        self._emit(cls(stream=self.config.stream, group=self.config.group,
                       consumer=self.config.consumer, **fields))

    # -- standby --------------------------------------------------------------------------

    def _wait_for_lease(self) -> Lease | None:
        """Block as a standby until this consumer holds the lease (or stop)."""
        events = self._keys.events
        last_signal = self._tail(events)
        announced = ""
        interval_ms = self.config.lease.watch_interval_ms
        while not self._stop.is_set():
            got = self._lease_mgr.try_acquire()
            if isinstance(got, Lease):
                return got
            holder = got
            if holder.token != announced:
                announced = holder.token
                self._set_role(Role.STANDBY)
                self._event(Standby, owner=holder.consumer, epoch=holder.epoch,
                            ttl_ms=holder.pttl_ms)
            deadline = time.monotonic() + max(holder.pttl_ms, 1) / 1000.0
            while not self._stop.is_set():
                if self._watch and holder.conn_id and not self._holder_alive(holder):
                    if self._lease_mgr.end_term(holder.token, "ended", "owner connection gone"):
                        self._event(OwnerConnectionGone, owner=holder.consumer,
                                    epoch=holder.epoch)
                    break
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0:
                    break
                block = min(left_ms, interval_ms) if self._watch and holder.conn_id else left_ms
                signal = self._block_read(events, last_signal, block)
                if signal is not None:
                    last_signal = signal
                    break
        return None

    def _holder_alive(self, holder: Holder) -> bool:
        try:
            return self._lease_mgr.connection_alive(self._cmd, holder)
        except redis.ResponseError as err:  # NoPermissionError is a ResponseError
            self._watch = False
            self._event(WatchDisabled, reason=f"CLIENT LIST not permitted ({err}); "
                        "failover waits for the lease TTL")
            return True

    def _tail(self, key: str) -> str:
        last: Any = self._cmd.xrevrange(key, count=1)
        return last[0][0].decode() if last else "0-0"

    def _block_read(self, key: str, after: str, block_ms: int) -> str | None:
        """Side-effect-free wait: XREAD BLOCK from ``after``; the newest id seen, or None."""
        if self._stop.is_set():
            return None
        if self._wait_id is None:
            self._wait_id = int(self._wait.client_id())
        try:
            reply: Any = self._wait.xread({key: after}, count=1, block=max(block_ms, 1))
        except CONNECTION_ERRORS:
            self._wait_id = None
            raise
        if not reply:
            return None
        entries = reply[0][1]
        return str(entries[-1][0].decode()) if entries else None

    # -- owner ----------------------------------------------------------------------------

    def _own(self, lease: Lease) -> None:
        self._lease = lease
        self._set_role(Role.OWNER)
        self._event(LeaseAcquired, epoch=lease.epoch)
        renewer = Renewer(self._lease_mgr, lease, self.config.lease)
        renewer.start()
        try:
            self._takeover(lease)
            self._consume(lease)
        except (LeaseLost, NotOwner) as err:
            lease.lose(str(err))
            self._event(LeaseLostEvent, epoch=lease.epoch, reason=lease.lost_reason)
        except _Stopping:
            pass
        except BaseException:
            renewer.halt()
            self._release(lease)
            raise
        finally:
            renewer.halt()
            self._lease = None
        if lease.valid():
            self._release(lease)
        self._set_role(Role.STANDBY)

    def _release(self, lease: Lease) -> None:
        with contextlib.suppress(*CONNECTION_ERRORS):
            if lease.valid() and self._lease_mgr.end_term(lease.token, "released", "clean stop"):
                self._event(LeaseReleased, epoch=lease.epoch)
        lease.lose("released")

    def _check(self, lease: Lease) -> None:
        if not lease.valid():
            raise LeaseLost(lease.lost_reason)

    def _takeover(self, lease: Lease) -> None:
        """Claim every other consumer's pending entries, deleting each once it is empty."""
        started = time.monotonic()
        cfg = self.config
        if self._hold_field is not None:
            held: list[Any] = self._cmd.hkeys(self._keys.held)
            self._held = {k.decode("utf-8", "replace") for k in held}
        claimed = 0
        deleted: list[str] = []
        trimmed: list[str] = []
        for info in self._cmd.xinfo_consumers(cfg.stream, cfg.group):
            name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
            if name == cfg.consumer:
                continue
            while True:
                self._check(lease)
                count, gone, done = self._scripts.call(
                    "claim", [cfg.stream, self._keys.lease],
                    [lease.token, cfg.group, cfg.consumer, name, cfg.claim_page])
                claimed += int(count)
                trimmed.extend(g.decode() for g in gone)
                if int(done):
                    deleted.append(name)
                    break
        elapsed = (time.monotonic() - started) * 1000.0
        if trimmed:
            self._event(EntriesTrimmed, ids=tuple(trimmed))
        self._event(TakeoverCompleted, epoch=lease.epoch, claimed=claimed,
                    consumers_deleted=tuple(deleted), trimmed=len(trimmed), duration_ms=elapsed)
        with contextlib.suppress(redis.RedisError):
            self._cmd.xadd(self._keys.events, {
                "type": "takeover", "consumer": cfg.consumer, "epoch": lease.epoch,
                "claimed": claimed, "deleted": ",".join(deleted), "trimmed": len(trimmed),
                "duration_ms": f"{elapsed:.1f}"}, maxlen=EVENTS_MAXLEN, approximate=True)

    def _read(self, lease: Lease, start: str, acks: list[str]
              ) -> tuple[list[Any], list[Any], list[Any], str]:
        cfg = self.config
        rows, counts, trimmed, tail = self._scripts.call(
            "read", [cfg.stream, self._keys.lease],
            [lease.token, cfg.group, cfg.consumer, cfg.batch_size, start, *acks])
        return rows, counts, trimmed, tail.decode() if isinstance(tail, bytes) else str(tail)

    def _read_ahead(self, lease: Lease) -> _ReadAhead:
        cfg = self.config
        return _ReadAhead(self._scripts, self._cmd, [cfg.stream, self._keys.lease],
                          [lease.token, cfg.group, cfg.consumer, cfg.batch_size],
                          cfg.batch_size)

    def _consume(self, lease: Lease) -> None:
        """Replay this consumer's pending entries in id order, then read new ones."""
        cfg = self.config
        history = True
        cursor = "0"
        acks: list[str] = []
        replayed = 0
        replay_started: float | None = time.monotonic()
        ahead = self._read_ahead(lease)
        try:
            while True:
                self._check(lease)
                if self._stop.is_set():
                    raise _Stopping
                try:
                    if history:
                        rows, counts, trimmed, tail = self._read(lease, cursor, acks)
                        acks = []
                    else:
                        if not ahead.in_flight:
                            ahead.send(acks, cursor)
                            acks = []
                        rows, tail = ahead.receive()
                        if rows:
                            # ask for the next batch now, so the server prepares it while the
                            # handler works on this one (its acks ride on the request after)
                            ahead.send(acks, rows[-1][0])
                            acks = []
                except _Resync:
                    # read what was delivered to us back from our own pending list
                    acks = ahead.reset() + acks
                    history = True
                    continue
                except CONNECTION_ERRORS:
                    # A '>' read whose reply was lost still delivered its entries to us: find
                    # them again in our own history, after the last entry we handled.  Acks
                    # whose fate is unknown are sent again (XACK is idempotent).
                    acks = ahead.reset() + acks
                    history = True
                    self._stop.wait(0.05)
                    continue
                if trimmed:
                    self._event(EntriesTrimmed, ids=tuple(t.decode() for t in trimmed))
                # after the replay, a history read only re-reads entries our own '>' reads
                # delivered and we never handed out: it bumped their count, we take it back
                rereading = 1 if replay_started is None else 0
                if not rows:
                    if history:
                        history = False
                        if replay_started is None:
                            continue  # a resync, not the replay after takeover
                        self._event(ReplayCompleted, epoch=lease.epoch, replayed=replayed,
                                    duration_ms=(time.monotonic() - replay_started) * 1000.0)
                        replay_started = None
                        continue
                    if not acks:
                        self._block_read(cfg.stream, tail, cfg.block_ms)
                    continue
                redelivered = 0
                handler = self._handler
                term = Term(cfg.stream, cfg.group, lease.epoch)
                ack = acks.append
                left = (self._max_messages - self._handled if self._max_messages is not None
                        else -1)
                count = 1
                own_group = self._group_bytes
                hold = self._hold_field
                for index, row in enumerate(rows):
                    # hot path: one check (stop asked, or lease past its deadline / lost), one
                    # Message, one handler call per entry
                    if self._halting or monotonic() >= lease.valid_until:
                        if self._halting:
                            raise _Stopping
                        raise LeaseLost(lease.lost_reason)
                    entry_id, flat = row
                    cursor = entry_id
                    if flat[0] == b"os-for" and flat[1] != own_group:
                        ack(entry_id)  # re-streamed for another group: ours handled the original
                        continue
                    if hold is not None and not self._hold_check(lease, entry_id, flat):
                        continue  # parked behind its key's holder, or moved behind it (acked)
                    if history:
                        count = int(counts[index]) - rereading
                        redelivered += count > 1
                    message = Message(entry_id, flat, term, count)
                    try:
                        handler(message)
                        ack(entry_id)
                    except Exception as err:
                        if self._recover(lease, message, err):
                            ack(entry_id)
                    self._handled += 1
                    left -= 1
                    if left == 0:
                        raise _Done
                if history:
                    replayed += len(rows)
                last_id = rows[-1][0]
                self._event(BatchHandled, epoch=lease.epoch, count=len(rows),
                            last_id=last_id.decode() if isinstance(last_id, bytes) else last_id,
                            redelivered=redelivered)
        finally:
            ahead.close()
            if acks and lease.valid():
                with contextlib.suppress(*CONNECTION_ERRORS, NotOwner):
                    self._scripts.call("ack", [cfg.stream, self._keys.lease],
                                       [lease.token, cfg.group, *acks])

    def _recover(self, lease: Lease, message: Message, error: Exception) -> bool:
        """The handler raised on ``message``: park it (Defer), or retry it in place per the retry
        policy.  True: it was handled in the end, ack it; False: it was parked (and acked by the
        park script)."""
        policy = self.config.retry
        while True:
            if isinstance(error, Defer):
                self._park(lease, message, error.reason, error.delay_ms)
                return False
            attempt = message.attempt
            spent = policy.max_attempts is not None and attempt >= policy.max_attempts
            action = policy.on_exhausted if spent else "retry"
            backoff = policy.backoff_ms(attempt) if action in ("retry", "block") else 0
            self._event(HandlerError, entry_id=message.id, attempt=attempt, error=repr(error),
                        action=action, backoff_ms=backoff)
            if action == "park":
                self._park(lease, message, f"handler failed {attempt} times: {error!r}",
                           policy.park_delay_ms)
                return False
            if action == "stop":
                raise HandlerFailed(message.id, attempt, error) from error
            if self._stop.wait(backoff / 1000.0):
                raise _Stopping from None
            self._check(lease)
            message = message.retry()
            try:
                self._handler(message)
                return True
            except Exception as err:
                error = err

    def _park(self, lease: Lease, message: Message, reason: str, delay_ms: int) -> None:
        self._check(lease)
        hold_key = None
        if self._hold_field is not None:
            value = message.raw.get(self._hold_field)
            if value is not None:
                hold_key = value.decode("utf-8", "replace")
        event = self._parker.park(lease.token, lease.epoch, self.config.consumer, message.id,
                                  message.raw, reason, delay_ms, message.attempt,
                                  self.config.stream, hold_key=hold_key)
        if hold_key is not None:
            self._held.add(hold_key)
        self._emit(event)

    def _hold_check(self, lease: Lease, entry_id: bytes, flat: list[bytes]) -> bool:
        """Hold-key mode: may this entry go to the handler?  Entries whose key is (or may be)
        held are decided by the fenced ``hold`` script: parked behind the holder, moved behind
        the holder's re-streamed copy, or let through."""
        key_bytes = None
        generation = b""
        origin = entry_id
        user_fields: list[bytes] = []
        for i in range(0, len(flat) - 1, 2):
            name = flat[i]
            if name.startswith(b"os-"):
                if name == b"os-hold-gen":
                    generation = flat[i + 1]
                elif name == b"os-origin-id":
                    origin = flat[i + 1]
                continue
            if name == self._hold_field:
                key_bytes = flat[i + 1]
            user_fields += [name, flat[i + 1]]
        if key_bytes is None:
            return True
        key = key_bytes.decode("utf-8", "replace")
        if key not in self._held:
            return True
        cfg = self.config
        keys = self._keys
        raw = dict(zip(flat[::2], flat[1::2], strict=True))
        record = self._parker.record(entry_id.decode(), raw, f"held behind the parked entry "
                                     f"of key {key!r}", 0, lease.epoch, cfg.consumer, key,
                                     "follower")
        self._check(lease)
        reply = self._scripts.call(
            "hold", [cfg.stream, keys.lease, keys.parked, keys.held, keys.followers(key)],
            [lease.token, cfg.group, entry_id, key, generation, record.to_json(), origin,
             *user_fields])
        action = reply[0].decode()
        if action == "free":
            if int(reply[1]):
                self._held.discard(key)
            return True
        self._event(EntryHeld, entry_id=entry_id.decode(), key=key, action=action,
                    new_id=reply[1].decode() if action == "forwarded" else None)
        return False


class _Resync(Exception):
    """Internal: a read-ahead's bodies do not match what the fenced script delivered (an entry
    was deleted in between, or the group's last-delivered id was not where we thought); read the
    delivered entries back from our own pending list instead."""


class _ReadAhead:
    """New entries, read ahead: the fenced ``deliver`` script (ack the previous batch, deliver the
    next one to us, reply with ids only) and a plain ``XRANGE`` for the bodies, pipelined on a
    connection of its own and sent without waiting, so the server works on batch N+1 while the
    handler works on batch N.  XRANGE changes nothing; the fence is the script's."""

    def __init__(self, scripts: Scripts, client: redis.Redis, keys: list[str], args: list[Any],
                 batch: int) -> None:
        self._scripts = scripts
        self._pool = client.connection_pool
        self._conn: Any = None
        self._head = ["EVALSHA", scripts.sha("deliver"), len(keys), *keys, *args]
        self._stream = keys[0]
        self._batch = batch
        self._sent_acks: list[Any] = []
        self.in_flight = False

    def send(self, acks: list[Any], after: bytes | str) -> None:
        """Ask for the entries after ``after`` (the last new entry delivered to us)."""
        if self._conn is None:
            self._conn = self._pool.get_connection()
        start = after.decode() if isinstance(after, bytes) else after
        commands = [(*self._head, *acks),
                    ("XRANGE", self._stream, f"({start}", "+", "COUNT", self._batch)]
        if pack_command is not None:  # hiredis, without redis-py's per-argument checks
            self._conn.send_packed_command([pack_command(c) for c in commands])
        else:
            self._conn.send_packed_command(self._conn.pack_commands(commands))
        self._sent_acks = acks
        self.in_flight = True

    def receive(self) -> tuple[list[Any], str]:
        """(rows, tail): the delivered entries in id order; ``tail`` when there were none.
        Raises :class:`_Resync` when the bodies cannot be matched to what was delivered."""
        head: Any
        try:
            try:
                head = self._conn.read_response()
            except redis.ResponseError as err:
                head = err
            rows = self._conn.read_response()
        except BaseException:
            self._drop()
            raise
        self.in_flight = False
        self._sent_acks = []
        if isinstance(head, redis.ResponseError):
            mapped = translate(head)
            if mapped is not None:
                raise mapped
            if isinstance(head, redis.exceptions.NoScriptError):  # restarted, or SCRIPT FLUSH
                self._head[1] = self._scripts.sha("deliver")
                raise _Resync
            raise head
        count, first, last, tail = head
        if not count:
            return [], tail.decode()
        start = 0
        while start < len(rows) and rows[start][0] != first:
            start += 1
        rows = rows[start:start + count]
        if len(rows) != count or rows[-1][0] != last:
            raise _Resync
        return rows, ""

    def reset(self) -> list[Any]:
        """After a connection error: forget the request; return the acks it carried."""
        acks = self._sent_acks
        self._sent_acks = []
        self._drop()
        return acks

    def _drop(self) -> None:
        self.in_flight = False
        if self._conn is not None:
            self._conn.disconnect()
            self._pool.release(self._conn)
            self._conn = None

    def close(self) -> None:
        """Collect an unanswered request (its entries stay pending: the next owner, or our own
        replay, gets them) and give the connection back."""
        if self._conn is None:
            return
        if self.in_flight:
            try:
                self._conn.read_response()
                self._conn.read_response()
                self.in_flight = False
            except (redis.RedisError, OSError):
                self._drop()
                return
        self._pool.release(self._conn)
        self._conn = None
