"""Fixer throughput and the server memory a parked entry costs.

1. Re-stream throughput: N parked entries (default 100,000; the demo's two small fields each,
   parked exactly as the defer script parks them: JSON record + delay-set member, due now), one
   Fixer with a trivial repair (fields returned as they are), timed from its first pass to the
   pass that leaves the delay set empty; then the same with 1 and 2 ``orderedstream fix``
   processes side by side, timed on the server's clock from the first to the last re-streamed
   entry.  Printed: items/s, and a check that every parked entry is on the stream exactly
   once.
2. Memory: M parked entries (default 1,000,000), ``used_memory`` before and after, divided by M
   (record + delay-set member; the entries themselves are not on the stream in this step).

    python benchmarks/fixer.py                          # embedded valkey-server
    python benchmarks/fixer.py --server-bin /usr/bin/redis-server --memory-entries 200000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections import Counter

import redis

from orderedstream import Fixer, FixerConfig, GroupKeys, ParkedEntry, identity_repair
from orderedstream._server import clone_client, parse_info
from orderedstream.testing import ServerProcess, park_directly

STREAM = "bench-fixer"


def park(client: redis.Redis, keys: GroupKeys, n: int) -> list[str]:
    now = 1_700_000_000_000
    return park_directly(client, keys, (
        ParkedEntry(id=f"{now + i}-0", origin_id=f"{now + i}-0", group="g",
                    reason="corrupted payload", attempts=1, epoch=1, consumer="c-1",
                    first_failure_ms=now, last_failure_ms=now,
                    raw={b"seq": str(i).encode(), b"payload": f"order-{i}".encode()})
        for i in range(n)))


def exactly_once(client: redis.Redis, ids: list[str]) -> bool:
    origins: Counter[bytes] = Counter()
    for _, fields in client.xrange(STREAM):
        origins[fields[b"os-origin-id"]] += 1
    return set(origins) == {i.encode() for i in ids} and max(origins.values()) == 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-bin", default=None)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--memory-entries", type=int, default=1_000_000)
    parser.add_argument("--processes", type=int, nargs="*", default=[1, 2],
                        help="also run this many `orderedstream fix` processes side by side")
    args = parser.parse_args()
    with ServerProcess(args.server_bin) as server:
        client = clone_client(server.client(), socket_timeout_s=60)
        label = parse_info(client.info("server")).label
        keys = GroupKeys(STREAM, "g")
        ids = park(client, keys, args.entries)
        print(f"fixer on {label}, redis-py {redis.__version__}")
        fixer = Fixer(FixerConfig(stream=STREAM, group="g", batch_size=args.batch),
                      identity_repair, client)
        passes = 0
        t0 = time.perf_counter()
        while True:
            done = fixer.fix_once()
            passes += 1
            if done.parked == 0:
                break
        elapsed = time.perf_counter() - t0
        exact = all_exact = exactly_once(client, ids)
        print(f"  re-stream, one fixer in this process: {args.entries:,} parked entries, batch "
              f"{args.batch}, {passes} passes, {elapsed:.2f} s -> "
              f"{args.entries / elapsed:,.0f} items/s (each on the stream exactly once: {exact})")
        for processes in args.processes:
            client.delete(STREAM, *keys.all())
            ids = park(client, keys, args.entries)
            procs = [subprocess.Popen(
                [sys.executable, "-m", "orderedstream", "fix", "--redis-url", server.url,
                 "--stream", STREAM, "--group", "g", "--batch", str(args.batch), "--quiet",
                 "--repair", "orderedstream:identity_repair"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(processes)]
            try:
                while client.zcard(keys.delay) or client.hlen(keys.parked):
                    time.sleep(0.01)
            finally:
                for p in procs:
                    p.terminate()
                    p.wait(10)
            # timed on the server's clock: first to last re-streamed entry (process start-up
            # is not counted)
            first = client.xrange(STREAM, count=1)[0][0]
            last = client.xrevrange(STREAM, count=1)[0][0]
            span = (int(last.split(b"-")[0]) - int(first.split(b"-")[0])) / 1000.0
            exact = exactly_once(client, ids)
            all_exact = all_exact and exact
            print(f"  re-stream, {processes} fixer processes: {args.entries:,} entries in "
                  f"{span:.2f} s (server clock, first to last XADD) -> "
                  f"{args.entries / span:,.0f} items/s (exactly once: {exact})")

        client.delete(STREAM, *keys.all())
        client.execute_command("MEMORY", "PURGE")  # type: ignore[no-untyped-call]
        before = int(client.info("memory")["used_memory"])
        park(client, keys, args.memory_entries)
        after = int(client.info("memory")["used_memory"])
        sample = client.hget(keys.parked, f"{1_700_000_000_000}-0") or b""
        per = (after - before) / args.memory_entries
        print(f"  memory: {args.memory_entries:,} parked entries: used_memory +"
              f"{(after - before) / 2**20:,.1f} MiB -> {per:,.0f} bytes per parked entry "
              f"(its JSON record alone is {len(sample)} bytes)")
        return 0 if all_exact else 1


if __name__ == "__main__":
    sys.exit(main())
