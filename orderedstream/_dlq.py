"""Operators' view of the dead-letter path: counts, list, show, retry, purge, and the graveyard:
list, requeue, purge (DESIGN.md §6)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import attrs
import redis

from . import _wire as wire
from ._deadletter import ParkedEntry
from ._holdkey import follower_member, release
from ._keys import GroupKeys, id_order
from ._scripts import Scripts
from ._server import AnyClient, node_client, server_ms
from .exceptions import ConfigError, MalformedRecord


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def check_group(client: redis.Redis, stream: str, group: str) -> None:
    """Raise :class:`ConfigError` naming what is missing when ``stream`` is not a stream or has
    no group ``group`` (a mistyped ``--group`` or ``--stream``)."""
    kind = _text(client.type(stream))
    if kind == "none":
        raise ConfigError(f"stream {stream!r} does not exist (nothing produced to it yet, or a "
                          "mistyped --stream?)")
    if kind != "stream":
        raise ConfigError(f"key {stream!r} holds a {kind}, not a stream: check --stream")
    groups: Any = client.xinfo_groups(stream)
    names = sorted(_text(g["name"]) for g in groups)
    if group not in names:
        raise ConfigError(f"group {group!r} does not exist on stream {stream!r}; groups: "
                          f"{', '.join(names) or 'none'}")


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
    """The parked entries and the graveyard of one (stream, group).  A partitioned topic's:
    one per partition (:meth:`of_topic`)."""

    def __init__(self, client: redis.Redis, stream: str, group: str) -> None:
        self._client = client
        self.stream = stream
        self.group = group
        self.keys = GroupKeys(stream, group)

    @classmethod
    def of_topic(cls, client: AnyClient, streams: Iterable[str],
                 group: str) -> list[DeadLetters]:
        """One per partition stream of a topic (``Topic.streams``, in partition order), each
        on the server, or the cluster node, that serves its slot (``client``'s own connection
        pool to that node: closing ``client`` closes them)."""
        return [cls(node_client(client, stream), stream, group) for stream in streams]

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

    def exists(self) -> bool:
        """Whether anything of the dead-letter path exists for this group."""
        keys = self.keys
        return bool(self._client.exists(keys.delay, keys.parked, keys.graveyard))

    def retry(self, ids: Iterable[str] | None = None) -> int:
        """Make parked entries due now on the server's clock (all of them when ``ids`` is None)
        and wake the fixers.  Followers are not scheduled on their own: retry their holder."""
        keys = self.keys
        chosen = list(ids) if ids is not None else [
            m.decode() for m in self._client.zrange(keys.delay, 0, -1)]  # type: ignore[union-attr]
        changed = 0
        for start in range(0, len(chosen), 1000):
            chunk = chosen[start:start + 1000]
            scores: list[Any] = self._client.zmscore(keys.delay, chunk)
            now = server_ms(self._client)
            due = {m: now for m, score in zip(chunk, scores, strict=True)
                   if score is not None and score > now}
            changed += sum(1 for m, score in zip(chunk, scores, strict=True)
                           if score is not None and score <= now)  # due already
            if not due:
                continue
            pipe = self._client.pipeline(transaction=True)
            pipe.zadd(keys.delay, due, xx=True, ch=True)
            pipe.xadd(keys.signal, {wire.SIGNAL_DUE: now}, maxlen=100, approximate=True)
            changed += int(pipe.execute()[0])
        return changed

    def _buried(self, ids: Iterable[str] | None) -> list[tuple[str, dict[str, str]]]:
        """(graveyard id, fields) of the chosen buried entries (by graveyard id or entry id),
        oldest first; all when ``ids`` is None."""
        rows: Any = self._client.xrange(self.keys.graveyard)
        wanted = None if ids is None else set(ids)
        out = []
        for gid, fields in rows:
            gid_text = gid.decode()
            decoded = {_text(k): _text(v) for k, v in fields.items()}
            if wanted is None or gid_text in wanted or decoded.get(wire.Graveyard.ID) in wanted:
                out.append((gid_text, decoded))
        return out

    def requeue(self, ids: Iterable[str] | None = None) -> tuple[int, list[str]]:
        """Put buried entries (by entry id or graveyard id; all when ``ids`` is None) back into
        the delay set, due now on the server's clock, with their record: the fixer repairs and
        re-streams them as usual.  Their repair attempts and park count start again at zero (the
        history keeps why they were buried); a hold-key entry comes back as a plain one (its
        key was released when it was buried).  Returns (requeued, problems): entries whose
        record cannot be read or that are parked again already stay in the graveyard."""
        keys = self.keys
        requeued = 0
        problems: list[str] = []
        for gid, fields in self._buried(ids):
            entry_id = fields.get(wire.Graveyard.ID, "")
            try:
                entry = ParkedEntry.from_json(entry_id, fields.get(wire.Graveyard.RECORD))
            except MalformedRecord as err:
                problems.append(f"{entry_id or gid}: {err}")
                continue
            if self._client.hexists(keys.parked, entry_id):
                problems.append(f"{entry_id}: parked already")
                continue
            now = server_ms(self._client)
            history = (*entry.history, {"ms": now, "requeued": "from the graveyard",
                                        "buried": fields.get(wire.Graveyard.REASON, "")})
            back = attrs.evolve(entry, fixer_attempts=0, parked=0, hold_key=None,
                                role="plain", history=history)
            pipe = self._client.pipeline(transaction=True)
            pipe.hset(keys.parked, entry_id, back.to_json())
            pipe.zadd(keys.delay, {entry_id: now})
            pipe.xdel(keys.graveyard, gid)
            pipe.xadd(keys.signal, {wire.SIGNAL_DUE: now}, maxlen=100, approximate=True)
            pipe.execute()
            requeued += 1
        return requeued, problems

    def purge_graveyard(self, ids: Iterable[str] | None = None) -> int:
        """Drop buried entries for good (by entry id or graveyard id; all when None)."""
        if ids is None:
            count = int(self._client.xlen(self.keys.graveyard))
            self._client.delete(self.keys.graveyard)
            return count
        gids = [gid for gid, _ in self._buried(ids)]
        return int(self._client.xdel(self.keys.graveyard, *gids)) if gids else 0

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
