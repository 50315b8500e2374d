"""Connecting: building clients with explicit timeouts and retries, and refusing servers that
cannot run the protocol (Redis < 7.0; see DESIGN.md §2)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import redis
import redis.cluster
from redis.backoff import NoBackoff
from redis.retry import Retry

from .exceptions import ConnectionFailed, UnsupportedServer

AnyClient = redis.Redis | redis.RedisCluster
"""A client for one server or for a Redis / Valkey Cluster."""


MIN_REDIS = (7, 0)
EMBEDDED_HINT = "or run `orderedstream server` for an embedded Valkey"


@attrs.frozen
class ServerInfo:
    """What the server says it is.  Valkey reports ``redis_version:7.2.4``; its real version is
    ``valkey_version``."""

    name: str
    version: tuple[int, ...]

    @property
    def label(self) -> str:
        return f"{self.name} {'.'.join(map(str, self.version))}"


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def parse_info(info: Mapping[str, Any]) -> ServerInfo:
    """Identify the server from ``INFO server``."""
    name = str(info.get("server_name") or "redis").lower()
    if "valkey_version" in info:
        return ServerInfo("valkey", _version(str(info["valkey_version"])))
    return ServerInfo(name, _version(str(info.get("redis_version", "0"))))


def check_supported(server: ServerInfo) -> None:
    """Raise :class:`UnsupportedServer` unless the server is Redis >= 7.0 or Valkey."""
    if server.name == "valkey":
        return
    if server.version < MIN_REDIS:
        raise UnsupportedServer(
            f"{server.label} is too old for orderedstream: it needs Redis >= 7.0 or Valkey >= 7.2. "
            "Redis 6.2 keeps claimed entries whose stream entry was deleted in the pending list "
            "and cannot run the fenced reads this library relies on. Upgrade the server, "
            + EMBEDDED_HINT + "."
        )


def _a_node(client: AnyClient) -> redis.Redis:
    """``client``, or for a cluster its client of the default node."""
    if isinstance(client, redis.RedisCluster):
        return client.get_redis_connection(
            client.get_default_node())  # type: ignore[no-untyped-call]
    return client


def describe_url(client: AnyClient) -> str:
    if isinstance(client, redis.RedisCluster):
        return f"{describe_url(_a_node(client)).rsplit('/', 1)[0]} (cluster)"
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}"
    scheme = "rediss" if issubclass(client.connection_pool.connection_class,
                                    redis.SSLConnection) else "redis"
    return f"{scheme}://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


def _unreachable(where: str, err: Exception) -> str:
    """What to say when connecting failed: TLS trouble, or no server there."""
    text = " ".join(str(err).split())
    if any(word in text.lower() for word in ("ssl", "certificate", "tls")):
        return (f"TLS with {where} failed: {text}. Name the CA that signed the server's "
                "certificate: rediss://host:port/0?ssl_ca_certs=/path/ca.crt (a client "
                "certificate: &ssl_certfile=...&ssl_keyfile=...).")
    return (f"cannot reach a Redis server at {where}: {text}. Is it running? Check --redis-url / "
            f"REDIS_URL (a TLS port needs rediss://), {EMBEDDED_HINT}.")


def client_name(text: str) -> str:
    """``text`` as a legal client name (CLIENT SETNAME takes printable ASCII without spaces):
    other characters, and ``%`` itself, become ``%XX`` per UTF-8 byte, so two different names
    never map to one client name (``café`` -> ``caf%C3%A9``, ``my fixer`` -> ``my%20fixer``)."""
    out = []
    for ch in text:
        if "!" <= ch <= "~" and ch != "%":
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def _driver_info() -> Any:
    """redis-py's client description (for ``CLIENT SETINFO``), made once; None before redis-py
    8, whose connections take their version from a default argument evaluated once."""
    try:
        from redis.driver_info import DriverInfo
    except ImportError:
        return None
    return DriverInfo()


_DRIVER_INFO = _driver_info()


def _own_settings(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A client's connection settings (address, credentials, TLS) without those we set
    ourselves (retries, name, protocol, decoding, socket timeout)."""
    out = dict(kwargs)
    for key in ("retry", "retry_on_timeout", "retry_on_error", "client_name", "decode_responses",
                "protocol", "socket_timeout", "encoding_errors", "cache", "cache_config"):
        out.pop(key, None)
    for key in list(out):  # RESP3-only features of the caller's client (we speak RESP2)
        if key.startswith(("maint_notifications", "oss_cluster_maint")):
            del out[key]
    if isinstance(getattr(out.get("redis_connect_func"), "__self__", None), redis.RedisCluster):
        del out["redis_connect_func"]  # a cluster's node client: the clone stands on its own
    if "driver_info" not in out and _DRIVER_INFO is not None:
        # redis-py >= 8 makes each connection without one look its own version up in the
        # installed packages' metadata (a cluster's node clients have none): milliseconds of
        # CPU per connection on a busy machine, where a member joining opens a dozen at once
        out["driver_info"] = _DRIVER_INFO
    return out


