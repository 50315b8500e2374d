"""Key names are pinned, and every key of a stream lands in the stream's cluster slot."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from orderedstream import ConfigError, GroupKeys, hash_tag
from orderedstream._keys import TopicGroupKeys, TopicKeys, partition_streams

GOLDEN_ORDERS_8 = ["{orders:p0#0}", "{orders:p1#43}", "{orders:p2#43}", "{orders:p3#0}",
                   "{orders:p4#42}", "{orders:p5#0}", "{orders:p6#0}", "{orders:p7#42}"]


def test_golden_names() -> None:
    """The key schema is part of the on-server format: changing it strands running systems."""
    k = GroupKeys("orders", "workers")
    assert k.lease == "os:{orders}:g:workers:lease"
    assert k.epoch == "os:{orders}:g:workers:epoch"
    assert k.owner == "os:{orders}:g:workers:owner"
    assert k.events == "os:{orders}:g:workers:events"
    assert k.members == "os:{orders}:g:workers:members"
    assert k.delay == "os:{orders}:g:workers:delay"
    assert k.parked == "os:{orders}:g:workers:parked"
    assert k.graveyard == "os:{orders}:g:workers:graveyard"
    assert k.claims == "os:{orders}:g:workers:claims"
    assert k.signal == "os:{orders}:g:workers:signal"
    assert k.held == "os:{orders}:g:workers:held"
    assert k.followers("cust-7") == "os:{orders}:g:workers:followers:cust-7"


def test_tagged_stream_reuses_its_tag() -> None:
    """A stream key with a hash tag keeps that tag for the auxiliary keys."""
    assert GroupKeys("app:{tenant7}:orders", "g").lease == "os:{tenant7}:g:g:lease"


def test_brace_without_tag_is_refused() -> None:
    """A key with '}' but no valid tag cannot be co-located; say so instead of misplacing keys."""
    with pytest.raises(ConfigError, match="hash tag"):
        hash_tag("odd}name")
    with pytest.raises(ConfigError):
        GroupKeys("{}x}", "g")


names = st.text(st.characters(blacklist_characters="}", blacklist_categories=("Cs",)),
                min_size=1, max_size=30)


@given(stream=names | st.builds(lambda a, t, b: f"{a}{{{t}}}{b}", names, names, names),
       group=names)
def test_all_keys_share_the_stream_slot(stream: str, group: str) -> None:
    """For any stream name (tagged or not) every auxiliary key hashes to the stream's slot."""
    keys = GroupKeys(stream, group)
    slot = key_slot(stream.encode())
    assert {key_slot(k.encode()) for k in keys.all()} == {slot}
    assert key_slot(keys.followers(group).encode()) == slot


def test_golden_topic_names() -> None:
    """A topic's keys and its partitions' stream names are on-server format: pinned."""
    assert TopicKeys("orders").meta == "os:{orders}:topic"
    tg = TopicGroupKeys("orders", "workers")
    assert tg.members == "os:{orders}:tg:workers:members"
    assert tg.events == "os:{orders}:tg:workers:events"
    assert tg.assignment == "os:{orders}:tg:workers:assignment"
    assert partition_streams("orders", 8) == GOLDEN_ORDERS_8
    assert GroupKeys(GOLDEN_ORDERS_8[3], "workers").lease == "os:{orders:p3#0}:g:workers:lease"


@given(topic=st.text(st.characters(blacklist_characters="{}", blacklist_categories=("Cs",)),
                     min_size=1, max_size=20),
       partitions=st.integers(1, 64))
def test_partitions_spread_evenly_over_the_slots(topic: str, partitions: int) -> None:
    """Partition i's stream (and every key of its groups) hashes into the i-th of P equal slot
    ranges, and the topic-group keys share the topic's slot."""
    streams = partition_streams(topic, partitions)
    assert len(set(streams)) == partitions
    for i, stream in enumerate(streams):
        slot = key_slot(stream.encode())
        assert i * 16384 // partitions <= slot < (i + 1) * 16384 // partitions
        assert {key_slot(k.encode()) for k in GroupKeys(stream, "g").all()} == {slot}
    tg = TopicGroupKeys(topic, "g")
    assert {key_slot(k.encode()) for k in [*tg.all(), TopicKeys(topic).meta]} == \
        {key_slot(topic.encode())}


def test_topic_names_with_braces_are_refused() -> None:
    """orderedstream picks each partition's hash tag: a brace in a topic name is refused."""
    for bad in ("a{b}", "x}", "", "{"):
        with pytest.raises(ConfigError, match="topic name"):
            TopicKeys(bad)
    with pytest.raises(ConfigError, match="partitions must be"):
        partition_streams("orders", 0)
