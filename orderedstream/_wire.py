"""orderedstream's wire format beyond key names (those are in :mod:`._keys`): the ``os-*``
headers it puts on entries it appends to a user's stream, and the fields of the records it
appends to its own streams (the timeline, the graveyard, the fixers' signal).  The Lua scripts
write the same names; ``tests/test_wire.py`` pins both sides.

Headers come first in an entry, so a reader can tell a copy for another group by its first field.
"""

from __future__ import annotations

HEADER_PREFIX = b"os-"
"""Field names that start with this are orderedstream's; a user's entry must not use them."""

FOR = b"os-for"
"""First field of a copy the fixer appended: the group it is for (other groups ack it unseen:
they handled the original)."""
ORIGIN_ID = b"os-origin-id"
"""The stream id the message first had (kept across repairs and hold-key moves)."""
PARKED = b"os-parked"
"""How many times the message has been parked so far."""
REPAIRED = b"os-repaired"
"""Present (``1``) on a copy the fixer repaired and re-streamed."""
HOLD_GEN = b"os-hold-gen"
"""Hold-key mode: the id of the parked holder whose release appended this copy."""

HEADERS = (FOR, ORIGIN_ID, PARKED, REPAIRED, HOLD_GEN)


class Timeline:
    """Fields of the group's events stream (the failover timeline; standbys block on it)."""

    TYPE = "type"
    CONSUMER = "consumer"
    EPOCH = "epoch"
    TS_MS = "ts_ms"
    BY = "by"
    REASON = "reason"
    CLAIMED = "claimed"
    DELETED = "deleted"
    TRIMMED = "trimmed"
    DURATION_MS = "duration_ms"

    FIELDS = (TYPE, CONSUMER, EPOCH, TS_MS, BY, REASON, CLAIMED, DELETED, TRIMMED, DURATION_MS)
    TYPES = ("acquired", "takeover", "released", "ended", "stalled")
    """'acquired' a new term; 'takeover' its claims done; 'released' a clean stop handed the
    lease over; 'ended' a standby ended a term whose owner's connection was gone; 'stalled' an
    owner gave its lease up because its handler ran past the handler timeout."""


class Rebalance:
    """Fields of a topic group's timeline (``TopicGroupKeys.events``; members block on it)."""

    TYPE = "type"
    MEMBER = "member"
    BY = "by"
    REASON = "reason"
    TS_MS = "ts_ms"
    PARTITIONS = "partitions"
    VERSION = "version"

    FIELDS = (TYPE, MEMBER, BY, REASON, TS_MS, PARTITIONS, VERSION)
    TYPES = ("joined", "left", "gone", "expired", "assigned", "released")
    """'joined' a member's first heartbeat; 'left' a clean stop; 'gone' another member found its
    heartbeat connection gone; 'expired' its membership ran out on the server's clock;
    'assigned' ``member`` stored the next target (its ``version``), moving ``partitions``;
    'released' ``member``
    handed ``partitions`` (comma-separated) over to their new targets."""


class Graveyard:
    """Fields of a graveyard entry: the parked id, why it was buried, its whole record (JSON)."""

    ID = "id"
    REASON = "reason"
    RECORD = "record"

    FIELDS = (ID, REASON, RECORD)


SIGNAL_DUE = "due"
"""The one field of the fixers' signal stream: when (server ms) something became due."""
