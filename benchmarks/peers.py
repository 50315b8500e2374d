"""orderedstream beside the peers users would pick instead, in one run, on this machine.

The same job for each system: consumer processes (this file, ``--worker``) that handle
sequence-numbered messages one by one, in order, under a steady load from a producer thread,
each appending what it handled (seq, redelivered flag, pid, time) to a shared record file:

* **orderedstream**: a Coordinator per process (batch 100, lease TTL ``--ttl-ms``, connection
  watch on: a standby learns of a dead owner by push at the producer's next write, the
  ``CLIENT LIST`` poll being the fallback) on an embedded valkey-server;
* **RabbitMQ**: a quorum queue with ``x-single-active-consumer``, manual acks (one per message),
  prefetch 100, pika, connection heartbeat ``--ttl-ms`` rounded up to seconds (127.0.0.1:5672,
  guest/guest);
* **NATS JetStream**: a file-backed stream and one durable *pull* consumer shared by the
  processes, explicit acks, ``max_ack_pending=1`` (one message in flight for the whole
  consumer: the only way JetStream 2.9 keeps order across processes), ``ack_wait`` =
  ``--ttl-ms`` (127.0.0.1:4222).  JetStream 2.9 has no exclusive consumer: both processes
  pull, and the consumer hands the next message to whichever asks (priority groups with a
  pinned client need nats-server 2.11).

Scenarios, per system (the handler sleeps ``--work-ms`` per message, so a signal often lands
while a message is being handled):

* **kill**: SIGKILL the process that handled the last message, ``--kills`` times, a
  replacement standby started after each; takeover = kill -> the first message handled by
  another process (handlers' own clocks), p50/p95/max;
* **graceful**: SIGTERM instead (each client's clean shutdown), ``--graceful`` times;
* **pause**: SIGSTOP instead, ``--pauses`` times; takeover as above, then SIGCONT: how many
  new messages the woken process still took (a zombie that processes is how order breaks),
  and how many handler calls that were in flight at SIGSTOP finished after it (no broker can
  stop those: a downstream store refuses them by orderedstream's fencing epoch);
* **ordered throughput**: one process, a no-op handler, ``--throughput-messages`` pre-filled
  messages, first to last handled;
* the whole kill/graceful/pause record judged: lost, out of order (went back without a
  redelivery flag, or skipped ahead), duplicates and how many were unflagged; for
  orderedstream also as a store that refuses writes of an older epoch keeps it.

A peer that is not running (nothing accepts on its port, or it refuses us) is skipped, and the
table says so.  Every process this starts is gone at the end, queues and streams it created are
deleted; loopback only; every wait is bounded.

    python benchmarks/peers.py                       # all three, 10 kills each
    python benchmarks/peers.py --only rabbitmq --kills 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

SYSTEMS = ("orderedstream", "rabbitmq", "nats")
RABBIT = ("127.0.0.1", 5672)
NATS_URL = "nats://127.0.0.1:4222"


# -- workers (subprocesses) -------------------------------------------------------------------

class Recorder:
    """The handler's own record (one unbuffered write per message survives SIGKILL), or, in
    no-op mode, a count that writes one summary line when ``target`` messages are handled."""

    def __init__(self, path: str, mode: str, target: int, work_ms: float) -> None:
        self.work_s = work_ms / 1000.0
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.noop = mode == "noop"
        self.target = target
        self.count = 0
        self.first = 0.0
        self.last_seq = 0
        self.reordered = 0
        self.pid = os.getpid()

    def handle(self, seq: int, redelivered: bool, epoch: int | None = None) -> None:
        if self.noop:
            if self.count == 0:
                self.first = time.time()
            self.count += 1
            if seq != self.last_seq + 1:
                self.reordered += 1
            self.last_seq = seq
            if self.count == self.target:
                os.write(self.fd, (json.dumps({
                    "summary": True, "first": self.first, "last": time.time(),
                    "count": self.count, "reordered": self.reordered}) + "\n").encode())
            return
        started = time.time()
        if self.work_s:
            time.sleep(self.work_s)
        os.write(self.fd, (json.dumps({"seq": seq, "red": redelivered, "pid": self.pid,
                                       "t0": started, "t": time.time(), "ep": epoch})
                           + "\n").encode())


def mark_ready(path: str) -> None:
    Path(path).write_text(str(os.getpid()))


def worker_orderedstream(args: argparse.Namespace, rec: Recorder) -> None:
    from orderedstream import Coordinator, CoordinatorConfig, LeaseConfig, Message, Role

    def handler(message: Message) -> None:
        rec.handle(int(message.raw[b"seq"]), message.redelivered, message.epoch)

    config = CoordinatorConfig(stream=args.queue, group="g", consumer=args.name,
                               batch_size=100, lease=LeaseConfig(ttl_ms=args.ttl_ms))
    coordinator = Coordinator.from_url(args.url, config, handler)
    stopping = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=coordinator.stop, kwargs={"timeout": 10}).start()

    signal.signal(signal.SIGTERM, on_term)
    coordinator.start()
    ready = False
    while not coordinator.join(timeout=0.02):
        if not ready and coordinator.role in (Role.STANDBY, Role.OWNER):
            mark_ready(args.ready)
            ready = True


def worker_rabbitmq(args: argparse.Namespace, rec: Recorder) -> None:
    import pika

    params = pika.ConnectionParameters(
        *RABBIT, credentials=pika.PlainCredentials("guest", "guest"),
        heartbeat=max(1, -(-args.ttl_ms // 1000)))
    conn = pika.BlockingConnection(params)
    channel = conn.channel()
    channel.basic_qos(prefetch_count=100)
    stopping: list[bool] = []

    def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
        rec.handle(int(body), bool(method.redelivered))
        ch.basic_ack(method.delivery_tag)

    channel.basic_consume(args.queue, on_message)
    signal.signal(signal.SIGTERM, lambda s, f: stopping.append(True))
    mark_ready(args.ready)
    while not stopping:
        conn.process_data_events(time_limit=0.05)
    channel.close()  # unacknowledged messages go back; the next consumer becomes active
    conn.close()


def worker_nats(args: argparse.Namespace, rec: Recorder) -> None:
    import nats
    from nats.errors import TimeoutError as NatsTimeout

    async def main() -> None:
        nc = await nats.connect(NATS_URL)
        js = nc.jetstream()
        sub = await js.pull_subscribe(args.queue, durable="g", stream=args.queue)
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        mark_ready(args.ready)
        while not stopping.is_set():
            try:
                msgs = await sub.fetch(1, timeout=0.5)
            except NatsTimeout:
                continue
            for msg in msgs:
                rec.handle(int(msg.data), msg.metadata.num_delivered > 1)
                await msg.ack()
        await nc.close()

    asyncio.run(main())


def run_worker(args: argparse.Namespace) -> int:
    rec = Recorder(args.record, args.mode, args.target, args.work_ms)
    {"orderedstream": worker_orderedstream, "rabbitmq": worker_rabbitmq,
     "nats": worker_nats}[args.worker](args, rec)
    return 0


# -- the systems, seen from the benchmark ---------------------------------------------------

def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


class Peer:
    """One system: create/delete a queue, produce to it, and what a worker needs."""

    name = ""
    settings = ""

    def available(self) -> str | None:
        """None when usable, else why not."""
        raise NotImplementedError

    def create(self, queue: str) -> None:
        raise NotImplementedError

    def delete(self, queue: str) -> None:
        raise NotImplementedError

    def producer(self, queue: str) -> Callable[[int], None]:
        """A function that durably sends one seq (returns when the system took it)."""
        raise NotImplementedError

    def prefill(self, queue: str, count: int) -> None:
        send = self.producer(queue)
        for seq in range(1, count + 1):
            send(seq)

    def close(self) -> None:
        pass

    def worker_url(self) -> str:
        return ""


class OrderedStream(Peer):
    name = "orderedstream"

    def __init__(self, ttl_ms: int) -> None:
        from orderedstream.testing import ServerProcess

        self.server = ServerProcess()
        self.ttl_ms = ttl_ms
        self.settings = (f"Coordinator, batch 100, lease TTL {ttl_ms} ms, connection watch "
                         "by push (poll as the fallback); embedded valkey")

    def available(self) -> str | None:
        self.server.start()
        info = self.server.client().info("server")
        self.settings += f" {info.get('valkey_version') or info.get('redis_version')}"
        return None

    def create(self, queue: str) -> None:
        pass

    def delete(self, queue: str) -> None:
        from orderedstream import GroupKeys

        client = self.server.client()
        client.delete(queue, *GroupKeys(queue, "g").all())
        client.close()

    def producer(self, queue: str) -> Callable[[int], None]:
        from orderedstream import Producer

        producer = Producer(self.server.client(), queue)

        def send(seq: int) -> None:
            producer.send({"seq": seq})

        return send

    def prefill(self, queue: str, count: int) -> None:
        from orderedstream import Producer

        producer = Producer(self.server.client(), queue)
        for start in range(1, count + 1, 1000):
            producer.send_many({"seq": s} for s in range(start, min(start + 1000, count + 1)))

    def worker_url(self) -> str:
        return self.server.url

    def close(self) -> None:
        self.server.cleanup()


class RabbitMQ(Peer):
    name = "rabbitmq"

    def __init__(self, ttl_ms: int) -> None:
        self.heartbeat = max(1, -(-ttl_ms // 1000))
        self.settings = (f"quorum queue, x-single-active-consumer, manual ack per message, "
                         f"prefetch 100, heartbeat {self.heartbeat} s, pika")

    def _connect(self) -> Any:
        import pika

        return pika.BlockingConnection(pika.ConnectionParameters(
            *RABBIT, credentials=pika.PlainCredentials("guest", "guest")))

    def available(self) -> str | None:
        if not port_open(*RABBIT):
            return f"nothing listens on {RABBIT[0]}:{RABBIT[1]}"
        try:
            import pika  # noqa: F401
        except ImportError:
            return "pika is not installed (pip install 'orderedstream[bench]')"
        try:
            conn = self._connect()
        except Exception as err:
            return f"cannot connect as guest: {err!r}"
        self.settings += f"; RabbitMQ {conn._impl.server_properties.get('version', '?')}"
        conn.close()
        return None

    def create(self, queue: str) -> None:
        conn = self._connect()
        conn.channel().queue_declare(queue, durable=True, arguments={
            "x-queue-type": "quorum", "x-single-active-consumer": True})
        conn.close()

    def delete(self, queue: str) -> None:
        with contextlib.suppress(Exception):
            conn = self._connect()
            conn.channel().queue_delete(queue)
            conn.close()

    def producer(self, queue: str) -> Callable[[int], None]:
        import pika

        channel = self._connect().channel()
        channel.confirm_delivery()
        props = pika.BasicProperties(delivery_mode=2)

        def send(seq: int) -> None:
            channel.basic_publish("", queue, str(seq).encode(), props)

        return send

    def prefill(self, queue: str, count: int) -> None:
        import pika

        conn = self._connect()
        channel = conn.channel()
        props = pika.BasicProperties(delivery_mode=2)
        for seq in range(1, count + 1):
            channel.basic_publish("", queue, str(seq).encode(), props)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ok = channel.queue_declare(queue, passive=True)
            if ok.method.message_count >= count:
                break
            time.sleep(0.1)
        conn.close()


class Nats(Peer):
    name = "nats"

    def __init__(self, ttl_ms: int) -> None:
        self.ack_wait = ttl_ms / 1000.0
        self.settings = (f"JetStream file stream, one durable pull consumer shared by the "
                         f"processes, explicit ack, max_ack_pending 1, ack_wait "
                         f"{self.ack_wait:g} s, nats-py")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._nc: Any = None

    def _run(self, coro: Any, timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def available(self) -> str | None:
        if not port_open("127.0.0.1", 4222):
            return "nothing listens on 127.0.0.1:4222"
        try:
            import nats
        except ImportError:
            return "nats-py is not installed (pip install 'orderedstream[bench]')"
        self._thread.start()
        try:
            self._nc = self._run(nats.connect(NATS_URL, connect_timeout=2,
                                              max_reconnect_attempts=0))
            self._run(self._nc.jetstream().account_info())
        except Exception as err:
            return f"no JetStream at {NATS_URL}: {err!r}"
        self.settings += f"; nats-server {self._nc._server_info.get('version', '?')}"
        return None

    def create(self, queue: str) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StorageType

        async def create() -> None:
            js = self._nc.jetstream()
            await js.add_stream(name=queue, subjects=[queue], storage=StorageType.FILE)
            await js.add_consumer(queue, ConsumerConfig(
                durable_name="g", ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1,
                ack_wait=self.ack_wait, deliver_policy=DeliverPolicy.ALL, max_deliver=-1))

        self._run(create())

    def delete(self, queue: str) -> None:
        with contextlib.suppress(Exception):
            self._run(self._nc.jetstream().delete_stream(queue))

    def producer(self, queue: str) -> Callable[[int], None]:
        js = self._nc.jetstream()

        def send(seq: int) -> None:
            self._run(js.publish(queue, str(seq).encode()))

        return send

    def prefill(self, queue: str, count: int) -> None:
        js = self._nc.jetstream()

        async def fill() -> None:
            for start in range(1, count + 1, 500):
                await asyncio.gather(*(js.publish(queue, str(s).encode())
                                       for s in range(start, min(start + 500, count + 1))))

        self._run(fill(), timeout=300)

    def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                self._run(self._nc.close(), timeout=5)
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)


# -- the scenarios ----------------------------------------------------------------------------

def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Tail:
    """Reads new complete lines of a record file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.records: list[dict[str, Any]] = []
        self._partial = b""

    def poll(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        new = [json.loads(line) for line in lines if line.strip()]
        self.records += new
        return new


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.002) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Run:
    """One system's run: its worker processes, the producer thread, the record."""

    def __init__(self, peer: Peer, args: argparse.Namespace, workdir: Path) -> None:
        self.peer = peer
        self.args = args
        self.workdir = workdir / peer.name
        self.workdir.mkdir()
        self.queue = f"bench-peers-{peer.name}-{uuid.uuid4().hex[:6]}"
        self.record = self.workdir / "record.jsonl"
        self.tail = Tail(self.record)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.n = 0
        self.produced = 0
        self.stop_producing = threading.Event()
        self.producer_error: BaseException | None = None

    def spawn(self, mode: str = "record", target: int = 0, queue: str | None = None,
              record: Path | None = None) -> subprocess.Popen[bytes]:
        self.n += 1
        ready = self.workdir / f"ready-{self.n}"
        log = open(self.workdir / f"w{self.n}.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", self.peer.name, "--name", f"w{self.n}",
             "--queue", queue or self.queue, "--record", str(record or self.record),
             "--ready", str(ready), "--mode", mode, "--target", str(target),
             "--url", self.peer.worker_url(), "--ttl-ms", str(self.args.ttl_ms),
             "--work-ms", str(self.args.work_ms)],
            stdout=log, stderr=log, preexec_fn=_die_with_parent)
        log.close()
        self.procs.append(proc)
        if not wait_for(lambda: ready.exists() or proc.poll() is not None, 30, 0.01) \
                or proc.poll() is not None:
            raise RuntimeError(f"{self.peer.name} worker did not start: "
                               f"{(self.workdir / f'w{self.n}.log').read_text()[-2000:]}")
        return proc

    def _produce(self) -> None:
        try:
            send = self.peer.producer(self.queue)
            interval = 1.0 / self.args.rate
            started = time.monotonic()
            while not self.stop_producing.is_set():
                send(self.produced + 1)
                self.produced += 1
                wait = started + self.produced * interval - time.monotonic()
                if wait > 0:
                    self.stop_producing.wait(wait)
        except BaseException as err:
            self.producer_error = err

    def active(self) -> subprocess.Popen[bytes] | None:
        """The live process that handled the newest message."""
        self.tail.poll()
        live = {p.pid: p for p in self.procs if p.poll() is None}
        for rec in reversed(self.tail.records):
            if rec["pid"] in live:
                return live[rec["pid"]]
        return None

    def steady(self, timeout: float = 10.0) -> subprocess.Popen[bytes] | None:
        """Wait until a live process handles a message produced from now on."""
        mark = time.time()

        def handled_after() -> subprocess.Popen[bytes] | None:
            self.tail.poll()
            recs = self.tail.records
            if recs and recs[-1]["t"] > mark + 0.05:
                return self.active()
            return None

        return wait_for(handled_after, timeout, 0.01)

    def takeover(self, victim: subprocess.Popen[bytes], sig: int,
                 timeout: float) -> tuple[float | None, float]:
        """Signal the active process; ms until another process handles a message."""
        self.tail.poll()
        start_index = len(self.tail.records)
        t0 = time.time()
        os.kill(victim.pid, sig)

        def other() -> float | None:
            self.tail.poll()
            for rec in self.tail.records[start_index:]:
                if rec["pid"] != victim.pid and rec["t"] >= t0:
                    return float(rec["t"])
            return None

        first = wait_for(other, timeout)
        return ((first - t0) * 1000.0 if first else None), t0

    def scenarios(self) -> dict[str, Any]:
        args = self.args
        out: dict[str, Any] = {"kill": [], "graceful": [], "pause": [], "zombie_handled": [],
                               "zombie_finished": [], "timeouts": 0}
        self.peer.create(self.queue)
        producer = threading.Thread(target=self._produce, daemon=True)
        producer.start()
        self.spawn()
        if not self.steady(15):
            raise RuntimeError("the first consumer handled nothing")
        self.spawn()  # the standby
        timeout = max(10.0, args.ttl_ms / 1000.0 * 8)
        plan = ([("kill", signal.SIGKILL)] * args.kills
                + [("graceful", signal.SIGTERM)] * args.graceful
                + [("pause", signal.SIGSTOP)] * args.pauses)
        for kind, sig in plan:
            victim = self.steady() or self.active()
            if victim is None:
                raise RuntimeError("no active consumer")
            ms, _ = self.takeover(victim, sig, timeout)
            if ms is None:
                out["timeouts"] += 1
            else:
                out[kind].append(ms)
            if kind == "pause":
                mark = len(self.tail.records)
                woke = time.time()
                os.kill(victim.pid, signal.SIGCONT)
                time.sleep(args.zombie_watch)
                self.tail.poll()
                late = [r for r in self.tail.records[mark:]
                        if r["pid"] == victim.pid and r["t"] >= woke]
                out["zombie_finished"].append(sum(1 for r in late if r["t0"] < woke))
                out["zombie_handled"].append(sum(1 for r in late if r["t0"] >= woke))
                victim.kill()
            if kind == "graceful":
                try:
                    victim.wait(15)
                except subprocess.TimeoutExpired:
                    victim.kill()
            victim.wait(15)
            self.spawn()  # a new standby
        self.stop_producing.set()
        producer.join(30)
        if self.producer_error is not None:
            raise self.producer_error
        produced = self.produced

        def drained() -> bool:
            self.tail.poll()
            return len({r["seq"] for r in self.tail.records}) >= produced

        out["drained"] = bool(wait_for(drained, 60, 0.05))
        from orderedstream.testing import verdict

        v = verdict(((int(r["seq"]), bool(r["red"])) for r in self.tail.records), produced)
        out["verdict"] = v.as_dict()
        if all(r.get("ep") is not None for r in self.tail.records):
            # what a downstream store that refuses writes of an older epoch keeps
            newest = 0
            kept = []
            for r in self.tail.records:
                if r["ep"] >= newest:
                    newest = r["ep"]
                    kept.append((int(r["seq"]), bool(r["red"])))
            out["fenced"] = verdict(kept, produced).as_dict()
        pids = [r["pid"] for r in self.tail.records]
        out["switches"] = sum(1 for a, b in itertools.pairwise(pids) if a != b)
        out["signals"] = len(plan)
        self.stop_all()
        self.peer.delete(self.queue)
        return out

    def throughput(self) -> dict[str, Any]:
        count = self.args.throughput_messages
        queue = f"{self.queue}-tp"
        self.peer.create(queue)
        try:
            self.peer.prefill(queue, count)
            summary = self.workdir / "throughput.jsonl"
            proc = self.spawn("noop", count, queue=queue, record=summary)
            tail = Tail(summary)
            got = wait_for(lambda: tail.poll() or None, self.args.throughput_timeout, 0.05)
            proc.kill()
            proc.wait(15)
            if not got:
                return {"rate": None, "reordered": None}
            line = got[0]
            return {"rate": line["count"] / max(line["last"] - line["first"], 1e-9),
                    "reordered": line["reordered"]}
        finally:
            self.peer.delete(queue)

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGCONT)
                    p.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(15)


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    return (f"{statistics.median(values):.0f} / {pct(values, 0.95):.0f} / {max(values):.0f} "
            f"(n={len(values)})")


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"peers on this machine ({os.cpu_count()} cores), load {args.rate:g} msg/s, "
        f"handler work {args.work_ms:g} ms, "
        f"lease TTL / heartbeat / ack_wait {args.ttl_ms} ms; takeover ms = p50 / p95 / max",
        "",
        "| | " + " | ".join(results) + " |",
        "|---|" + "---|" * len(results),
    ]

    def row(label: str, cell: Callable[[dict[str, Any]], str]) -> None:
        cells = []
        for res in results.values():
            cells.append(res["skipped"] if "skipped" in res else cell(res))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("setup", lambda r: r["settings"])
    row("SIGKILL -> standby's first message, ms", lambda r: fmt(r["kill"]))
    row("graceful stop -> next consumer's first message, ms", lambda r: fmt(r["graceful"]))
    row("SIGSTOP -> another process's first message, ms", lambda r: fmt(r["pause"]))
    row("woken (SIGCONT) owner: new messages it still took", lambda r: (
        f"{sum(r['zombie_handled'])} in {len(r['zombie_handled'])} pauses"))
    row("woken owner: handler calls in flight at SIGSTOP that finished", lambda r: (
        f"{sum(r['zombie_finished'])} in {len(r['zombie_finished'])} pauses"))
    row("takeovers that timed out", lambda r: str(r["timeouts"]))
    row("handling moved between processes (signals sent)", lambda r: (
        f"{r['switches']} times ({r['signals']})"))
    row("ordered throughput, no-op handler, msg/s", lambda r: (
        "-" if r["throughput"]["rate"] is None else
        f"{r['throughput']['rate']:,.0f} (reordered {r['throughput']['reordered']})"))
    row("lost", lambda r: str(r["verdict"]["lost"]))
    row("out of order", lambda r: str(r["verdict"]["out_of_order"]))
    row("duplicates (unflagged)", lambda r: (
        f"{r['verdict']['duplicates']} ({r['verdict']['unflagged_duplicates']})"))
    row("out of order / unflagged duplicates, as an epoch-fenced store keeps them",
        lambda r: (f"{r['fenced']['out_of_order']} / {r['fenced']['unflagged_duplicates']}"
                   if "fenced" in r else "no fencing token"))
    row("messages handled / produced", lambda r: (
        f"{r['verdict']['handled']} / {r['verdict']['produced']}"
        + ("" if r["drained"] else " (not drained)")))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=SYSTEMS,
                        help="run only this system (repeatable)")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--graceful", type=int, default=5)
    parser.add_argument("--pauses", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200.0, help="messages/s under load")
    parser.add_argument("--work-ms", type=float, default=2.0,
                        help="simulated work per message in the failover scenarios (so a "
                             "signal often lands while a message is in flight)")
    parser.add_argument("--ttl-ms", type=int, default=2000,
                        help="orderedstream lease TTL, RabbitMQ heartbeat (rounded up to s), "
                             "JetStream ack_wait")
    parser.add_argument("--zombie-watch", type=float, default=3.0,
                        help="seconds to watch a woken (SIGCONT) owner")
    parser.add_argument("--throughput-messages", type=int, default=20_000)
    parser.add_argument("--throughput-timeout", type=float, default=180.0)
    parser.add_argument("--json", action="store_true", help="also print the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the workers' logs")
    # worker mode (internal)
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)
    for name in ("--name", "--queue", "--record", "--ready", "--mode", "--url"):
        parser.add_argument(name, default="", help=argparse.SUPPRESS)
    parser.add_argument("--target", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return run_worker(args)

    workdir = Path(tempfile.mkdtemp(prefix="orderedstream-peers-"))
    results: dict[str, Any] = {}
    factories = {"orderedstream": OrderedStream, "rabbitmq": RabbitMQ, "nats": Nats}
    try:
        for name in args.only or SYSTEMS:
            peer: Peer = factories[name](args.ttl_ms)
            run: Run | None = None
            try:
                why = peer.available()
                if why is not None:
                    print(f"{name}: skipped ({why})", file=sys.stderr)
                    results[name] = {"skipped": f"skipped: {why}"}
                    continue
                print(f"{name}: {peer.settings}", file=sys.stderr)
                run = Run(peer, args, workdir)
                res = run.scenarios()
                res["throughput"] = run.throughput()
                res["settings"] = peer.settings
                results[name] = res
                print(f"{name}: done", file=sys.stderr)
            finally:
                if run is not None:
                    run.stop_all()
                    run.peer.delete(run.queue)
                peer.close()
    finally:
        if args.keep:
            print(f"logs in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(report(results, args))
    if args.json:
        print(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
