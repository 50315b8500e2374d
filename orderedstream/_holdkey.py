"""Hold-key mode: per-key order across the dead-letter path (DESIGN.md §6).

While an entry with ordering key K is parked (its *holder*), later entries with key K are parked
behind it (*followers*); when the fixer re-streams the holder, its followers are appended behind
it in their original order, and anything of K still ahead of the owner is moved behind them.
Order within a key is the order of origin ids.  The server side is ``lua/hold.lua``,
``lua/defer.lua`` and ``lua/fix_release.lua`` with ``lua/lib/held.lua``; this is the owner's
side: the gate every entry of a possibly held key passes before the handler.
"""

from __future__ import annotations

from typing import Any

import redis

from . import _wire as wire
from ._deadletter import Parker
from ._events import Emit, EntryHeld
from ._keys import GroupKeys
from ._lease import Lease
from ._reader import check_lease
from ._scripts import Scripts


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

    def refresh(self, client: redis.Redis) -> None:
        """Learn which keys are held now (at the start of a term)."""
        held: list[Any] = client.hkeys(self._keys.held)
        self._held = {k.decode("utf-8", "replace") for k in held}

    def parked(self, key: str) -> None:
        """An entry of ``key`` was just parked: the key may be held now."""
        self._held.add(key)

    def key_of(self, raw: dict[bytes, bytes] | Any) -> str | None:
        value = raw.get(self.field)
        return value.decode("utf-8", "replace") if value is not None else None

    def admit(self, lease: Lease, entry_id: bytes, flat: list[bytes]) -> bool:
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
        reply = self._scripts.call(
            "hold", [keys.stream, keys.lease, keys.parked, keys.held, keys.followers(key),
                     keys.delay, keys.signal],
            [lease.token, keys.group, entry_id, key, generation, record.to_json(), origin,
             *user_fields])
        action = reply[0].decode()
        if action == "free":
            if int(reply[1]):
                self._held.discard(key)
            return True
        self._emit(EntryHeld, entry_id=entry_id.decode(), key=key, action=action,
                   new_id=reply[1].decode() if action == "forwarded" else None)
        return False
