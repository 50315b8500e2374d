"""``orderedstream`` command line: the only code that imports rich or installs signal handlers."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import importlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, NoReturn
from urllib.parse import urlsplit, urlunsplit

import attrs
import redis
from rich.console import Console
from rich.markup import escape

from .. import __version__
from .. import _wire as wire
from .._config import CoordinatorConfig, FixerConfig, LeaseConfig, RetryPolicy
from .._coordinator import Coordinator
from .._demo import CORRUPT_PREFIX, demo_payload, demo_repair
from .._dlq import DeadLetters, ListedEntry
from .._events import Event, FixerPass, Hook
from .._fixer import Fixer
from .._message import Message
from .._producer import Producer
from .._server import client_from_url, connect_check
from ..exceptions import ConfigError, Defer, OrderedStreamError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

DEFAULT_URL = "redis://localhost:6379/0"


class _Formatter(argparse.HelpFormatter):
    """``--help`` shows every option's default (its value from the environment, if set; a
    URL's password as ``***``), unless the help text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, argparse.SUPPRESS)
                or not action.option_strings):
            return text
        shown = redact(default) if isinstance(default, str) and "://" in default else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


def _url_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", DEFAULT_URL),
                        help="server URL: redis://[user:password@]host:port/db, rediss://... "
                             "for TLS, unix:///path; a cluster: the URL of any node "
                             "(env REDIS_URL)")


def _common(parser: argparse.ArgumentParser) -> None:
    _url_option(parser)
    parser.add_argument("--stream", default=os.environ.get("ORDEREDSTREAM_STREAM", "orders"),
                        help="stream key (env ORDEREDSTREAM_STREAM)")
    parser.add_argument("--group", default=os.environ.get("ORDEREDSTREAM_GROUP", "workers"),
                        help="consumer group (env ORDEREDSTREAM_GROUP)")


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for anything printed)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<the URL given>"


