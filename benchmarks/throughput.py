"""Consumer throughput: the Coordinator with a no-op handler against two hand-written redis-py
loops, in the same run, on the same server and pre-filled stream.

* raw batched: XREADGROUP COUNT 500, a no-op handler call per entry, one XACK per batch (the
  fast hand-rolled loop); "raw, no handler" skips the per-entry call: a ceiling no real
  consumer reaches, printed for reference
* naive:       XREADGROUP COUNT 1 + XACK per entry (run on --naive-entries only: it is slow)
* coordinator: Coordinator(batch_size=500), no-op handler; it also decodes fields to str,
  checks its lease per entry and fences every read/ack
* batch handler: Coordinator.batched(batch_size=500), one no-op call per batch
* raw asyncio:   the raw batched loop with redis.asyncio and an awaited no-op handler
* async coordinator / async batch: AsyncCoordinator(batch_size=500), awaited no-op handler /
  batch handler
* async for messages(): AsyncCoordinator(batch_size=500) without a handler, an empty
  ``async for`` body
* coordinator + prometheus hook: the same with ``orderedstream.metrics.PrometheusHook`` as a
  hook (event-derived series: one update per batch), scraped once at the end
* + timed handler: also the per-entry handler histogram (``hook.timed(handler)``: two clock
  reads and one bucket update per entry)

Each contender reads the whole stream through a fresh consumer group (created at 0) and is timed
from its first read to its last ack; the runs alternate (raw, coordinator, raw, ...) --rounds
times and the best and median rates are printed, with the ratio coordinator/raw of the medians
and of each round (a round's two runs are back to back, so its ratio is the least noisy
figure on a shared machine).

    python benchmarks/throughput.py                   # embedded valkey-server, 200k entries
    python benchmarks/throughput.py --server-bin /usr/bin/redis-server
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import redis
import redis.asyncio

from orderedstream import AsyncCoordinator, Coordinator, CoordinatorConfig, GroupKeys, Message
from orderedstream._server import clone_client, parse_info
from orderedstream.testing import ServerProcess, fill_stream

STREAM = "bench-throughput"
CPU_US: dict[str, list[float]] = {"": [], "hook": [], "timed": []}
"""The client process's CPU time per entry (all its threads), by metrics mode: less at the
mercy of other processes on a shared machine than the wall-clock rates."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far, in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def noop_handler(entry_id: bytes, fields: dict[bytes, bytes]) -> None:
    """What every real consumer loop has: one call per entry."""


def raw_batched(client: redis.Redis, group: str, total: int, call_handler: bool = True) -> float:
    client.xgroup_create(STREAM, group, id="0")
    done = 0
    t0 = time.perf_counter()
    while done < total:
        reply = client.xreadgroup(group, "raw", {STREAM: ">"}, count=500)
        entries = reply[0][1]
        if call_handler:
            for entry_id, fields in entries:
                noop_handler(entry_id, fields)
        client.xack(STREAM, group, *[e[0] for e in entries])
        done += len(entries)
    return total / (time.perf_counter() - t0)


def naive(client: redis.Redis, group: str, total: int) -> float:
    client.xgroup_create(STREAM, group, id="0")
    t0 = time.perf_counter()
    for _ in range(total):
        reply = client.xreadgroup(group, "naive", {STREAM: ">"}, count=1)
        client.xack(STREAM, group, reply[0][1][0][0])
    return total / (time.perf_counter() - t0)


def coordinator(client: redis.Redis, group: str, total: int, metrics: str = "") -> float:
    """``metrics``: '' none, 'hook' a PrometheusHook, 'timed' the hook and a timed handler."""
    seen = [0]
    first = [0.0]

    def noop(message: Message) -> None:
        if seen[0] == 0:
            first[0] = time.perf_counter()
        seen[0] += 1

    config = CoordinatorConfig(stream=STREAM, group=group, consumer="coord", batch_size=500)
    handler: Callable[[Message], object] = noop
    hooks = []
    registry = None
    if metrics:
        from prometheus_client import CollectorRegistry, generate_latest

        from orderedstream.metrics import PrometheusHook

        registry = CollectorRegistry()
        hook = PrometheusHook(registry, client=client)
        hooks.append(hook)
        if metrics == "timed":
            handler = hook.timed(noop)
    c = Coordinator(config, handler, client, hooks=hooks)
    cpu = time.process_time()
    c.run(max_messages=total)  # returns after the last ack (acks are flushed on exit)
    elapsed = time.perf_counter() - first[0]
    CPU_US[metrics].append((time.process_time() - cpu) / total * 1e6)
    if registry is not None:
        assert b"orderedstream_handled_total" in generate_latest(registry)
    client.delete(*GroupKeys(STREAM, group).all())
    return total / elapsed


