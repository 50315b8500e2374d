"""Partitioned-topic benchmark on an embedded 3+3 cluster: member processes (``orderedstream
consume --topic``, the recording handler) under a steady producer, all measured in one run.

Parts (``--parts``, comma-separated):

* ``kill``: ``--members`` members share ``--partitions`` partitions; ``--kills`` times a random
  member is SIGKILLed (and a replacement started once the group has settled).  Per kill:
  *owned again* = kill -> the last orphaned partition's new term (its ``acquired`` record, server
  clock), *handled again* = per orphaned partition, the first entry handled by another process,
  counted from the later of the kill and that entry's arrival (its stream id), the worst of them;
* ``rebalance``: ``--rebalances`` times, a member joins, then one leaves (SIGTERM): partitions
  moved (target: at most ceil(P/N) + 1), the pause of each moved partition (its last entry
  handled by the old owner -> the first by the new one, minus any time no entry was waiting),
  and the longest gap between two handled entries of a partition that did not move in the 2 s
  after each join / leave, beside the same measure over as many quiet 2 s windows;
* ``churn``: random member kills, pauses past the TTL, joins and leaves every 2-4 s for
  ``--churn-seconds``: the longest time any partition had no owner (its lease sampled every
  50 ms);
* ``primary``: a primary (not the URL's node) is SIGKILLed under load: how long its shard's
  partitions pause, and the other shards' end-to-end latency before and after;
* ``scale``: one process owning 256 partitions: connections it holds per node, its idle CPU
  over ``--idle-seconds`` (from ``/proc``), and under the producer for as long: end-to-end
  latency (entry id -> handled) p50/p99, its CPU per entry, and the commands the servers ran per
  entry (INFO commandstats of the primaries: every client's, the producer's XADD included).

At the end every part's record is judged (per-key order, lost, duplicates flagged or not, no
(partition, epoch) handled by two processes).

    python benchmarks/partitions.py                         # every part
    python benchmarks/partitions.py --parts kill --kills 20
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import random
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

from orderedstream._keys import GroupKeys, TopicGroupKeys
from orderedstream._topic import TopicProducer, create_topic, load_topic
from orderedstream.testing import ClusterServers, RecordTail, topic_verdict, wait_until

KEYS = 256
STARTED: list[Members] = []  # every group of member processes, stopped on the way out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else math.nan


class Seq:
    """The global ``seq``, shared by producers writing side by side."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def next(self) -> int:
        with self._lock:
            self.value += 1
            return self.value


