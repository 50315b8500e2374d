"""The Lua scripts (``lua/*.lua``), each behind one typed method.

Every method writes its script's KEYS and ARGV next to each other, as the script's header
documents them, and returns a small record instead of a raw reply.  All of them go through one
raw path, :meth:`Scripts.run`: EVALSHA packed in one step (hiredis, when installed), the script
loaded again on NOSCRIPT (a restart, ``SCRIPT FLUSH``), a connection interrupted mid-command
dropped (never reused), and the script's ``NOTOWNER`` / ``NOGROUP`` replies raised as
:class:`~orderedstream.exceptions.NotOwner` / :class:`~orderedstream.exceptions.GroupMissing`.
Keys reach the scripts only through KEYS (computed by :mod:`._keys`).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any, Generic, TypeVar

import attrs
import redis

from ._keys import GroupKeys
from .exceptions import GroupMissing, NotOwner, OrderedStreamError

EVENTS_MAXLEN = 1000
SCRIPT_MAX_VALUES = 7800
"""The most field/value values of one entry a script appends (MAX_VALUES in lua/lib/chunks.lua:
a script passes a command's arguments on Lua's C stack, ~8000 values).  Bigger entries are
appended outside a script, in a WATCH/MULTI/EXEC transaction."""

# hiredis packs a whole command in one C call; redis-py encodes each argument in Python first
pack_command: Callable[[tuple[Any, ...]], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
    pack_command = _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is an optional extra
    pack_command = None

Encodable = str | bytes | int | float


@functools.cache
def _load(name: str) -> str:
    """A script's text, with each ``--! include lib/x.lua`` line replaced by that file (Lua
    scripts sent to the server cannot load code of their own).  Read once per process: every
    :class:`Scripts` (one per connection that runs scripts) and every target read asks."""
    folder = resources.files("orderedstream").joinpath("lua")
    text = folder.joinpath(f"{name}.lua").read_text("utf-8")
    lines = []
    for line in text.splitlines(keepends=True):
        if line.startswith("--! include "):
            part = folder
            for step in line.split()[2].split("/"):
                part = part.joinpath(step)
            lines.append(part.read_text("utf-8"))
        else:
            lines.append(line)
    return "".join(lines)


def script_names() -> list[str]:
    """Every ``lua/*.lua`` shipped in the package."""
    folder = resources.files("orderedstream").joinpath("lua")
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".lua"))


def script_text(name: str) -> str:
    """The text sent to the server for script ``name`` (includes resolved)."""
    return _load(name)


def translate(err: redis.ResponseError) -> OrderedStreamError | None:
    """Map a script's error reply to our error tree (None: not one of ours)."""
    text = str(err)
    if text.startswith("NOTOWNER"):
        return NotOwner(text)
    if text.startswith("NOGROUP"):
        return GroupMissing(f"{text} (was the stream or group deleted?)")
    return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- replies ----------------------------------------------------------------------------------

@attrs.frozen
class ReadReply:
    """``read``: rows ``[(id, [field, value, ...]), ...]`` in id order; for history reads each
    row's delivery count and the ids found trimmed (acked); for ``>`` reads that found nothing,
    the stream's last id (``tail``) to wait from."""

    rows: list[Any]
    counts: list[Any]
    trimmed: list[str]
    tail: str


@attrs.frozen
class DeliverReply:
    """``deliver``: how many new entries were delivered, the first and last of their ids, or
    (none delivered) the stream's last id."""

    count: int
    first: bytes
    last: bytes
    tail: str

    @classmethod
    def parse(cls, reply: Any) -> DeliverReply:
        count, first, last, tail = reply
        return cls(int(count), first, last, _text(tail))


@attrs.frozen
class ClaimReply:
    """``claim``: entries moved to the caller, ids found trimmed, and whether the dead consumer
    was deleted (its pending list was empty)."""

    claimed: int
    trimmed: list[str]
    deleted: bool


@attrs.frozen
class DeferReply:
    """``defer``: when the fixer may take it (server ms; 0 for a follower) and its role."""

    due_ms: int
    role: str


@attrs.frozen
class HoldReply:
    """``hold``: 'free' (hand it to the handler; ``released``: the key is not held any more),
    'follower' (parked behind the holder), 'forwarded' (appended behind the holder's copies as
    ``new_id``) or 'parked' (too big to forward: it holds the key now)."""

    action: str
    released: bool = False
    new_id: str | None = None


@attrs.frozen
class FixClaim:
    """``fix_claim``: the server clock, the claim's token (``until_ms``), the claimed ids with
    their records, and ms until the next entry is due (-1: none parked)."""

    now_ms: int
    until_ms: int
    ids: list[str]
    records: list[bytes | None]
    next_due_ms: int


@attrs.frozen
class Restream:
    """One repaired entry for ``fix_restream``."""

    id: str
    origin_id: str
    parked: int
    fields: list[bytes]


@attrs.frozen
class Follower:
    """One follower for ``fix_release``: its zset member, id, origin id and fields."""

    member: bytes
    id: bytes
    origin_id: str
    fields: list[bytes]


@attrs.frozen
class ReleaseReply:
    """``fix_release``: 'ok' (with the holder's new id and the last id appended, '' if none),
    'stale' (followers changed: read them again), 'lost' (not our claim / not parked) or
    'notyet' (the owner has not passed the key's previous release)."""

    status: str
    holder_id: str = ""
    last_id: str = ""


@attrs.frozen
class AcquireReply:
    """``acquire``: granted (with the new epoch, token and whether the server changed since the
    last term), or who holds the lease (token, PTTL, heartbeat connection id and name)."""

    granted: bool
    epoch: int = 0
    token: str = ""
    server_changed: bool = False
    holder: str = ""
    pttl_ms: int = 0
    conn_id: str = ""
    conn_name: str = ""

    @classmethod
    def parse(cls, reply: Any) -> AcquireReply:
        if int(reply[0]) == 1:
            return cls(True, epoch=int(reply[1]), token=_text(reply[2]),
                       server_changed=int(reply[3]) == 1)
        return cls(False, holder=_text(reply[1]), pttl_ms=int(reply[2]),
                   conn_id=_text(reply[3]), conn_name=_text(reply[4]))


T = TypeVar("T")


@attrs.frozen
class ScriptOp(Generic[T]):
    """One script call, built but not run: :meth:`Scripts.do` runs it here and now; the
    protocol's generators (:mod:`._engine`) yield it to a sync or an asyncio driver."""

    name: str
    keys: list[str]
    args: list[Any]
    parse: Callable[[Any], T]


def _int(reply: Any) -> int:
    return int(reply)


def _is_one(reply: Any) -> bool:
    return int(reply) == 1


def end_term_op(keys: GroupKeys, token: str, kind: str, by: str,
                reason: str) -> ScriptOp[bool]:
    return ScriptOp("end_term", [keys.lease, keys.events],
                    [token, kind, by, reason, EVENTS_MAXLEN], _is_one)


def _read_reply(reply: Any) -> ReadReply:
    rows, counts, trimmed, tail = reply
    return ReadReply(rows, counts, [_text(t) for t in trimmed], _text(tail))


def read_op(keys: GroupKeys, token: str, consumer: str, count: int, start: str | bytes,
            acks: Sequence[Any]) -> ScriptOp[ReadReply]:
    return ScriptOp("read", [keys.stream, keys.lease],
                    [token, keys.group, consumer, count, start, *acks], _read_reply)


def ack_op(keys: GroupKeys, token: str, ids: Sequence[Any]) -> ScriptOp[int]:
    return ScriptOp("ack", [keys.stream, keys.lease], [token, keys.group, *ids], _int)


def _claim_reply(reply: Any) -> ClaimReply:
    claimed, trimmed, deleted = reply
    return ClaimReply(int(claimed), [_text(t) for t in trimmed], bool(int(deleted)))


def claim_op(keys: GroupKeys, token: str, consumer: str, dead: str,
             page: int) -> ScriptOp[ClaimReply]:
    return ScriptOp("claim", [keys.stream, keys.lease],
                    [token, keys.group, consumer, dead, page], _claim_reply)


@attrs.frozen
class TakeOverReply:
    """``take_over``: what the claims did, and the first page read along with them (``kind``
    'replay': the caller's own pending entries from the start, as a history read; 'new': it
    had none, these are new entries now delivered to it; 'none': consumers are ``left`` with
    entries still pending, nothing was read)."""

    epoch: int
    claimed: int
    trimmed: list[str]
    deleted: list[str]
    left: list[str]
    kind: str
    read: ReadReply
    tail: str
    """The stream's last id before the read ('0-0' if none)."""

    @classmethod
    def parse(cls, reply: Any) -> TakeOverReply:
        epoch, claimed, trimmed, deleted, left, kind, rows, counts, gone, tail = reply
        return cls(int(epoch), int(claimed), [_text(t) for t in trimmed],
                   [_text(d) for d in deleted], [_text(n) for n in left], _text(kind),
                   ReadReply(rows, counts, [_text(t) for t in gone], ""), _text(tail))


def take_over_command(keys: GroupKeys, consumer: str, nonce: str, claim_page: int,
                      count: int) -> tuple[str, list[str], list[Any]]:
    """``take_over`` (fenced by the term's nonce: it can ride right behind ``acquire``) as the
    name, keys and args of an EVALSHA; reply: :meth:`TakeOverReply.parse`."""
    return ("take_over", [keys.stream, keys.lease, keys.events],
            [consumer, nonce, keys.group, claim_page, count, EVENTS_MAXLEN])


def take_over_op(keys: GroupKeys, consumer: str, nonce: str, claim_page: int,
                 count: int) -> ScriptOp[TakeOverReply]:
    name, script_keys, args = take_over_command(keys, consumer, nonce, claim_page, count)
    return ScriptOp(name, script_keys, args, TakeOverReply.parse)


def _defer_reply(reply: Any) -> DeferReply:
    due, role = reply
    return DeferReply(int(due), _text(role))


def defer_op(keys: GroupKeys, token: str, entry_id: str, record: str, delay_ms: int,
             hold_key: str | None, origin_id: str) -> ScriptOp[DeferReply]:
    return ScriptOp(
        "defer", [keys.stream, keys.lease, keys.delay, keys.parked, keys.signal, keys.held,
                  keys.followers(hold_key or "")],
        [token, keys.group, entry_id, record, delay_ms, hold_key or "", origin_id],
        _defer_reply)


def _hold_reply(reply: Any) -> HoldReply:
    action = _text(reply[0])
    if action == "free":
        return HoldReply(action, released=bool(int(reply[1])))
    if action == "forwarded":
        return HoldReply(action, new_id=_text(reply[1]))
    return HoldReply(action)


def hold_op(keys: GroupKeys, token: str, entry_id: bytes | str, hold_key: str,
            generation: bytes, record: str, origin_id: bytes | str,
            fields: Sequence[bytes]) -> ScriptOp[HoldReply]:
    return ScriptOp(
        "hold", [keys.stream, keys.lease, keys.parked, keys.held, keys.followers(hold_key),
                 keys.delay, keys.signal],
        [token, keys.group, entry_id, hold_key, generation, record, origin_id, *fields],
        _hold_reply)


@functools.cache
def _texts_and_shas() -> tuple[dict[str, str], dict[str, str]]:
    """Every script's text and SHA1, by name (made once per process)."""
    texts = {name: _load(name) for name in script_names()}
    return texts, {name: hashlib.sha1(text.encode()).hexdigest() for name, text in texts.items()}


class Scripts:
    """The package's scripts for one client; run them on that client or another one."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._texts, self._shas = _texts_and_shas()

    @property
    def client(self) -> redis.Redis:
        """The client the scripts run on unless another one is given."""
        return self._client

    # -- the raw path -------------------------------------------------------------------------

    def sha(self, name: str) -> str:
        """The script's SHA1, loading it into the server's cache first."""
        self._client.script_load(self._texts[name])
        return self._shas[name]

    def load_command(self, name: str) -> tuple[Any, ...]:
        """``SCRIPT LOAD`` of script ``name``, for sending by hand."""
        return ("SCRIPT", "LOAD", self._texts[name])

    def command(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> tuple[Any, ...]:
        """The EVALSHA command for pipelining by hand (its reply: :meth:`reply`)."""
        return ("EVALSHA", self._shas[name], len(keys), *keys, *args)

    @staticmethod
    def reply(reply: Any) -> Any:
        """A pipelined reply: raised if it is an error, translated where it is ours."""
        if isinstance(reply, redis.ResponseError):
            mapped = translate(reply)
            if mapped is not None:
                raise mapped from reply
            raise reply
        return reply

    def run(self, name: str, keys: Sequence[str], args: Sequence[Any],
            client: redis.Redis | None = None) -> Any:
        """Run script ``name`` (the one raw path every method uses)."""
        client = client or self._client
        for _ in range(2):
            try:
                if pack_command is not None and getattr(client, "connection", None) is None:
                    return self._packed(client, self.command(name, keys, args))
                return client.execute_command(  # type: ignore[no-untyped-call]
                    *self.command(name, keys, args))
            except redis.exceptions.NoScriptError:
                client.script_load(self._texts[name])
            except redis.ResponseError as err:
                mapped = translate(err)
                if mapped is not None:
                    raise mapped from err
                raise
        raise OrderedStreamError(f"script {name} vanished from the server's cache twice")

    call = run  # the raw path under its old name, for tests that call a script by hand

    @staticmethod
    def _packed(client: redis.Redis, command: tuple[Any, ...]) -> Any:
        """One command packed by hiredis in one step on a pooled connection."""
        assert pack_command is not None
        pool = client.connection_pool
        conn: Any = pool.get_connection()
        try:
            conn.send_packed_command([pack_command(command)])
            reply = conn.read_response()
        except redis.ResponseError:
            pool.release(conn)
            raise
        except BaseException:
            conn.disconnect()  # interrupted mid-command: never reuse it
            pool.release(conn)
            raise
        pool.release(conn)
        return reply

    # -- the lease ------------------------------------------------------------------------------

    def acquire_command(self, keys: GroupKeys, consumer: str, ttl_ms: int, conn_id: int,
                        conn_name: str, host: str, pid: int, nonce: str) -> tuple[Any, ...]:
        """``acquire`` for sending by hand (reply: :meth:`AcquireReply.parse`)."""
        return self.command("acquire", [keys.lease, keys.epoch, keys.owner, keys.events],
                            [consumer, ttl_ms, conn_id, conn_name, host, pid, EVENTS_MAXLEN,
                             nonce])

    def acquire(self, keys: GroupKeys, consumer: str, ttl_ms: int, conn_id: int,
                conn_name: str, host: str, pid: int, nonce: str) -> AcquireReply:
        command = self.acquire_command(keys, consumer, ttl_ms, conn_id, conn_name, host, pid,
                                       nonce)
        return AcquireReply.parse(self.run("acquire", command[3:7], command[7:]))

    def renew(self, keys: GroupKeys, token: str, ttl_ms: int, conn_id: int,
              client: redis.Redis | None = None) -> bool:
        return int(self.run("renew", [keys.lease, keys.owner], [token, ttl_ms, conn_id],
                            client=client)) == 1

    def end_term(self, keys: GroupKeys, token: str, kind: str, by: str, reason: str) -> bool:
        """Compare-and-delete the lease, and append ``kind`` to the timeline (wakes standbys)."""
        return self.do(end_term_op(keys, token, kind, by, reason))

    def do(self, op: ScriptOp[T], client: redis.Redis | None = None) -> T:
        """Run a script call built by one of the ``*_op`` functions, here and now."""
        return op.parse(self.run(op.name, op.keys, op.args, client))

    # -- the owner's reads and acks -----------------------------------------------------------

    def deliver_command(self, keys: GroupKeys, token: str, consumer: str, count: int,
                        acks: Sequence[Any]) -> tuple[Any, ...]:
        """``deliver`` for the read-ahead's pipeline (reply: :meth:`DeliverReply.parse`)."""
        return self.command("deliver", [keys.stream, keys.lease],
                            [token, keys.group, consumer, count, *acks])


    # -- the fixer -------------------------------------------------------------------------------

    def fix_claim(self, keys: GroupKeys, fixer: str, most: int,
                  visibility_ms: int) -> FixClaim:
        now, until, ids, records, next_due = self.run(
            "fix_claim", [keys.delay, keys.parked, keys.claims], [fixer, most, visibility_ms])
        return FixClaim(int(now), int(until), [_text(i) for i in ids], list(records),
                        int(next_due))

    def fix_restream(self, keys: GroupKeys, until_ms: int,
                     entries: Sequence[Restream]) -> list[str]:
        """New ids, or '' where the claim was no longer ours, in the order given."""
        args: list[Any] = [until_ms, keys.group]
        for e in entries:
            args += [e.id, e.origin_id, e.parked, len(e.fields), *e.fields]
        return [_text(i) for i in self.run(
            "fix_restream", [keys.stream, keys.delay, keys.parked], args)]

    def fix_reschedule(self, keys: GroupKeys, until_ms: int,
                       entries: Sequence[tuple[str, int, str]]) -> int:
        """``entries``: (id, backoff ms, updated record JSON); returns how many were ours."""
        args: list[Any] = [until_ms]
        for entry_id, backoff_ms, record in entries:
            args += [entry_id, backoff_ms, record]
        return int(self.run("fix_reschedule", [keys.delay, keys.parked], args))

    def fix_bury(self, keys: GroupKeys, until_ms: int,
                 entries: Sequence[tuple[str, str, str]]) -> list[str]:
        """``entries``: (id, record, reason); graveyard ids, or '' where the claim was lost."""
        args: list[Any] = [until_ms]
        for entry_id, record, reason in entries:
            args += [entry_id, record, reason]
        return [_text(i) for i in self.run(
            "fix_bury", [keys.delay, keys.parked, keys.graveyard], args)]

    def fix_release(self, keys: GroupKeys, until_ms: int | None, hold_key: str,
                    holder_id: str, mode: str, origin_id: str, parked: int, record: str,
                    reason: str, holder_fields: Sequence[bytes],
                    followers: Sequence[Follower]) -> ReleaseReply:
        """``until_ms`` None: an operator's command (the entry must merely be parked)."""
        args: list[Any] = ["" if until_ms is None else until_ms, keys.group, hold_key,
                           holder_id, mode, origin_id, parked, record, reason,
                           len(holder_fields), *holder_fields, len(followers)]
        for f in followers:
            args += [f.member, f.id, f.origin_id, len(f.fields), *f.fields]
        reply = self.run("fix_release", [keys.stream, keys.delay, keys.parked, keys.held,
                                         keys.followers(hold_key), keys.graveyard], args)
        status = _text(reply[0])
        if status == "ok":
            return ReleaseReply(status, _text(reply[1]), _text(reply[2]))
        return ReleaseReply(status)