def clone_client(client: redis.Redis, *, name: str | None = None,
                 socket_timeout_s: float = 5.0, single: bool = False) -> redis.Redis:
    """A client to the same server with our own settings: RESP2 bytes replies, an explicit socket
    timeout and **no automatic retries** (redis-py's default retry re-sent an XADD during a
    server pause and wrote it twice; a re-sent blocking read is received twice).  ``name`` may
    be any text: it is made a legal client name by :func:`client_name`."""
    pool = client.connection_pool
    kwargs = _own_settings(pool.connection_kwargs)
    new_pool = redis.ConnectionPool(
        connection_class=pool.connection_class,
        retry=Retry(NoBackoff(), 0),
        client_name=client_name(name) if name is not None else None,
        protocol=2,
        decode_responses=False,
        socket_timeout=socket_timeout_s,
        **kwargs,
    )
    try:  # a single-connection client connects at once
        clone = redis.Redis(connection_pool=new_pool, single_connection_client=single)
    except redis.ConnectionError as err:
        new_pool.disconnect()
        raise ConnectionFailed(_unreachable(describe_url(client), err)) from err
    clone.auto_close_connection_pool = True  # the pool is ours: close() disconnects it
    return clone


def _shown(url: str) -> str:
    """``url`` for an error message: anything between ``://`` and ``@`` (credentials) hidden."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


def client_from_url(url: str) -> redis.Redis:
    """A client for a ``redis://``, ``rediss://`` or ``unix://`` URL; anything else is refused."""
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConnectionFailed(
            f"{_shown(url)!r} is not a Redis URL: use redis://host:port/db, rediss://... for TLS, "
            "or unix:///path/to/socket"
        )
    try:
        return redis.Redis.from_url(url, protocol=2, retry=Retry(NoBackoff(), 0))
    except ValueError as err:
        raise ConnectionFailed(f"cannot parse Redis URL {_shown(url)!r}: "
                               f"{str(err).replace(url, _shown(url))}") from err


def connect_check(client: AnyClient) -> ServerInfo:
    """Ping the server (a cluster: its default node) and check it is supported; errors say
    what to do."""
    where = describe_url(client)
    try:
        info = _a_node(client).info("server")
    except redis.AuthenticationError as err:
        raise ConnectionFailed(f"{where} refused the credentials: {err}. "
                               "Put user:password in the URL.") from err
    except (redis.ConnectionError, redis.TimeoutError) as err:
        raise ConnectionFailed(_unreachable(where, err)) from err
    except redis.ResponseError as err:
        raise ConnectionFailed(f"{where} answered INFO with an error: {err}") from err
    server = parse_info(info)
    check_supported(server)
    return server


def cluster_enabled(client: redis.Redis) -> bool:
    """Whether the server behind ``client`` runs in cluster mode (``INFO cluster``)."""
    info: Any = client.info("cluster")
    return bool(int(info.get("cluster_enabled", 0) or 0))


