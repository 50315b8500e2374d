"""Every Redis key orderedstream uses, and nowhere else.

All keys of one stream share one Redis Cluster hash slot (so every multi-key script stays
legal on a cluster): if the stream key carries a hash tag (``{...}``) the auxiliary keys reuse
it, otherwise the whole stream key becomes the tag, so ``orders`` and ``os:{orders}:...``
hash alike.  ``tests/test_keys.py`` pins the names.
"""

from __future__ import annotations

import attrs
from redis.crc import key_slot

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


# -- partitioned topics ----------------------------------------------------------------------

CLUSTER_SLOTS = 16384
MAX_PARTITIONS = 1024


def check_topic_name(topic: str) -> None:
    """A topic name is any non-empty text without ``{`` or ``}`` (orderedstream chooses the hash
    tag of every partition itself)."""
    if not topic or "{" in topic or "}" in topic:
        raise ConfigError(f"topic name {topic!r} is not allowed: give a non-empty name without "
                          "'{' or '}' (orderedstream picks each partition's cluster hash tag "
                          "itself)")


def partition_stream(topic: str, index: int, partitions: int) -> str:
    """Partition ``index``'s stream key, ``{<topic>:p<index>#<n>}``: the whole key is its hash
    tag, and ``n`` is the smallest counter that puts the key's slot in the ``index``-th of
    ``partitions`` equal slot ranges, ``[index*16384//P, (index+1)*16384//P)``.  So the P
    partitions spread evenly over any even contiguous split of the slots (a 3-shard cluster's
    default one included).  Stored in the topic's metadata at creation: a later change of this
    naming never renames an existing topic's partitions."""
    check_topic_name(topic)
    if not 0 <= index < partitions:
        raise ValueError(f"partition {index} out of range 0..{partitions - 1}")
    lo = index * CLUSTER_SLOTS // partitions
    hi = (index + 1) * CLUSTER_SLOTS // partitions
    n = 0
    while True:
        key = f"{{{topic}:p{index}#{n}}}"
        if lo <= key_slot(key.encode()) < hi:
            return key
        n += 1


def partition_streams(topic: str, partitions: int) -> list[str]:
    """Every partition's stream key, in partition order (see :func:`partition_stream`)."""
    if not 1 <= partitions <= MAX_PARTITIONS:
        raise ConfigError(f"partitions must be 1..{MAX_PARTITIONS}, got {partitions}")
    return [partition_stream(topic, i, partitions) for i in range(partitions)]


@attrs.frozen
class TopicKeys:
    """Keys of one topic (its partitions' own keys are :class:`GroupKeys` of each partition
    stream, in that stream's slot)."""

    topic: str = attrs.field()

    @topic.validator
    def _valid(self, _: object, value: str) -> None:
        check_topic_name(value)

    @property
    def meta(self) -> str:
        """Hash: partitions (P), hash (the routing hash's name), streams (JSON list of the
        partition stream keys), created_ms (server clock), version.  Written once."""
        return f"os:{{{self.topic}}}:topic"


@attrs.frozen
class TopicGroupKeys:
    """Keys of one (topic, group) that are not per partition, all in the topic's own slot."""

    topic: str
    group: str
    prefix: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        check_topic_name(self.topic)
        object.__setattr__(self, "prefix", f"os:{{{self.topic}}}:tg:{self.group}:")

    @property
    def members(self) -> str:
        """Sorted set: member name -> its liveness expiry (server clock, ms)."""
        return self.prefix + "members"

    @property
    def events(self) -> str:
        """Capped stream: the rebalance timeline (joins, leaves, targets, handoffs)."""
        return self.prefix + "events"

    @property
    def conns(self) -> str:
        """Hash: member name -> ``<conn id> <conn name> <server run id>`` of its heartbeat
        connection to this slot's node (watched: a member whose connection is gone is gone)."""
        return self.prefix + "conns"

    @property
    def assignment(self) -> str:
        """Hash: the current target (version, members, JSON member -> partitions), from which
        the next one is derived with ``_assign.rebalance`` (sticky moves)."""
        return self.prefix + "assignment"

    def all(self) -> list[str]:
        return [self.members, self.conns, self.events, self.assignment]
