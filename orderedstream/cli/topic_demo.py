"""``orderedstream demo --partitions P``: the failover demo for a partitioned topic.

An embedded cluster (3 primaries, 3 replicas), a topic of P partitions, a producer (``produce
--topic``: entries with ``seq``, ``key``, ``kseq``; every ``--corrupt-every``-th payload
corrupted, as in the single-stream demo), ``--consumers`` members (``consume --topic`` with the
recording handler, in hold-key mode on ``key``) and two topic fixers (``fix --topic``), all real
processes.  Every ``--kill-every`` seconds a random member that owns partitions is SIGKILLed and
a new one started; once, mid-run, a fixer is SIGKILLed and started again; with
``--kill-primary`` one primary is killed once, mid-run (its replica is promoted).  A live panel
(the ``status --topic`` view, the demo's kills merged into its timeline), then the verdict from
what the handlers recorded: per-key order, lost, duplicates (flagged or not), epochs handed out
twice (must be 0), corrupted entries repaired (distinct entries, not handlings), entries still
parked or buried (must be 0), and how long each failover took.

Per-key order is judged strictly, repaired entries included: the handler parks a corrupted
entry (``Defer``), and hold-key mode parks its key's later entries behind it, so when a fixer
re-streams it repaired (at the tail) they come back after it, in order (DESIGN.md §6).  Without
hold-key mode a repaired entry would come back after its key's later entries: what the
single-stream demo counts as "late", and no per-key order a topic could promise.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import tempfile
import time
import uuid
from collections.abc import Set as AbstractSet
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from .. import _wire as wire
from .._demo import is_corrupt
from .._dlq import DeadLetters
from .._server import AnyClient, connect_url
from .._status import TopicEvent, TopicStatus, topic_status
from .._topic import Topic, create_topic
from ..exceptions import ConfigError
from ..testing import ClusterServers, RecordTail, topic_verdict
from .demo import _Cast, _Stop, tear_down
from .topic_status import _fault, _ranges, _refresh, render_topic_status


class _Failover:
    """One fault the demo caused: ``waiting`` are the partitions not yet handled again."""

    def __init__(self, kind: str, who: str, at: float, partitions: set[int],
                 pid: int | None = None) -> None:
        self.kind, self.who, self.at, self.pid = kind, who, at, pid
        self.partitions = frozenset(partitions)
        self.waiting = set(partitions)
        self.last = at
        self.took_ms: float | None = None
        self.gave_up = False

    def see(self, record: dict[str, Any]) -> None:
        """A handled entry: does it show one of our partitions served again?"""
        p = record.get("p")
        if p not in self.waiting or record["t"] < self.at:
            return
        if self.pid is not None:  # a member killed: served by another process
            again = record["pid"] != self.pid
        else:  # a primary killed: an entry written after the kill (so by its replica)
            again = int(str(record["id"]).split("-")[0]) >= self.at * 1000
        if again:
            self.waiting.discard(p)
            self.last = max(self.last, record["t"])
            if not self.waiting:
                self.took_ms = (self.last - self.at) * 1000.0

    @property
    def open(self) -> bool:
        return self.took_ms is None and not self.gave_up

    def event(self) -> TopicEvent:
        # 'again': until every partition it served was handled again
        detail = {"owned": _ranges(sorted(self.partitions))}
        if self.took_ms is not None:
            detail["again_ms"] = f"{self.took_ms:.0f}"
        elif self.gave_up:
            detail["again"] = "not seen"
        return TopicEvent(ts_ms=int(self.at * 1000), type=self.kind, member=self.who,
                          partition=None, epoch=None, detail=detail)


HOLD_KEY_FIELD = "key"  # the members' hold-key field: the demo entries' routing key


def _in_streams(client: AnyClient, topic: Topic) -> tuple[dict[int, tuple[str, int]], set[int]]:
    """seq -> (key, kseq) of every entry the partition streams hold, and the seqs written
    corrupted (the producer's originals; re-streamed copies carry os-origin-id)."""
    out: dict[int, tuple[str, int]] = {}
    corrupt: set[int] = set()
    for stream in topic.streams:
        last = "-"
        while True:
            rows: Any = client.xrange(stream, min=last, count=5000)
            if last != "-":
                rows = rows[1:]
            if not rows:
                break
            for _, fields in rows:
                if b"seq" in fields:
                    seq = int(fields[b"seq"])
                    out[seq] = (fields[b"key"].decode(), int(fields[b"kseq"]))
                    if wire.ORIGIN_ID not in fields and is_corrupt(
                            fields.get(b"payload", b"").decode("utf-8", "replace")):
                        corrupt.add(seq)
            last = rows[-1][0].decode()
    return out, corrupt


def _dead_letters(client: AnyClient, topic: Topic, group: str) -> tuple[int, int]:
    """(entries still parked or held behind, entries buried) over every partition."""
    counts = [d.counts() for d in DeadLetters.of_topic(client, topic.streams, group)]
    return sum(c.parked + c.followers for c in counts), sum(c.graveyard for c in counts)


def judge(records: list[dict[str, Any]], present: dict[int, tuple[str, int]],
          corrupt: AbstractSet[int] = frozenset(), parked: int = 0, buried: int = 0
          ) -> dict[str, Any]:
    """The verdict over the handlers' records and what the streams hold.  An entry the
    producer was told was written but that a killed primary took with it (replication is
    asynchronous) is counted apart (``lost_by_server``), and per-key order is judged over the
    entries that exist (a key's ``kseq`` renumbered over them), repaired ones in their place
    (hold-key mode).  ``corrupt``: the seqs written corrupted; ``repaired`` counts those
    handled repaired, once each however often a copy was handled; ``parked`` and ``buried``
    (what the dead-letter path still holds) must be 0."""
    handled = {int(r["seq"]) for r in records}
    produced = max(present.keys() | handled, default=0)
    kseqs: dict[str, set[int]] = {}
    for key, kseq in present.values():
        kseqs.setdefault(key, set()).add(kseq)
    for r in records:
        kseqs.setdefault(str(r["key"]), set()).add(int(r["kseq"]))
    rank = {(key, kseq): n for key, seqs in kseqs.items()
            for n, kseq in enumerate(sorted(seqs), start=1)}
    judged = topic_verdict((dict(r, kseq=rank[(str(r["key"]), int(r["kseq"]))])
                            for r in records), produced)
    lost = [s for s in judged.lost if s in present]
    repaired = {int(r["seq"]) for r in records if r.get("repaired")}
    result = judged.as_dict()
    result.update(lost=len(lost), lost_by_server=len(judged.lost) - len(lost),
                  corrupted=len(corrupt), repaired=len(repaired & corrupt),
                  still_parked=parked, buried=buried)
    result["ok"] = not (lost or judged.out_of_order or judged.unflagged_duplicates
                        or judged.epochs_reused or parked or buried
                        or repaired & corrupt != corrupt)
    return result


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))], 1)


