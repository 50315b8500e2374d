"""Operators' view of the dead-letter path: counts, list, show, retry, purge (DESIGN.md §6)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import attrs
import redis

from ._deadletter import ParkedEntry
from ._holdkey import follower_member, release
from ._keys import GroupKeys, id_order
from ._scripts import Scripts
from ._server import server_ms
from .exceptions import MalformedRecord


@attrs.frozen(kw_only=True)
class DeadLetterCounts:
    parked: int
    """Entries in the delay set (waiting for, or being worked on by, a fixer)."""
    followers: int
    """Hold-key mode: entries parked behind a holder (they return with it)."""
    claimed: int
    """Entries fixers hold under a visibility lease right now."""
    graveyard: int
    """Entries the fixer gave up on."""
    held_keys: int
    """Hold-key mode: ordering keys held right now."""
    next_due_ms: int | None
    """Milliseconds until the next entry is due on the server clock (negative: overdue);
    None when nothing is parked."""


@attrs.frozen(kw_only=True)
class ListedEntry:
    entry: ParkedEntry | None
    """None when the record is malformed (``error`` says why)."""
    id: str
    due_in_ms: int | None
    """Relative to the server clock; None for a follower (not scheduled)."""
    claimed_by: str | None
    error: str | None = None


class DeadLetters:
    """The parked entries and the graveyard of one (stream, group)."""

    def __init__(self, client: redis.Redis, stream: str, group: str) -> None:
        self._client = client
        self.stream = stream
        self.group = group
        self.keys = GroupKeys(stream, group)

    def counts(self) -> DeadLetterCounts:
        keys = self.keys
        pipe = self._client.pipeline(transaction=False)
        pipe.zcard(keys.delay)
        pipe.hlen(keys.parked)
        pipe.hgetall(keys.claims)
        pipe.xlen(keys.graveyard)
        pipe.hlen(keys.held)
        pipe.zrange(keys.delay, 0, 0, withscores=True)
        pipe.time()
        parked, records, claims, graveyard, held, first, time_reply = pipe.execute()
        now = server_ms(self._client, time_reply)
        claimed = 0
        for value in claims.values():
            until = int(value.split()[0])
            if until > now:
                claimed += int(self._client.zcount(keys.delay, until, until))
        return DeadLetterCounts(parked=parked, followers=max(records - parked, 0),
                                claimed=claimed, graveyard=graveyard, held_keys=held,
                                next_due_ms=int(first[0][1]) - now if first else None)

    def entries(self, limit: int = 50, offset: int = 0) -> list[ListedEntry]:
        """Parked entries by due time, then followers (hold-key mode) by id."""
        keys = self.keys
        now = server_ms(self._client)
        scored: list[Any] = self._client.zrange(keys.delay, offset, offset + limit - 1,
                                                withscores=True)
        due = {member.decode(): int(score) for member, score in scored}
        ids = list(due)
        if len(ids) < limit:
            # followers: records without a delay-set member
            extra: list[str] = []
            everything: list[Any] = self._client.hkeys(keys.parked)
            for start in range(0, len(everything), 1000):  # one ZMSCORE per 1000 records
                chunk = everything[start:start + 1000]
                scores: list[Any] = self._client.zmscore(keys.delay, chunk)
                extra += [raw_id.decode() for raw_id, score in zip(chunk, scores, strict=True)
                          if score is None]
            ids += sorted(extra, key=id_order)[: limit - len(ids)]
        return self._describe(ids, due, now)

    def _describe(self, ids: list[str], due: dict[str, int], now: int) -> list[ListedEntry]:
        if not ids:
            return []
        records: list[Any] = self._client.hmget(self.keys.parked, ids)
        claims: dict[bytes, bytes] = self._client.hgetall(self.keys.claims)  # type: ignore[assignment]
        holder = {int(v.split()[0]): k.decode() for k, v in claims.items()}
        out = []
        for entry_id, record in zip(ids, records, strict=True):
            score = due.get(entry_id)
            claimed_by = holder.get(score) if score is not None and score > now else None
            try:
                entry: ParkedEntry | None = ParkedEntry.from_json(entry_id, record)
                error = None
            except MalformedRecord as err:
                entry, error = None, str(err)
            out.append(ListedEntry(entry=entry, id=entry_id, error=error, claimed_by=claimed_by,
                                   due_in_ms=score - now if score is not None else None))
        return out

    def show(self, entry_id: str) -> ListedEntry | None:
        """One parked entry, or None when it is not parked."""
        score = self._client.zscore(self.keys.delay, entry_id)
        if score is None and not self._client.hexists(self.keys.parked, entry_id):
            return None
        due = {entry_id: int(score)} if score is not None else {}
        return self._describe([entry_id], due, server_ms(self._client))[0]

    def graveyard(self, limit: int = 50) -> list[dict[str, Any]]:
        """The most recent buried entries: graveyard id, original id, reason, record."""
        rows: Any = self._client.xrevrange(self.keys.graveyard, count=limit)
        out = []
        for gid, fields in rows:
            out.append({"graveyard_id": gid.decode(),
                        **{k.decode(): v.decode("utf-8", "replace") for k, v in fields.items()}})
        return out

    def retry(self, ids: Iterable[str] | None = None) -> int:
        """Make parked entries due now (all of them when ``ids`` is None) and wake the fixers.
        Followers are not scheduled on their own: retry their holder."""
        keys = self.keys
        chosen = list(ids) if ids is not None else [
            m.decode() for m in self._client.zrange(keys.delay, 0, -1)]  # type: ignore[union-attr]
        changed = 0
        for start in range(0, len(chosen), 1000):
            chunk = chosen[start:start + 1000]
            pipe = self._client.pipeline(transaction=True)
            pipe.zadd(keys.delay, dict.fromkeys(chunk, 0), xx=True, ch=True)
            pipe.xadd(keys.signal, {"due": 0}, maxlen=100, approximate=True)
            changed += int(pipe.execute()[0])
        return changed

    def purge(self, ids: Iterable[str] | None = None) -> int:
        """Drop parked entries for good (all when ``ids`` is None).  In hold-key mode, purging a
        holder releases its followers behind it, in order."""
        keys = self.keys
        chosen = list(ids) if ids is not None else [
            m.decode() for m in self._client.zrange(keys.delay, 0, -1)]  # type: ignore[union-attr]
        scripts = Scripts(self._client)
        purged = 0
        for entry_id in chosen:
            record = self._client.hget(keys.parked, entry_id)
            try:
                entry = ParkedEntry.from_json(entry_id, record)
            except MalformedRecord:
                entry = ParkedEntry(id=entry_id, origin_id=entry_id, group=self.group,
                                    reason="malformed", raw={})
            if entry.role == "follower" and entry.hold_key is not None:
                pipe = self._client.pipeline(transaction=True)
                pipe.zrem(keys.followers(entry.hold_key), follower_member(entry))
                pipe.hdel(keys.parked, entry_id)
                purged += int(pipe.execute()[1])
                continue
            for _ in range(50):  # 'notyet': the owner has not passed the key's last release
                status, _count = release(self._client, scripts, keys, entry, [], "purge",
                                         "purged by an operator", token="")
                if status != "notyet":
                    break
                time.sleep(0.1)
            purged += status == "ok"
        return purged
