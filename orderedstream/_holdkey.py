"""Hold-key mode: per-key order across the dead-letter path (DESIGN.md §6).

While an entry with ordering key K is parked (its *holder*), later entries with key K are parked
behind it (*followers*); when the fixer re-streams the holder, its followers are appended behind
it in their original order, and anything of K still ahead of the owner is moved behind them.
Order within a key is the order of origin ids.  The server side is ``lua/hold.lua``,
``lua/defer.lua`` and ``lua/fix_release.lua`` with ``lua/lib/held.lua``; this is the owner's
side: the gate every entry of a possibly held key passes before the handler.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import redis

from . import _wire as wire
from ._deadletter import ParkedEntry, Parker, claim_is_ours
from ._engine import Step
from ._events import Emit, EntryHeld
from ._keys import GroupKeys, id_order
from ._lease import Lease
from ._reader import check_lease
from ._scripts import SCRIPT_MAX_VALUES, Follower, Scripts, hold_op
from ._wire import Graveyard
from .exceptions import MalformedRecord, OrderedStreamError


def follower_member(entry: ParkedEntry) -> str:
    """Its member in the followers zset of its key (see lua/lib/held.lua)."""
    seq = entry.origin_id.partition("-")[2]
    return f"{seq:0>20} {entry.id}"



class HoldGate:
    """Decides, for the owner, whether an entry may go to the handler."""

    def __init__(self, field: str, scripts: Scripts, keys: GroupKeys, parker: Parker,
                 consumer: str, emit: Emit) -> None:
        self.field = field.encode()
        self._scripts = scripts
        self._keys = keys
        self._parker = parker
        self._consumer = consumer
        self._emit = emit
        self._held: set[str] = set()  # keys that may be held (a superset)

    def refresh(self, held: list[Any]) -> None:
        """Learn which keys are held now (at the start of a term): ``HKEYS`` of the held hash."""
        self._held = {k.decode("utf-8", "replace") for k in held}

    def parked(self, key: str) -> None:
        """An entry of ``key`` was just parked: the key may be held now."""
        self._held.add(key)

    def key_of(self, raw: dict[bytes, bytes] | Any) -> str | None:
        value = raw.get(self.field)
        return value.decode("utf-8", "replace") if value is not None else None

    def admit(self, lease: Lease, entry_id: bytes, flat: list[bytes]) -> Step[bool]:
        """May this entry go to the handler?  Entries whose key is (or may be) held are decided
        by the fenced ``hold`` script: parked behind the holder, moved behind the holder's
        re-streamed copy (both acked by the script), or let through."""
        key_bytes = None
        generation = b""
        origin = entry_id
        user_fields: list[bytes] = []
        for i in range(0, len(flat) - 1, 2):
            name = flat[i]
            if name.startswith(wire.HEADER_PREFIX):
                if name == wire.HOLD_GEN:
                    generation = flat[i + 1]
                elif name == wire.ORIGIN_ID:
                    origin = flat[i + 1]
                continue
            if name == self.field:
                key_bytes = flat[i + 1]
            user_fields += [name, flat[i + 1]]
        if key_bytes is None:
            return True
        key = key_bytes.decode("utf-8", "replace")
        if key not in self._held:
            return True
        keys = self._keys
        raw = dict(zip(flat[::2], flat[1::2], strict=True))
        record = self._parker.record(entry_id.decode(), raw, f"held behind the parked entry "
                                     f"of key {key!r}", 0, lease.epoch, self._consumer, key,
                                     "follower")
        check_lease(lease)
        got = yield hold_op(keys, lease.token, entry_id, key, generation, record.to_json(),
                            origin, user_fields)
        if got.action == "free":
            if got.released:
                self._held.discard(key)
            return True
        self._emit(EntryHeld, entry_id=entry_id.decode(), key=key, action=got.action,
                   new_id=got.new_id)
        return False


# -- the fixer's side: releasing a key ------------------------------------------------------

TX_ATTEMPTS = 100  # WATCH conflicts before a transaction is left for a later pass


def release_ready(client: redis.Redis, keys: GroupKeys, entry: ParkedEntry) -> bool:
    """May this holder be released now?  The same test fix_release.lua makes (which stays the
    authority); the fixer asks it first so a repair is not called again and again while the
    owner is still behind the key's previous release."""
    state: Any = client.hget(keys.held, entry.hold_key or "")
    parts = state.split() if state else []
    if len(parts) != 3 or parts[0].decode() != entry.id or parts[2] == b"-":
        return True
    return _group_passed(client, keys.stream, keys.group, parts[2].decode())


def _group_passed(client: Any, stream: str, group: str, chain: str) -> bool:
    """Has the group handled everything up to ``chain`` (the last copy of a key's previous
    release)?  The test fix_release.lua makes."""
    if client.xpending_range(stream, group, "-", chain, 1):
        return False
    groups: Any = client.xinfo_groups(stream)
    for info in groups:
        name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
        if name == group:
            last = info["last-delivered-id"]
            last = last.decode() if isinstance(last, bytes) else str(last)
            return id_order(last) >= id_order(chain)
    return True



