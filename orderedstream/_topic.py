"""Partitioned topics: P partition streams, each an ordinary orderedstream stream, and the
producers that route an entry to its key's partition.

A topic's metadata (one hash in the topic's own slot, :attr:`TopicKeys.meta`) holds its
partition count, routing hash and partition stream names; it is written once
(:func:`create_topic`, idempotent with the same P, :class:`TopicMismatch` with another) and every
producer and member reads the names from it.

Routing (:func:`partition_for`) is ``crc32(utf8(key)) % P`` with zlib's CRC-32 (the IEEE
polynomial: ``zlib.crc32`` in Python, ``java.util.zip.CRC32``, Go's ``crc32.ChecksumIEEE``), so a
producer in any language can compute it.  The same key always lands in the same partition.
(Kafka's murmur2 was measured too: on the demo's keys ``k0..k63`` it left one of 8 partitions
without a key and put 12 keys on another; CRC-32 put 7 to 9 on each, and runs in C.)
"""

from __future__ import annotations

import inspect
import json
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import attrs
import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.connection
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.crc import key_slot

from ._keys import GroupKeys, TopicKeys, check_topic_name, partition_streams
from ._producer import Fields, append, entry_ids
from ._scripts import script_text
from ._server import AnyClient, client_name, clone_any, connect_url, describe_url
from .exceptions import ConfigError, TopicMismatch, TopicMissing

HASH_NAME = "crc32"
META_VERSION = "1"

Key = str | bytes


def partition_for(key: Key, partitions: int) -> int:
    """The partition of ``key`` among ``partitions``: ``crc32(utf8(key)) % P`` (zlib's CRC-32,
    the IEEE one of Ethernet, gzip and PNG; an unsigned 32-bit value)."""
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    data = key.encode() if isinstance(key, str) else bytes(key)
    return zlib.crc32(data) % partitions


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@attrs.frozen
class Topic:
    """A topic as its metadata describes it."""

    name: str
    partitions: int
    streams: tuple[str, ...]
    hash: str = HASH_NAME
    created_ms: int = 0

    def partition_for(self, key: Key) -> int:
        return partition_for(key, self.partitions)

    def stream_for(self, key: Key) -> str:
        """The partition stream ``key``'s entries go to."""
        return self.streams[partition_for(key, self.partitions)]

    def group_keys(self, partition: int, group: str) -> GroupKeys:
        """The keys of ``group`` on one partition (lease, epoch, delay set...)."""
        return GroupKeys(self.streams[partition], group)

    def as_dict(self) -> dict[str, Any]:
        return {"topic": self.name, "partitions": self.partitions, "hash": self.hash,
                "created_ms": self.created_ms, "streams": list(self.streams)}


def _parse(name: str, partitions: Any, hash_name: Any, streams: Any, created: Any) -> Topic:
    try:
        count = int(_text(partitions))
        names = json.loads(_text(streams))
        if not isinstance(names, list) or len(names) != count:
            raise ValueError("streams do not match the partition count")
        return Topic(name, count, tuple(str(s) for s in names), _text(hash_name) or HASH_NAME,
                     int(_text(created or 0)))
    except (ValueError, TypeError) as err:
        raise ConfigError(f"the metadata of topic {name!r} ({TopicKeys(name).meta}) is damaged "
                          f"({err}); it was not written by orderedstream") from err


def create_topic(client: AnyClient, name: str, partitions: int) -> Topic:
    """Create topic ``name`` with ``partitions`` partitions, or return it if it exists with
    that many; :class:`TopicMismatch` if it exists with another count (or routing hash).
    Atomic (one script on the topic's metadata key): two creators agree on one topic."""
    check_topic_name(name)
    streams = partition_streams(name, partitions)
    script = client.register_script(script_text("topic_create"))
    reply: Any = script(keys=[TopicKeys(name).meta],
                        args=[partitions, HASH_NAME, json.dumps(streams), META_VERSION],
                        client=client)
    topic = _parse(name, *reply[1:])
    if topic.partitions != partitions:
        raise TopicMismatch(name, topic.partitions, partitions)
    if topic.hash != HASH_NAME:
        raise TopicMismatch(name, topic.partitions, partitions, detail=(
            f"topic {name!r} routes keys with {topic.hash!r}, which this version of "
            f"orderedstream does not know (it routes with {HASH_NAME!r}); a producer using "
            "another hash would break per-key order. Upgrade orderedstream."))
    return topic


