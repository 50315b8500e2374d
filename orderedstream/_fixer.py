"""The fixer: takes due parked entries under a visibility lease, repairs them and re-streams them
atomically (DESIGN.md §6).

Every state change is one script: claim (re-score to now + visibility, record the claim),
re-stream (XADD + ZREM + HDEL, only while the claim is ours), reschedule, bury.  So a fixer that
dies anywhere loses nothing (its entries come back after the visibility lease) and doubles
nothing (a re-stream happens at most once per parked entry: after it, the entry is no longer
parked, and a late fixer whose claim was taken over is refused).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from importlib import resources
from typing import Any

import attrs
import redis

from . import _wire as wire
from ._background import Background
from ._config import FixerConfig
from ._deadletter import ParkedEntry, to_bytes
from ._events import Emitter, Event, FixerPass, Hook, RepairFailed
from ._keys import GroupKeys, id_order
from ._recovery import CONNECTION_ERRORS, Outage, passing_fault
from ._scripts import Scripts
from ._server import client_from_url, clone_client, connect_check
from .exceptions import MalformedRecord, OrderedStreamError, Unrepairable

log = logging.getLogger("orderedstream")

FieldValue = str | bytes | int | float
Repair = Callable[[ParkedEntry], Mapping[str, FieldValue] | Mapping[bytes, FieldValue]]


_NOT_YET_MS = 100  # hold-key mode: retry a release this soon when the owner is still behind
SCRIPT_MAX_VALUES = 7800
"""The most field/value values of one entry a script re-streams (MAX_VALUES in
lua/lib/chunks.lua: a script passes a command's arguments on Lua's C stack, ~8000 values).
Bigger entries are re-streamed outside a script, in a WATCH/MULTI/EXEC transaction."""
_TX_ATTEMPTS = 100  # WATCH conflicts (other fixers, parks) before an entry is left for later
def identity_repair(entry: ParkedEntry) -> Mapping[bytes, bytes]:
    """Re-stream the entry unchanged (for entries parked only to wait, e.g. a downstream outage)."""
    return entry.raw


def _flatten(fields: Any) -> list[bytes]:
    """A repair's result as XADD field/value values; TypeError/ValueError (a failed repair)
    when it is not a mapping of str/bytes names to str/bytes/int/float values."""
    if not isinstance(fields, Mapping):
        raise TypeError(f"the repair returned {fields!r:.80}: return the fields to re-stream "
                        "(a mapping), or raise Unrepairable")
    flat: list[bytes] = []
    if all(type(k) is bytes and type(v) is bytes and not k.startswith(wire.HEADER_PREFIX)
           for k, v in fields.items()):
        for key, value in fields.items():  # the common case, without per-value conversions
            flat += (key, value)
        if flat:
            return flat
    for key, value in fields.items():
        if not isinstance(key, str | bytes):
            raise TypeError(f"field name {key!r} is not str or bytes")
        name = to_bytes(key)
        if name.startswith(wire.HEADER_PREFIX):
            continue  # orderedstream's headers are set by the re-stream itself
        if isinstance(value, bool) or not isinstance(value, str | bytes | int | float):
            raise TypeError(f"the repair returned {value!r:.80} for field {key!r}: values must "
                            "be str, bytes, int or float")
        flat += [name, to_bytes(value)]
    if not flat:
        raise ValueError("the repair returned no fields (a stream entry needs at least one)")
    return flat


class Fixer(Background):
    """Repairs and re-streams the parked entries of one (stream, group).

    >>> with Fixer(FixerConfig(stream="orders", group="workers"), repair, client):  # doctest: +SKIP
    ...     ...   # start() on enter, stop() on exit

    Any number of fixers may run side by side: each entry is taken by one at a time.
    """

    _kind = "fixer"

    def __init__(self, config: FixerConfig, repair: Repair, client: redis.Redis,
                 *, hooks: Sequence[Hook] = ()) -> None:
        self.config = config
        self._repair = repair
        self._keys = GroupKeys(config.stream, config.group)
        self._emit = Emitter(hooks)
        timeout_s = config.socket_timeout_ms / 1000.0
        super().__init__(clone_client(client, name=f"os-fix:{config.name}",
                                      socket_timeout_s=timeout_s))
        self._wait = clone_client(client, name=f"os-fix:{config.name}:wait", single=True,
                                  socket_timeout_s=timeout_s + config.max_wait_ms / 1000.0)
        self._scripts = Scripts(self._cmd)
        self._outage = Outage(self._event)
        self._last_signal = "$"
        self._last_counts: tuple[int, int] | None = None
        self.totals = {"restreamed": 0, "rescheduled": 0, "buried": 0, "lost": 0}

    @classmethod
    def from_url(cls, url: str, config: FixerConfig, repair: Repair,
                 *, hooks: Sequence[Hook] = ()) -> Fixer:
        return cls(config, repair, client_from_url(url), hooks=hooks)

    # -- lifecycle (shared with the Coordinator: ._background) ----------------------------

    def start(self) -> None:
        """Run in a background thread; returns at once.  Errors surface from ``join``."""
        self._start_thread()

    def run(self) -> None:
        """Fix until ``stop()``, in the caller's thread."""
        self._main()

    def _main(self) -> None:
        """Pass after pass, sleeping until the next entry is due (or a new one is parked).

        While the server cannot serve it (connection lost, OOM, LOADING, READONLY, ...: see
        :func:`~orderedstream._recovery.passing_fault`) the fixer waits, 50 ms growing to 2 s
        between tries, says so once (:class:`ServerUnavailable`, again only when the kind of
        failure changes) and resumes (:class:`ServerRecovered`).  Any other error ends it
        (``join`` re-raises it).  Waiting loses nothing: what it had claimed comes back after
        the visibility lease."""
        try:
            connect_check(self._cmd)
            while not self._stop.is_set():
                try:
                    done = self.fix_once()
                    self._outage.ok()
                    if done.claimed < self.config.batch_size:
                        self._sleep(done.next_due_ms)
                except Exception as err:
                    reason = passing_fault(err)
                    if reason is None:
                        raise
                    self._stop.wait(self._outage.failed(reason))
        finally:
            self._cmd.close()
            self._wait.close()
            self._stopped.set()

    def _event(self, cls: type[Event], **fields: Any) -> None:
        cfg = self.config
        self._emit(cls(stream=cfg.stream, group=cfg.group, consumer=cfg.name, **fields))

    def _sleep(self, next_due_ms: int) -> None:
        """Until the next entry is due, or a new one is parked.  A server-side XREAD BLOCK
        times out up to ~100 ms late (the server checks timeouts on its cron), so the last
        stretch before a due time is slept here, in steps of at most 25 ms."""
        cap = self.config.max_wait_ms
        wait = cap if next_due_ms < 0 else min(next_due_ms, cap)
        if wait > 120:
            if self._wait_id is None:
                self._wait_id = int(self._wait.client_id())
            try:
                reply: Any = self._wait.xread({self._keys.signal: self._last_signal}, count=100,
                                              block=wait - 100)
            except CONNECTION_ERRORS:
                self._wait_id = None
                raise
            if reply:
                self._last_signal = reply[0][1][-1][0].decode()
        elif wait > 0:
            self._stop.wait(min(wait, 25) / 1000.0)

    # -- one pass ---------------------------------------------------------------------------

    def fix_once(self) -> FixerPass:
        """Take up to ``batch_size`` due entries, repair them, and re-stream, reschedule or bury
        each.  Returns what it did (also emitted as an event)."""
        cfg = self.config
        keys = self._keys
        if self._last_signal == "$":
            last: Any = self._cmd.xrevrange(keys.signal, count=1)
            self._last_signal = last[0][0].decode() if last else "0-0"
        now, until, ids, records, next_due = self._scripts.call(
            "fix_claim", [keys.delay, keys.parked, keys.claims],
            [cfg.name, cfg.batch_size, cfg.visibility_ms])
        token = str(until)  # the claim's own score: proves the entries are still ours
        restream: list[Any] = []
        reschedule: list[Any] = []
        bury: list[tuple[ParkedEntry | None, str, str, str]] = []  # entry, id, record, reason
        holders: list[tuple[ParkedEntry, list[bytes]]] = []
        big: list[tuple[ParkedEntry, list[bytes]]] = []  # too many values for a script
        not_yet: list[Any] = []
        for raw_id, record in zip(ids, records, strict=True):
            entry_id = raw_id.decode()
            try:
                entry = ParkedEntry.from_json(entry_id, record)
            except MalformedRecord as err:
                text = record.decode("utf-8", "replace") if isinstance(record, bytes) else ""
                bury.append((None, entry_id, text, str(err)))
                continue
            if entry.parked > cfg.max_parks:  # repaired and parked again, over and over
                bury.append((entry, entry_id, entry.to_json(),
                             f"parked {entry.parked} times (max_parks={cfg.max_parks}): the "
                             f"entry keeps failing after each repair"))
                continue
            if entry.hold_key is not None and not self._release_ready(entry):
                not_yet += [entry_id, _NOT_YET_MS, entry.to_json()]  # repair it when it can go
                continue
            try:
                flat = _flatten(self._repair(entry))
            except Unrepairable as err:
                bury.append((entry, entry_id, entry.to_json(), f"unrepairable: {err}"))
                continue
            except Exception as err:
                failures = entry.fixer_attempts + 1
                history = (*entry.history, {"ms": int(now), "fixer": cfg.name,
                                            "error": repr(err)})
                updated = attrs.evolve(entry, fixer_attempts=failures, history=history)
                if failures >= cfg.max_attempts:
                    action, backoff = "bury", 0
                    bury.append((updated, entry_id, updated.to_json(),
                                 f"repair failed {failures} times: {err!r}"))
                else:
                    action, backoff = "reschedule", cfg.backoff_ms(failures)
                    reschedule += [entry_id, backoff, updated.to_json()]
                self._emit(RepairFailed(stream=cfg.stream, group=cfg.group, consumer=cfg.name,
                                        entry_id=entry_id, error=repr(err),
                                        fixer_attempts=failures, action=action,
                                        backoff_ms=backoff))
                continue
            if entry.hold_key is not None:
                holders.append((entry, flat))
                continue
            if len(flat) > SCRIPT_MAX_VALUES:
                big.append((entry, flat))
                continue
            restream += [entry_id, entry.origin_id, entry.parked, len(flat), *flat]
        restreamed = lost = rescheduled = buried = released = 0
        if restream:
            out = self._scripts.call_bulk("fix_restream", [cfg.stream, keys.delay, keys.parked],
                                          [token, cfg.group, *restream])
            restreamed = sum(1 for new_id in out if new_id)
            lost += len(out) - restreamed
        for entry, flat in big:
            status = restream_outside_script(self._cmd, keys, entry, flat, token)
            restreamed += status == "ok"
            lost += status == "lost"
            if status == "busy":  # kept changing under WATCH: try again shortly
                not_yet += [entry.id, _NOT_YET_MS, entry.to_json()]
        if reschedule:
            rescheduled = int(self._scripts.call(
                "fix_reschedule", [keys.delay, keys.parked], [token, *reschedule]))
            lost += len(reschedule) // 3 - rescheduled
        plain_bury: list[Any] = []
        for bury_entry, entry_id, text, reason in bury:
            if bury_entry is not None and bury_entry.hold_key is not None:
                status, count = release(self._cmd, self._scripts, keys, bury_entry, [],
                                        "bury", reason, token=token)
                buried += status == "ok"
                lost += status == "lost"
                released += count
                if status == "notyet":
                    not_yet += [entry_id, _NOT_YET_MS, bury_entry.to_json()]
            else:
                plain_bury += [entry_id, text, reason]
        if plain_bury:
            out = self._scripts.call("fix_bury", [keys.delay, keys.parked, keys.graveyard],
                                     [token, *plain_bury])
            buried += sum(1 for gid in out if gid)
            lost += sum(1 for gid in out if not gid)
        for entry, flat in holders:
            status, count = release(self._cmd, self._scripts, keys, entry, flat, "restream",
                                    "", token=token)
            restreamed += status == "ok"
            lost += status == "lost"
            released += count
            if status == "notyet":  # not a failure: the owner is still behind; soon again
                not_yet += [entry.id, _NOT_YET_MS, entry.to_json()]
        if not_yet:
            rescheduled += int(self._scripts.call(
                "fix_reschedule", [keys.delay, keys.parked], [token, *not_yet]))
        next_due = int(next_due)
        soonest = [int(b) for b in (*reschedule[1::3], *not_yet[1::3])]
        if soonest:  # entries put back this pass may be due before what the claim saw
            next_due = min(soonest) if next_due < 0 else min(next_due, *soonest)
        parked = int(self._cmd.zcard(keys.delay))
        totals = self.totals
        totals["restreamed"] += restreamed
        totals["rescheduled"] += rescheduled
        totals["buried"] += buried
        totals["lost"] += lost
        event = FixerPass(stream=cfg.stream, group=cfg.group, consumer=cfg.name,
                          claimed=len(ids), restreamed=restreamed, rescheduled=rescheduled,
                          buried=buried, lost=lost, followers_released=released, parked=parked,
                          next_due_ms=next_due)
        counts = (parked, next_due >= 0)
        if ids or counts != self._last_counts:
            self._emit(event)
        self._last_counts = counts
        return event

    def _release_ready(self, entry: ParkedEntry) -> bool:
        """Hold-key mode: may this holder be released now?  The same test fix_release.lua
        makes (which stays the authority); asked first so a repair is not called again and
        again while the owner is still behind the key's previous release."""
        keys = self._keys
        state: Any = self._cmd.hget(keys.held, entry.hold_key or "")
        parts = state.split() if state else []
        if len(parts) != 3 or parts[0].decode() != entry.id or parts[2] == b"-":
            return True
        return _group_passed(self._cmd, self.config.stream, self.config.group,
                             parts[2].decode())


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