def connect_url(url: str) -> AnyClient:
    """A checked client for ``url`` (:func:`client_from_url` + :func:`connect_check`): a
    ``redis.RedisCluster`` when the server there runs in cluster mode (a URL of any node
    works: the client discovers the others), else the plain ``redis.Redis``.  Like every client
    of ours: RESP2, bytes replies, no automatic retry (a MOVED or ASK redirection is still
    followed).  Unreachable, wrong credentials or too old: the same one-line
    :class:`ConnectionFailed` / :class:`UnsupportedServer` as for one server."""
    client = client_from_url(url)
    try:
        connect_check(client)
        if not cluster_enabled(client):
            return client
    except BaseException:
        client.close()
        raise
    where = describe_url(client)
    client.close()
    if url.startswith("unix://"):
        raise ConnectionFailed(f"{where} runs in cluster mode, which redis-py reaches over TCP "
                               "only: use redis://host:port (or rediss://) of any node")
    try:
        return redis.RedisCluster.from_url(url, protocol=2, retry=Retry(NoBackoff(), 0))
    except redis.AuthenticationError as err:
        raise ConnectionFailed(f"{where} refused the credentials: {err}. "
                               "Put user:password in the URL.") from err
    except (redis.ConnectionError, redis.TimeoutError) as err:
        raise ConnectionFailed(_unreachable(where, err)) from err
    except redis.RedisError as err:  # RedisClusterException: slots not covered, a db != 0...
        raise ConnectionFailed(f"cannot use the cluster at {where}: "
                               f"{' '.join(str(err).split())}") from err


def is_cluster(client: object) -> bool:
    return isinstance(client, redis.RedisCluster)


def clone_cluster(client: redis.RedisCluster, *, name: str | None = None,
                  socket_timeout_s: float = 5.0) -> redis.RedisCluster:
    """:func:`clone_client` for a cluster: a new ``RedisCluster`` that knows the same nodes,
    with the same credentials and TLS, RESP2 bytes replies, an explicit socket timeout and no
    automatic retry (MOVED / ASK redirections are still followed: nothing ran)."""
    kwargs = _own_settings(client.nodes_manager.connection_kwargs)
    for key in ("redis_connect_func", "db", "host", "port"):
        kwargs.pop(key, None)
    # a client made from a rediss:// URL holds TLS as the pool's connection class, which
    # redis-py hands a node client only for a URL: say it as `ssl` (the ssl_* settings stay)
    connection_class = kwargs.pop("connection_class", None)
    if connection_class is not None and issubclass(connection_class, redis.SSLConnection):
        kwargs["ssl"] = True
    nodes = [redis.cluster.ClusterNode(n.host, n.port)  # type: ignore[no-untyped-call]
             for n in client.get_nodes()]  # type: ignore[no-untyped-call]
    try:
        return redis.RedisCluster(
            startup_nodes=nodes, retry=Retry(NoBackoff(), 0), protocol=2,
            decode_responses=False, socket_timeout=socket_timeout_s,
            client_name=client_name(name) if name is not None else None, **kwargs)
    except (redis.ConnectionError, redis.TimeoutError) as err:
        raise ConnectionFailed(_unreachable(", ".join(f"{n.host}:{n.port}" for n in nodes),
                                            err)) from err


def clone_any(client: AnyClient, *, name: str | None = None,
              socket_timeout_s: float = 5.0) -> AnyClient:
    """:func:`clone_cluster` or :func:`clone_client`, whichever ``client`` needs."""
    if isinstance(client, redis.RedisCluster):
        return clone_cluster(client, name=name, socket_timeout_s=socket_timeout_s)
    return clone_client(client, name=name, socket_timeout_s=socket_timeout_s)


def node_client(client: AnyClient, key: str | bytes) -> redis.Redis:
    """A plain client to the primary that serves ``key``'s slot now (the keyless commands
    that must go there: ``CLIENT LIST``, ``CLIENT ID``, ``WAIT``, ``INFO``); ``client`` itself
    for one server.  It is the cluster client's own connection pool to that node, with the
    same credentials and TLS: do not close it (:func:`clone_client` makes one of your own).
    The slot map is the cluster client's: after a failover it is refreshed by the first
    command that meets the change (or ``client.nodes_manager.initialize()``)."""
    if not isinstance(client, redis.RedisCluster):
        return client
    node = client.get_node_from_key(key)  # type: ignore[no-untyped-call]
    return client.get_redis_connection(node)


