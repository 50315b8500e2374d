"""AsyncTopicMember against TopicMember: the same pre-filled topic, the same load, in one run.

A topic of P partitions (default 8) is filled once with N entries (keys k0..k63, so every
partition holds about N/P); each contender is one member alone in a fresh group (created at
0), timed from ``start()`` until its handler has seen every entry (so the time includes the
member joining and acquiring its partitions: printed apart as "first entry after"), then
stopped.  Contenders, each run --rounds times, alternating sync and async:

* trivial: the sync member with a handler that only counts, the async member with an
  ``async def`` that only counts (each call is one task on the loop: the engine's handler
  call crosses from the member's driver thread to the loop and back);
* 1 ms of waiting: the sync handler sleeps 1 ms (``time.sleep``: the driver thread runs one
  partition's handler at a time), the async one awaits ``asyncio.sleep(0.001)`` (handlers of
  different partitions run concurrently on the loop, one partition's entries still one after
  another), on --sleep-entries entries (fewer: the sync member takes P times longer).

Printed per contender: the median rate (entries/s), the median CPU time per entry of this
process (all its threads: the member's control and driver threads, the loop), and the ratio
async/sync of the medians and of each round (a round's two runs are back to back).  Each run
also checks that every entry was handled once and each key's entries in order.

    python benchmarks/aio_member.py                        # embedded valkey-server
    python benchmarks/aio_member.py --cluster              # embedded 3 + 3 cluster
    python benchmarks/aio_member.py --entries 20000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from orderedstream import (
    AsyncTopicMember,
    MemberConfig,
    Message,
    TopicMember,
    TopicProducer,
    connect_url,
    create_topic,
)
from orderedstream._server import connect_check
from orderedstream.testing import ClusterServers, ServerProcess

TOPIC = "bench-aio-member"
KEYS = 64


class Tally:
    """What a run's handler saw: the count, when the first came, each key's last sequence
    number (order check) and the entries seen twice."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.count = 0
        self.first = 0.0
        self.last_kseq: dict[str, int] = {}
        self.disorder = 0
        self.seen: set[bytes] = set()
        self.twice = 0
        self.done = threading.Event()

    def saw(self, message: Message) -> None:
        fields = message.raw
        key = fields[b"key"].decode()
        kseq = int(fields[b"kseq"])
        if kseq != self.last_kseq.get(key, 0) + 1:
            self.disorder += 1
        self.last_kseq[key] = kseq
        seq = fields[b"seq"]
        self.twice += seq in self.seen
        self.seen.add(seq)
        if not self.count:
            self.first = time.perf_counter()
        self.count += 1
        if self.count >= self.total:
            self.done.set()


def fill(client: Any, total: int) -> None:
    producer = TopicProducer(client, TOPIC)
    kseq = [0] * KEYS
    for start in range(0, total, 1000):
        batch = []
        for seq in range(start, min(start + 1000, total)):
            k = seq % KEYS
            kseq[k] += 1
            batch.append((f"k{k}", {"seq": seq, "key": f"k{k}", "kseq": kseq[k]}))
        producer.send_many(batch)


def config(group: str, batch: int) -> MemberConfig:
    return MemberConfig(topic=TOPIC, group=group, name="bench", batch_size=batch)


def run_sync(url: str, group: str, total: int, batch: int, sleep_s: float
             ) -> tuple[float, float, float]:
    tally = Tally(total)

    def handle(message: Message) -> None:
        if sleep_s:
            time.sleep(sleep_s)
        tally.saw(message)

    client = connect_url(url)
    member = TopicMember(config(group, batch), handle, client)
    cpu0, t0 = time.process_time(), time.perf_counter()
    member.start()
    if not tally.done.wait(600):
        raise SystemExit(f"sync run: {tally.count} of {total} handled")
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    member.stop()
    client.close()
    check(tally, "sync")
    return total / elapsed, cpu / total * 1e6, (tally.first - t0) * 1000


