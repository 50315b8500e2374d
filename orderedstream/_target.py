"""The stored target assignment of a topic's group: one sequence of targets, each derived from
the one before (so every change moves only what must move, see :mod:`._assign`), with no
leader.

Any member may advance it: :func:`settle_target` reads the live members (the members sorted
set, server-clock expiry) and the stored target in one script; if the target was computed for
exactly those members it is the answer; otherwise the member derives the next one with
:func:`~._assign.rebalance` and stores it with a compare-and-set (only if the version is still
the one it read *and* the live members are still the ones it derived it for).  Members that
race derive the same next target from the same inputs; one stores it, the others read it.
Both keys are in the topic's slot (:class:`~._keys.TopicGroupKeys`), so both scripts are legal
on a cluster.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs

from ._assign import Assignment, moves, owners, rebalance
from ._keys import TopicGroupKeys
from ._scripts import EVENTS_MAXLEN, script_text
from ._server import AnyClient
from ._topic import Topic


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@attrs.frozen
class Target:
    """One target: ``version`` (0: none stored yet), the live ``members`` it was derived for,
    and ``assignment`` (member -> partitions, every member a key)."""

    version: int
    members: tuple[str, ...]
    assignment: Mapping[str, tuple[int, ...]]

    def partitions_of(self, member: str) -> tuple[int, ...]:
        return tuple(self.assignment.get(member, ()))

    def owner_of(self, partition: int) -> str | None:
        return owners(self.assignment).get(partition)

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "members": list(self.members),
                "assignment": {m: list(ps) for m, ps in self.assignment.items()}}


@attrs.frozen
class TargetView:
    """What :func:`read_target` saw at once: the server clock, the live members and the stored
    target."""

    now_ms: int
    live: tuple[str, ...]
    stored: Target


def _by_bytes(members: Any) -> tuple[str, ...]:
    return tuple(sorted((_text(m) for m in members), key=lambda m: m.encode()))


def read_target(client: AnyClient, topic: Topic, group: str) -> TargetView:
    """The live members and the stored target, read together (one script)."""
    keys = TopicGroupKeys(topic.name, group)
    script = client.register_script(script_text("target_read"))
    now, live, version, members, target = script(keys=[keys.members, keys.assignment],
                                                 client=client)
    assignment: Assignment = {m: tuple(int(p) for p in ps)
                              for m, ps in json.loads(_text(target)).items()}
    stored = Target(int(_text(version)), tuple(json.loads(_text(members))), assignment)
    return TargetView(int(_text(now)), _by_bytes(live), stored)


def settle_target(client: AnyClient, topic: Topic, group: str, *, by: str = "",
                  attempts: int = 20) -> Target:
    """The target for the members live now: the stored one if it was derived for exactly
    them, else the next one (derived from the stored one, stored by this call or by a member
    that raced it, and recorded on the group's timeline as ``assigned`` by ``by``).  With no
    live member, the stored target as it is."""
    keys = TopicGroupKeys(topic.name, group)
    write = client.register_script(script_text("target_write"))
    for _ in range(attempts):
        view = read_target(client, topic, group)
        stored = view.stored
        if not view.live or (stored.version and stored.members == view.live):
            return stored
        nxt = rebalance(stored.assignment, topic.partitions, view.live)
        reply: Any = write(keys=[keys.members, keys.assignment, keys.events],
                           args=[stored.version, json.dumps(list(view.live)),
                                 json.dumps({m: list(ps) for m, ps in nxt.items()}),
                                 by, ",".join(map(str, moves(stored.assignment, nxt))),
                                 EVENTS_MAXLEN, *view.live],
                           client=client)
        if int(reply[0]) == 1:
            return Target(int(_text(reply[1])), view.live, nxt)
    raise TimeoutError(f"the target of {topic.name}/{group} kept changing under "
                       f"{attempts} attempts (members joining and leaving that fast?)")
