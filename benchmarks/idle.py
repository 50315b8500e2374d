"""Idle cost: the CPU an idle owner and an idle standby use, asyncio and sync.

Four consumer processes (``orderedstream consume``, default settings, ``--quiet``) run at
once against one server: an asyncio owner and an asyncio standby of one group (``--async``),
and a sync owner and a sync standby of another (the baseline).  The streams stay empty.  Once
each one is in its role, the script reads each process's CPU time (user + system, all its
threads: ``utime`` + ``stime`` of ``/proc/<pid>/stat``) at the start and at the end of the
window, and prints it as a share of one core over the window (and the server's, serving all
four).  The issue's goal: each < 1 %.

    python benchmarks/idle.py                     # 30 s window, embedded valkey-server
    python benchmarks/idle.py --seconds 60 --server-bin /usr/bin/redis-server
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import redis

from orderedstream import GroupKeys
from orderedstream._server import parse_info
from orderedstream.testing import ServerProcess, wait_until

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15)


def start(url: str, stream: str, name: str, use_async: bool) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "orderedstream", "consume", "--redis-url", url,
            "--stream", stream, "--group", "g", "--name", name, "--quiet"]
    if use_async:
        args.append("--async")
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def role(client: redis.Redis, stream: str, name: str) -> str | None:
    member = client.hget(GroupKeys(stream, "g").members, name)
    return json.loads(member)["role"] if member else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--server-bin", default=None)
    args = parser.parse_args()
    procs: dict[str, subprocess.Popen[bytes]] = {}
    with ServerProcess(args.server_bin) as server:
        client = server.client()
        label = parse_info(client.info("server")).label
        try:
            for engine, use_async in (("async", True), ("sync", False)):
                stream = f"idle-{engine}"
                client.xgroup_create(stream, "g", id="0", mkstream=True)
                procs[f"{engine} owner"] = start(server.url, stream, f"{engine}-o", use_async)
                wait_until(lambda s=stream, n=f"{engine}-o": role(client, s, n) == "owner", 20,
                           message=f"{engine} owner")
                procs[f"{engine} standby"] = start(server.url, stream, f"{engine}-s", use_async)
                wait_until(lambda s=stream, n=f"{engine}-s": role(client, s, n) == "standby",
                           20, message=f"{engine} standby")
            time.sleep(2.0)  # let the start-up (imports, connections) settle out of the window
            server_before = cpu_seconds(server.proc.pid)
            before = {name: cpu_seconds(p.pid) for name, p in procs.items()}
            t0 = time.monotonic()
            time.sleep(args.seconds)
            after = {name: cpu_seconds(p.pid) for name, p in procs.items()}
            server_used = cpu_seconds(server.proc.pid) - server_before
            window = time.monotonic() - t0
            roles = {name: role(client, f"idle-{name.split()[0]}",
                                f"{name.split()[0]}-{name.split()[1][0]}") for name in procs}
        finally:
            for p in procs.values():
                p.terminate()
            for p in procs.values():
                p.wait(30)
        client.close()
    print(f"idle cost on {label}, redis-py {redis.__version__}: CPU time (user + system, all "
          f"threads, /proc/<pid>/stat) over {window:.1f} s, default settings, empty streams")
    for name in procs:
        used = after[name] - before[name]
        print(f"  {name:<14} {used * 1000:>7.0f} ms CPU = {used / window * 100:5.2f} % of a "
              f"core   (role at the end: {roles[name]})")
    print(f"  {'server':<14} {server_used * 1000:>7.0f} ms CPU = "
          f"{server_used / window * 100:5.2f} % of a core   (serving all four)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
