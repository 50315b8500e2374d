"""The wire format beyond key names, pinned: the ``os-*`` headers orderedstream puts on entries
of a user's stream and the fields of its own records.  Changing one breaks entries already on
servers (a re-streamed copy no other version recognises), so it must be a deliberate change."""

from __future__ import annotations

import re

from orderedstream import _wire as wire
from orderedstream._scripts import script_names, script_text


def test_golden_header_names() -> None:
    """The headers' names, exactly."""
    assert wire.HEADERS == (b"os-for", b"os-origin-id", b"os-parked", b"os-repaired",
                            b"os-hold-gen")
    assert all(h.startswith(wire.HEADER_PREFIX) for h in wire.HEADERS)


def test_golden_record_fields() -> None:
    """The timeline's, the graveyard's and the fixers' signal fields, exactly."""
    assert wire.Timeline.FIELDS == ("type", "consumer", "epoch", "ts_ms", "by", "reason",
                                    "claimed", "deleted", "trimmed", "duration_ms")
    assert wire.Timeline.TYPES == ("acquired", "takeover", "released", "ended", "stalled")
    assert wire.Rebalance.FIELDS == ("type", "member", "by", "reason", "ts_ms", "partitions",
                                     "version")
    assert wire.Rebalance.TYPES == ("joined", "left", "gone", "expired", "assigned",
                                    "released")
    assert wire.Graveyard.FIELDS == ("id", "reason", "record")
    assert wire.SIGNAL_DUE == "due"


def test_scripts_write_only_pinned_headers() -> None:
    """Every ``os-*`` literal in the Lua scripts is one of the pinned headers (the scripts and
    the Python code cannot drift apart)."""
    used = set()
    for name in script_names():
        used |= set(re.findall(r"'(os-[a-z-]+)'", script_text(name)))
    assert used
    assert {u.encode() for u in used} <= set(wire.HEADERS)


def test_scripts_write_only_pinned_record_fields() -> None:
    """The XADDs of the scripts to orderedstream's own streams use only pinned field names:
    the timeline (acquire, end_term), the graveyard (fix_bury, fix_release), the signal
    stream (defer, hold) and a topic group's timeline (member_beat, member_leave)."""
    pinned = {*wire.Timeline.FIELDS, *wire.Graveyard.FIELDS, *wire.Rebalance.FIELDS,
              wire.SIGNAL_DUE}
    for name in script_names():
        for call in re.findall(r"redis\.call\('XADD', KEYS\[\d\], (.*?)\)\n", script_text(name),
                               re.S):
            if "os-" in call:
                continue  # a copy on the user's stream: headers, checked above
            args = [a.strip() for a in call.replace("\n", " ").split(",")]
            pairs = args[args.index("'*'") + 1:]
            fields = [f.strip("'") for f in pairs[::2]]
            assert fields and all(re.fullmatch("[a-z_]+", f) for f in fields), (name, fields)
            assert set(fields) <= pinned, (name, fields)
