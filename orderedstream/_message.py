"""The message a handler receives."""

from __future__ import annotations

from collections.abc import Mapping

import attrs


@attrs.frozen(kw_only=True)
class Message:
    """One stream entry handed to the handler.

    ``epoch`` is the owner's fencing epoch: pass it to downstream systems so they can refuse a
    write from a former owner (a higher epoch always wins).  ``delivery_count`` is the server's
    count of deliveries to any consumer of the group; ``redelivered`` means this entry may have
    been seen before (by a consumer that died, or by this one before a reconnect).
    """

    id: str
    fields: Mapping[str, str]
    raw: Mapping[bytes, bytes]
    stream: str
    group: str
    epoch: int
    delivery_count: int = 1
    attempt: int = 1

    @property
    def redelivered(self) -> bool:
        return self.delivery_count > 1

    @property
    def repaired(self) -> bool:
        """True for an entry the fixer re-streamed after it was parked."""
        return "os-origin-id" in self.fields