def load_callable(spec: str) -> Callable[..., Any]:
    """``package.module:function`` -> the function, with an error that says what was wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"expected module:function, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except SyntaxError as err:
        raise ConfigError(f"cannot import {module_name!r} for {spec!r}: syntax error in "
                          f"{err.filename} line {err.lineno}: {err.msg}. Fix the module.") from err
    except ImportError as err:
        raise ConfigError(f"cannot import {module_name!r} for {spec!r}: {err}. Check the module "
                          "name and that it is on the path (the current directory is).") from err
    except Exception as err:  # the module raised while importing
        where = traceback.extract_tb(err.__traceback__)[-1]
        raise ConfigError(f"importing {module_name!r} for {spec!r} raised "
                          f"{type(err).__name__}: {err} ({where.filename} line "
                          f"{where.lineno}). Fix the module.") from err
    try:
        func = getattr(module, attr)
    except AttributeError as err:
        names = ", ".join(n for n in dir(module)
                          if not n.startswith("_") and callable(getattr(module, n)))
        raise ConfigError(f"{module_name!r} has no {attr!r} (it has: {names or 'nothing'}). "
                          "Give --handler/--repair as module:function.") from err
    if not callable(func):
        raise ConfigError(f"{spec!r} is not callable")
    return func  # type: ignore[no-any-return]


def _where(args: argparse.Namespace) -> str:
    url = getattr(args, "redis_url", None)
    return redact(url) if url else "the server"


def explain(err: BaseException, args: argparse.Namespace) -> str | None:
    """One line that says what went wrong and what to do, for an error that needs a person;
    None for one we do not know (a bug: the traceback is then worth having)."""
    where = _where(args)
    stream = getattr(args, "stream", None)
    text = " ".join(str(err).split())
    if isinstance(err, OrderedStreamError):
        return text
    if isinstance(err, redis.AuthenticationError) or text.startswith(("WRONGPASS", "NOAUTH")):
        return (f"{where} refused the credentials ({text}). Put the right user:password in "
                "--redis-url / REDIS_URL (redis://user:password@host:port/db).")
    if isinstance(err, redis.exceptions.NoPermissionError) or text.startswith("NOPERM"):
        return (f"the server's ACL does not allow this user that command ({text}). Grant the "
                "role's rules (README, 'Access control'), or use another user in --redis-url.")
    if text.startswith("WRONGTYPE"):
        return (f"a key orderedstream uses holds the wrong type ({text}); is {stream!r} a "
                "stream? Choose another --stream, or delete the key if it is stale.")
    lowered = text.lower()
    if (isinstance(err, OSError) and not isinstance(err, ConnectionError)
            and "ssl" not in lowered and "certificate" not in lowered):
        return text  # e.g. a file named in the URL or a --dir that cannot be used
    if isinstance(err, redis.ConnectionError | redis.TimeoutError | OSError):
        if "ssl" in lowered or "tls" in lowered or "certificate" in lowered:
            return (f"TLS with {where} failed ({text}). Use rediss:// for a TLS port and pass "
                    "the CA: rediss://host:port/0?ssl_ca_certs=/path/ca.crt (or "
                    "ssl_cert_reqs=none to skip verification).")
        return (f"cannot reach a Redis server at {where} ({text}). Is it running, and is this "
                "its address? Check --redis-url / REDIS_URL (a TLS port needs rediss://), or run "
                "`orderedstream server`.")
    if isinstance(err, redis.ResponseError):
        return f"{where} refused a command: {text}"
    return None


class _QuietLogs(logging.Handler):
    """The CLI prints events through its own hook: the ``orderedstream`` logger gets this
    handler (so logging's last-resort handler does not print each warning a second time) and
    prints only what no hook shows: records that are not events (a failing hook)."""

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "os_event", None) is None and record.levelno >= logging.ERROR:
            if "stopped on error" in record.getMessage():
                return  # the loop's error: main() prints it, once
            err_console.print(f"[red]{record.getMessage()}[/]", soft_wrap=True)


def _install_log_handler() -> None:
    logger = logging.getLogger("orderedstream")
    if not any(isinstance(h, _QuietLogs) for h in logger.handlers):
        logger.addHandler(_QuietLogs())


def wait_stopped(task: Any, stop_metrics: Callable[[], None]) -> None:
    """Wait until ``task`` (a started coordinator, member or fixer) ends (a signal asks it to
    stop); the metrics server goes either way."""
    try:
        while not task.join(timeout=0.5):
            pass
    finally:
        stop_metrics()


def _metrics(spec: str | None, url: str, hooks: list[Hook]
             ) -> tuple[Any, Callable[[], None]]:
    """``--metrics-port [HOST:]PORT``: a Prometheus hook appended to ``hooks`` and ``/metrics``
    served; returns (hook or None, stop)."""
    if spec is None:
        return None, lambda: None
    try:
        from prometheus_client import CollectorRegistry

        from .. import metrics
    except ImportError as err:
        raise ConfigError(f"{err} (needed by --metrics-port)") from err
    try:
        host, port = metrics.parse_listen(spec)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    hook = metrics.PrometheusHook(CollectorRegistry(), client=client_from_url(url))
    hooks.append(hook)
    try:
        stop = metrics.serve(port, host, hook.registry)
    except OSError as err:
        raise ConfigError(f"--metrics-port {spec}: cannot listen ({err})") from err
    err_console.print(f"metrics at http://{host}:{port}/metrics")
    return hook, stop


# -- demo payloads ------------------------------------------------------------------------

def demo_handler(message: Message) -> None:
    """Prints each entry; refuses (parks) corrupted demo payloads."""
    payload = message.fields.get("payload", "")
    if payload.startswith(CORRUPT_PREFIX):
        raise Defer("corrupted payload", delay_ms=1000)
    flags = []
    if message.redelivered:
        flags.append(f"[yellow]redelivered x{message.delivery_count}[/]")
    if message.repaired:
        flags.append(f"[cyan]repaired from {message.origin_id}[/]")
    elif message.origin_id != message.id:
        flags.append(f"[cyan]held, first {message.origin_id}[/]")
    fields = message.fields
    if "seq" in fields:  # one of `orderedstream produce`'s
        what = f"seq={fields['seq']:>6} id={message.id} epoch={message.epoch} {payload}"
    else:
        what = (f"id={message.id} epoch={message.epoch} "
                + " ".join(f"{k}={v}" for k, v in fields.items()))
    console.print(escape(what) + (" " + " ".join(flags) if flags else ""), soft_wrap=True)


# -- event rendering ------------------------------------------------------------------------

def print_event(event: Event, where: str = "") -> None:
    """One line per event (``where``: what to print before it, e.g. the partition)."""
    name = event.name
    if name == "batch_handled" or (isinstance(event, FixerPass) and not event.claimed):
        return
    style = {"lease_acquired": "bold green", "lease_lost": "bold red", "standby": "yellow",
             "owner_connection_gone": "bold magenta", "takeover_completed": "green",
             "handler_failed": "red", "entry_parked": "cyan", "fixer_pass": "cyan",
             "repair_failed": "red", "entry_held": "cyan"}.get(name, "dim")
    err_console.print(f"[{style}]{time.strftime('%H:%M:%S')} {where}{event.consumer} {name}[/] "
                      f"{event.describe()}")


# -- commands -------------------------------------------------------------------------------

def terminal_gone() -> None:
    """The terminal was closed (SIGHUP): from now on, write nothing to it (a write to a closed
    terminal fails); stdout and stderr go to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            os.dup2(devnull, fd)
    os.close(devnull)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Signals:
    """First SIGINT/SIGTERM/SIGHUP (the terminal closed): graceful stop.  Second: exit at once
    (``on_force``, if given, cleans up first: servers and temporary directories)."""

    def __init__(self, on_first: Callable[[], object], text: str = "stopping (handing the "
                 "lease over)... again to force",
                 on_force: Callable[[], object] | None = None) -> None:
        self.count = 0
        self._on_first = on_first
        self._on_force = on_force
        with err_console.capture() as captured:  # rendered now: the signal handler writes it
            err_console.print(f"[yellow]{text}[/]")  # without holding the lease's handover up
        self._text = captured.get()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            terminal_gone()
        self.count += 1
        if self.count > 1:
            err_console.print("[red]second signal: exiting now[/]")
            if self._on_force is not None:
                self._on_force()
            os._exit(130)
        threading.Thread(target=self._on_first, daemon=True).start()
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(self._text)
            sys.stderr.flush()


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def cmd_server(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..testing import ClusterServers, ServerProcess

    if args.cluster:
        if args.port is not None or args.dir is not None or args.appendonly:
            raise ConfigError("--cluster starts six nodes on free ports with temporary data: "
                              "leave out --port, --dir and --appendonly")
        from .topic import cmd_server_cluster

        cluster = ClusterServers()
        stopped = threading.Event()
        _Signals(stopped.set, text="stopping the cluster...", on_force=cluster.cleanup)
        try:
            return cmd_server_cluster(args, console, err_console, stopped, cluster)
        finally:
            cluster.cleanup()

    if args.port is not None and _port_taken(args.port):
        raise ConfigError(f"port {args.port} on 127.0.0.1 is taken (another server?). Pick "
                          "another --port, or leave it out for a free one.")
    data_dir = None
    if args.dir is not None:
        data_dir = Path(args.dir).expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
    elif args.appendonly:
        raise ConfigError("--appendonly keeps data across restarts: name where with --dir DIR "
                          "(it is kept when the server stops)")
    server = ServerProcess(port=args.port, appendonly=args.appendonly, dir=data_dir)
    done = threading.Event()
    _Signals(done.set, text="stopping the server...", on_force=server.cleanup)
    try:
        try:
            server.start()
        except (RuntimeError, TimeoutError) as err:
            raise ConfigError(f"the server did not start: {' '.join(str(err).split())[:300]}"
                              ) from err
        kept = "kept" if data_dir is not None else "removed on exit"
        console.print(f"[bold green]{Path(server.binary).name}[/] ready at "
                      f"[bold]{server.url}[/] (data in {server.dir}, {kept}); Ctrl+C stops it")
        console.print(f"  export REDIS_URL={server.url}")
        while not done.wait(0.5):
            if server.proc is None or server.proc.poll() is not None:
                log = server.dir / "server.log"
                tail = log.read_text(errors="replace").strip().splitlines()[-1:] \
                    if log.exists() else []
                err_console.print(f"[bold red]error:[/] the server exited: "
                                  f"{tail[0] if tail else 'no log'}", soft_wrap=True)
                return 2
    finally:
        server.cleanup()
    return 0


def stored_seq(client: Any, stream: str) -> int | None:
    """The ``seq`` of the last entry a producer wrote to ``stream`` (None: none, or not a demo
    entry).  Copies re-streamed by a fixer (they carry ``os-origin-id``, and an older ``seq``)
    are passed over."""
    last = "+"
    while True:
        rows: Any = client.xrevrange(stream, max=last, count=50)
        if last != "+":
            rows = rows[1:]
        if not rows:
            return None
        for _, fields in rows:
            if wire.ORIGIN_ID in fields:
                continue
            value = fields.get(b"seq")
            try:
                return int(value) if value is not None else None
            except ValueError:
                return None
        last = rows[-1][0]


def cmd_produce(args: argparse.Namespace) -> int:
    """Demo entries with sequence numbers.  A send whose reply was lost (connection gone, server
    restarting) is not simply sent again, which could write it twice: once the server answers,
    the producer looks at the stream's last ``seq`` and goes on after what the stream holds."""
    from .._recovery import passing_fault

    if args.topic is not None:
        from .topic import cmd_produce_topic

        stopping = threading.Event()
        _Signals(stopping.set, text="stopping")
        return cmd_produce_topic(args, console, err_console, stopping)
    if args.key_field is not None:
        raise ConfigError("--key-field routes entries of a topic: give --topic NAME")
    client = client_from_url(args.redis_url)
    connect_check(client)
    producer = Producer(client, args.stream, maxlen=args.maxlen)
    stop = threading.Event()
    _Signals(stop.set, text="stopping")
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    seq = args.start_seq
    end = args.start_seq + args.count if args.count else None
    started = time.monotonic()
    sent = 0
    down: str | None = None
    while not stop.is_set() and (end is None or seq < end):
        chunk = 1 if interval else min(500, (end - seq) if end is not None else 500)
        corrupt_every = args.corrupt_every
        batch = [demo_payload(s, bool(corrupt_every) and s % corrupt_every == 0)
                 for s in range(seq, seq + chunk)]
        try:
            if down is not None:  # the last send's fate is unknown: what does the stream hold?
                stored = stored_seq(producer.client, args.stream)
                if stored is not None and seq <= stored < seq + chunk:
                    err_console.print(f"[yellow]seq {seq}..{stored} were stored before the "
                                      "connection was lost; going on after them[/]")
                    if not args.quiet and interval:
                        console.print(f"sent seq={stored} id=(stored)")
                    sent += stored - seq + 1
                    seq = stored + 1
                    down = None
                    continue
            ids = producer.send_many(batch)
        except Exception as err:
            reason = passing_fault(err)
            if reason is None:
                raise
            if down is None:
                err_console.print(f"[yellow]server unavailable ({reason}); retrying[/]")
            down = reason
            stop.wait(0.1)
            continue
        if down is not None:
            err_console.print("[green]server available again[/]")
            down = None
        seq += chunk
        sent += chunk
        if not args.quiet and interval:
            console.print(f"sent seq={seq - 1} id={ids[-1]}")
        if interval:
            next_at = started + sent * interval
            stop.wait(max(0.0, next_at - time.monotonic()))
    console.print(f"[green]produced {sent} entries to {args.stream}[/] "
                  f"(last seq {seq - 1}) in {time.monotonic() - started:.2f}s")
    producer.close()
    return 0


def _connected(args: argparse.Namespace) -> Any:
    """A client for ``--redis-url``, checked: reachable, credentials, a supported server, and
    ``--stream`` a stream (or not there yet)."""
    client = client_from_url(args.redis_url)
    connect_check(client)
    kind: Any = client.type(args.stream)
    kind = kind.decode() if isinstance(kind, bytes) else str(kind)
    if kind not in ("none", "stream"):
        raise ConfigError(f"key {args.stream!r} holds a {kind}, not a stream: check --stream")
    return client


async def async_demo_handler(message: Message) -> None:
    """``demo_handler`` for ``consume --async``."""
    demo_handler(message)


def _consume_async(args: argparse.Namespace, config: CoordinatorConfig,
                   hooks: list[Hook]) -> int:
    """``consume --async``: the AsyncCoordinator on an event loop; the handler (or batch
    handler) must be an ``async def``."""
    import asyncio
    import inspect

    import redis.asyncio

    from .._aio import AsyncCoordinator

    spec = args.batch_handler or args.handler
    handler: Any = load_callable(spec) if spec else async_demo_handler
    if not inspect.iscoroutinefunction(handler):
        raise ConfigError(f"consume --async awaits its handler, and {spec} is a plain function: "
                          "pass an `async def` one (or drop --async)")

    async def main() -> None:
        client = redis.asyncio.Redis.from_url(args.redis_url)
        coordinator = (AsyncCoordinator.batched(config, handler, client, hooks=hooks)
                       if args.batch_handler else
                       AsyncCoordinator(config, handler, client, hooks=hooks))
        loop = asyncio.get_running_loop()
        _Signals(lambda: loop.call_soon_threadsafe(
            lambda: loop.create_task(coordinator.stop(timeout=30))))
        err_console.print(f"[bold]{escape(config.consumer)}[/] consuming {args.stream}/"
                          f"{args.group} at {redact(args.redis_url)} with asyncio (lease "
                          f"{args.lease_ttl_ms} ms)", soft_wrap=True)
        try:
            await coordinator.run(max_messages=args.max_messages)
        finally:
            await coordinator.aclose()
            await client.aclose()
        err_console.print(f"[green]{config.consumer} stopped after {coordinator.handled} "
                          "entries[/]")

    asyncio.run(main())
    return 0


def consumer_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``consume``'s options as :class:`ConsumerSettings` keywords (one stream or a topic)."""
    return {
        "batch_size": args.batch,
        "lease": LeaseConfig(ttl_ms=args.lease_ttl_ms, watch_connection=not args.no_watch,
                             watch_push=not args.no_push, wait_replicas=args.wait_replicas),
        "retry": RetryPolicy(max_attempts=args.max_attempts, on_exhausted=args.on_exhausted,
                             max_deliveries=args.max_deliveries or None,
                             min_park_delay_ms=args.min_park_delay_ms),
        "handler_timeout_ms": args.handler_timeout_ms,
        "hold_key_field": args.hold_key_field,
    }


def cmd_consume(args: argparse.Namespace) -> int:
    if args.topic is not None:
        from .member import cmd_consume_topic

        return cmd_consume_topic(args, err_console)
    handler = load_callable(args.handler) if args.handler else demo_handler
    config = CoordinatorConfig(stream=args.stream, group=args.group,
                               **({"consumer": args.name} if args.name else {}),
                               **consumer_settings(args))
    hooks: list[Hook] = [] if args.quiet else [print_event]
    client = _connected(args)
    if args.use_async:
        client.close()
        return _consume_async(args, config, hooks)
    hook, stop_metrics = _metrics(args.metrics_port, args.redis_url, hooks)
    if hook is not None:
        handler = hook.timed(handler)
    if args.batch_handler:
        coordinator = Coordinator.batched(config, load_callable(args.batch_handler), client,
                                          hooks=hooks)
    else:
        coordinator = Coordinator(config, handler, client, hooks=hooks)
    _Signals(lambda: coordinator.stop(timeout=30))
    err_console.print(f"[bold]{escape(config.consumer)}[/] consuming {args.stream}/{args.group} "
                      f"at {redact(args.redis_url)} (lease {args.lease_ttl_ms} ms)",
                      soft_wrap=True)
    coordinator.start(max_messages=args.max_messages)
    try:
        wait_stopped(coordinator, stop_metrics)
    except (KeyboardInterrupt, SystemExit) as err:  # raised by the handler, in the loop's thread
        err_console.print(f"[bold red]error:[/] the handler raised {type(err).__name__}; "
                          f"{config.consumer} stopped and handed the lease over, the entry it "
                          "was handling stays pending for the next owner")
        return 2
    err_console.print(f"[green]{config.consumer} stopped after {coordinator.handled} entries[/]")
    return 0


def fixer_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``fix``'s options as :class:`FixerSettings` keywords (one stream or a topic)."""
    return {**({"name": args.name} if args.name else {}),
            "batch_size": args.batch, "visibility_ms": args.visibility_ms,
            "max_attempts": args.max_attempts, "max_parks": args.max_parks}


def cmd_fix(args: argparse.Namespace) -> int:
    if args.topic is not None:
        from .topic_fix import cmd_fix_topic

        return cmd_fix_topic(args, err_console)
    repair = load_callable(args.repair) if args.repair else demo_repair
    config = FixerConfig(stream=args.stream, group=args.group, **fixer_settings(args))
    hooks: list[Hook] = [] if args.quiet else [print_event]
    client = _connected(args)
    hook, stop_metrics = _metrics(args.metrics_port, args.redis_url, hooks)
    if hook is not None:
        hook.watch(args.stream, args.group)
    fixer = Fixer(config, repair, client, hooks=hooks)
    _Signals(lambda: fixer.stop(timeout=30))
    err_console.print(f"[bold]{escape(config.name)}[/] fixing parked entries of "
                      f"{args.stream}/{args.group} at {redact(args.redis_url)}", soft_wrap=True)
    fixer.start()
    wait_stopped(fixer, stop_metrics)
    totals = fixer.totals
    err_console.print(f"[green]{config.name} stopped: re-streamed {totals['restreamed']}, "
                      f"rescheduled {totals['rescheduled']}, buried {totals['buried']}[/]")
    return 0


def _entry_row(item: ListedEntry) -> dict[str, Any]:
    entry = item.entry
    return {
        "id": item.id,
        "due_in_ms": item.due_in_ms,
        "claimed_by": item.claimed_by,
        "error": item.error,
        **(entry.as_dict() if entry is not None else {}),
    }


def due_text(due_in_ms: int | None) -> str:
    """'in 1.2 s', 'due now', 'overdue 3.4 s' (server clock); '-' when not scheduled."""
    from .dashboard import ms_text

    if due_in_ms is None:
        return "-"
    if due_in_ms > 0:
        return f"in {ms_text(due_in_ms)}"
    if due_in_ms > -1000:
        return "due now"
    return f"overdue {ms_text(-due_in_ms)}"


def _open_dlq(args: argparse.Namespace) -> tuple[Any, DeadLetters]:
    from .._dlq import check_group

    client = client_from_url(args.redis_url)
    connect_check(client)
    dlq = DeadLetters(client, args.stream, args.group)
    try:
        check_group(client, args.stream, args.group)
    except ConfigError:
        if not dlq.exists():  # parked entries outlive a deleted group: still show them
            raise
    return client, dlq


def _many(n: int, one: str, more: str) -> str:
    return f"{n} {one if n == 1 else more}"


def dlq_entries_table(title: str, items: Sequence[tuple[int | None, ListedEntry]]) -> Any:
    """``dlq list``'s table: one line per parked entry (``partition`` None: one stream, no
    partition column)."""
    from rich.table import Table

    table = Table(title=title, box=None, pad_edge=False, header_style="bold underline")
    # ids are copied into show/retry/purge: never wrapped nor cut.  Every column is one
    # line; the fields column gets what is left of the terminal (`dlq show ID` has all)
    rows: list[list[str]] = []
    for partition, item in items:
        e = item.entry
        where = "" if partition is None else str(partition)
        due_in = f"fixer {item.claimed_by}" if item.claimed_by else due_text(item.due_in_ms)
        if e is None:
            rows.append([where, item.id, "", due_in, "?", str(item.error), "?", ""])
            continue
        role = e.role if e.hold_key is None else f"{e.role} of {e.hold_key}"
        origin = "" if e.origin_id == item.id else e.origin_id
        fields = " ".join(f"{k}={v}" for k, v in e.fields.items())
        rows.append([where, item.id, origin, due_in, role, e.reason, str(e.fixer_attempts),
                     fields])
    heads = ["p", "id", "origin", "due", "role", "reason", "repairs", "fields"]
    caps = [0, 0, 15, 16, 14, 18, 0, 0]  # 0: as wide as its widest value
    show = [i for i in range(8) if i not in (0, 2) or any(r[i] for r in rows)]
    widths: dict[int, int] = {}
    for i in show:
        widest = max([len(heads[i]), *(len(r[i]) for r in rows)])
        widths[i] = min(widest, caps[i]) if caps[i] else widest
    others = sum(w for i, w in widths.items() if i != 7) + 2 * (len(show) - 1) + 1
    widths[7] = max(10, min(widths[7], console.width - others))
    for i in show:
        table.add_column(heads[i], no_wrap=True, overflow="ellipsis", width=widths[i])
    for cells in rows:
        table.add_row(*(escape(cells[i]) for i in show))
    return table


def graveyard_table(title: str, buried: Sequence[tuple[int | None, dict[str, Any]]]) -> Any:
    """``dlq list --graveyard``'s table (``partition`` None: one stream)."""
    from rich.table import Table

    table = Table(title=title)
    widest = max((len(str(r.get("id", ""))) for _, r in buried), default=8)
    if any(p is not None for p, _ in buried):
        table.add_column("p", no_wrap=True)
    table.add_column("entry id", no_wrap=True, min_width=widest)
    table.add_column("graveyard id", no_wrap=True, min_width=widest)
    table.add_column("reason", no_wrap=True, overflow="ellipsis", max_width=60)
    for partition, row in buried:
        cells = [row.get("id", "?"), row["graveyard_id"], row.get("reason", "")]
        table.add_row(*([] if partition is None else [str(partition)]), *cells)
    return table


def cmd_dlq(args: argparse.Namespace) -> int:
    import json

    if args.topic is not None:
        from .topic_fix import cmd_dlq_topic

        return cmd_dlq_topic(args, console, err_console)
    _client, dlq = _open_dlq(args)
    action = args.action
    if action == "list":
        counts = dlq.counts()
        if args.graveyard:
            buried = dlq.graveyard(args.limit)
            if args.json:
                console.print_json(json.dumps({"graveyard": buried}))
                return 0
            console.print(graveyard_table(
                f"graveyard of {args.stream}/{args.group} ({counts.graveyard} entries; dlq "
                "requeue ID|--all, dlq purge --graveyard ID|--all)",
                [(None, row) for row in buried]))
            return 0
        items = dlq.entries(args.limit)
        if args.json:
            console.print_json(json.dumps({"counts": attrs.asdict(counts),
                                           "entries": [_entry_row(i) for i in items]}))
            return 0
        console.print(dlq_entries_table(
            f"parked in {args.stream}/{args.group}: {counts.parked} scheduled, "
            f"{counts.followers} held behind, {counts.graveyard} in the graveyard; next "
            f"{due_text(counts.next_due_ms)}", [(None, item) for item in items]))
        return 0
    if action == "show":
        shown = dlq.show(args.id)
        if shown is None:
            buried = [g for g in dlq.graveyard(10_000)
                      if args.id in (g.get("id"), g["graveyard_id"])]
            if buried:
                console.print_json(json.dumps({"graveyard": buried[0]}))
                return 0
            err_console.print(f"[red]{args.id} is not parked in {args.stream}/{args.group}, "
                              "nor in its graveyard[/]")
            return 1
        console.print_json(json.dumps(_entry_row(shown)))
        return 0
    if not args.all and not args.id:
        err_console.print(f"[bold red]error:[/] dlq {action}: give an entry ID or --all")
        return 2
    n = dlq_act([dlq], args)
    return 0 if n or args.all else 1


def dlq_act(letters: Sequence[DeadLetters], args: argparse.Namespace) -> int:
    """``dlq retry|requeue|purge ID|--all`` on the dead letters of one stream or of several
    partitions; says how many entries it changed, and returns that."""
    action = args.action
    ids = None if args.all else [args.id]
    n = 0
    for dlq in letters:
        if action == "retry":
            n += dlq.retry(ids)
        elif action == "requeue":
            done, problems = dlq.requeue(ids)
            n += done
            for problem in problems:
                err_console.print(f"[yellow]not requeued: {problem}[/]", soft_wrap=True)
        elif args.graveyard:
            n += dlq.purge_graveyard(ids)
        else:
            n += dlq.purge(ids)
    if action == "retry":
        console.print(f"{_many(n, 'parked entry', 'parked entries')} due now")
    elif action == "requeue":
        console.print(f"{_many(n, 'buried entry', 'buried entries')} back in the delay set, "
                      "due now (a fixer repairs and re-streams them)")
    elif args.graveyard:
        console.print(f"{_many(n, 'buried entry', 'buried entries')} purged from the graveyard")
    else:
        console.print(f"{_many(n, 'parked entry', 'parked entries')} purged")
    return n


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from rich.live import Live

    from .._dlq import check_group
    from .._status import group_status
    from .dashboard import render_problem, render_status

    if args.topic is not None:
        from .topic_status import cmd_status_topic

        return cmd_status_topic(args, console)
    client = client_from_url(args.redis_url)
    connect_check(client)
    if args.is_owner is not None:  # a healthcheck: quiet, and the answer in the exit code
        owner = group_status(client, args.stream, args.group).owner
        if owner != args.is_owner:
            err_console.print(f"{args.is_owner} does not own {args.stream}/{args.group} "
                              f"(owner: {owner or 'nobody'})", soft_wrap=True)
            return 1
        return 0
    if args.json or not args.watch:
        check_group(client, args.stream, args.group)
        status = group_status(client, args.stream, args.group)
        if args.json:
            console.print_json(json.dumps(status.as_dict()))
        else:
            console.print(render_status(status))
        return 0
    stop = threading.Event()
    _Signals(stop.set, text="stopping")
    last: tuple[float, int] | None = None
    rate: float | None = None
    with Live(console=console, refresh_per_second=4, screen=False) as live:
        while not stop.is_set():
            try:
                check_group(client, args.stream, args.group)
            except ConfigError as err:  # not there (yet): say so, and look again
                if "not a stream" in str(err):
                    raise  # a key of another type does not become a stream by waiting
                live.update(render_problem(f"{err}; waiting for it (Ctrl+C ends)",
                                           f"{args.stream} / {args.group}"))
                stop.wait(args.interval)
                continue
            status = group_status(client, args.stream, args.group)
            now = time.monotonic()
            if status.entries_read is not None:
                if last is not None and now > last[0]:
                    rate = (status.entries_read - last[1]) / (now - last[0])
                last = (now, status.entries_read)
            live.update(render_status(status, rate=rate, height=console.height - 1))
            stop.wait(args.interval)
    return 0


def cmd_topic(args: argparse.Namespace) -> int:
    from .topic import cmd_topic as run

    return run(args, console)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args, console)


def _metrics_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", default=os.environ.get("ORDEREDSTREAM_METRICS_PORT"),
                        metavar="[HOST:]PORT",
                        help="serve Prometheus /metrics here (needs the 'prometheus' extra; "
                             "default: $ORDEREDSTREAM_METRICS_PORT, else off)")