class Producer(threading.Thread):
    """Writes ``seq``/``key``/``kseq`` entries at a steady rate, its keys (all ``KEYS`` by
    default) taking turns; producers given disjoint keys and one :class:`Seq` write side by
    side (one per shard: a shard failing over holds up only its own)."""

    def __init__(self, client: Any, topic: str, rate: float, keys: list[int] | None = None,
                 seq: Seq | None = None) -> None:
        super().__init__(daemon=True)
        self.producer = TopicProducer(client, topic)
        self.topic = load_topic(client, topic)
        self.rate = rate
        self.keys = keys if keys is not None else list(range(KEYS))
        self.seq = seq or Seq()
        self.made = 0  # entries this producer made
        self.kseq = dict.fromkeys(self.keys, 0)
        self.halt = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        while not self.halt.is_set():
            due = started + self.made / self.rate
            wait = due - time.monotonic()
            if wait > 0 and self.halt.wait(wait):
                break
            batch = []
            for _ in range(max(1, int((time.monotonic() - due) * self.rate) + 1)):
                self.made += 1
                k = self.keys[self.made % len(self.keys)]
                self.kseq[k] += 1
                batch.append((f"k{k}", {"seq": self.seq.next(), "key": f"k{k}",
                                        "kseq": self.kseq[k]}))
            self._send(batch)

    def _send(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        """Send ``batch``; after a fault (a shard failing over) send again only the entries
        the partitions do not hold (one producer: a partition holds a seq when its last
        entry's seq is at least that), so nothing is written twice."""
        from orderedstream.cli.topic import _stored_seqs

        while True:
            try:
                self.producer.send_many(batch)
                return
            except Exception:
                while not self.halt.is_set():
                    time.sleep(0.1)
                    try:
                        self.producer.client.nodes_manager.initialize()
                        streams = {self.topic.stream_for(k) for k, _ in batch}
                        stored = _stored_seqs(self.producer.client, streams)
                        break
                    except Exception:
                        continue
                else:
                    return
                batch = [(k, f) for k, f in batch
                         if f["seq"] > stored[self.topic.stream_for(k)]]
                if not batch:
                    return

    def stop(self) -> int:
        """Stop; the number of entries made by every producer sharing its :class:`Seq`."""
        self.halt.set()
        self.join()
        self.producer.close()
        return self.seq.value


class Members:
    """Member processes of one topic group."""

    def __init__(self, url: str, topic: str, workdir: Path, ttl_ms: int) -> None:
        self.url = url
        self.topic = topic
        self.workdir = workdir
        self.ttl_ms = ttl_ms
        self.record = RecordTail(workdir / "record.jsonl")
        self.env = dict(os.environ, ORDEREDSTREAM_RECORD=str(self.record.path),
                        ORDEREDSTREAM_WORK_MS="0")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.count = 0
        STARTED.append(self)

    def spawn(self) -> str:
        name = f"m{self.count}"
        self.count += 1
        args = [sys.executable, "-m", "orderedstream", "consume", "--redis-url", self.url,
                "--topic", self.topic, "--group", "g", "--name", name, "--quiet",
                "--handler", "orderedstream.testing:record_handler",
                "--lease-ttl-ms", str(self.ttl_ms), "--batch", "50"]
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed by the OS
        self.procs[name] = subprocess.Popen(args, env=self.env, stdout=log, stderr=log)
        return name

    def live(self) -> dict[str, subprocess.Popen[bytes]]:
        return {n: p for n, p in self.procs.items() if p.poll() is None}

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(10)


def owners_now(client: Any, streams: list[str]) -> dict[int, str]:
    """partition -> consumer name of its lease holder (absent: no owner)."""
    out = {}
    for p, stream in enumerate(streams):
        token = client.get(GroupKeys(stream, "g").lease)
        if token:
            out[p] = token.decode().split(":")[0]
    return out


def settled(client: Any, streams: list[str], names: set[str]) -> bool:
    owners = owners_now(client, streams)
    if len(owners) != len(streams) or set(owners.values()) != names:
        return False
    counts = [list(owners.values()).count(n) for n in names]
    return max(counts) - min(counts) <= 1


def acquired_ms(client: Any, stream: str, after_ms: float) -> float | None:
    """Server ms of the first 'acquired' record of ``stream``'s group after ``after_ms``."""
    for _, fields in client.xrange(GroupKeys(stream, "g").events, min=f"{int(after_ms)}"):
        if fields.get(b"type") == b"acquired":
            return float(fields[b"ts_ms"])
    return None


def id_ms(entry_id: str) -> float:
    return float(entry_id.split("-")[0]) / 1000.0


def _settled_group(cluster: ClusterServers, args: argparse.Namespace, work: Path,
                   tag: str) -> tuple[Any, str, list[str], Members]:
    """A new topic of ``--partitions`` and ``--members`` member processes, once they settled:
    (cluster client, topic, partition streams, members)."""
    client = cluster.client()
    topic = f"{tag}{os.getpid()}"
    streams = list(create_topic(client, topic, args.partitions).streams)
    members = Members(cluster.url, topic, work, args.ttl_ms)
    for _ in range(args.members):
        members.spawn()
    wait_until(lambda: settled(client, streams, set(members.live())), 60,
               message="members settled")
    return client, topic, streams, members


def part_kill(cluster: ClusterServers, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    client, topic, streams, members = _settled_group(cluster, args, work, "bk")
    producer = Producer(client, topic, args.rate)
    producer.start()
    owned_again: list[float] = []
    handled_again: list[float] = []
    detail: list[dict[str, Any]] = []
    rng = random.Random(7)
    try:
        for _ in range(args.kills):
            time.sleep(1.0)
            live = members.live()
            name = rng.choice(sorted(live))
            orphaned = {p for p, owner in owners_now(client, streams).items() if owner == name}
            victim = live[name]
            killed = time.time()
            victim.kill()
            victim.wait()
            members.spawn()  # the replacement joins later (after the orphans are taken)
            wait_until(lambda: settled(client, streams, set(members.live())), 60,
                       message="settled after the kill")
            owned = [acquired_ms(client, streams[p], killed * 1000) for p in orphaned]
            owned_again.append(max((o or math.inf) for o in owned) / 1000.0 - killed)
            detail.append({"orphaned": len(orphaned),
                           "timeline_ms": _timeline(client, topic, killed),
                           "owned_ms": round(owned_again[-1] * 1000, 1)})
            def waits(pid: int = victim.pid, since: float = killed,
                      ps: set[int] = orphaned) -> list[float | None]:
                rows = members.record.read()
                return [_first_after(rows, pid, since, p) for p in ps]

            wait_until(lambda: all(w is not None for w in waits()), 30,
                       message="orphans handled")
            handled_again.append(max(w if w is not None else math.inf for w in waits()))
    finally:
        produced = producer.stop()
    wait_until(lambda: len({r["seq"] for r in members.record.read()}) >= produced, 60,
               message="everything handled")
    members.stop_all()
    result = topic_verdict(members.record.read(), produced)
    return {"part": "kill", "partitions": args.partitions, "members": args.members,
            "kills": args.kills, "rate": args.rate,
            "owned_again_ms": _stats(owned_again), "handled_again_ms": _stats(handled_again),
            "per_kill": detail if args.detail else None,
            "verdict": result.as_dict()}


def _timeline(client: Any, topic: str, since: float) -> list[str]:
    """The group's rebalance records after ``since``: "<ms after since> <type> <member>"."""
    out = []
    for _, f in client.xrange(TopicGroupKeys(topic, "g").events, min=f"{int(since * 1000)}"):
        at = float(f[b"ts_ms"]) - since * 1000 if b"ts_ms" in f else math.nan
        out.append(f"{at:.0f} {f[b'type'].decode()} {f.get(b'member', b'').decode()}")
    return out[:6]


def _first_after(rows: list[dict[str, Any]], pid: int, since: float,
                 partition: int) -> float | None:
    """Seconds from the later of ``since`` and the entry's arrival to the first handling of an
    entry of ``partition`` by a process other than ``pid`` after ``since``."""
    for r in rows:
        if r["p"] == partition and r["pid"] != pid and r["t"] >= since:
            return float(r["t"]) - max(since, id_ms(r["id"]))
    return None


def _stats(values: list[float]) -> dict[str, float]:
    ms = [v * 1000.0 for v in values]
    return {"n": len(ms), "p50": round(pct(ms, 0.5), 1), "p99": round(pct(ms, 0.99), 1),
            "max": round(max(ms), 1) if ms else math.nan}


def part_rebalance(cluster: ClusterServers, args: argparse.Namespace,
                   work: Path) -> dict[str, Any]:
    """``--rebalances`` cycles of: a quiet window, a member joins, the group settles, the oldest
    other member leaves (SIGTERM), the group settles.  Each join and leave is judged on its own
    (partitions moved); the pauses of moved partitions are pooled over the cycles, and the
    longest gap on unmoved partitions of each 2 s window after a join / a leave is set beside
    the same measure over the quiet windows (as many, as long)."""
    client, topic, streams, members = _settled_group(cluster, args, work, "br")
    producer = Producer(client, topic, args.rate)
    producer.start()
    cpu = CpuSampler(members, cluster)
    if args.detail:
        cpu.start()
    out: dict[str, Any] = {"part": "rebalance", "partitions": args.partitions,
                           "cycles": args.rebalances}
    quiet: list[tuple[float, float]] = []
    events: dict[str, list[tuple[float, dict[int, str], dict[int, str], int]]] = {
        "join": [], "leave": []}
    try:
        time.sleep(2.0)
        for _ in range(args.rebalances):
            time.sleep(1.0)
            quiet_from = time.time()
            time.sleep(2.5)
            quiet.append((quiet_from, quiet_from + 2.0))
            before = owners_now(client, streams)
            changed_at = time.time()
            joined = members.spawn()
            wait_until(lambda: settled(client, streams, set(members.live())), 60,
                       message="settled after the join")
            time.sleep(2.5)
            # the rebalance starts at the member's 'joined' record (its process started
            # before: imports, group checks; that CPU is not the rebalance's)
            changed_at = _record_time(client, topic, "joined", joined, changed_at)
            events["join"].append((changed_at, before, owners_now(client, streams),
                                   len(members.live())))
            before = owners_now(client, streams)
            leaver = sorted((n for n in members.live() if n != joined),
                            key=lambda n: int(n[1:]))[0]
            changed_at = time.time()
            members.procs[leaver].send_signal(signal.SIGTERM)
            members.procs[leaver].wait(30)
            wait_until(lambda: settled(client, streams, set(members.live())), 60,
                       message="settled after the leave")
            time.sleep(2.5)
            events["leave"].append((changed_at, before, owners_now(client, streams),
                                    len(members.live()) + 1))
    finally:
        produced = producer.stop()
        cpu.halt()
    wait_until(lambda: len({r["seq"] for r in members.record.read()}) >= produced, 60,
               message="everything handled")
    members.stop_all()
    records = members.record.read()
    every = list(range(args.partitions))
    quiet_gaps = [_longest_gap(records, every, window) for window in quiet]
    out["quiet_longest_gap_ms"] = _gaps(quiet_gaps)
    if args.detail:
        out["quiet_detail"] = [{"worst": _worst_gaps(records, every, w),
                                "cpu_ms": cpu.spent(*w)} for w in quiet]
    for kind, happened in events.items():
        moved_counts, pauses, gaps, details = [], [], [], []
        for at, before, after, _ in happened:
            moved, paused, gap = _moves(records, before, after, at, args.partitions)
            moved_counts.append(moved)
            pauses += paused
            gaps.append(gap)
            if args.detail:
                stayed = [p for p in every if before.get(p) == after.get(p)]
                details.append({"at": round(at, 3),
                                "worst": _worst_gaps(records, stayed, (at, at + 2.0)),
                                "cpu_ms": cpu.spent(at, at + 2.0)})
        out[kind] = {"moved": moved_counts,
                     "bound": math.ceil(args.partitions / happened[0][3]) + 1,
                     "pause_ms": _stats(pauses),
                     "unmoved_longest_gap_ms": _gaps(gaps)}
        if args.detail:
            out[kind]["detail"] = details
    out["verdict"] = topic_verdict(records, produced).as_dict()
    return out


class CpuSampler(threading.Thread):
    """``--detail``: the CPU time of every member process and server node, read from ``/proc``
    every 50 ms, so the CPU each spent in a window can be told (:meth:`spent`)."""

    def __init__(self, members: Members, cluster: ClusterServers) -> None:
        super().__init__(daemon=True)
        self.members = members
        self.servers = {f"s{s.port}": s.proc.pid for s in cluster.servers
                        if s.proc is not None}
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            pids = {**{n: p.pid for n, p in self.members.live().items()}, **self.servers}
            ticks = {}
            for name, pid in pids.items():
                with contextlib.suppress(OSError, IndexError):
                    ticks[name] = _cpu(pid)
            self.samples.append((time.time(), ticks))

    def halt(self) -> None:
        self.done.set()

    def spent(self, start: float, end: float) -> dict[str, float]:
        """ms of CPU each process spent from ``start`` to ``end`` (nearest samples), plus the
        members' and the servers' sums."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2:
            return {}
        first, last = inside[0][1], inside[-1][1]
        tick_ms = 1000.0 / os.sysconf("SC_CLK_TCK")
        out = {n: round((last[n] - first.get(n, 0)) * tick_ms) for n in last}
        out["members"] = sum(v for n, v in out.items() if n.startswith("m"))
        out["servers"] = sum(v for n, v in out.items() if n.startswith("s"))
        return out


def _gaps(gaps: list[float]) -> dict[str, Any]:
    """Per-window longest gaps (s): each, their median and the longest, in ms."""
    ms = [round(g * 1000, 1) for g in gaps]
    return {"windows": ms, "median": round(statistics.median(ms), 1), "max": max(ms)}


def _moves(records: list[dict[str, Any]], before: dict[int, str], after: dict[int, str],
           at: float, partitions: int) -> tuple[int, list[float], float]:
    """(partitions moved, the pause of each moved partition (s), the longest gap on the others
    in the 2 s from ``at`` (s))."""
    moved = sorted(p for p in after if before.get(p) != after[p])
    pauses = []
    for p in moved:
        rows = [r for r in records if r["p"] == p and r["t"] >= at - 1]
        old = [r for r in rows if r["t"] < at + 5 and _owner_change(rows, r)]
        if old:
            first_new = old[0]
            prev = [r for r in rows if r["t"] < first_new["t"]]
            last_old = prev[-1]["t"] if prev else at
            pauses.append(float(first_new["t"]) - max(last_old, id_ms(first_new["id"])))
    stayed = [p for p in range(partitions) if p not in moved]
    return len(moved), pauses, _longest_gap(records, stayed, (at, at + 2.0))


def _worst_gaps(records: list[dict[str, Any]], partitions: list[int],
                window: tuple[float, float], n: int = 3) -> list[dict[str, Any]]:
    """The ``n`` longest waits inside ``window`` (:func:`_longest_gap`), each with when it
    ended (ms after the window's start), its partition and process."""
    wanted = set(partitions)
    last: dict[int, float] = {}
    found = []
    for r in records:
        p = r["p"]
        if p not in wanted:
            continue
        t = float(r["t"])
        if window[0] <= t <= window[1] and p in last:
            found.append({"ms": round((t - max(last[p], id_ms(r["id"]))) * 1000, 3),
                          "at_ms": round((t - window[0]) * 1000), "p": p, "pid": r["pid"]})
        last[p] = t
    return sorted(found, key=lambda g: -g["ms"])[:n]


def _record_time(client: Any, topic: str, kind: str, member: str, after: float) -> float:
    """When (server clock, s) ``member``'s first ``kind`` record after ``after`` was written."""
    key = TopicGroupKeys(topic, "g").events
    for entry_id, f in client.xrange(key, min=f"{int(after * 1000)}"):
        if f.get(b"type") == kind.encode() and f.get(b"member") == member.encode():
            return id_ms(entry_id.decode())
    return after


def _owner_change(rows: list[dict[str, Any]], r: dict[str, Any]) -> bool:
    i = rows.index(r)
    return i > 0 and rows[i - 1]["pid"] != r["pid"]


def _longest_gap(records: list[dict[str, Any]], partitions: list[int],
                 window: tuple[float, float]) -> float:
    """The longest time an entry of one of ``partitions`` waited beyond its arrival for the
    previous one to be handled, inside ``window``: handled - max(arrival, previous handled)."""
    worst = _worst_gaps(records, partitions, window, 1)
    return worst[0]["ms"] / 1000.0 if worst else 0.0


def part_scale(cluster: ClusterServers, args: argparse.Namespace,
               work: Path) -> dict[str, Any]:
    client = cluster.client()
    topic = f"bs{os.getpid()}"
    streams = list(create_topic(client, topic, 256).streams)
    members = Members(cluster.url, topic, work, args.ttl_ms)
    name = members.spawn()
    proc = members.procs[name]
    wait_until(lambda: len(owners_now(client, streams)) == 256, 120, message="256 owned")
    conns = {}
    for node in cluster.primaries_now():
        listed = cluster.server(node).client().client_list()
        conns[f"{node.port}"] = sum(1 for c in listed if c["name"].startswith(f"os:{name}:"))
    time.sleep(2.0)
    ticks = _cpu(proc.pid)
    started = time.monotonic()
    time.sleep(args.idle_seconds)
    idle = (_cpu(proc.pid) - ticks) / os.sysconf("SC_CLK_TCK") / (time.monotonic() - started)
    producer = Producer(client, topic, args.rate)
    calls, ticks = _calls(cluster), _cpu(proc.pid)
    producer.start()
    time.sleep(args.idle_seconds)
    produced = producer.stop()
    wait_until(lambda: len({r["seq"] for r in members.record.read()}) >= produced, 60,
               message="everything handled")
    busy = (_cpu(proc.pid) - ticks) / os.sysconf("SC_CLK_TCK")
    calls = _calls(cluster) - calls
    records = members.record.read()
    latency = [float(r["t"]) - id_ms(r["id"]) for r in records]
    members.stop_all()
    return {"part": "scale", "partitions": 256, "connections_per_node": conns,
            "idle_cpu_percent": round(idle * 100, 2),
            "end_to_end_ms": _stats(latency), "rate": args.rate,
            "member_cpu_us_per_entry": round(busy / produced * 1e6),
            "server_commands_per_entry": {k: round(v / produced, 2)
                                          for k, v in calls.most_common(8)},
            "verdict": topic_verdict(records, produced).as_dict()}


def _calls(cluster: ClusterServers) -> collections.Counter[str]:
    """Commands the primaries ran so far, by name (INFO commandstats), every client's."""
    out: collections.Counter[str] = collections.Counter()
    for node in cluster.primaries_now():
        stats: Any = cluster.server(node).client().info("commandstats")
        for name, row in stats.items():
            out[name.removeprefix("cmdstat_")] += int(row["calls"])
    return out


def part_churn(cluster: ClusterServers, args: argparse.Namespace,
               work: Path) -> dict[str, Any]:
    """Random member kills, pauses past the TTL, joins and leaves every 2-4 s for
    ``--churn-seconds``; a sampler reads every partition's lease every 50 ms and keeps the
    longest time one had no owner at all."""
    client, topic, streams, members = _settled_group(cluster, args, work, "bc")
    producer = Producer(client, topic, args.rate)
    producer.start()
    ownerless = Ownerless(client, streams)
    ownerless.start()
    rng = random.Random(11)
    actions: dict[str, int] = {"kill": 0, "pause": 0, "join": 0, "leave": 0}
    try:
        end = time.monotonic() + args.churn_seconds
        while time.monotonic() < end:
            time.sleep(rng.uniform(2.0, 4.0))
            live = members.live()
            choices = ["kill", "pause"] if len(live) > 2 else []
            choices += ["join"] if len(live) < args.members + 1 else []
            choices += ["leave"] if len(live) > 2 else []
            action = rng.choice(choices)
            actions[action] += 1
            name = rng.choice(sorted(live))
            if action == "kill":
                live[name].kill()
                live[name].wait()
                members.spawn()
            elif action == "pause":
                live[name].send_signal(signal.SIGSTOP)
                time.sleep(2 * args.ttl_ms / 1000.0)
                live[name].send_signal(signal.SIGCONT)
            elif action == "join":
                members.spawn()
            else:
                live[name].send_signal(signal.SIGTERM)
                live[name].wait(30)
    finally:
        ownerless.halt.set()
        ownerless.join()
        produced = producer.stop()
    wait_until(lambda: len({r["seq"] for r in members.record.read()}) >= produced, 120,
               message="everything handled")
    members.stop_all()
    records = members.record.read()
    return {"part": "churn", "seconds": args.churn_seconds, "actions": actions,
            "longest_ownerless_ms": round(ownerless.longest * 1000, 1),
            "ownerless_sampled_every_ms": 50,
            # an entry's wait beyond its arrival and its predecessor's handling: a paused
            # owner holds its partitions until its lease runs out (the TTL)
            "longest_partition_stall_ms": round(
                _longest_gap(records, list(range(args.partitions)), (0, math.inf)) * 1000, 1),
            "verdict": topic_verdict(records, produced).as_dict()}


class Ownerless(threading.Thread):
    """Samples every partition's lease every 50 ms (one pipelined read per node); keeps the
    longest time one was seen without a holder."""

    def __init__(self, client: Any, streams: list[str]) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.keys = [GroupKeys(s, "g").lease for s in streams]
        self.halt = threading.Event()
        self.longest = 0.0

    def run(self) -> None:
        since: dict[int, float] = {}
        while not self.halt.wait(0.05):
            pipe = self.client.pipeline()
            for key in self.keys:
                pipe.get(key)
            try:
                held = pipe.execute()
            except Exception:  # a shard failing over: sample again
                continue
            now = time.monotonic()
            for p, token in enumerate(held):
                if token is None:
                    since.setdefault(p, now)
                    self.longest = max(self.longest, now - since[p])
                else:
                    since.pop(p, None)


def part_primary(cluster: ClusterServers, args: argparse.Namespace,
                 work: Path) -> dict[str, Any]:
    """A primary is SIGKILLed under load: how long its shard's partitions pause (kill -> the
    first entry written after the kill handled, per partition there), and the end-to-end
    latency of the other shards' partitions before and after."""
    client, topic, streams, members = _settled_group(cluster, args, work, "bp")
    url_port = int(cluster.url.rsplit(":", 1)[1].split("/")[0])
    victim = next(n for n in cluster.primaries_now() if n.port != url_port)
    on_victim = {p for p, s in enumerate(streams) if cluster.primary_for(s) == victim}
    # one producer per shard (a producer held up by the failed shard would write the others'
    # entries late, then all at once: that burst, not the members, would set their latency)
    layout = load_topic(client, topic)
    by_shard: dict[int, list[int]] = collections.defaultdict(list)
    for k in range(KEYS):
        by_shard[cluster.primary_for(layout.stream_for(f"k{k}")).port].append(k)
    seq = Seq()
    producers = [Producer(client, topic, args.rate * len(keys) / KEYS, keys, seq)
                 for keys in by_shard.values()]
    for producer in producers:
        producer.start()
    try:
        time.sleep(5.0)
        killed = time.time()
        cluster.kill(victim)
        time.sleep(10.0)
    finally:
        produced = max(producer.stop() for producer in producers)
    wait_until(lambda: len({r["seq"] for r in members.record.read()}) >= produced, 120,
               message="everything handled")
    records = members.record.read()
    members.stop_all()
    pauses = []
    for p in on_victim:
        after = [float(r["t"]) for r in records if r["p"] == p and id_ms(r["id"]) >= killed]
        if after:
            pauses.append(min(after) - killed)
    others_before = [float(r["t"]) - id_ms(r["id"]) for r in records
                     if r["p"] not in on_victim and killed - 4 <= id_ms(r["id"]) < killed]
    others_after = [float(r["t"]) - id_ms(r["id"]) for r in records
                    if r["p"] not in on_victim and killed <= id_ms(r["id"]) < killed + 4]
    return {"part": "primary", "partitions_on_killed_shard": len(on_victim),
            "shard_pause_ms": _stats(pauses),
            "other_shards_end_to_end_ms": {"before": _stats(others_before),
                                            "after": _stats(others_after)},
            "verdict": topic_verdict(records, produced).as_dict()}


def _cpu(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="kill,rebalance,churn,primary,scale")
    parser.add_argument("--churn-seconds", type=float, default=180.0)
    parser.add_argument("--partitions", type=int, default=64)
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--rebalances", type=int, default=5,
                        help="rebalance: join + leave cycles")
    parser.add_argument("--rate", type=float, default=1000.0, help="produced entries/s")
    parser.add_argument("--ttl-ms", type=int, default=3000)
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--detail", action="store_true",
                        help="kill: each kill's timeline; rebalance: each window's longest "
                             "waits (partition, process, when) and each process's CPU")
    args = parser.parse_args()
    parts = {"kill": part_kill, "rebalance": part_rebalance, "scale": part_scale,
             "churn": part_churn, "primary": part_primary}
    # SIGTERM (``timeout``, a CI runner) ends the run like Ctrl+C: every process it started is
    # stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = []
    with ClusterServers() as cluster:
        print(f"embedded cluster: 3 primaries + 3 replicas at {cluster.url}", flush=True)
        for part in args.parts.split(","):
            work = Path(tempfile.mkdtemp(prefix=f"partitions-{part}-"))
            try:
                result = parts[part](cluster, args, work)
            finally:
                for members in STARTED:
                    members.stop_all()
                shutil.rmtree(work, ignore_errors=True)
            results.append(result)
            print(json.dumps(result, indent=None if args.json else 2), flush=True)
    return 0 if all(r["verdict"]["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
