"""Key names are pinned, and every key of a stream lands in the stream's cluster slot."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from orderedstream import ConfigError, GroupKeys, hash_tag


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
