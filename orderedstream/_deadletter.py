"""The dead-letter path's records: how a parked entry is stored and read back (DESIGN.md §6).

A parked entry is a member of the group's delay set (its stream id, scored by due time on the
server clock) plus a JSON record in the ``parked`` hash: the entry's own fields, exactly (a value
that is not UTF-8 is kept as ``{"b64": ...}``), without orderedstream's ``os-*`` headers, and the
metadata an operator needs.  A record that cannot be read back is a :class:`MalformedRecord`;
the fixer buries it (graveyard) instead of failing on it again and again.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping
from typing import Any

import attrs

from . import _wire as wire
from ._config import MIN_PARK_DELAY_MS
from ._events import EntryParked
from ._keys import GroupKeys
from ._scripts import ScriptOp, Scripts, defer_op
from .exceptions import MalformedRecord


def encode_fields(raw: Mapping[bytes, bytes]) -> list[list[Any]]:
    """Fields as JSON-safe pairs; bytes that are not UTF-8 become ``{"b64": ...}``."""

    def one(value: bytes) -> Any:
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode("ascii")}

    return [[one(k), one(v)] for k, v in raw.items()]


def decode_fields(pairs: list[list[Any]]) -> dict[bytes, bytes]:
    """Inverse of :func:`encode_fields`."""

    def one(value: Any) -> bytes:
        if isinstance(value, dict):
            return base64.b64decode(value["b64"], validate=True)
        if not isinstance(value, str):
            raise TypeError(f"field value {value!r} is neither a string nor {{'b64': ...}}")
        return value.encode("utf-8")

    try:  # the common case: every name and value is text
        return {k.encode(): v.encode() for k, v in pairs}
    except AttributeError:
        return {one(k): one(v) for k, v in pairs}


def to_bytes(value: str | bytes | int | float) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8")


@attrs.frozen(kw_only=True)
class ParkedEntry:
    """A parked entry as the fixer, a repair function and an operator see it."""

    id: str
    """The stream id it had when it was parked (its member in the delay set)."""
    origin_id: str
    """The id of the first stream entry of this message (kept across repairs)."""
    group: str
    reason: str
    raw: Mapping[bytes, bytes]
    """The entry's fields as they were, without orderedstream's ``os-*`` headers."""
    attempts: int = 1
    """Handler calls before it was parked."""
    parked: int = 1
    """How many times this message has been parked (2 = it failed again after a repair)."""
    fixer_attempts: int = 0
    """Failed repairs so far."""
    first_failure_ms: int = 0
    last_failure_ms: int = 0
    epoch: int = 0
    consumer: str = ""
    hold_key: str | None = None
    role: str = "plain"
    """'plain', 'holder' (of hold_key) or 'follower' (parked behind the holder of hold_key)."""
    history: tuple[Mapping[str, Any], ...] = ()
    """One record per failed repair: time (ms), error."""

    @property
    def fields(self) -> dict[str, str]:
        """Fields decoded as UTF-8 (undecodable bytes shown as U+FFFD; see ``raw``)."""
        return {k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
                for k, v in self.raw.items()}

    def to_json(self) -> str:
        return json.dumps({
            "id": self.id, "origin_id": self.origin_id, "group": self.group,
            "reason": self.reason, "attempts": self.attempts, "parked": self.parked,
            "fixer_attempts": self.fixer_attempts, "first_failure_ms": self.first_failure_ms,
            "last_failure_ms": self.last_failure_ms, "epoch": self.epoch,
            "consumer": self.consumer, "hold_key": self.hold_key, "role": self.role,
            "history": list(self.history), "fields": encode_fields(self.raw),
        }, separators=(",", ":"))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready view for operators (``dlq show --json``)."""
        out: dict[str, Any] = json.loads(self.to_json())
        out["fields"] = self.fields
        return out

    @classmethod
    def from_json(cls, entry_id: str, text: bytes | str | None) -> ParkedEntry:
        """Read a record back; :class:`MalformedRecord` says what is wrong with it."""
        if text is None:
            raise MalformedRecord(f"parked entry {entry_id} has no record")
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError("not a JSON object")
            return cls(
                id=entry_id, origin_id=str(data.get("origin_id") or entry_id),
                group=str(data["group"]), reason=str(data.get("reason", "")),
                raw=decode_fields(data["fields"]), attempts=int(data.get("attempts", 1)),
                parked=int(data.get("parked", 1)),
                fixer_attempts=int(data.get("fixer_attempts", 0)),
                first_failure_ms=int(data.get("first_failure_ms", 0)),
                last_failure_ms=int(data.get("last_failure_ms", 0)),
                epoch=int(data.get("epoch", 0)), consumer=str(data.get("consumer", "")),
                hold_key=data.get("hold_key"), role=str(data.get("role", "plain")),
                history=tuple(data.get("history") or ()))
        except (ValueError, TypeError, KeyError, AttributeError) as err:
            raise MalformedRecord(
                f"parked entry {entry_id} has a malformed record ({type(err).__name__}: {err})"
            ) from err

    def flat_fields(self) -> list[bytes]:
        out: list[bytes] = []
        for key, value in self.raw.items():
            out += [key, value]
        return out