def server_ms(client: redis.Redis, reply: Any = None) -> int:
    """The server's clock in ms (what leases and due times are measured on).  ``reply``: a TIME
    reply already fetched (e.g. in a pipeline)."""
    seconds, micros = reply if reply is not None else client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def resp3_connection(client: redis.Redis, name: str, *, socket_timeout_s: float = 5.0) -> Any:
    """A connected RESP3 connection to ``client``'s server, like its own, named, without
    automatic retries (for pushes: ``CLIENT TRACKING``)."""
    pool = client.connection_pool
    kwargs = _own_settings(pool.connection_kwargs)
    conn = pool.connection_class(protocol=3, client_name=client_name(name),
                                 socket_timeout=socket_timeout_s, retry=Retry(NoBackoff(), 0),
                                 **kwargs)
    try:
        conn.connect()
    except BaseException:
        conn.disconnect()
        raise
    return conn


class NodeMap:
    """Which server serves a key: on a cluster (``redis.RedisCluster``), the primary that owns
    the key's slot; else the one server.  Hands out a plain client of our own per node
    (:func:`clone_client` settings), so keyless commands (``CLIENT ID``, ``WAIT``) reach the
    node that owns the key."""

    def __init__(self, client: Any, *, socket_timeout_s: float = 5.0) -> None:
        self.cluster = isinstance(client, redis.RedisCluster)
        # a cluster client of our own, with our socket timeout, for the slot map: the caller's
        # may have none, and a node that stops answering would hold a refresh for ever
        self.client = (clone_cluster(client, socket_timeout_s=socket_timeout_s)
                       if self.cluster else client)
        self._own = self.client is not client
        self._timeout = socket_timeout_s
        self._refreshed = 0.0
        self._refreshing = threading.Lock()  # held while a refresh runs
        self.on_change: list[Callable[[], None]] = []  # called when the primaries changed

    def node_name(self, key: str) -> str:
        """``host:port`` of the node serving ``key`` ('' on a single server)."""
        if not self.cluster:
            return ""
        return str(self.client.get_node_from_key(key).name)

    def node_for(self, key: str, name: str, *, single: bool = False) -> tuple[str, redis.Redis]:
        """(node name, a new client of our own to it, named ``name``) for ``key``; a node that
        does not answer raises :class:`redis.ConnectionError` (a passing fault: the caller
        waits it out and asks again, maybe another node by then)."""
        try:
            return self.node_name(key), clone_client(node_client(self.client, key), name=name,
                                                     socket_timeout_s=self._timeout,
                                                     single=single)
        except ConnectionFailed as err:
            raise redis.ConnectionError(str(err)) from err

    def refresh(self, *, wait: bool = False) -> None:
        """The slot map may be stale (MOVED, a node gone): read it again (at most every
        100 ms), on a thread of its own unless ``wait``: a caller that drives other nodes'
        work never waits on a node that does not answer (the next fault asks again)."""
        now = time.monotonic()
        if not self.cluster or now - self._refreshed < 0.1:
            return
        if not self._refreshing.acquire(blocking=False):
            return  # one is running
        self._refreshed = now
        if wait:
            self._read_slots()
        else:
            threading.Thread(target=self._read_slots, name="orderedstream-slots",
                             daemon=True).start()

    def _read_slots(self) -> None:
        try:
            before = self._primaries()
            # no node answers (a whole cluster restarting): the next fault asks again
            with contextlib.suppress(redis.RedisError, redis.exceptions.RedisClusterException,
                                     OSError):
                self.client.nodes_manager.initialize()
            if self._primaries() != before:
                for call in list(self.on_change):
                    with contextlib.suppress(Exception):
                        call()
        finally:
            self._refreshing.release()

    def _primaries(self) -> frozenset[str]:
        with contextlib.suppress(Exception):
            return frozenset(n.name for n in self.client.get_primaries())
        return frozenset()

    def close(self) -> None:
        """Close the cluster client of our own (not the caller's)."""
        if self._own:
            with contextlib.suppress(Exception):
                self.client.close()