def _dlq_topic_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topic", default=None, metavar="NAME",
                        help="every partition of this topic (for --group) instead of --stream")
    parser.add_argument("--partition", type=int, default=None, metavar="N",
                        help="with --topic: partition N only (an entry id names one entry "
                             "per partition)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orderedstream", formatter_class=_Formatter,
        description="Single active consumer, ordered failover and a dead-letter path for "
                    "Redis Streams. Every command says what went wrong in one line and exits 2 "
                    "when it cannot work (server, credentials, ACL, TLS, configuration).")
    parser.add_argument("--version", action="version", version=f"orderedstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=_Formatter)

    server = command("server", "run the embedded Valkey (or redis-server) in the foreground "
                               "until Ctrl+C, SIGTERM or the terminal closes")
    server.add_argument("--port", type=int, default=None, help="port (default: a free one)")
    server.add_argument("--dir", default=None,
                        help="keep the server's data in this directory (created if needed, "
                             "kept on exit); default: a temporary one, removed on exit")
    server.add_argument("--appendonly", action="store_true",
                        help="persist every write (AOF, fsync always); needs --dir")
    server.add_argument("--cluster", action="store_true",
                        help="a cluster instead: 3 primaries and 3 replicas on free loopback "
                             "ports (node timeout 1000 ms), for partitioned topics")
    server.set_defaults(func=cmd_server)

    topic = command("topic", "create or describe a partitioned topic")
    topic_sub = topic.add_subparsers(dest="action", required=True)
    create = topic_sub.add_parser("create", formatter_class=_Formatter,
                                  help="create a topic with P partitions (again with the same P: "
                                       "nothing changes; another P is refused)")
    _url_option(create)
    create.add_argument("name", help="topic name (no '{' or '}')")
    create.add_argument("--partitions", type=int, required=True,
                        help="number of partitions, fixed for the topic's life (1..1024)")
    describe = topic_sub.add_parser("describe", formatter_class=_Formatter,
                                    help="partitions: stream, cluster slot, node, length")
    _url_option(describe)
    describe.add_argument("name", help="topic name")
    describe.add_argument("--json", action="store_true", help="as JSON")
    topic.set_defaults(func=cmd_topic)

    produce = command("produce", "append demo entries carrying sequence numbers")
    _common(produce)
    produce.add_argument("--count", type=int, default=0, help="entries to send (0: forever)")
    produce.add_argument("--rate", type=float, default=10.0, help="entries/s (0: flat out)")
    produce.add_argument("--start-seq", type=int, default=1, help="first sequence number")
    produce.add_argument("--corrupt-every", type=int, default=0,
                         help="make every K-th payload one the demo handler rejects (0: none)")
    produce.add_argument("--maxlen", type=int, default=None,
                         help="cap the stream (approximately; default: no cap)")
    produce.add_argument("--quiet", action="store_true", help="no line per entry")
    produce.add_argument("--topic", default=None,
                         help="produce to this topic's partitions instead of --stream: demo "
                              "entries carry seq, key (k0..k{K-1}) and kseq (the entry's number "
                              "within its key)")
    produce.add_argument("--keys", type=int, default=64,
                         help="with --topic: how many keys the demo entries take turns on")
    produce.add_argument("--key-field", default=None, metavar="FIELD",
                         help="with --topic: read JSON objects from stdin (one a line) and "
                              "route each by its FIELD, as fast as they come")
    produce.set_defaults(func=cmd_produce)

    consume = command("consume", "consume as the single active consumer, or wait as a standby")
    _common(consume)
    consume.add_argument("--name", default=os.environ.get("ORDEREDSTREAM_CONSUMER"),
                         help="consumer name (env ORDEREDSTREAM_CONSUMER; default: "
                              "host-pid-random)")
    consume.add_argument("--handler", default=None,
                         help="module:function to import as the handler (default: print each "
                              "entry)")
    consume.add_argument("--topic", default=None, metavar="NAME",
                         help="be a member of --group for every partition of this topic: own "
                              "a balanced share of them, stand by for the rest (instead of "
                              "--stream)")
    consume.add_argument("--async", dest="use_async", action="store_true",
                         help="run the asyncio engine (AsyncCoordinator): --handler and "
                              "--batch-handler then take an `async def`")
    consume.add_argument("--batch-handler", default=None, metavar="MODULE:FUNCTION",
                         help="a function of a list of messages, called once per batch (up to "
                              "--batch entries) and acknowledged together when it returns")
    consume.add_argument("--max-messages", type=int, default=None,
                         help="exit (handing the lease over) after N handled (default: never)")
    consume.add_argument("--lease-ttl-ms", type=int, default=3000,
                         help="lease time to live: a paused owner is replaced after it")
    consume.add_argument("--batch", type=int, default=100, help="entries per read")
    consume.add_argument("--no-watch", action="store_true",
                         help="do not watch the owner's connection; fail over on TTL only")
    consume.add_argument("--no-push", action="store_true",
                         help="watch the owner's connection by polling CLIENT LIST only, "
                              "without the server's push (CLIENT TRACKING)")
    consume.add_argument("--wait-replicas", type=int, default=0, metavar="N",
                         help="own only once N replicas acknowledged the new term (WAIT)")
    consume.add_argument("--max-attempts", type=int, default=5,
                         help="handler calls per entry before --on-exhausted applies")
    consume.add_argument("--on-exhausted", choices=["park", "stop", "block"], default="park",
                         help="when the attempts are spent: park the entry, stop, or keep "
                              "retrying")
    consume.add_argument("--max-deliveries", type=int, default=20,
                         help="park an entry the server delivered more often than this without "
                              "an ack, e.g. one that crashes the process (0: no limit)")
    consume.add_argument("--min-park-delay-ms", type=int, default=100,
                         help="floor on every park delay, Defer(delay_ms=0) included")
    consume.add_argument("--handler-timeout-ms", type=int, default=300_000,
                         help="a handler call running longer than this makes the owner step "
                              "down so a standby takes over")
    consume.add_argument("--quiet", action="store_true", help="no event output")
    consume.add_argument("--hold-key-field", default=None,
                         help="hold-key mode: the field with each entry's ordering key "
                              "(default: off)")
    _metrics_option(consume)
    consume.set_defaults(func=cmd_consume)

    fix = command("fix", "repair parked entries when due and re-stream them")
    _common(fix)
    fix.add_argument("--name", default=None, help="fixer name (default: fixer-host-pid-random)")
    fix.add_argument("--repair", default=None,
                     help="module:function to import as the repair (default: the demo's)")
    fix.add_argument("--batch", type=int, default=500, help="entries claimed per pass")
    fix.add_argument("--visibility-ms", type=int, default=30_000,
                     help="a claimed entry is offered again after this if the fixer dies")
    fix.add_argument("--max-attempts", type=int, default=5,
                     help="failed repairs before an entry goes to the graveyard")
    fix.add_argument("--max-parks", type=int, default=10,
                     help="an entry parked more often than this (it fails again after every "
                          "repair) goes to the graveyard")
    fix.add_argument("--quiet", action="store_true", help="no event output")
    fix.add_argument("--topic", default=None, metavar="NAME",
                     help="fix --group's parked entries on every partition of this topic "
                          "(instead of --stream), from one process")
    _metrics_option(fix)
    fix.set_defaults(func=cmd_fix)

    demo = command("demo", "the failover demo: producer, consumers and fixer as processes, the "
                           "owner killed every few seconds, a live panel and a verdict (Ctrl+C "
                           "ends it early, with its verdict); --partitions: the same for a "
                           "partitioned topic on an embedded cluster")
    demo.add_argument("--redis-url", default=None,
                      help="use this server (default: start an embedded valkey-server)")
    demo.add_argument("--stream", default=None,
                      help="stream, or with --partitions the topic (default: a new "
                           "demo-xxxxxx one)")
    demo.add_argument("--group", default="workers", help="consumer group")
    demo.add_argument("--duration", type=float, default=30.0,
                      help="seconds of kills (Ctrl+C ends them early)")
    demo.add_argument("--kill-every", type=float, default=4.0, help="seconds between kills")
    demo.add_argument("--pause", action="store_true",
                      help="SIGSTOP the owner instead of killing it: a zombie, fenced on waking")
    demo.add_argument("--consumers", type=int, default=3, help="consumer processes")
    demo.add_argument("--rate", type=float, default=200.0, help="entries/s produced")
    demo.add_argument("--corrupt-every", type=int, default=None,
                      help="every K-th payload is corrupted, parked and repaired (0: none; "
                           "default: 50)")
    demo.add_argument("--defer-ms", type=int, default=500, help="delay before a repair")
    demo.add_argument("--lease-ttl-ms", type=int, default=1500, help="the consumers' lease TTL")
    demo.add_argument("--drain-timeout", type=float, default=30.0,
                      help="seconds to wait for everything produced to be handled")
    demo.add_argument("--json", action="store_true", help="print the verdict as JSON on stdout")
    demo.add_argument("--keep-logs", action="store_true",
                      help="keep the processes' logs (default: removed on exit)")
    demo.add_argument("--partitions", type=int, default=None, metavar="P",
                      help="the partitioned demo: an embedded cluster (3 primaries, 3 "
                           "replicas), a topic of P partitions, --consumers members of it (in "
                           "hold-key mode) and two topic fixers; a random member killed (and "
                           "replaced) every --kill-every seconds, a fixer once")
    demo.add_argument("--keys", type=int, default=32,
                      help="with --partitions: keys the producer's entries take turns on")
    demo.add_argument("--kill-primary", action="store_true",
                      help="with --partitions: also kill one primary once, mid-run (its "
                           "replica is promoted)")
    demo.set_defaults(func=cmd_demo)

    status = command("status", "owner, lease, consumers, lag, dead letters and the failover "
                               "timeline of a stream/group (or of a topic's group: --topic)")
    _common(status)
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl+C")
    status.add_argument("--interval", type=float, default=0.5, help="seconds between refreshes")
    status.add_argument("--json", action="store_true", help="print once, as JSON")
    status.add_argument("--is-owner", metavar="NAME", default=None,
                        help="print nothing; exit 0 if consumer NAME owns the group, else 1 "
                             "(for healthchecks)")
    status.add_argument("--topic", default=None, metavar="NAME",
                        help="a partitioned topic's --group instead of --stream: each "
                             "partition's owner, epoch, lag and parked count, each member's "
                             "partitions, the rebalance and failover timeline")
    status.set_defaults(func=cmd_status)

    dlq = command("dlq", "inspect and act on parked and buried entries")
    dlq_sub = dlq.add_subparsers(dest="action", required=True)
    dlq_list = dlq_sub.add_parser("list", help="parked entries by due time, with counts",
                                  formatter_class=_Formatter)
    _common(dlq_list)
    _dlq_topic_options(dlq_list)
    dlq_list.add_argument("--limit", type=int, default=50, help="entries shown at most")
    dlq_list.add_argument("--graveyard", action="store_true", help="list the graveyard")
    dlq_list.add_argument("--json", action="store_true", help="as JSON")
    dlq_show = dlq_sub.add_parser("show", help="one parked (or buried) entry, as JSON",
                                  formatter_class=_Formatter)
    _common(dlq_show)
    _dlq_topic_options(dlq_show)
    dlq_show.add_argument("id", help="entry id (or graveyard id)")
    for name, text in (("retry", "make parked entries due now (server clock)"),
                       ("purge", "drop parked entries for good (--graveyard: buried ones)"),
                       ("requeue", "put buried entries back into the delay set, due now: a "
                                   "fixer repairs and re-streams them")):
        one = dlq_sub.add_parser(name, help=text, description=text, formatter_class=_Formatter)
        _common(one)
        _dlq_topic_options(one)
        one.add_argument("id", nargs="?", help="entry id (or graveyard id)")
        one.add_argument("--all", action="store_true", help="every entry")
        if name == "purge":
            one.add_argument("--graveyard", action="store_true",
                             help="purge from the graveyard instead of the delay set")
    dlq.set_defaults(func=cmd_dlq)
    return parser


def run() -> NoReturn:
    """The ``orderedstream`` command: :func:`main`, then out of the process at once.  What the
    command started is stopped by then, and the exit handlers run (logging, exporters); the
    interpreter's own teardown is skipped: it took a member that left its group a tenth of a
    second of CPU, spent while the other members were taking its partitions over."""
    code = main()
    with contextlib.suppress(Exception):
        run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
        if run_exit_handlers is not None:
            run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _install_log_handler()
    try:
        return int(args.func(args))
    except KeyboardInterrupt:  # a Ctrl+C before the command's own handler was installed
        err_console.print("[yellow]interrupted[/]")
        return 130
    except Exception as err:
        line = explain(err, args)
        if line is None:
            raise  # not one we know: a bug, and its traceback is worth having
        err_console.print("[bold red]error:[/] " + escape(line), soft_wrap=True)
        return 2
