"""The message a handler receives."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .exceptions import Defer


class Undecodable(Defer):
    """Raised on first access to ``Message.fields`` of an entry that is not UTF-8; the
    coordinator parks the entry with this reason (its raw bytes are kept)."""


class Message:
    """One stream entry handed to the handler (read-only).

    ``epoch`` is the owner's fencing epoch: pass it to downstream systems so they can refuse a
    write from a former owner (a higher epoch always wins).  ``delivery_count`` is the server's
    count of deliveries to consumers of the group; ``redelivered`` means this entry may have been
    seen before (by a consumer that died, or by this one before a reconnect).  ``fields`` are
    decoded as UTF-8 on first access; ``raw`` has the bytes.
    """

    __slots__ = ("_fields", "_flat", "_id", "_raw", "attempt", "delivery_count", "epoch",
                 "group", "stream")

    def __init__(self, entry_id: bytes | str, flat: list[bytes], stream: str, group: str,
                 epoch: int, delivery_count: int = 1, attempt: int = 1) -> None:
        self._id = entry_id
        self._flat = flat
        self._fields: dict[str, str] | None = None
        self._raw: dict[bytes, bytes] | None = None
        self.stream = stream
        self.group = group
        self.epoch = epoch
        self.delivery_count = delivery_count
        self.attempt = attempt

    @classmethod
    def from_fields(cls, entry_id: str, fields: Mapping[str, str], **kwargs: Any) -> Message:
        """Build one by hand (for tests of your handler)."""
        flat: list[bytes] = []
        for key, value in fields.items():
            flat += [key.encode(), value.encode()]
        return cls(entry_id, flat, **kwargs)

    @property
    def id(self) -> str:
        entry_id = self._id
        return entry_id.decode() if isinstance(entry_id, bytes) else entry_id

    @property
    def raw(self) -> Mapping[bytes, bytes]:
        if self._raw is None:
            flat = self._flat
            self._raw = dict(zip(flat[::2], flat[1::2], strict=True))
        return self._raw

    @property
    def fields(self) -> Mapping[str, str]:
        if self._fields is None:
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
        """True for an entry the fixer re-streamed after it was parked."""
        return b"os-origin-id" in self.raw

    def retry(self) -> Message:
        """The same entry for the next attempt."""
        return Message(self._id, self._flat, self.stream, self.group, self.epoch,
                       self.delivery_count, self.attempt + 1)

    def __repr__(self) -> str:
        return (f"Message(id={self.id!r}, epoch={self.epoch}, "
                f"delivery_count={self.delivery_count}, attempt={self.attempt})")
