"""Hold-key mode: while an entry with ordering key K is parked, later K entries wait behind it
and come back after it, in order; other keys flow on.  Judged from the handler's own record."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from orderedstream import (
    Coordinator,
    CoordinatorConfig,
    Defer,
    Fixer,
    FixerConfig,
    GroupKeys,
    LeaseConfig,
    Message,
    Producer,
)
from orderedstream._demo import demo_repair
from orderedstream.testing import ServerProcess, read_records, wait_until


class KeyedSeen:
    def __init__(self) -> None:
        self.handled: list[tuple[str, int, bool]] = []  # key, seq, repaired
        self.lock = threading.Lock()

    def __call__(self, message: Message) -> None:
        fields = message.fields
        if fields["payload"].startswith("CORRUPT:"):
            raise Defer("corrupted payload", delay_ms=0)
        with self.lock:
            self.handled.append((fields["key"], int(fields["seq"]), message.repaired))


def send(client: redis.Redis, stream: str, plan: list[tuple[str, bool]], start: int = 1) -> None:
    Producer(client, stream).send_many(
        {"seq": str(seq), "key": key,
         "payload": f"CORRUPT:{seq}" if corrupt else f"order-{seq}"}
        for seq, (key, corrupt) in enumerate(plan, start=start))


def per_key(handled: list[tuple[str, int, bool]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for key, seq, _ in handled:
        out[key].append(seq)
    return dict(out)


def expected(plan: list[tuple[str, bool]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = defaultdict(list)
    for seq, (key, _) in enumerate(plan, start=1):
        out[key].append(seq)
    return dict(out)


def run_plan(client: redis.Redis, stream: str, plan: list[tuple[str, bool]],
             restart_at: int | None = None) -> KeyedSeen:
    seen = KeyedSeen()
    config = CoordinatorConfig(stream=stream, group="g", consumer="c", hold_key_field="key",
                               lease=LeaseConfig(ttl_ms=1000), batch_size=7)
    fixer = Fixer(FixerConfig(stream=stream, group="g", batch_size=3), demo_repair, client)
    with fixer:
        coordinator = Coordinator(config, seen, client)
        coordinator.start()
        send(client, stream, plan[:restart_at] if restart_at else plan)
        if restart_at is not None:
            # a clean handover to a fresh coordinator in the middle (it reloads the held keys)
            wait_until(lambda: len(seen.handled) >= restart_at // 2, 10, message="half")
            coordinator.stop(5)
            coordinator = Coordinator(config, seen, client)
            coordinator.start()
            send(client, stream, plan[restart_at:], start=restart_at + 1)
        wait_until(lambda: len(seen.handled) >= len(plan), 15,
                   message=f"{len(plan)} handled, have {len(seen.handled)}")
        coordinator.stop(5)
    return seen


def test_held_key_keeps_its_order_and_others_flow(client: redis.Redis, stream: str) -> None:
    """Key a's entry 2 is parked: a's 4 and 6 wait behind it (and come back after it); key b
    is handled as it comes."""
    plan = [("a", False), ("a", True), ("b", False), ("a", False), ("b", False), ("a", False),
            ("b", False)]
    seen = run_plan(client, stream, plan)
    assert per_key(seen.handled) == expected(plan)
    b_positions = [i for i, h in enumerate(seen.handled) if h[0] == "b"]
    a4_position = next(i for i, h in enumerate(seen.handled) if h[1] == 4)
    assert b_positions[0] < a4_position  # b was not held up by a
    keys = GroupKeys(stream, "g")
    wait_until(lambda: client.hlen(keys.held) == 0, 5, message="key released")
    assert client.hlen(keys.parked) == 0 and client.zcard(keys.delay) == 0


plans = st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), min_size=1, max_size=40)


# found by fuzzing: a handover while a key's repairs overlap (a copy of an earlier release
# still ahead of the owner when the next holder is parked)
OVERLAP = [("a", True), ("a", True), ("c", False), ("a", False), ("a", True), ("b", False),
           ("a", False), ("a", False), ("c", True), ("a", False), ("c", False), ("a", True),
           ("a", False), ("a", False), ("a", False), ("a", False), ("b", True), ("a", False)]


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan=plans, restart=st.booleans())
@example(plan=OVERLAP, restart=True)
def test_hold_key_order_for_any_mix(server: ServerProcess, plan: list[tuple[str, bool]],
                                    restart: bool) -> None:
    """Any mix of keys and corrupted entries, with or without an owner handover midway: every
    entry is handled exactly once, and each key's entries in production order."""
    client = server.client()
    stream = f"h-{uuid.uuid4().hex[:10]}"
    try:
        seen = run_plan(client, stream, plan,
                        restart_at=len(plan) // 2 if restart and len(plan) > 1 else None)
        assert per_key(seen.handled) == expected(plan)
        assert sorted(s for _, s, _ in seen.handled) == list(range(1, len(plan) + 1))
    finally:
        client.delete(stream, *GroupKeys(stream, "g").all(),
                      *[GroupKeys(stream, "g").followers(k) for k in "abc"])
        client.close()


@pytest.mark.slow
def test_hold_key_order_survives_consumer_and_fixer_kills(
        server: ServerProcess, client: redis.Redis, stream: str, tmp_path: Path,
        procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL the owner and the fixer while keys are held; their replacements finish the job:
    per key, the first handling of each entry follows production order, nothing is lost, and a
    second handling happens only as a flagged redelivery."""
    record = tmp_path / "record.jsonl"
    plan = [("k" + str(i % 5), i % 6 == 0) for i in range(1, 401)]
    consume = ("consume", "--redis-url", server.url, "--stream", stream, "--group", "g",
               "--handler", "orderedstream.testing:record_handler", "--hold-key-field", "key",
               "--lease-ttl-ms", "1000", "--batch", "10", "--quiet")
    fix = ("fix", "--redis-url", server.url, "--stream", stream, "--group", "g", "--quiet",
           "--visibility-ms", "1000", "--batch", "5", "--repair",
           "orderedstream.testing:slow_repair")
    env = dict(os.environ, ORDEREDSTREAM_RECORD=str(record), ORDEREDSTREAM_WORK_MS="1",
               ORDEREDSTREAM_REPAIR_MS="20")

    def spawn(*args: str, name: str) -> subprocess.Popen[bytes]:
        log = open(tmp_path / f"{name}.log", "ab")  # noqa: SIM115 - closed by the OS
        p = subprocess.Popen([sys.executable, "-m", "orderedstream", *args], env=env,
                             stdout=log, stderr=log)
        procs.append(p)
        return p

    consumer = spawn(*consume, "--name", "a", name="a")
    fixer = spawn(*fix, name="f1")
    send(client, stream, plan)
    keys = GroupKeys(stream, "g")
    wait_until(lambda: len(read_records(record)) >= 60 and client.hlen(keys.held) > 0, 20,
               message="some handled, a key held")
    consumer.send_signal(signal.SIGKILL)
    fixer.send_signal(signal.SIGKILL)
    spawn(*consume, "--name", "b", name="b")
    spawn(*fix, name="f2")
    wait_until(lambda: {r["seq"] for r in read_records(record)} == set(range(1, 401)), 60,
               message="every entry handled")
    records = read_records(record)
    keys_of = {seq: key for seq, (key, _) in enumerate(plan, start=1)}
    first: dict[str, list[int]] = defaultdict(list)
    seen_seq: set[int] = set()
    for r in records:
        if r["seq"] in seen_seq:
            assert r["red"], f"unflagged second handling of {r['seq']}"
            continue
        seen_seq.add(r["seq"])
        first[keys_of[r["seq"]]].append(r["seq"])
    assert dict(first) == expected(plan)