def load_topic(client: AnyClient, name: str) -> Topic:
    """The topic's metadata; :class:`TopicMissing` if it was never created."""
    check_topic_name(name)
    values: Any = client.hmget(TopicKeys(name).meta,
                               ["partitions", "hash", "streams", "created_ms"])
    if values[0] is None:
        raise TopicMissing(name)
    topic = _parse(name, *values)
    if topic.hash != HASH_NAME:
        raise TopicMismatch(name, topic.partitions, topic.partitions, detail=(
            f"topic {name!r} routes keys with {topic.hash!r}, which this version of "
            f"orderedstream does not know (it routes with {HASH_NAME!r}). Upgrade orderedstream."))
    return topic


@attrs.frozen
class PartitionInfo:
    """One partition for ``topic describe``: its stream, slot, the node serving it, length."""

    index: int
    stream: str
    slot: int
    node: str
    length: int


@attrs.frozen
class TopicDescription:
    topic: Topic
    partitions: tuple[PartitionInfo, ...]
    cluster: bool

    def as_dict(self) -> dict[str, Any]:
        out = self.topic.as_dict()
        del out["streams"]
        out["cluster"] = self.cluster
        out["partition_list"] = [attrs.asdict(p) for p in self.partitions]
        return out


def _node_of(client: AnyClient, stream: str) -> str:
    if isinstance(client, redis.RedisCluster):
        node = client.get_node_from_key(stream)  # type: ignore[no-untyped-call]
        return f"{node.host}:{node.port}"
    return describe_url(client).split("://", 1)[1].rsplit("/", 1)[0]


def describe_topic(client: AnyClient, name: str) -> TopicDescription:
    """P, routing hash, and for each partition its stream, slot, node and length."""
    topic = load_topic(client, name)
    pipe = client.pipeline(transaction=False)
    for stream in topic.streams:
        pipe.xlen(stream)
    lengths: Any = pipe.execute()
    parts = tuple(PartitionInfo(i, s, key_slot(s.encode()), _node_of(client, s), int(n))
                  for i, (s, n) in enumerate(zip(topic.streams, lengths, strict=True)))
    return TopicDescription(topic, parts, isinstance(client, redis.RedisCluster))


# -- producers ------------------------------------------------------------------------------

class TopicProducer:
    """Appends entries to a topic, each to its key's partition (:func:`partition_for`), on a
    cluster or a single server.  ``send`` one entry, ``send_many`` in one pipelined round trip
    (per node, on a cluster); like :class:`~orderedstream.Producer`, no automatic retry (a
    retried XADD can write an entry twice).  Entries of one key keep the order they were sent
    in; entries of different keys in different partitions have no order between them."""

    client: AnyClient
    """The producer's own client (no automatic retries)."""

    def __init__(self, client: AnyClient, topic: str | Topic, *, maxlen: int | None = None,
                 socket_timeout_s: float = 5.0) -> None:
        self.client = clone_any(client, name="os:producer", socket_timeout_s=socket_timeout_s)
        try:
            self.topic = topic if isinstance(topic, Topic) else load_topic(self.client, topic)
        except BaseException:
            self.client.close()
            raise
        self._maxlen = maxlen

    @classmethod
    def from_url(cls, url: str, topic: str, *, maxlen: int | None = None) -> TopicProducer:
        client = connect_url(url)
        try:
            return cls(client, topic, maxlen=maxlen)
        finally:
            client.close()

    def send(self, fields: Fields, *, key: Key) -> str:
        """Append one entry to ``key``'s partition; returns its id."""
        return entry_ids([append(self.client, self.topic.stream_for(key), fields,
                                 self._maxlen)])[0]

    def send_many(self, batch: Iterable[tuple[Key, Fields]]) -> list[str]:
        """Append many ``(key, fields)`` entries, each to its key's partition, in one pipelined
        round trip per node (no MULTI); ids in the order given."""
        pipe = self.client.pipeline(transaction=False)
        for key, fields in batch:
            append(pipe, self.topic.stream_for(key), fields, self._maxlen)
        return entry_ids(pipe.execute())

    def close(self) -> None:
        self.client.close()