def release(client: redis.Redis, scripts: Scripts, keys: GroupKeys, entry: ParkedEntry,
            flat: list[bytes], mode: str, reason: str, *, token: str) -> tuple[str, int]:
    """Settle a holder (hold-key mode) or purge any entry: re-stream, bury or purge it and
    append its followers behind, in origin order, in one script.  ``token`` is the claim's
    until_ms, or '' for an operator's command.  Returns (status, followers released): 'ok';
    'lost' when the entry is not ours (claim lost) or not parked any more; 'notyet' when the
    owner has not yet passed the key's previous release (try again shortly)."""
    hold_key = entry.hold_key or ""
    followers_key = keys.followers(hold_key)
    if len(flat) > SCRIPT_MAX_VALUES:
        return _release_outside_script(client, keys, entry, flat, mode, reason, token)
    for _ in range(100):
        members: list[Any] = client.zrange(followers_key, 0, -1) if hold_key else []
        follower_ids = [m.split(b" ", 1)[1] for m in members]
        followers: list[Follower] = []
        if members:
            records: list[Any] = client.hmget(keys.parked, follower_ids)
            for member, fid, record in zip(members, follower_ids, records, strict=True):
                origin, follower_flat = _follower_fields(fid.decode(), record)
                if len(follower_flat) > SCRIPT_MAX_VALUES:
                    return _release_outside_script(client, keys, entry, flat, mode, reason,
                                                   token)
                followers.append(Follower(member, fid, origin, follower_flat))
        got = scripts.fix_release(keys, int(token) if token else None, hold_key, entry.id,
                                  mode, entry.origin_id, entry.parked, entry.to_json(), reason,
                                  flat, followers)
        if got.status != "stale":
            return got.status, len(members) if got.status == "ok" else 0
        # 'stale': the owner parked another follower meanwhile; read them again
    raise OrderedStreamError(f"the followers of {hold_key!r} kept changing; try again")


def _release_outside_script(client: redis.Redis, keys: GroupKeys, entry: ParkedEntry,
                            flat: list[bytes], mode: str, reason: str,
                            token: str) -> tuple[str, int]:
    """What fix_release.lua does, for a key whose holder or a follower is too big for a script
    (more than SCRIPT_MAX_VALUES values): the checks under WATCH of the delay set, the parked
    records, the held states and the key's followers; then every write in one MULTI/EXEC.  The
    key's new state names the id of the last copy appended, which only the server knows: a
    small script queued last in the transaction (fix_release_tail.lua) reads it and sets it."""
    hold_key = entry.hold_key or ""
    followers_key = keys.followers(hold_key)
    pipe: Any = client.pipeline(transaction=True)
    with pipe:
        for _ in range(TX_ATTEMPTS):
            try:
                pipe.watch(keys.delay, keys.parked, keys.held, followers_key)
                if not claim_is_ours(pipe, keys, entry.id, token):
                    return "lost", 0
                state = pipe.hget(keys.held, hold_key) if hold_key else None
                holding = False
                if state and not state.startswith(b"tail:"):
                    holder, _, chain = state.decode().split(" ")
                    holding = holder == entry.id
                    if holding and chain != "-" and not _group_passed(
                            pipe, keys.stream, keys.group, chain):
                        return "notyet", 0
                members: list[Any] = pipe.zrange(followers_key, 0, -1) if hold_key else []
                follower_ids = [m.split(b" ", 1)[1] for m in members]
                records: list[Any] = pipe.hmget(keys.parked, follower_ids) if members else []
                pipe.multi()
                appended = 0
                if mode == "restream":
                    pipe.execute_command("XADD", keys.stream, "*", wire.FOR, keys.group,
                                         wire.ORIGIN_ID, entry.origin_id, wire.PARKED,
                                         entry.parked, wire.REPAIRED, "1", wire.HOLD_GEN,
                                         entry.id, *flat)
                    appended += 1
                elif mode == "bury":
                    pipe.xadd(keys.graveyard, {Graveyard.ID: entry.id,
                                               Graveyard.REASON: reason,
                                               Graveyard.RECORD: entry.to_json()})
                pipe.zrem(keys.delay, entry.id)
                pipe.hdel(keys.parked, entry.id)
                for fid, record in zip(follower_ids, records, strict=True):
                    origin, follower_flat = _follower_fields(fid.decode(), record)
                    pipe.execute_command("XADD", keys.stream, "*", wire.FOR, keys.group,
                                         wire.ORIGIN_ID, origin, wire.HOLD_GEN, entry.id,
                                         *follower_flat)
                    pipe.hdel(keys.parked, fid)
                    appended += 1
                if hold_key:
                    pipe.delete(followers_key)
                if holding:
                    pipe.eval(_release_tail_script(), 2, keys.held, keys.stream, hold_key,
                              entry.id, entry.origin_id, appended)
                pipe.execute()
                return "ok", len(members)
            except redis.WatchError:
                continue
    return "notyet", 0  # kept changing under WATCH: the caller tries again shortly


_TAIL_SCRIPT: list[str] = []


def _release_tail_script() -> str:
    """lua/fix_release_tail.lua's text (run by EVAL inside MULTI, where a NOSCRIPT of an
    EVALSHA would come too late to load it)."""
    if not _TAIL_SCRIPT:
        folder = resources.files("orderedstream").joinpath("lua")
        _TAIL_SCRIPT.append(folder.joinpath("fix_release_tail.lua").read_text("utf-8"))
    return _TAIL_SCRIPT[0]


def _follower_fields(entry_id: str, record: bytes | None) -> tuple[str, list[bytes]]:
    """A follower's origin id and fields for re-streaming; a follower whose record cannot be
    read goes back with its raw record in one field, so nothing is silently dropped."""
    try:
        entry = ParkedEntry.from_json(entry_id, record)
    except MalformedRecord:
        return entry_id, [b"malformed-parked-record", record or b""]
    return entry.origin_id, entry.flat_fields()
