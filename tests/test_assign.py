"""Partition assignment (no server): balanced, deterministic, and sticky through rebalance."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from orderedstream._assign import assign, moves, owners, rebalance, weight

names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12)
member_sets = st.lists(names, min_size=1, max_size=24, unique=True)
partition_counts = st.integers(1, 256)


def _balanced(target: dict[str, tuple[int, ...]], partitions: int, members: list[str]) -> None:
    assert set(target) == set(members)
    owned = [p for ps in target.values() for p in ps]
    assert sorted(owned) == list(range(partitions))  # every partition once
    counts = [len(ps) for ps in target.values()]
    assert max(counts) - min(counts) <= 1
    assert counts.count(partitions // len(members) + 1) == partitions % len(members)


def test_golden_assignment() -> None:
    """The weights and the procedure are part of the protocol: members of different versions
    must compute the same target.  These values pin both."""
    assert weight("a", 0) == 14838075594999191121
    assert assign(8, ["a", "b", "c"]) == {"a": (0, 2, 4), "b": (6, 7), "c": (1, 3, 5)}
    assert assign(8, ["c", "a", "b", "a"]) == assign(8, ["a", "b", "c"])


@given(partition_counts, member_sets)
def test_assign_is_balanced_and_order_free(partitions: int, members: list[str]) -> None:
    """Every partition has exactly one owner, owned counts differ by at most one (exactly
    P mod N members own one more), and the member list's order does not matter."""
    target = assign(partitions, members)
    _balanced(target, partitions, members)
    assert assign(partitions, list(reversed(members))) == target


@settings(max_examples=300)
@given(partition_counts, member_sets, names)
def test_a_join_moves_only_the_newcomers_share(partitions: int, members: list[str],
                                               newcomer: str) -> None:
    """A member joining (N members after the join) takes P // N partitions and nothing else
    moves: at most ceil(P / N) <= the issue's ceil(P / N) + 1."""
    if newcomer in members:
        return
    before = assign(partitions, members)
    after = rebalance(before, partitions, [*members, newcomer])
    _balanced(after, partitions, [*members, newcomer])
    moved = moves(before, after)
    n = len(members) + 1
    assert len(moved) == partitions // n <= math.ceil(partitions / n)
    assert set(moved) == set(after[newcomer])


@settings(max_examples=300)
@given(partition_counts, member_sets.filter(lambda ms: len(ms) > 1), st.data())
def test_a_leave_moves_only_the_leavers_partitions(partitions: int, members: list[str],
                                                    data: st.DataObject) -> None:
    """A member leaving (N members before it left): exactly its partitions move, at most
    ceil(P / N), each to a member under its new quota."""
    leaver = data.draw(st.sampled_from(members))
    before = assign(partitions, members)
    rest = [m for m in members if m != leaver]
    after = rebalance(before, partitions, rest)
    _balanced(after, partitions, rest)
    moved = moves(before, after)
    assert set(moved) == set(before[leaver])
    assert len(moved) <= math.ceil(partitions / len(members))


@settings(max_examples=100)
@given(partition_counts, st.lists(st.tuples(st.booleans(), names), min_size=1, max_size=30))
def test_a_history_of_joins_and_leaves_stays_balanced_and_sticky(
        partitions: int, steps: list[tuple[bool, str]]) -> None:
    """Through any sequence of single joins and leaves (each target derived from the last),
    every target is balanced and every step moves at most ceil(P / N) partitions."""
    members: list[str] = []
    target: dict[str, tuple[int, ...]] = {}
    for join, name in steps:
        if join and name not in members:
            members.append(name)
            n = len(members)
        elif not join and name in members and len(members) > 1:
            n = len(members)
            members.remove(name)
        else:
            continue
        new = rebalance(target, partitions, members)
        _balanced(new, partitions, members)
        if target:
            assert len(moves(target, new)) <= math.ceil(partitions / n)
        target = new


def test_rebalance_tolerates_a_damaged_previous_target() -> None:
    """Partitions out of range, owned twice, or owned by members that left are handed out
    again; the result is still a balanced target of the live members."""
    previous = {"a": (0, 1, 99), "b": (1, 2), "gone": (3,)}
    target = rebalance(previous, 4, ["a", "b", "c"])
    _balanced(target, 4, ["a", "b", "c"])
    assert 1 in target["a"]  # the first member by name keeps a duplicate


def test_moves_and_owners() -> None:
    """``moves`` lists the partitions whose owner differs (also owned on one side only)."""
    old = {"a": (0, 1), "b": (2,)}
    new = {"a": (0,), "b": (2,), "c": (1, 3)}
    assert moves(old, new) == [1, 3]
    assert owners(new) == {0: "a", 2: "b", 1: "c", 3: "c"}
    assert assign(3, []) == {}
