"""The message a handler receives."""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from . import _wire as wire
from .exceptions import Undecodable


@attrs.frozen
class Term:
    """What every message of one batch shares: where it came from and the owner's epoch."""

    stream: str
    group: str
    epoch: int
    partition: int | None = None
    """The partition of a topic the entry came from (None: a plain stream)."""


class Message:
    """One stream entry handed to the handler (read-only).

    ``epoch`` is the owner's fencing epoch: pass it to downstream systems so they can refuse a
    write from a former owner (a higher epoch always wins).  ``delivery_count`` is the server's
    count of deliveries to consumers of the group; ``redelivered`` means this entry may have been
    seen before (by a consumer that died, or by this one before a reconnect).  ``fields`` (a
    ``str -> str`` mapping, decoded as UTF-8 on first access) and ``raw`` (the same as
    ``bytes -> bytes``) are the producer's fields only; the ``os-*`` headers orderedstream puts
    on a copy it re-streams are in ``headers``, and read through ``repaired`` and ``origin_id``.
    """

    __slots__ = ("_attempt", "_fields", "_flat", "_headers", "_id", "_raw", "_term",
                 "delivery_count")
    _attempt: int
    _fields: dict[str, str]
    _raw: dict[bytes, bytes]
    _headers: dict[bytes, bytes]

    def __init__(self, entry_id: bytes | str, flat: list[bytes], term: Term,
                 delivery_count: int = 1) -> None:
        # the hot path: four stores; the rest is derived on first access
        self._id = entry_id
        self._flat = flat
        self._term = term
        self.delivery_count = delivery_count

    @property
    def stream(self) -> str:
        return self._term.stream

    @property
    def group(self) -> str:
        return self._term.group

    @property
    def epoch(self) -> int:
        return self._term.epoch

    @property
    def partition(self) -> int | None:
        """The topic partition the entry came from (:class:`~orderedstream.TopicMember`); None
        for a plain stream."""
        return self._term.partition

    @property
    def attempt(self) -> int:
        """1 on the first call of the handler for this entry, 2 on its first retry, ..."""
        try:
            return self._attempt
        except AttributeError:
            return 1

    @classmethod
    def from_fields(cls, entry_id: str, fields: Mapping[str, str], *, stream: str = "stream",
                    group: str = "group", epoch: int = 1, delivery_count: int = 1) -> Message:
        """Build one by hand (for tests of your handler)."""
        flat: list[bytes] = []
        for key, value in fields.items():
            flat += [key.encode(), value.encode()]
        return cls(entry_id, flat, Term(stream, group, epoch), delivery_count)

    @property
    def id(self) -> str:
        entry_id = self._id
        return entry_id.decode() if isinstance(entry_id, bytes) else entry_id

    def _split(self) -> None:
        """Headers from fields: orderedstream's headers come first in an entry it appended
        (:mod:`._wire`), so an entry whose first field is not one has none."""
        flat = self._flat
        start = 0
        if flat and flat[0][:3] == wire.HEADER_PREFIX:
            while start < len(flat) and flat[start][:3] == wire.HEADER_PREFIX:
                start += 2
        self._headers = dict(zip(flat[:start:2], flat[1:start:2], strict=True))
        self._raw = dict(zip(flat[start::2], flat[start + 1::2], strict=True))

    @property
    def raw(self) -> Mapping[bytes, bytes]:
        """The producer's fields as bytes (without orderedstream's headers)."""
        try:
            return self._raw
        except AttributeError:
            self._split()
            return self._raw

    @property
    def headers(self) -> Mapping[bytes, bytes]:
        """orderedstream's ``os-*`` headers on a copy it re-streamed (empty on an entry as the
        producer wrote it): ``os-origin-id``, ``os-parked``, ``os-repaired``, ..."""
        try:
            return self._headers
        except AttributeError:
            self._split()
            return self._headers

    @property
    def wire_fields(self) -> Mapping[bytes, bytes]:
        """Every field as stored: the headers, then the producer's fields."""
        return {**self.headers, **self.raw}

    @property
    def fields(self) -> Mapping[str, str]:
        """The producer's fields, decoded as UTF-8 (:class:`Undecodable` parks an entry that is
        not)."""
        try:
            return self._fields
        except AttributeError:
            pass
        try:
            self._fields = {k.decode(): v.decode() for k, v in self.raw.items()}
        except UnicodeDecodeError as err:
            raise Undecodable(f"undecodable entry (not UTF-8): {err}", delay_ms=0) from err
        return self._fields

    @property
    def redelivered(self) -> bool:
        return self.delivery_count > 1

    @property
    def repaired(self) -> bool:
        """True for an entry the fixer repaired and re-streamed after it was parked."""
        return wire.REPAIRED in self.headers

    @property
    def origin_id(self) -> str:
        """The stream id this message first had: its own id, unless orderedstream re-streamed
        it (repaired, or held behind a parked entry of its ordering key)."""
        origin = self.headers.get(wire.ORIGIN_ID)
        return origin.decode("utf-8", "replace") if origin is not None else self.id

    def retry(self) -> Message:
        """The same entry for the next attempt."""
        again = Message(self._id, self._flat, self._term, self.delivery_count)
        again._attempt = self.attempt + 1
        return again

    def __repr__(self) -> str:
        return (f"Message(id={self.id!r}, epoch={self.epoch}, "
                f"delivery_count={self.delivery_count}, attempt={self.attempt})")
