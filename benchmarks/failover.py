"""Failover benchmark: real consumer processes (the CLI) under load, the owner killed again and
again; all modes in one run, on one server.

Modes (``--modes``, comma-separated):

* ``push``: SIGKILL under load; standbys learn of the dead owner by the server's push
  (``CLIENT TRACKING ... REDIRECT``, the default);
* ``poll``: the same with ``--no-push``: the ``CLIENT LIST`` poll every 25 ms only (the code
  before push detection);
* ``ttl-only``: the same with ``--no-watch``: the lease TTL only;
* ``graceful``: SIGTERM under load (the owner hands the lease over);
* ``idle-push`` / ``idle-poll``: an idle stream: the owner is killed with no producer running,
  and one entry is produced ``--idle-delay-ms`` later; time = that entry's XADD -> its handling
  (with push, that XADD is what tells the standby: the poll runs every 250 ms only).

Beside each kill it also records when the killed process was reaped (``waitpid`` returns only
after the kernel closed its sockets): "teardown" is kill -> reaped, the part of a crash failover
that happens before any server or standby can know (the kernel freeing a Python process), and
"after" is, per SIGKILL under load, the time minus that kill's teardown: the part that follows
(the producer's next write, the push, the takeover round trip, the first entry handled).

For each loaded mode it starts a producer thread (steady ``--rate`` entries/s), ``--consumers``
consumer processes with the recording handler, and then ``--kills`` times: finds the owner (from
the group's owner hash), kills it, starts a replacement standby, and measures kill -> first entry
handled by another process (from the handlers' own record file, wall clock on this machine).
Each kill waits until the replacement standby is connected, so it measures failover from a
steady state.  At the end it waits for everything to be handled and judges the whole record:
lost, out of order, duplicates (and whether all were flagged redeliveries).

``--cpu-seconds N`` (0: skip) also measures a standby's CPU time over N seconds (from
``/proc/<pid>/stat``) beside a live owner, idle stream, with push and with the poll only.

``--async``: the consumers run ``consume --async`` (the AsyncCoordinator) in every mode, and
two more modes run by default: ``mixed`` (SIGKILL, push) and ``mixed-graceful`` (SIGTERM), where
sync and async consumers alternate, so that the kills alternate between a sync owner followed by
an async one and the reverse (reported as two rows each: ``s>a`` and ``a>s``).

    python benchmarks/failover.py                    # embedded valkey-server, every mode
    python benchmarks/failover.py --server-bin /usr/bin/redis-server --kills 30
    python benchmarks/failover.py --async            # asyncio consumers, and mixed pairs
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
from typing import Any

import redis

from orderedstream import GroupKeys, Producer
from orderedstream.testing import RecordTail, ServerProcess, verdict, wait_until

LOADED = ("push", "poll", "ttl-only", "graceful")
IDLE = ("idle-push", "idle-poll")
MIXED = ("mixed", "mixed-graceful")
ALL = (*LOADED, *IDLE)
HANDLERS = {"sync": ["--handler", "orderedstream.testing:record_handler"],
            "async": ["--async", "--handler", "orderedstream.testing:async_record_handler"]}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Group:
    """Consumer processes of one benchmark stream."""

    def __init__(self, server: ServerProcess, client: redis.Redis, stream: str,
                 flags: list[str], ttl_ms: int, kinds: tuple[str, ...] = ("sync",)) -> None:
        self.server = server
        self.kinds = kinds  # consumers spawned: "sync" / "async", in turn
        self.kind_of: dict[int, str] = {}
        self.client = client
        self.stream = stream
        self.keys = GroupKeys(stream, "g")
        self.flags = flags
        self.ttl_ms = ttl_ms
        self.workdir = Path(tempfile.mkdtemp(prefix=f"failover-{stream}-"))
        self.record = RecordTail(self.workdir / "record.jsonl")
        self.env = dict(os.environ, ORDEREDSTREAM_RECORD=str(self.record.path),
                        ORDEREDSTREAM_WORK_MS="0")
        self.by_pid: dict[int, subprocess.Popen[bytes]] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.next_name = 0

    def spawn(self) -> subprocess.Popen[bytes]:
        """Start one more consumer; returns once its heartbeat connection is listed."""
        name = f"c{self.next_name}"
        kind = self.kinds[self.next_name % len(self.kinds)]
        self.next_name += 1
        args = [sys.executable, "-m", "orderedstream", "consume", "--redis-url", self.server.url,
                "--stream", self.stream, "--group", "g", "--name", name, "--quiet",
                *HANDLERS[kind], "--lease-ttl-ms", str(self.ttl_ms), "--batch", "50",
                *self.flags]
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115
        p = subprocess.Popen(args, env=self.env, stdout=log, stderr=log)
        self.procs.append(p)
        self.by_pid[p.pid] = p
        self.kind_of[p.pid] = kind
        beat = f"os:{name}:beat"
        try:
            wait_until(lambda: any(c.get("name") == beat for c in self.client.client_list()),
                       30, message=f"{beat} connected")
        except TimeoutError as err:
            tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
            raise TimeoutError(f"{err} (exit code {p.poll()}); its log ends:\n{tail}") from err
        return p

    def owner_pid(self) -> int | None:
        if not self.client.exists(self.keys.lease):
            return None
        pid = self.client.hget(self.keys.owner, "pid")
        return int(pid) if pid else None

    def first_after(self, pid: int, start: int) -> tuple[float, int] | None:
        """(time, pid) of the first entry handled by another process than ``pid``."""
        for r in self.record.read()[start:]:
            if r["pid"] != pid:
                return float(r["t"]), int(r["pid"])
        return None

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.client.delete(self.stream, *self.keys.all())
        shutil.rmtree(self.workdir, ignore_errors=True)


def summary(mode: str, times: list[float], group: Group, total: int,
            teardown: list[float], after: list[float] | None = None) -> dict[str, Any]:
    wait_until(lambda: len({r["seq"] for r in group.record.read()}) >= total, 60,
               message="everything handled")
    recs = group.record.read()
    v = verdict(((int(r["seq"]), bool(r["red"])) for r in recs), total)
    return {
        "mode": mode, "kills": len(times), "produced": total, "handled_records": len(recs),
        "p50_ms": round(statistics.median(times), 1), "p95_ms": round(pct(times, 0.95), 1),
        "max_ms": round(max(times), 1),
        "teardown_p50_ms": round(statistics.median(teardown), 1) if teardown else None,
        "after_reap_p50_ms": round(statistics.median(after), 1) if after else None,
        "after_reap_p95_ms": round(pct(after, 0.95), 1) if after else None,
        "lost": len(v.lost), "out_of_order": len(v.out_of_order),
        "duplicates": v.duplicates, "unflagged_duplicates": v.unflagged_duplicates,
    }


def flags_for(mode: str) -> list[str]:
    if mode in ("poll", "idle-poll"):
        return ["--no-push"]
    if mode == "ttl-only":
        return ["--no-watch"]
    return []


def reap_time(victim: subprocess.Popen[bytes], into: list[float],
              t_kill: float) -> threading.Thread:
    """Record kill -> reaped (its sockets are closed by then) from a thread of its own (join it
    once the victim is reaped: its figure is in ``into`` then)."""

    def wait() -> None:
        victim.wait()
        into.append((time.time() - t_kill) * 1000.0)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def run_loaded(server: ServerProcess, mode: str, kills: int, rate: float, ttl_ms: int,
               consumers: int, kinds: tuple[str, ...] = ("sync",),
               label: str = "") -> list[dict[str, Any]]:
    """One loaded mode; one result row, or (several ``kinds``) one row per kind of handover
    (``s>a``: a sync owner followed by an async one, ...)."""
    client = server.client()
    group = Group(server, client, f"bench-failover-{mode}", flags_for(mode), ttl_ms, kinds)
    client.delete(group.stream, *group.keys.all())
    produced = [0]
    stop = threading.Event()

    def produce() -> None:
        producer = Producer(server.client(), group.stream)
        started = time.monotonic()
        while not stop.is_set():
            produced[0] += 1
            producer.send({"seq": produced[0]})
            stop.wait(max(0.0, started + produced[0] / rate - time.monotonic()))

    for _ in range(consumers):
        group.spawn()
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    times: dict[str, list[float]] = {}
    after: dict[str, list[float]] = {}  # kill -> first handled, minus the victim's teardown
    teardown: list[float] = []
    graceful = mode.endswith("graceful")
    try:
        for _ in range(kills):
            pid = wait_until(group.owner_pid, 30, message="an owner")
            # let the owner work a little, so each kill lands mid-stream
            seen = len(group.record.read())
            wait_until(lambda s=seen: len(group.record.read()) > s + int(rate * 0.2), 30,
                       message="owner handling")
            victim = group.by_pid.pop(pid)
            start = len(group.record.read())
            t_kill = time.time()
            victim.send_signal(signal.SIGTERM if graceful else signal.SIGKILL)
            reaper = None if graceful else reap_time(victim, teardown, t_kill)
            # (the time is the handler's own; polling every 5 ms only spares the CPU)
            t_first, heir = wait_until(lambda p=pid, s=start: group.first_after(p, s), 30,
                                       interval=0.005, message="failover")
            kind = (f"{group.kind_of[pid][0]}>{group.kind_of[heir][0]}" if len(kinds) > 1
                    else "")
            took = (t_first - t_kill) * 1000.0
            times.setdefault(kind, []).append(took)
            victim.wait(30)
            if reaper is not None:
                reaper.join(5)
                after.setdefault(kind, []).append(took - teardown[-1])
            group.spawn()  # a replacement standby, up before the next kill
    finally:
        stop.set()
        producer.join()
    try:
        return [summary(f"{label}{mode}{' ' + kind if kind else ''}", got, group, produced[0],
                        teardown, after.get(kind)) for kind, got in sorted(times.items())]
    finally:
        group.close()


def run_idle(server: ServerProcess, mode: str, kills: int, ttl_ms: int, consumers: int,
             delay_ms: int, kinds: tuple[str, ...] = ("sync",),
             label: str = "") -> dict[str, Any]:
    client = server.client()
    group = Group(server, client, f"bench-failover-{mode}", flags_for(mode), ttl_ms, kinds)
    client.delete(group.stream, *group.keys.all())
    seq = 0
    times: list[float] = []
    teardown: list[float] = []

    def produce_one() -> float:
        nonlocal seq
        seq += 1
        t = time.time()
        client.xadd(group.stream, {"seq": seq})
        return t

    for _ in range(consumers):
        group.spawn()
    try:
        for _ in range(kills):
            pid = wait_until(group.owner_pid, 30, message="an owner")
            n = len(group.record.read())
            produce_one()  # the owner is at work, then the stream goes quiet
            wait_until(lambda n=n: len(group.record.read()) > n, 30, message="handled")
            time.sleep(0.2)
            victim = group.by_pid.pop(pid)
            start = len(group.record.read())
            victim.send_signal(signal.SIGKILL)
            reap_time(victim, teardown, time.time())
            time.sleep(delay_ms / 1000.0)
            t_add = produce_one()
            t_first, _ = wait_until(lambda p=pid, s=start: group.first_after(p, s), 30,
                                    interval=0.005, message="failover")
            times.append((t_first - t_add) * 1000.0)
            victim.wait(30)
            group.spawn()
        return summary(f"{label}{mode}", times, group, seq, teardown)
    finally:
        group.close()


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def standby_cpu(server: ServerProcess, flags: list[str], seconds: float,
                kinds: tuple[str, ...] = ("sync",)) -> float:
    """CPU seconds a standby uses per minute beside a live owner on an idle stream."""
    client = server.client()
    group = Group(server, client, f"bench-cpu{'-'.join(flags)}", flags, 3000, kinds)
    try:
        group.spawn()
        wait_until(group.owner_pid, 30, message="an owner")
        standby = group.spawn()
        time.sleep(1.0)  # past its start-up
        before = cpu_ticks(standby.pid)
        time.sleep(seconds)
        used = (cpu_ticks(standby.pid) - before) / os.sysconf("SC_CLK_TCK")
    finally:
        group.close()
    return round(used * 60.0 / seconds, 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-bin", default=None)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--rate", type=float, default=1000.0, help="produced entries/s")
    parser.add_argument("--ttl-ms", type=int, default=1000)
    parser.add_argument("--consumers", type=int, default=2)
    parser.add_argument("--idle-delay-ms", type=int, default=100,
                        help="idle modes: the entry is produced this long after the kill")
    parser.add_argument("--cpu-seconds", type=float, default=30.0,
                        help="measure a standby's CPU over this long (0: skip)")
    parser.add_argument("--modes", default=None,
                        help=f"comma-separated (default: {','.join(ALL)}; with --async also "
                             f"{','.join(MIXED)})")
    parser.add_argument("--async", dest="use_async", action="store_true",
                        help="asyncio consumers (consume --async); adds the mixed modes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    modes = (args.modes.split(",") if args.modes
             else [*ALL, *MIXED] if args.use_async else list(ALL))
    kinds = ("async",) if args.use_async else ("sync",)
    label = "async " if args.use_async else ""
    results = []
    cpu: dict[str, float] = {}
    with ServerProcess(args.server_bin) as server:
        info = server.client().info("server")
        version = info.get("valkey_version") or info["redis_version"]
        label_server = f"{info.get('server_name') or 'redis'} {version}"
        for mode in modes:
            if mode in LOADED:
                results += run_loaded(server, mode, args.kills, args.rate, args.ttl_ms,
                                      args.consumers, kinds, label)
            elif mode in MIXED:
                results += run_loaded(server, mode, args.kills, args.rate, args.ttl_ms,
                                      args.consumers, ("sync", "async"))
            elif mode in IDLE:
                results.append(run_idle(server, mode, args.kills, args.ttl_ms, args.consumers,
                                        args.idle_delay_ms, kinds, label))
            else:
                parser.error(f"unknown mode {mode!r} (modes: {', '.join((*ALL, *MIXED))})")
        if args.cpu_seconds > 0:
            cpu = {"push": standby_cpu(server, [], args.cpu_seconds, kinds),
                   "poll": standby_cpu(server, ["--no-push"], args.cpu_seconds, kinds)}
    if args.json:
        print(json.dumps({"server": label_server, "results": results,
                          "standby_cpu_s_per_min": cpu},
                         indent=2))
        return 0
    print(f"failover benchmark on {label_server}; {label or 'sync '}consumers; lease TTL "
          f"{args.ttl_ms} ms; {args.consumers} consumer processes; producer {args.rate:.0f} "
          "entries/s; time = kill signal -> first entry handled by another process (handler's "
          "own record); idle modes: the entry's "
          f"XADD ({args.idle_delay_ms} ms after the kill) -> its handling; teardown: kill -> the "
          "killed process reaped (its sockets closed), p50; after: p50 of (time - teardown) per "
          "SIGKILL under load, what follows the kernel's teardown")
    print(f"{'mode':<22} {'kills':>5} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'teardown':>9} "
          f"{'after':>6} "
          f"{'produced':>9} "
          f"{'lost':>5} {'reord':>6} {'dups':>5} {'unflagged':>9}")
    for r in results:
        print(f"{r['mode']:<22} {r['kills']:>5} {r['p50_ms']:>8} {r['p95_ms']:>8} "
              f"{r['max_ms']:>8} {r['teardown_p50_ms'] or '-':>9} "
              f"{r['after_reap_p50_ms'] or '-':>6} {r['produced']:>9} "
              f"{r['lost']:>5} {r['out_of_order']:>6} {r['duplicates']:>5} "
              f"{r['unflagged_duplicates']:>9}")
    if cpu:
        print(f"standby CPU beside a live owner, idle stream ({args.cpu_seconds:.0f} s each): "
              f"push {cpu['push']} s/min, poll only {cpu['poll']} s/min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
