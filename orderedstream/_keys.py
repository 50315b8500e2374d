"""Every Redis key orderedstream uses, and nowhere else.

All keys of one stream share one Redis Cluster hash slot (so every multi-key script stays
legal on a cluster): if the stream key carries a hash tag (``{...}``) the auxiliary keys reuse
it, otherwise the whole stream key becomes the tag, so ``orders`` and ``os:{orders}:...``
hash alike.  ``tests/test_keys.py`` pins the names.
"""

from __future__ import annotations

import attrs

from .exceptions import ConfigError


def hash_tag(stream: str) -> str:
    """The part of ``stream`` Redis Cluster hashes: its ``{tag}`` if it has one, else all of it."""
    start = stream.find("{")
    if start != -1:
        end = stream.find("}", start + 1)
        if end > start + 1:
            return stream[start + 1 : end]
    if "}" in stream:
        raise ConfigError(
            f"stream key {stream!r} contains '}}' but no hash tag; orderedstream cannot put its "
            "keys in the same cluster slot. Rename the stream, or give it a tag like 'orders{o}'."
        )
    return stream


def id_order(entry_id: str) -> tuple[int, int]:
    """A stream id ('ms-seq') as a sortable pair (the same order as lua/lib/ids.lua's before)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@attrs.frozen
class GroupKeys:
    """Keys of one (stream, group)."""

    stream: str
    group: str
    prefix: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "prefix", f"os:{{{hash_tag(self.stream)}}}:g:{self.group}:")

    @property
    def lease(self) -> str:
        """String ``<consumer>:<epoch>`` with a PX expiry: who owns the group now."""
        return self.prefix + "lease"

    @property
    def epoch(self) -> str:
        """Counter, INCR'd on every acquisition: the fencing epoch."""
        return self.prefix + "epoch"

    @property
    def owner(self) -> str:
        """Hash describing the current term: consumer, epoch, connection id/name, host, pid."""
        return self.prefix + "owner"

    @property
    def members(self) -> str:
        """Hash: consumer name -> JSON (role, pid, host, connection name, since): who is
        there, for operators (``orderedstream status``).  Liveness is never read from it."""
        return self.prefix + "members"

    @property
    def events(self) -> str:
        """Capped stream: the failover timeline, and the wake-up signal standbys block on."""
        return self.prefix + "events"

    @property
    def delay(self) -> str:
        """Sorted set of parked entry ids, scored by due time (server clock, ms)."""
        return self.prefix + "delay"

    @property
    def parked(self) -> str:
        """Hash: parked entry id -> JSON payload and metadata."""
        return self.prefix + "parked"

    @property
    def claims(self) -> str:
        """Hash: fixer name -> '<until_ms> <count>' of its latest claim (for operators; a
        claimed entry's own delay-set score is its visibility lease and claim token)."""
        return self.prefix + "claims"

    @property
    def signal(self) -> str:
        """Capped stream: wakes fixers when an entry is parked or made due earlier."""
        return self.prefix + "signal"

    @property
    def graveyard(self) -> str:
        """Stream of entries the fixer gave up on, with their history, for a person."""
        return self.prefix + "graveyard"

    @property
    def held(self) -> str:
        """Hash: ordering key -> ``<holder id> <holder origin id>`` while the entry holding it
        is parked, ``tail:<holder id>:<last id>:<holder origin id>`` once the fixer re-streamed
        it and its followers up to ``<last id>`` (hold-key mode; see lua/hold.lua)."""
        return self.prefix + "held"

    def followers(self, key: str) -> str:
        """List: ids of the entries parked behind the holder of ordering key ``key``, in order
        (hold-key mode)."""
        return f"{self.prefix}followers:{key}"

    def all(self) -> list[str]:
        """Every auxiliary key (not the user's stream)."""
        return [self.lease, self.epoch, self.owner, self.members, self.events, self.delay,
                self.parked,
                self.claims, self.signal, self.graveyard, self.held]


@attrs.frozen
class TopicGroupKeys:
    """Keys of one consumer group of a partitioned topic (membership, timeline), in the
    topic's own slot; each partition's keys are :class:`GroupKeys` of its stream."""

    topic: str
    group: str
    prefix: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "prefix", f"os:{{t:{self.topic}}}:tg:{self.group}:")

    @property
    def members(self) -> str:
        """Sorted set: member name -> expiry (server clock, ms): who is alive."""
        return self.prefix + "members"

    @property
    def conns(self) -> str:
        """Hash: member name -> ``<conn id> <conn name> <server run id>`` of its heartbeat
        connection to this slot's node (watched: a member whose connection is gone is gone)."""
        return self.prefix + "conns"

    @property
    def events(self) -> str:
        """Capped stream: the rebalance timeline (joined, left, gone, expired, released), and
        what wakes every member."""
        return self.prefix + "events"