def _claim_is_ours(pipe: Any, keys: GroupKeys, entry_id: str, token: str) -> bool:
    """Under WATCH: the claim check of the scripts (the entry's score is our claim's until_ms;
    an operator's command, token '', needs the entry merely parked)."""
    if token == "":
        return bool(pipe.hexists(keys.parked, entry_id))
    score = pipe.zscore(keys.delay, entry_id)
    return score is not None and int(score) == int(token)


def restream_outside_script(client: redis.Redis, keys: GroupKeys, entry: ParkedEntry,
                            flat: list[bytes], token: str) -> str:
    """What fix_restream.lua does, for one entry too big for a script (more than
    SCRIPT_MAX_VALUES values): the claim check under WATCH of the delay set, then XADD + ZREM +
    HDEL in one MULTI/EXEC, so it is re-streamed at most once.  Returns 'ok', 'lost' (the
    claim is not ours) or 'busy' (the delay set kept changing: try again later)."""
    pipe: Any = client.pipeline(transaction=True)
    with pipe:
        for _ in range(_TX_ATTEMPTS):
            try:
                pipe.watch(keys.delay)
                if not _claim_is_ours(pipe, keys, entry.id, token):
                    return "lost"
                pipe.multi()
                pipe.execute_command("XADD", keys.stream, "*", wire.FOR, keys.group,
                                     wire.ORIGIN_ID, entry.origin_id, wire.PARKED, entry.parked,
                                     wire.REPAIRED, "1", *flat)
                pipe.zrem(keys.delay, entry.id)
                pipe.hdel(keys.parked, entry.id)
                pipe.execute()
                return "ok"
            except redis.WatchError:
                continue
    return "busy"


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
        args: list[Any] = [token, keys.group, hold_key, entry.id, mode, entry.origin_id,
                           entry.parked, entry.to_json(), reason, len(flat), *flat,
                           len(members)]
        if members:
            records: list[Any] = client.hmget(keys.parked, follower_ids)
            for member, fid, record in zip(members, follower_ids, records, strict=True):
                origin, follower_flat = _follower_fields(fid.decode(), record)
                if len(follower_flat) > SCRIPT_MAX_VALUES:
                    return _release_outside_script(client, keys, entry, flat, mode, reason,
                                                   token)
                args += [member, fid, origin, len(follower_flat), *follower_flat]
        reply = scripts.call_bulk(
            "fix_release", [keys.stream, keys.delay, keys.parked, keys.held, followers_key,
                            keys.graveyard], args)
        status = reply[0].decode()
        if status != "stale":
            return status, len(members) if status == "ok" else 0
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
        for _ in range(_TX_ATTEMPTS):
            try:
                pipe.watch(keys.delay, keys.parked, keys.held, followers_key)
                if not _claim_is_ours(pipe, keys, entry.id, token):
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
                    pipe.xadd(keys.graveyard, {"id": entry.id, "reason": reason,
                                               "record": entry.to_json()})
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