def run_async(url: str, group: str, total: int, batch: int, sleep_s: float
              ) -> tuple[float, float, float]:
    tally = Tally(total)

    async def handle(message: Message) -> None:
        if sleep_s:
            await asyncio.sleep(sleep_s)
        tally.saw(message)

    async def main() -> tuple[float, float, float]:
        member = AsyncTopicMember.from_url(url, config(group, batch), handle)
        cpu0, t0 = time.process_time(), time.perf_counter()
        await member.start()
        while not tally.done.is_set():  # the loop stays free for the handlers
            await asyncio.sleep(0.002)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        await member.stop()
        return elapsed, cpu, t0

    elapsed, cpu, t0 = asyncio.run(main())
    check(tally, "async")
    return total / elapsed, cpu / total * 1e6, (tally.first - t0) * 1000


def check(tally: Tally, who: str) -> None:
    if tally.count < tally.total or tally.disorder or tally.twice:
        raise SystemExit(f"{who} run: {tally.count} handled of {tally.total}, "
                         f"{tally.disorder} out of key order, {tally.twice} twice")


def compare(url: str, label: str, total: int, batch: int, sleep_s: float, rounds: int,
            runs: list[int]) -> dict[str, Any]:
    sync: list[tuple[float, float, float]] = []
    aio: list[tuple[float, float, float]] = []
    contenders: list[tuple[list[tuple[float, float, float]],
                           Callable[..., tuple[float, float, float]]]] = [
        (sync, run_sync), (aio, run_async)]
    for _ in range(rounds):
        for into, run in contenders:
            runs[0] += 1
            into.append(run(url, f"g{runs[0]}", total, batch, sleep_s))
    rate_s = statistics.median(r[0] for r in sync)
    rate_a = statistics.median(r[0] for r in aio)
    return {
        "label": label,
        "sync": (rate_s, statistics.median(r[1] for r in sync),
                 statistics.median(r[2] for r in sync)),
        "async": (rate_a, statistics.median(r[1] for r in aio),
                  statistics.median(r[2] for r in aio)),
        "ratio": rate_a / rate_s,
        "rounds": [a[0] / s[0] for s, a in zip(sync, aio, strict=True)],
    }


def report(result: dict[str, Any], total: int) -> None:
    print(f"\n{result['label']} ({total} entries)")
    for who in ("sync", "async"):
        rate, cpu_us, first_ms = result[who]
        print(f"  {who:5}  {rate:9,.0f} entries/s  {cpu_us:6.1f} µs CPU/entry  "
              f"first entry after {first_ms:5.1f} ms")
    rounds = ", ".join(f"{r:.2f}" for r in result["rounds"])
    print(f"  async / sync: {result['ratio']:.2f}x (medians); per round: {rounds}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-bin", default=None)
    parser.add_argument("--cluster", action="store_true",
                        help="on an embedded 3 + 3 cluster (default: one server)")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--sleep-entries", type=int, default=2_000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    servers: Any = ClusterServers() if args.cluster else ServerProcess(args.server_bin)
    with servers:
        url = servers.url
        client = connect_url(url)
        where = connect_check(client).label
        if args.cluster:
            where += " cluster, 3 primaries + 3 replicas"
        print(f"{where}, loopback; topic of {args.partitions} partitions, one member alone in "
              f"a fresh group per run, batch {args.batch}; medians of {args.rounds} rounds")
        total = max(args.entries, args.sleep_entries)
        create_topic(client, TOPIC, partitions=args.partitions)
        fill(client, total)
        client.close()
        runs = [0]
        # every run reads the topic from its start: the first `total` entries of each
        trivial = compare(url, "trivial handler", total, args.batch, 0.0, args.rounds, runs)
        report(trivial, total)
        slept = compare_sleep(url, args, runs)
        report(slept, args.sleep_entries)
    return 0


def compare_sleep(url: str, args: argparse.Namespace, runs: list[int]) -> dict[str, Any]:
    return compare(url, "1 ms per entry (sync: time.sleep; async: await asyncio.sleep)",
                   args.sleep_entries, args.batch, 0.001, args.rounds, runs)


if __name__ == "__main__":
    raise SystemExit(main())
