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
from typing import Any

import attrs
import redis

from . import _wire as wire
from ._background import Background
from ._config import FixerConfig
from ._deadletter import ParkedEntry, claim_is_ours, to_bytes
from ._events import Emitter, Event, FixerPass, Hook, RepairFailed
from ._holdkey import TX_ATTEMPTS, release, release_ready
from ._keys import GroupKeys
from ._recovery import CONNECTION_ERRORS, Outage, passing_fault
from ._scripts import SCRIPT_MAX_VALUES, Restream, Scripts
from ._server import client_from_url, clone_client, connect_check
from .exceptions import MalformedRecord, Unrepairable

log = logging.getLogger("orderedstream")

FieldValue = str | bytes | int | float
Repair = Callable[[ParkedEntry], Mapping[str, FieldValue] | Mapping[bytes, FieldValue]]


_NOT_YET_MS = 100  # hold-key mode: retry a release this soon when the owner is still behind


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

    Any number of fixers may run side by side: each entry is taken by one at a time.  (The
    parked entries of every partition of a topic: :class:`~orderedstream.TopicFixer`.)
    """

    _kind = "fixer"

    def __init__(self, config: FixerConfig, repair: Repair, client: redis.Redis,
                 *, hooks: Sequence[Hook] = ()) -> None:
        self.config = config
        self._keys = GroupKeys(config.stream, config.group)
        self._emit = Emitter(hooks)
        self._work = StreamRepairs(config, repair, self._emit)
        timeout_s = config.socket_timeout_ms / 1000.0
        super().__init__(clone_client(client, name=f"os-fix:{config.name}",
                                      socket_timeout_s=timeout_s))
        self._wait = clone_client(client, name=f"os-fix:{config.name}:wait", single=True,
                                  socket_timeout_s=timeout_s + config.max_wait_ms / 1000.0)
        self._scripts = Scripts(self._cmd)
        self._outage = Outage(self._work.event)
        self._last_signal = "$"

    @classmethod
    def from_url(cls, url: str, config: FixerConfig, repair: Repair,
                 *, hooks: Sequence[Hook] = ()) -> Fixer:
        return cls(config, repair, client_from_url(url), hooks=hooks)

    @property
    def totals(self) -> dict[str, int]:
        """Entries re-streamed, rescheduled, buried and lost (a claim taken over) so far."""
        return self._work.totals

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
        if self._last_signal == "$":  # new parks from here on wake the sleep
            last: Any = self._cmd.xrevrange(self._keys.signal, count=1)
            self._last_signal = last[0][0].decode() if last else "0-0"
        return self._work.fix_once(self._cmd, self._scripts)


class StreamRepairs:
    """The fixer's work on one (stream, group), one pass at a time: claim due entries (a
    visibility lease per entry), repair them, and re-stream, reschedule or bury each, every
    state change in one script.  It holds no connection: each pass runs on the client (and its
    :class:`~orderedstream._scripts.Scripts`) it is given, a client of the server, or of the
    cluster node, that serves the stream.  A :class:`Fixer` runs one; a
    :class:`~orderedstream.TopicFixer` one per partition."""

    def __init__(self, config: FixerConfig, repair: Repair, emit: Emitter) -> None:
        self.config = config
        self.keys = GroupKeys(config.stream, config.group)
        self._repair = repair
        self._emit = emit
        self._last_counts: tuple[int, int] | None = None
        self.totals = {"restreamed": 0, "rescheduled": 0, "buried": 0, "lost": 0}

    def event(self, cls: type[Event], **fields: Any) -> None:
        """Emit an event of this (stream, group) and fixer."""
        cfg = self.config
        self._emit(cls(stream=cfg.stream, group=cfg.group, consumer=cfg.name, **fields))

    def fix_once(self, client: redis.Redis, scripts: Scripts) -> FixerPass:
        """Take up to ``batch_size`` due entries, repair them, and re-stream, reschedule or bury
        each, on ``client`` (``scripts`` runs on it).  Returns what it did (also emitted as an
        event)."""
        cfg = self.config
        keys = self.keys
        claim = scripts.fix_claim(keys, cfg.name, cfg.batch_size, cfg.visibility_ms)
        until = claim.until_ms  # the claim's own score: proves the entries are still ours
        token = str(until)
        restream: list[Restream] = []
        reschedule: list[tuple[str, int, str]] = []  # id, backoff ms, record
        bury: list[tuple[ParkedEntry | None, str, str, str]] = []  # entry, id, record, reason
        holders: list[tuple[ParkedEntry, list[bytes]]] = []
        big: list[tuple[ParkedEntry, list[bytes]]] = []  # too many values for a script
        not_yet: list[tuple[str, int, str]] = []
        for entry_id, record in zip(claim.ids, claim.records, strict=True):
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
            if entry.hold_key is not None and not release_ready(client, keys, entry):
                not_yet.append((entry_id, _NOT_YET_MS, entry.to_json()))  # repair it later
                continue
            try:
                flat = _flatten(self._repair(entry))
            except Unrepairable as err:
                bury.append((entry, entry_id, entry.to_json(), f"unrepairable: {err}"))
                continue
            except Exception as err:
                failures = entry.fixer_attempts + 1
                history = (*entry.history, {"ms": claim.now_ms, "fixer": cfg.name,
                                            "error": repr(err)})
                updated = attrs.evolve(entry, fixer_attempts=failures, history=history)
                if failures >= cfg.max_attempts:
                    action, backoff = "bury", 0
                    bury.append((updated, entry_id, updated.to_json(),
                                 f"repair failed {failures} times: {err!r}"))
                else:
                    action, backoff = "reschedule", cfg.backoff_ms(failures)
                    reschedule.append((entry_id, backoff, updated.to_json()))
                self.event(RepairFailed, entry_id=entry_id, error=repr(err),
                           fixer_attempts=failures, action=action, backoff_ms=backoff)
                continue
            if entry.hold_key is not None:
                holders.append((entry, flat))
            elif len(flat) > SCRIPT_MAX_VALUES:
                big.append((entry, flat))
            else:
                restream.append(Restream(entry_id, entry.origin_id, entry.parked, flat))
        restreamed = lost = rescheduled = buried = released = 0
        if restream:
            out = scripts.fix_restream(keys, until, restream)
            restreamed = sum(1 for new_id in out if new_id)
            lost += len(out) - restreamed
        for entry, flat in big:
            status = restream_outside_script(client, keys, entry, flat, token)
            restreamed += status == "ok"
            lost += status == "lost"
            if status == "busy":  # kept changing under WATCH: try again shortly
                not_yet.append((entry.id, _NOT_YET_MS, entry.to_json()))
        if reschedule:
            rescheduled = scripts.fix_reschedule(keys, until, reschedule)
            lost += len(reschedule) - rescheduled
        plain_bury: list[tuple[str, str, str]] = []
        for bury_entry, entry_id, text, reason in bury:
            if bury_entry is not None and bury_entry.hold_key is not None:
                status, count = release(client, scripts, keys, bury_entry, [], "bury",
                                        reason, token=token)
                buried += status == "ok"
                lost += status == "lost"
                released += count
                if status == "notyet":
                    not_yet.append((entry_id, _NOT_YET_MS, bury_entry.to_json()))
            else:
                plain_bury.append((entry_id, text, reason))
        if plain_bury:
            out = scripts.fix_bury(keys, until, plain_bury)
            buried += sum(1 for gid in out if gid)
            lost += sum(1 for gid in out if not gid)
        for entry, flat in holders:
            status, count = release(client, scripts, keys, entry, flat, "restream", "",
                                    token=token)
            restreamed += status == "ok"
            lost += status == "lost"
            released += count
            if status == "notyet":  # not a failure: the owner is still behind; soon again
                not_yet.append((entry.id, _NOT_YET_MS, entry.to_json()))
        if not_yet:
            rescheduled += scripts.fix_reschedule(keys, until, not_yet)
        next_due = claim.next_due_ms
        soonest = [backoff for _, backoff, _ in (*reschedule, *not_yet)]
        if soonest:  # entries put back this pass may be due before what the claim saw
            next_due = min(soonest) if next_due < 0 else min(next_due, *soonest)
        parked = int(client.zcard(keys.delay))
        totals = self.totals
        totals["restreamed"] += restreamed
        totals["rescheduled"] += rescheduled
        totals["buried"] += buried
        totals["lost"] += lost
        event = FixerPass(stream=cfg.stream, group=cfg.group, consumer=cfg.name,
                          claimed=len(claim.ids), restreamed=restreamed,
                          rescheduled=rescheduled, buried=buried, lost=lost,
                          followers_released=released, parked=parked, next_due_ms=next_due)
        counts = (parked, next_due >= 0)
        if claim.ids or counts != self._last_counts:
            self._emit(event)
        self._last_counts = counts
        return event


def restream_outside_script(client: redis.Redis, keys: GroupKeys, entry: ParkedEntry,
                            flat: list[bytes], token: str) -> str:
    """What fix_restream.lua does, for one entry too big for a script (more than
    SCRIPT_MAX_VALUES values): the claim check under WATCH of the delay set, then XADD + ZREM +
    HDEL in one MULTI/EXEC, so it is re-streamed at most once.  Returns 'ok', 'lost' (the
    claim is not ours) or 'busy' (the delay set kept changing: try again later)."""
    pipe: Any = client.pipeline(transaction=True)
    with pipe:
        for _ in range(TX_ATTEMPTS):
            try:
                pipe.watch(keys.delay)
                if not claim_is_ours(pipe, keys, entry.id, token):
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


