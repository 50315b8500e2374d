"""``orderedstream demo``: a producer, consumers and a fixer as real processes; the owner is
killed (or paused) again and again; a live panel; a verdict from what the handlers recorded."""

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
import uuid
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from .. import _wire as wire
from .._keys import GroupKeys
from .._server import client_from_url, connect_check
from .._status import group_status
from ..exceptions import ConfigError
from ..testing import (
    ServerProcess,
    _die_with_parent,
    process_stopped,
    read_records,
    verdict,
    wait_until,
)
from .dashboard import render_status


class _Cast:
    """The demo's processes: the real CLI, each logging to a file in the work directory."""

    def __init__(self, url: str, stream: str, group: str, work: Path,
                 args: argparse.Namespace, *, topic: str | None = None,
                 prefix: str = "consumer", consumer_args: tuple[str, ...] = ()) -> None:
        self.url, self.stream, self.group, self.work = url, stream, group, work
        self.args = args
        self.where = ["--topic", topic] if topic is not None else ["--stream", stream]
        self.prefix = prefix
        self.consumer_args = consumer_args  # more options for every consumer
        self.record = work / "handled.jsonl"
        self.consumers: dict[str, subprocess.Popen[bytes]] = {}
        self.fixers: dict[str, subprocess.Popen[bytes]] = {}
        self.others: list[subprocess.Popen[bytes]] = []  # the producer, fixers killed
        self.count = 0
        self.env = dict(os.environ, ORDEREDSTREAM_RECORD=str(self.record),
                        ORDEREDSTREAM_DEFER_MS=str(args.defer_ms))

    def _spawn(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        log = open(self.work / f"{name}.log", "ab")  # noqa: SIM115 - closed by the OS
        # a session of its own: a Ctrl+C or a closed terminal reaches the demo only, which
        # stops its cast in order; and each dies with the demo if the demo is killed
        return subprocess.Popen([sys.executable, "-m", "orderedstream", *argv,
                                 "--redis-url", self.url, *self.where,
                                 "--group", self.group], env=self.env, stdout=log, stderr=log,
                                start_new_session=True, preexec_fn=_die_with_parent)

    def consumer(self, name: str | None = None) -> str:
        """Start a consumer: a new one, or ``name`` again (a killed one restarting)."""
        if name is None:
            self.count += 1
            name = f"{self.prefix}-{self.count}"
        self.consumers[name] = self._spawn(
            name, "consume", "--name", name, "--quiet", "--lease-ttl-ms",
            str(self.args.lease_ttl_ms), "--batch", "20",
            "--handler", "orderedstream.testing:record_handler", *self.consumer_args)
        return name

    def producer(self, *extra: str) -> subprocess.Popen[bytes]:
        argv = ["produce", "--rate", str(self.args.rate), "--quiet", *extra]
        if self.args.corrupt_every:
            argv += ["--corrupt-every", str(self.args.corrupt_every)]
        self.others.append(self._spawn("producer", *argv))
        return self.others[-1]

    def fixer(self, name: str = "fixer") -> None:
        """Start fixer ``name`` (again: a killed one restarting; the old process is kept
        among ``others`` to be reaped)."""
        if name in self.fixers:
            self.others.append(self.fixers[name])
        self.fixers[name] = self._spawn(name, "fix", "--name", name, "--quiet",
                                        "--visibility-ms", "5000")

    def stop(self) -> None:
        procs = [*self.others, *self.fixers.values(), *self.consumers.values()]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.terminate()
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def _clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"


class _Stop:
    """Ctrl+C, SIGTERM or a closed terminal (SIGHUP): the first ends the kills (the demo then
    drains and gives its verdict), the second skips the draining."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.hurry = threading.Event()
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum: int, frame: object) -> None:
        if signum == signal.SIGHUP:
            from . import terminal_gone

            terminal_gone()
        if self.stop.is_set():
            self.hurry.set()
        self.stop.set()

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def run_demo(args: argparse.Namespace, console: Console) -> int:
    from . import redact

    if args.partitions is not None:
        from .topic_demo import run_topic_demo

        return run_topic_demo(args, console)
    if args.kill_primary:
        raise ConfigError("--kill-primary needs the cluster of the partitioned demo: add "
                          "--partitions 8")
    if args.corrupt_every is None:
        args.corrupt_every = 50

    server: ServerProcess | None = None
    cast: _Cast | None = None
    client: Any = None
    work: Path | None = None
    signals = _Stop()
    stop = signals.stop
    try:
        url = args.redis_url
        if url is None:
            server = ServerProcess()
            server.start()
            url = server.url
        stream = args.stream or f"demo-{uuid.uuid4().hex[:6]}"
        group = args.group
        work = Path(tempfile.mkdtemp(prefix="orderedstream-demo-"))
        client = client_from_url(url)
        out = Console(stderr=True) if args.json else console
        connect_check(client)
        client.delete(stream, *GroupKeys(stream, group).all())
        out.print(f"[bold]orderedstream demo[/] on {'embedded valkey ' if server else ''}"
                  f"{redact(url)}: stream {stream}, group {group}, logs in {work}; Ctrl+C ends "
                  "it with its verdict")
        cast = _Cast(url, stream, group, work, args)
        for _ in range(args.consumers):
            cast.consumer()
        cast.fixer()
        producer = cast.producer()
        failovers: list[tuple[str, str, str, float | None]] = []
        took: list[float] = []
        pending_kill: tuple[float, str, int] | None = None  # when, whom, its epoch
        paused: list[subprocess.Popen[bytes]] = []
        started = time.monotonic()
        next_kill = started + args.kill_every
        last_rate: tuple[float, int] | None = None
        rate: float | None = None
        records: list[dict[str, Any]] = []
        with Live(console=out, refresh_per_second=4, transient=False) as live:
            while not stop.is_set() and time.monotonic() - started < args.duration:
                status = group_status(client, stream, group)
                records = read_records(cast.record)
                now = time.monotonic()
                if last_rate is not None and now - last_rate[0] >= 0.9:
                    rate = (len(records) - last_rate[1]) / (now - last_rate[0])
                    last_rate = (now, len(records))
                elif last_rate is None:
                    last_rate = (now, len(records))
                if pending_kill is not None:
                    at, victim, old_epoch = pending_kill
                    # the failover is over when a newer epoch handles something (a woken
                    # zombie's last write carries its old epoch and does not count)
                    after = [r for r in records if r["t"] >= at and r["epoch"] > old_epoch]
                    if after:
                        first = min(after, key=lambda r: r["t"])
                        ms = (first["t"] - at) * 1000.0
                        took.append(ms)
                        owner = next((n for n, p in cast.consumers.items()
                                      if p.pid == first["pid"]), str(first["pid"]))
                        failovers[-1] = (failovers[-1][0], failovers[-1][1], owner, ms)
                        pending_kill = None
                if (pending_kill is None and now >= next_kill and status.owner
                        and status.owner in cast.consumers):
                    victim = status.owner
                    proc = cast.consumers[victim]
                    for zombie in paused:  # wake the previous zombie: it finds itself fenced
                        zombie.send_signal(signal.SIGCONT)
                    paused.clear()
                    at = time.time()
                    if args.pause:
                        proc.send_signal(signal.SIGSTOP)
                        pid = proc.pid
                        wait_until(lambda: process_stopped(pid), 5,  # noqa: B023
                                   message="paused")
                        paused.append(proc)
                        action = "paused"
                    else:
                        proc.kill()
                        proc.wait(5)
                        action = "killed"
                    pending_kill = (at, victim, status.epoch or 0)
                    failovers.append((_clock(at), f"{victim} ({action})", "...", None))
                    if not args.pause:
                        cast.consumer(victim)  # it comes back, as a standby
                    next_kill = time.monotonic() + args.kill_every
                live.update(render_status(status, rate=rate, failovers=failovers,
                                          height=out.height - 1,
                                          title=f"orderedstream demo - {stream}/{group} - "
                                                f"{time.monotonic() - started:.0f}/"
                                                f"{args.duration:.0f} s"))
                stop.wait(0.25)
            for zombie in paused:
                zombie.send_signal(signal.SIGCONT)
            # stop producing, then let the consumers and the fixer drain everything
            producer.terminate()
            producer.wait(10)
            produced, corrupt = _produced(client, stream)
            drain_until = time.monotonic() + args.drain_timeout
            while time.monotonic() < drain_until and not signals.hurry.is_set():
                records = read_records(cast.record)
                if {r["seq"] for r in records} >= set(range(1, produced + 1)):
                    break
                live.update(render_status(group_status(client, stream, group), rate=rate,
                                          failovers=failovers, height=out.height - 1,
                                          title="draining... (Ctrl+C again: the verdict now)"))
                signals.hurry.wait(0.25)
        records, fenced = fence(read_records(cast.record))
        judged = verdict(((r["seq"], r["red"]) for r in records), produced, late=corrupt)
        # distinct entries: a repaired copy handled again after a kill is a flagged redelivery
        repaired = len({r["origin"] for r in records if r.get("repaired")})
        result = judged.as_dict()
        result.update({
            "kills" if not args.pause else "pauses": len(failovers),
            "failover_ms_p50": round(statistics.median(took), 1) if took else None,
            "failover_ms_p95": round(sorted(took)[min(len(took) - 1,
                                                      round(0.95 * (len(took) - 1)))], 1)
            if took else None,
            "failovers_ms": [round(t, 1) for t in took],
            "corrupted": len(corrupt), "repaired_handled": repaired,
            "fenced_zombie_writes": fenced,
            "stream": stream, "server": redact(url),
            "logs": str(work) if args.keep_logs else None,
            "interrupted": stop.is_set()})
        if args.json:
            print(json.dumps(result))
        else:
            ok = "green" if judged.ok else "red"
            flagged = judged.duplicates - judged.unflagged_duplicates
            console.print()
            table = Table(title="verdict (from the handlers' own record)", show_header=False)
            table.add_column("measure", style="bold")
            table.add_column("value")
            for measure, value in (
                    ("produced", str(produced)),
                    ("handled", str(judged.handled)),
                    ("lost", f"[{ok}]{len(judged.lost)}[/]"),
                    ("out of order", f"[{ok}]{len(judged.out_of_order)}[/]"),
                    ("duplicates", f"{judged.duplicates} ({flagged} flagged redeliveries)"),
                    ("repaired", f"{repaired} of {len(corrupt)} corrupted"),
                    ("failover p50 / p95",
                     f"{result['failover_ms_p50']} / {result['failover_ms_p95']} ms "
                     f"over {len(took)} {'pauses' if args.pause else 'kills'}"),
                    ("fenced zombie writes", str(fenced))):
                table.add_row(measure, value)
            console.print(table)
        return 0 if not judged.lost and not judged.out_of_order else 1
    finally:
        tear_down(cast, client, server, work, args.keep_logs, signals)


def tear_down(cast: Any, client: Any, servers: Any, work: Path | None, keep_logs: bool,
              signals: Any) -> None:
    """The end of a demo, however it ends: its processes, its client, its embedded server(s),
    its work directory (unless ``--keep-logs``), and the signal handlers it installed."""
    try:
        if cast is not None:
            cast.stop()
        if client is not None:
            client.close()
    finally:
        if servers is not None:
            servers.cleanup()
        if work is not None and not keep_logs:
            shutil.rmtree(work, ignore_errors=True)
        signals.restore()


def fence(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """What a downstream store that fences by epoch would accept: records in the order they
    were written, minus any whose epoch is older than one already written (a paused owner's
    last handler call, finishing after it woke up).  Returns (accepted, refused count)."""
    newest = 0
    accepted = []
    for r in records:
        if r["epoch"] < newest:
            continue
        newest = r["epoch"]
        accepted.append(r)
    return accepted, len(records) - len(accepted)


def _produced(client: Any, stream: str) -> tuple[int, set[int]]:
    """From the stream itself: how many entries the producer wrote, and which were corrupted
    (the originals; re-streamed copies carry os-origin-id)."""
    seqs: set[int] = set()
    corrupt: set[int] = set()
    last = "-"
    while True:
        rows = client.xrange(stream, min=last, count=5000)
        if last != "-":
            rows = rows[1:]
        if not rows:
            break
        for _, fields in rows:
            if wire.ORIGIN_ID in fields:
                continue
            seq = int(fields[b"seq"])
            seqs.add(seq)
            if fields.get(b"payload", b"").startswith(b"CORRUPT:"):
                corrupt.add(seq)
        last = rows[-1][0].decode()
    return (max(seqs) if seqs else 0), corrupt