def run_topic_demo(args: argparse.Namespace, console: Console) -> int:
    from . import redact

    if args.pause:
        raise ConfigError("--pause is the single-stream demo's: the partitioned demo kills "
                          "members (leave out --pause, or --partitions)")
    if args.corrupt_every is None:
        args.corrupt_every = 50
    if args.kill_primary and args.redis_url is not None:
        raise ConfigError("--kill-primary kills a node of the demo's own cluster: leave out "
                          "--redis-url")
    if args.consumers < 2 or args.keys < 1:
        raise ConfigError("the partitioned demo needs --consumers >= 2 (a killed member's "
                          "partitions go to the others) and --keys >= 1")
    out = Console(stderr=True) if args.json else console
    cluster: ClusterServers | None = None
    cast: _Cast | None = None
    client: Any = None
    work: Path | None = None
    signals = _Stop()
    stop = signals.stop
    try:
        url = args.redis_url
        if url is None:
            out.print("starting the embedded cluster (3 primaries, 3 replicas)...")
            cluster = ClusterServers()
            try:
                cluster.start()
            except (RuntimeError, TimeoutError) as err:
                raise ConfigError(f"the cluster did not start: "
                                  f"{' '.join(str(err).split())[:300]}") from err
            url = cluster.url
        client = connect_url(url)
        name = args.stream or f"demo-{uuid.uuid4().hex[:6]}"
        group = args.group
        topic = create_topic(client, name, args.partitions)
        work = Path(tempfile.mkdtemp(prefix="orderedstream-demo-"))
        out.print(f"[bold]orderedstream demo[/] on {'an embedded cluster at ' if cluster else ''}"
                  f"{redact(url)}: topic {name} ({topic.partitions} partitions), group {group}, "
                  f"logs in {work}; Ctrl+C ends it with its verdict")
        cast = _Cast(url, name, group, work, args, topic=name, prefix="member",
                     consumer_args=("--hold-key-field", HOLD_KEY_FIELD))
        for _ in range(args.consumers):
            cast.consumer()
        fixers = ("fixer-1", "fixer-2")  # side by side: each parked entry taken by one
        for fixer in fixers:
            cast.fixer(fixer)
        producer = cast.producer("--keys", str(args.keys))
        tail = RecordTail(cast.record)
        seen = 0
        faults: list[_Failover] = []
        fixer_kills: list[TopicEvent] = []
        rng = random.Random()
        started = time.monotonic()
        next_kill = started + args.kill_every
        primary_at = started + args.duration / 2 if args.kill_primary else None
        # a fixer killed once (and started again), between the member kills
        fixer_at: float | None = started + args.duration / 2 - args.kill_every / 2
        status: TopicStatus | None = None
        note: str | None = None
        last_rate: tuple[float, int] | None = None
        rate: float | None = None

        def look() -> None:
            """Read the group's state and the new records; time the open failovers."""
            nonlocal status, note, seen, last_rate, rate
            try:
                status = topic_status(client, topic, group)
                note = None
            except Exception as err:
                reason = _fault(err)
                if reason is None:
                    raise
                note = f"a shard is failing over ({reason[:60]})"
                _refresh(client)
            rows = tail.read()
            for record in rows[seen:]:
                for fault in faults:
                    if fault.open:
                        fault.see(record)
            seen = len(rows)
            now = time.monotonic()
            if last_rate is not None and now - last_rate[0] >= 0.9:
                rate = (seen - last_rate[1]) / (now - last_rate[0])
                last_rate = (now, seen)
            elif last_rate is None:
                last_rate = (now, seen)
            for fault in faults:
                if fault.open and time.time() - fault.at > 20:
                    fault.gave_up = True

        def panel(title: str) -> Any:
            if status is None:
                return f"[yellow]{note or 'reading the group...'}[/]"
            return render_topic_status(status, rate=rate,
                                       events=[*fixer_kills, *(f.event() for f in faults)],
                                       note=note, title=title, height=out.height - 1)

        with Live(console=out, refresh_per_second=4, transient=False) as live:
            while not stop.is_set() and time.monotonic() - started < args.duration:
                look()
                now = time.monotonic()
                members_open = any(f.open and f.pid is not None for f in faults)
                # a kill once the previous one is over and two members at least are live
                # (the replacement of the last victim may still be starting)
                if (status is not None and now >= next_kill and not members_open
                        and sum(m.live for m in status.members) >= 2):
                    owners = {p.owner for p in status.partitions if p.owner}
                    alive = {n: p for n, p in cast.consumers.items() if p.poll() is None}
                    choices = sorted(n for n in alive if n in owners)
                    if choices:
                        victim = rng.choice(choices)
                        proc = alive[victim]
                        owned = {p.index for p in status.partitions if p.owner == victim}
                        at = time.time()
                        proc.kill()
                        proc.wait(5)
                        faults.append(_Failover("SIGKILL", victim, at, owned, proc.pid))
                        cast.consumer()  # a new member takes its place
                    next_kill = now + args.kill_every
                if fixer_at is not None and now >= fixer_at:
                    fixer_at = None
                    victim = rng.choice(fixers)
                    proc = cast.fixers[victim]
                    at = time.time()
                    proc.kill()
                    proc.wait(5)
                    cast.fixer(victim)  # its claims come back to either after 5 s at most
                    fixer_kills.append(TopicEvent(
                        ts_ms=int(at * 1000), type="SIGKILL", member=victim, partition=None,
                        epoch=None, detail={"fixer": "started again"}))
                if (primary_at is not None and now >= primary_at and cluster is not None
                        and status is not None):
                    primary_at = None
                    # the last partition's primary: not the node of the URL every process was
                    # given (new members are given a running node's URL anyway)
                    node = cluster.primary_for(topic.streams[-1])
                    where = f"{node.host}:{node.port}"
                    parts = {p.index for p in status.partitions if p.node == where}
                    at = time.time()
                    cluster.kill(node)
                    cast.url = cluster.url
                    faults.append(_Failover("primary killed", f":{node.port}", at, parts))
                live.update(panel(f"orderedstream demo - {name}/{group} - "
                                  f"{time.monotonic() - started:.0f}/{args.duration:.0f} s"))
                stop.wait(0.25)
            # stop producing, then let the members and fixers handle everything the streams
            # hold (a corrupted entry: once repaired)
            producer.send_signal(signal.SIGTERM)
            producer.wait(30)
            present: dict[int, tuple[str, int]] = {}
            corrupt: set[int] = set()
            drain_until = time.monotonic() + args.drain_timeout
            while not signals.hurry.is_set():
                try:
                    present, corrupt = _in_streams(client, topic)
                    break
                except Exception as err:
                    if _fault(err) is None or time.monotonic() > drain_until:
                        raise
                    _refresh(client)
                    signals.hurry.wait(0.25)
            while time.monotonic() < drain_until and not signals.hurry.is_set():
                look()
                if {int(r["seq"]) for r in tail.read()} >= present.keys():
                    break
                live.update(panel("draining... (Ctrl+C again: the verdict now)"))
                signals.hurry.wait(0.25)
            look()
            parked = buried = -1  # unknown (the cluster would not say)
            for _ in range(20):
                try:
                    parked, buried = _dead_letters(client, topic, group)
                    break
                except Exception as err:
                    if _fault(err) is None:
                        raise
                    _refresh(client)
                    signals.hurry.wait(0.25)
        result = judge(tail.read(), present, corrupt, parked, buried)
        kills = [f for f in faults if f.pid is not None]
        took = [f.took_ms for f in kills if f.took_ms is not None]
        primary = next((f for f in faults if f.pid is None), None)
        result.update({
            "topic": name, "partitions": topic.partitions, "server": redact(url),
            "kills": len(kills), "failover_ms_p50": _pct(took, 0.5),
            "failover_ms_p95": _pct(took, 0.95), "failovers_ms": [round(t, 1) for t in took],
            "failovers_not_seen": sum(1 for f in kills if f.took_ms is None),
            "fixers": len(fixers), "fixer_kills": len(fixer_kills),
            "primary_killed": primary is not None,
            "primary_failover_ms": round(primary.took_ms, 1)
            if primary is not None and primary.took_ms is not None else None,
            "logs": str(work) if args.keep_logs else None, "interrupted": stop.is_set()})
        if args.json:
            print(json.dumps(result))
        else:
            _print_verdict(console, result)
        return 0 if result["ok"] else 1
    finally:
        tear_down(cast, client, cluster, work, args.keep_logs, signals)


