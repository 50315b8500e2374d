"""The demo's payloads: what ``orderedstream produce`` writes, what the demo handler rejects, and
the demo repair that turns a rejected payload back into a valid one."""

from __future__ import annotations

from ._deadletter import ParkedEntry

CORRUPT_PREFIX = "CORRUPT:"


def demo_payload(seq: int, corrupt: bool) -> dict[str, str]:
    body = f"order-{seq}"
    return {"seq": str(seq), "payload": CORRUPT_PREFIX + body[::-1] if corrupt else body}


def is_corrupt(payload: str) -> bool:
    return payload.startswith(CORRUPT_PREFIX)


def demo_repair(entry: ParkedEntry) -> dict[str, str]:
    """The demo's repair: turns a corrupted demo payload back into the valid one."""
    fields = entry.fields
    payload = fields.get("payload", "")
    if is_corrupt(payload):
        fields["payload"] = payload[len(CORRUPT_PREFIX):][::-1]
    return fields
