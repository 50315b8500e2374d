"""Failover benchmark: real consumer processes (the CLI) under load, the owner killed again and
again.

For each mode it starts a producer thread (steady --rate entries/s), --consumers consumer
processes with the recording handler, and then --kills times: finds the owner (from the group's
owner hash), kills it (SIGKILL; SIGTERM for 'graceful'), starts a replacement standby, and
measures kill -> first entry handled by another process (from the handlers' own record file,
wall clock on this machine).  Each kill waits until the replacement standby is connected, so it
measures failover from a steady state rather than against a Python process still starting.
At the end it stops the producer, waits for everything to be
handled, and judges the whole record: lost, out of order, duplicates (and whether all were
flagged redeliveries).

    python benchmarks/failover.py                    # embedded valkey-server, all three modes
    python benchmarks/failover.py --server-bin /usr/bin/redis-server --kills 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from orderedstream import GroupKeys, Producer
from orderedstream.testing import ServerProcess, read_records, verdict, wait_until


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_mode(server: ServerProcess, mode: str, kills: int, rate: float, ttl_ms: int,
             consumers: int) -> dict[str, object]:
    stream = f"bench-failover-{mode}"
    client = server.client()
    client.delete(stream, *GroupKeys(stream, "g").all())
    workdir = Path(tempfile.mkdtemp(prefix=f"failover-{mode}-"))
    record = workdir / "record.jsonl"
    env = dict(os.environ, ORDEREDSTREAM_RECORD=str(record), ORDEREDSTREAM_WORK_MS="0")
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(i: int) -> subprocess.Popen[bytes]:
        args = [sys.executable, "-m", "orderedstream", "consume", "--redis-url", server.url,
                "--stream", stream, "--group", "g", "--name", f"c{i}", "--quiet",
                "--handler", "orderedstream.testing:record_handler",
                "--lease-ttl-ms", str(ttl_ms), "--batch", "50"]
        if mode == "ttl-only":
            args.append("--no-watch")
        log = open(workdir / f"c{i}.log", "wb")  # noqa: SIM115
        p = subprocess.Popen(args, env=env, stdout=log, stderr=log)
        procs.append(p)
        return p

    produced = [0]
    stop = threading.Event()

    def produce() -> None:
        producer = Producer(client, stream)
        started = time.monotonic()
        while not stop.is_set():
            produced[0] += 1
            producer.send({"seq": produced[0]})
            stop.wait(max(0.0, started + produced[0] / rate - time.monotonic()))

    def owner_pid() -> int | None:
        if not client.exists(GroupKeys(stream, "g").lease):
            return None
        pid = client.hget(GroupKeys(stream, "g").owner, "pid")
        return int(pid) if pid else None

    by_pid: dict[int, subprocess.Popen[bytes]] = {}
    for i in range(consumers):
        p = spawn(i)
        by_pid[p.pid] = p
    for i in range(consumers):
        wait_until(lambda i=i: any(c.get("name") == f"os:c{i}:beat"
                                   for c in client.client_list()), 30, message="consumers up")
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    times: list[float] = []
    next_name = consumers
    try:
        for _ in range(kills):
            pid = wait_until(owner_pid, 30, message="an owner")
            # let the owner work a little, so each kill lands mid-stream
            seen = len(read_records(record))
            wait_until(lambda s=seen: len(read_records(record)) > s + int(rate * 0.2), 30,
                       message="owner handling")
            victim = by_pid.pop(pid)
            t_kill = time.time()
            victim.send_signal(signal.SIGTERM if mode == "graceful" else signal.SIGKILL)

            def first_after(pid: int = pid, t_kill: float = t_kill) -> float | None:
                for r in read_records(record):
                    if r["pid"] != pid and r["t"] >= t_kill:
                        return float(r["t"])
                return None

            t_first = wait_until(first_after, 30, interval=0.002, message="failover")
            times.append((t_first - t_kill) * 1000.0)
            victim.wait(30)
            p = spawn(next_name)
            by_pid[p.pid] = p
            # measure each kill from a steady state: the replacement is up and waiting as a
            # standby (its heartbeat connection is listed), not still importing Python
            beat = f"os:c{next_name}:beat"
            wait_until(lambda beat=beat: any(c.get("name") == beat for c in client.client_list()),
                       30, message=f"{beat} connected")
            next_name += 1
    finally:
        stop.set()
        producer.join()
    total = produced[0]
    wait_until(lambda: len({r["seq"] for r in read_records(record)}) >= total, 60,
               message="everything handled")
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    recs = read_records(record)
    v = verdict(((int(r["seq"]), bool(r["red"])) for r in recs), total)
    client.delete(stream, *GroupKeys(stream, "g").all())
    shutil.rmtree(workdir, ignore_errors=True)
    return {
        "mode": mode, "kills": len(times), "produced": total, "handled_records": len(recs),
        "p50_ms": round(statistics.median(times), 1), "p95_ms": round(pct(times, 0.95), 1),
        "max_ms": round(max(times), 1), "lost": len(v.lost), "out_of_order": len(v.out_of_order),
        "duplicates": v.duplicates, "unflagged_duplicates": v.unflagged_duplicates,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-bin", default=None)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--rate", type=float, default=1000.0, help="produced entries/s")
    parser.add_argument("--ttl-ms", type=int, default=1000)
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument("--modes", default="watch,ttl-only,graceful")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    results = []
    with ServerProcess(args.server_bin) as server:
        info = server.client().info("server")
        version = info.get("valkey_version") or info["redis_version"]
        label = f"{info.get('server_name') or 'redis'} {version}"
        for mode in args.modes.split(","):
            results.append(run_mode(server, mode, args.kills, args.rate, args.ttl_ms,
                                    args.consumers))
    if args.json:
        print(json.dumps({"server": label, "results": results}, indent=2))
        return 0
    print(f"failover benchmark on {label}; lease TTL {args.ttl_ms} ms; {args.consumers} "
          f"consumer processes; producer {args.rate:.0f} entries/s; time = kill signal -> first "
          "entry handled by another process (handler's own record)")
    print(f"{'mode':<10} {'kills':>5} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'produced':>9} "
          f"{'lost':>5} {'reord':>6} {'dups':>5} {'unflagged':>9}")
    for r in results:
        print(f"{r['mode']:<10} {r['kills']:>5} {r['p50_ms']:>8} {r['p95_ms']:>8} "
              f"{r['max_ms']:>8} {r['produced']:>9} {r['lost']:>5} {r['out_of_order']:>6} "
              f"{r['duplicates']:>5} {r['unflagged_duplicates']:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