def _print_verdict(console: Console, result: dict[str, Any]) -> None:
    ok = "green" if result["ok"] else "red"
    flagged = result["duplicates"] - result["unflagged_duplicates"]
    table = Table(title="verdict (from the handlers' own record)", show_header=False)
    table.add_column("measure", style="bold")
    table.add_column("value")
    rows = [
        ("produced", str(result["produced"])),
        ("handled", str(result["handled"])),
        ("lost", f"[{ok}]{result['lost']}[/]"),
        ("per-key out of order", f"[{ok}]{result['out_of_order']}[/]"),
        ("duplicates", f"{result['duplicates']} ({flagged} flagged redeliveries, "
                       f"{result['unflagged_duplicates']} not)"),
        ("epochs reused", f"[{ok}]{result['epochs_reused']}[/]"),
        ("repaired", f"[{ok}]{result['repaired']}[/] of {result['corrupted']} corrupted, "
                     f"each in its key's order ({result['fixers']} fixers, "
                     f"{result['fixer_kills']} killed and started again)"),
        ("still parked / buried", f"[{ok}]{result['still_parked']} / {result['buried']}[/]"),
        ("member failover p50 / p95",
         f"{result['failover_ms_p50']} / {result['failover_ms_p95']} ms over "
         f"{len(result['failovers_ms'])} kills (every orphaned partition handled again)"),
    ]
    if result["primary_killed"]:
        rows.append(("primary failover", f"{result['primary_failover_ms']} ms (its partitions "
                                         "handled again, entries written to the replica)"))
    if result["lost_by_server"]:
        rows.append(("lost by the server", f"{result['lost_by_server']} (acknowledged to the "
                                           "producer, gone with the killed primary: "
                                           "replication is asynchronous)"))
    for measure, value in rows:
        table.add_row(measure, value)
    console.print()
    console.print(table)