def coordinator_batched(client: redis.Redis, group: str, total: int) -> float:
    """The batch handler: one call per batch of up to 500 entries (what a handler that writes a
    batch to a database in one statement gets)."""
    seen = [0]
    first = [0.0]

    def noop_batch(messages: Sequence[Message]) -> None:
        if seen[0] == 0:
            first[0] = time.perf_counter()
        seen[0] += len(messages)

    config = CoordinatorConfig(stream=STREAM, group=group, consumer="batch", batch_size=500)
    Coordinator.batched(config, noop_batch, client).run(max_messages=total)
    elapsed = time.perf_counter() - first[0]
    client.delete(*GroupKeys(STREAM, group).all())
    return total / elapsed


def raw_async(url: str, group: str, total: int) -> float:
    """The hand-written asyncio loop: XREADGROUP COUNT 500, an awaited no-op handler per entry,
    one XACK per batch (redis.asyncio)."""

    async def handler(entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        pass

    async def run() -> float:
        client = redis.asyncio.Redis.from_url(url, socket_timeout=30)
        await client.xgroup_create(STREAM, group, id="0")
        done = 0
        t0 = time.perf_counter()
        while done < total:
            reply = await client.xreadgroup(group, "raw", {STREAM: ">"}, count=500)
            entries = reply[0][1]
            for entry_id, fields in entries:
                await handler(entry_id, fields)
            await client.xack(STREAM, group, *[e[0] for e in entries])
            done += len(entries)
        rate = total / (time.perf_counter() - t0)
        await client.aclose()
        return rate

    return asyncio.run(run())


def run_async(run: Coroutine[Any, Any, float], url: str, group: str) -> float:
    """Run an async contender to its rate, then delete its group's keys."""
    rate = asyncio.run(run)
    cleanup = redis.Redis.from_url(url)
    cleanup.delete(*GroupKeys(STREAM, group).all())
    cleanup.close()
    return rate


def coordinator_async(url: str, group: str, total: int, batched: bool = False) -> float:
    """AsyncCoordinator (batch_size 500) with an awaited no-op handler (or batch handler)."""
    seen = [0]
    first = [0.0]

    async def noop(message: Message) -> None:
        if seen[0] == 0:
            first[0] = time.perf_counter()
        seen[0] += 1

    async def noop_batch(messages: Sequence[Message]) -> None:
        if seen[0] == 0:
            first[0] = time.perf_counter()
        seen[0] += len(messages)

    async def run() -> float:
        config = CoordinatorConfig(stream=STREAM, group=group, consumer="acoord",
                                   batch_size=500)
        client = redis.asyncio.Redis.from_url(url)
        c = (AsyncCoordinator.batched(config, noop_batch, client) if batched
             else AsyncCoordinator(config, noop, client))
        await c.run(max_messages=total)
        elapsed = time.perf_counter() - first[0]
        await c.aclose()
        await client.aclose()
        return total / elapsed

    return run_async(run(), url, group)


def coordinator_messages(url: str, group: str, total: int) -> float:
    """AsyncCoordinator (batch_size 500) without a handler: ``async for`` over messages(),
    each body acknowledged when the loop asks for the next one."""

    async def run() -> float:
        config = CoordinatorConfig(stream=STREAM, group=group, consumer="amsg", batch_size=500)
        client = redis.asyncio.Redis.from_url(url)
        c = AsyncCoordinator(config, None, client)
        await c.start(max_messages=total)  # the run ends after the last one (acks flushed)
        first = 0.0
        async with c.messages() as stream:
            async for _ in stream:
                if not first:
                    first = time.perf_counter()
        elapsed = time.perf_counter() - first
        await client.aclose()
        return total / elapsed

    return run_async(run(), url, group)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-bin", default=None)
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--naive-entries", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-metrics", action="store_true",
                        help="skip the rows with the Prometheus hook")
    args = parser.parse_args()
    with ServerProcess(args.server_bin) as server:
        client = clone_client(server.client(), socket_timeout_s=30)
        label = parse_info(client.info("server")).label
        fill_stream(client, STREAM, args.entries)
        rates: dict[str, list[float]] = {"raw": [], "coordinator": [], "raw, no handler": [],
                                         "batch handler": [], "raw asyncio": [],
                                         "async coordinator": [], "async batch": [],
                                         "async for messages()": []}
        if not args.no_metrics:
            rates["coordinator + prometheus hook"] = []
            rates["  + timed handler"] = []
        cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in rates}
        n = args.entries

        def run(name: str, contender: Callable[..., float], *call: object) -> None:
            """One run of ``contender``: its rate, and the CPU per entry of this process
            (all its threads) and of the server over the run."""
            client_cpu, server_cpu = time.process_time(), cpu_seconds(server.proc.pid)
            rates[name].append(contender(*call))
            cpu[name].append(((time.process_time() - client_cpu) / n * 1e6,
                              (cpu_seconds(server.proc.pid) - server_cpu) / n * 1e6))

        for r in range(args.rounds):
            run("raw", raw_batched, client, f"raw{r}", n)
            run("coordinator", coordinator, client, f"coord{r}", n)
            if not args.no_metrics:
                run("coordinator + prometheus hook", coordinator, client, f"prom{r}", n, "hook")
                run("  + timed handler", coordinator, client, f"timed{r}", n, "timed")
            run("raw, no handler", raw_batched, client, f"bare{r}", n, False)
            run("batch handler", coordinator_batched, client, f"batch{r}", n)
            run("raw asyncio", raw_async, server.url, f"araw{r}", n)
            run("async coordinator", coordinator_async, server.url, f"acoord{r}", n)
            run("async batch", coordinator_async, server.url, f"abatch{r}", n, True)
            run("async for messages()", coordinator_messages, server.url, f"amsg{r}", n)
        naive_rate = naive(client, "naive", args.naive_entries)
    print(f"throughput on {label}, redis-py {redis.__version__}, one Python process, "
          f"{args.entries} pre-filled entries, {args.rounds} alternating rounds")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"  {name:<30} best {max(values):>9,.0f}/s  median {median:>9,.0f}/s"
              f"  runs {', '.join(f'{v:,.0f}' for v in values)}")
    print("  CPU per entry, medians (client: this process, all threads; server: the server "
          "process; /proc/<pid>/stat, 10 ms ticks):")
    for name, pairs in cpu.items():
        client_us = statistics.median(c for c, _ in pairs)
        server_us = statistics.median(s for _, s in pairs)
        print(f"    {name.strip():<28} client {client_us:5.2f} us  server {server_us:5.2f} us  "
              f"sum {client_us + server_us:5.2f} us")
    print(f"  {'naive':<30} {naive_rate:>14,.0f}/s  (COUNT 1 + XACK each, {args.naive_entries} "
          "entries)")
    ratio = statistics.median(rates["coordinator"]) / statistics.median(rates["raw"])
    print(f"  coordinator / raw batched (medians): {ratio:.2f}x")
    # each round runs raw then coordinator back to back: their ratio shares the machine's mood
    paired = [c / r for c, r in zip(rates["coordinator"], rates["raw"], strict=True)]
    print(f"  coordinator / raw batched, per round: "
          f"{', '.join(f'{p:.2f}' for p in paired)}  (median {statistics.median(paired):.2f}x)")
    for name, over in (("batch handler", "raw"), ("async coordinator", "raw asyncio"),
                       ("async batch", "raw"), ("async for messages()", "raw asyncio")):
        ratios = [b / r for b, r in zip(rates[name], rates[over], strict=True)]
        print(f"  {name} / {over}, per round: {', '.join(f'{p:.2f}' for p in ratios)}  "
              f"(median {statistics.median(ratios):.2f}x)")
    if not args.no_metrics:
        base = statistics.median(CPU_US[""])
        print(f"  client CPU per entry (medians): coordinator {base:.2f} us", end="")
        for mode, name in (("hook", "prometheus hook"), ("timed", "+ timed handler")):
            cost = statistics.median(CPU_US[mode])
            print(f", {name} {cost:.2f} us ({(cost / base - 1) * 100:+.1f} %)", end="")
        print()
        coord = rates["coordinator"]
        for name in ("coordinator + prometheus hook", "  + timed handler"):
            per_round = [m / c for m, c in zip(rates[name], coord, strict=True)]
            print(f"  {name.strip()} / coordinator, per round: "
                  f"{', '.join(f'{p:.3f}' for p in per_round)}  "
                  f"(median {statistics.median(per_round):.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