AsyncAnyClient = redis.asyncio.Redis | redis.asyncio.RedisCluster


def async_clone_any(client: AsyncAnyClient, *, name: str,
                    socket_timeout_s: float = 5.0) -> AsyncAnyClient:
    """An asyncio client of our own to the same server or cluster: RESP2 bytes replies, an
    explicit socket timeout, no automatic retry (a cluster's MOVED / ASK still followed)."""
    if not isinstance(client, redis.asyncio.RedisCluster):
        from ._aio import async_clone

        return async_clone(client, name=name, socket_timeout_s=socket_timeout_s)
    accepted = inspect.signature(redis.asyncio.RedisCluster).parameters
    kwargs = {k: v for k, v in client.connection_kwargs.items()
              if k in accepted and (k.startswith("ssl_") or k in (
                  "username", "password", "credential_provider", "socket_connect_timeout",
                  "socket_keepalive", "socket_keepalive_options", "health_check_interval"))}
    if issubclass(client.connection_kwargs.get("connection_class", object),
                  redis.asyncio.connection.SSLConnection):
        kwargs["ssl"] = True
    known = client.get_nodes() or list(client.nodes_manager.startup_nodes.values())
    nodes = [redis.asyncio.cluster.ClusterNode(n.host, n.port) for n in known]
    return redis.asyncio.RedisCluster(
        startup_nodes=nodes, retry=redis.asyncio.retry.Retry(NoBackoff(), 0), protocol=2,
        decode_responses=False,
        socket_timeout=socket_timeout_s, client_name=client_name(name), **kwargs)


class AsyncTopicProducer:
    """:class:`TopicProducer` for asyncio (``redis.asyncio.Redis`` or ``RedisCluster``): the
    topic's metadata is read on the first send."""

    def __init__(self, client: AsyncAnyClient, topic: str | Topic, *,
                 maxlen: int | None = None, socket_timeout_s: float = 5.0) -> None:
        self.client = async_clone_any(client, name="os:producer",
                                      socket_timeout_s=socket_timeout_s)
        self._topic = topic if isinstance(topic, Topic) else None
        self._name = topic.name if isinstance(topic, Topic) else topic
        check_topic_name(self._name)
        self._maxlen = maxlen

    async def topic(self) -> Topic:
        """The topic's metadata (read once)."""
        if self._topic is None:
            values: Any = await self.client.hmget(TopicKeys(self._name).meta,
                                                  ["partitions", "hash", "streams",
                                                   "created_ms"])
            if values[0] is None:
                raise TopicMissing(self._name)
            topic = _parse(self._name, *values)
            if topic.hash != HASH_NAME:
                raise TopicMismatch(self._name, topic.partitions, topic.partitions, detail=(
                    f"topic {self._name!r} routes keys with {topic.hash!r}, which this "
                    "version of orderedstream does not know. Upgrade orderedstream."))
            self._topic = topic
        return self._topic

    async def send(self, fields: Fields, *, key: Key) -> str:
        """Append one entry to ``key``'s partition; returns its id."""
        topic = await self.topic()
        return entry_ids([await append(self.client, topic.stream_for(key), fields,
                                       self._maxlen)])[0]

    async def send_many(self, batch: Iterable[tuple[Key, Fields]]) -> list[str]:
        """Append many ``(key, fields)`` entries, one pipelined round trip per node."""
        topic = await self.topic()
        pipe = self.client.pipeline(transaction=False)
        for key, fields in batch:
            append(pipe, topic.stream_for(key), fields, self._maxlen)
        return entry_ids(await pipe.execute())

    async def aclose(self) -> None:
        await self.client.aclose()


def fields_key(fields: Mapping[Any, Any], field: str) -> Key:
    """The routing key of a user entry: the value of its field ``field`` (``--key-field``)."""
    value = fields.get(field, fields.get(field.encode()))
    if value is None:
        raise ConfigError(f"entry has no field {field!r} to route it by: {dict(fields)!r}")
    return value if isinstance(value, str | bytes) else str(value)