def split_headers(raw: Mapping[bytes, bytes]) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """(user fields, orderedstream's os-* headers)."""
    fields: dict[bytes, bytes] = {}
    headers: dict[bytes, bytes] = {}
    for key, value in raw.items():
        (headers if key.startswith(wire.HEADER_PREFIX) else fields)[key] = value
    return fields, headers


class Parker:
    """Parks entries for one (stream, group) through the fenced ``defer`` script.  Every park
    waits at least ``min_delay_ms`` (``RetryPolicy.min_park_delay_ms``), so an entry that fails
    again at once after each repair cannot cycle park -> re-stream in a tight loop."""

    def __init__(self, scripts: Scripts, keys: GroupKeys, group: str,
                 min_delay_ms: int = MIN_PARK_DELAY_MS) -> None:
        self._scripts = scripts
        self._keys = keys
        self._group = group
        self._min_delay_ms = min_delay_ms

    def record(self, entry_id: str, raw: Mapping[bytes, bytes], reason: str, attempts: int,
               epoch: int, consumer: str, hold_key: str | None, role: str) -> ParkedEntry:
        fields, headers = split_headers(raw)
        origin = headers.get(wire.ORIGIN_ID)
        try:
            parked_before = int(headers.get(wire.PARKED, b"0"))
        except ValueError:
            parked_before = 0
        now_ms = int(time.time() * 1000)
        return ParkedEntry(
            id=entry_id, origin_id=origin.decode("utf-8", "replace") if origin else entry_id,
            group=self._group, reason=reason, raw=fields, attempts=attempts,
            parked=parked_before + 1, first_failure_ms=now_ms, last_failure_ms=now_ms,
            epoch=epoch, consumer=consumer, hold_key=hold_key, role=role)

    def park(self, token: str, epoch: int, consumer: str, entry_id: str,
             raw: Mapping[bytes, bytes], reason: str, delay_ms: int, attempts: int,
             stream: str, hold_key: str | None = None) -> ScriptOp[EntryParked]:
        """The fenced ``defer`` call that parks the entry and acks it (run it with a driver or
        :meth:`Scripts.do`); its reply is the :class:`EntryParked` event to emit."""
        record = self.record(entry_id, raw, reason, attempts, epoch, consumer, hold_key,
                             "holder" if hold_key is not None else "plain")
        op = defer_op(self._keys, token, entry_id, record.to_json(),
                      max(delay_ms, self._min_delay_ms), hold_key, record.origin_id)

        def parked(reply: Any) -> EntryParked:
            got = op_parse(reply)
            return EntryParked(stream=stream, group=self._group, consumer=consumer,
                               entry_id=entry_id, reason=reason, due_ms=got.due_ms,
                               held_key=hold_key, role=got.role)

        op_parse = op.parse
        return ScriptOp(op.name, op.keys, op.args, parked)


def claim_is_ours(pipe: Any, keys: GroupKeys, entry_id: str, token: str) -> bool:
    """The claim check of the fixer's scripts, for transactions (under WATCH): the entry's
    delay-set score is our claim's until_ms; an operator's command (token '') needs the entry
    merely parked."""
    if token == "":
        return bool(pipe.hexists(keys.parked, entry_id))
    score = pipe.zscore(keys.delay, entry_id)
    return score is not None and int(score) == int(token)
