"""``orderedstream`` command line: the only code that imports rich or installs signal handlers."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import attrs
from rich.console import Console

from .. import __version__
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


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", DEFAULT_URL),
                        help="server URL (default: $REDIS_URL, else %(default)s)")
    parser.add_argument("--stream", default=os.environ.get("ORDEREDSTREAM_STREAM", "orders"))
    parser.add_argument("--group", default=os.environ.get("ORDEREDSTREAM_GROUP", "workers"))


def load_callable(spec: str) -> Callable[..., Any]:
    """``package.module:function`` -> the function, with an error that says what was wrong."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"expected module:function, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"cannot import {module_name!r} for {spec!r}: {err}") from err
    try:
        func = getattr(module, attr)
    except AttributeError as err:
        raise ConfigError(f"{module_name!r} has no {attr!r}") from err
    if not callable(func):
        raise ConfigError(f"{spec!r} is not callable")
    return func  # type: ignore[no-any-return]


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
    console.print(f"seq={message.fields.get('seq', '?'):>6} id={message.id} "
                  f"epoch={message.epoch} {payload} {' '.join(flags)}")


# -- event rendering ------------------------------------------------------------------------

def print_event(event: Event) -> None:
    name = event.name
    if name == "batch_handled" or (isinstance(event, FixerPass) and not event.claimed):
        return
    style = {"lease_acquired": "bold green", "lease_lost": "bold red", "standby": "yellow",
             "owner_connection_gone": "bold magenta", "takeover_completed": "green",
             "handler_failed": "red", "entry_parked": "cyan", "fixer_pass": "cyan",
             "repair_failed": "red", "entry_held": "cyan"}.get(name, "dim")
    err_console.print(f"[{style}]{time.strftime('%H:%M:%S')} {event.consumer} {name}[/] "
                      f"{event.describe()}")


# -- commands -------------------------------------------------------------------------------

class _Signals:
    """First SIGINT/SIGTERM: graceful stop.  Second: exit at once."""

    def __init__(self, on_first: Callable[[], object]) -> None:
        self.count = 0
        self._on_first = on_first
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.count > 1:
            err_console.print("[red]second signal: exiting now[/]")
            os._exit(130)
        err_console.print("[yellow]stopping (handing the lease over)... again to force[/]")
        threading.Thread(target=self._on_first, daemon=True).start()


def cmd_server(args: argparse.Namespace) -> int:
    from ..testing import ServerProcess

    server = ServerProcess(port=args.port, appendonly=args.appendonly)
    server.start()
    done = threading.Event()
    _Signals(done.set)
    console.print(f"[bold green]valkey-server[/] ready at [bold]{server.url}[/] "
                  f"(data in {server.dir}); Ctrl+C stops it")
    console.print(f"  export REDIS_URL={server.url}")
    try:
        while not done.wait(0.5):
            if server.proc is None or server.proc.poll() is not None:
                err_console.print("[red]the server exited[/]")
                return 1
    finally:
        server.cleanup()
    return 0


def _stored_seq(client: Any, stream: str) -> int | None:
    """The ``seq`` of the stream's last entry (None: empty, or not a demo entry)."""
    last: Any = client.xrevrange(stream, count=1)
    if not last:
        return None
    value = last[0][1].get(b"seq")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def cmd_produce(args: argparse.Namespace) -> int:
    """Demo entries with sequence numbers.  A send whose reply was lost (connection gone, server
    restarting) is not simply sent again, which could write it twice: once the server answers,
    the producer looks at the stream's last ``seq`` and goes on after what the stream holds."""
    from .._recovery import passing_fault

    client = client_from_url(args.redis_url)
    connect_check(client)
    producer = Producer(client, args.stream, maxlen=args.maxlen)
    stop = threading.Event()
    _Signals(stop.set)
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
                stored = _stored_seq(producer.client, args.stream)
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


def cmd_consume(args: argparse.Namespace) -> int:
    handler = load_callable(args.handler) if args.handler else demo_handler
    config = CoordinatorConfig(
        stream=args.stream, group=args.group,
        **({"consumer": args.name} if args.name else {}),
        batch_size=args.batch,
        lease=LeaseConfig(ttl_ms=args.lease_ttl_ms, watch_connection=not args.no_watch,
                          wait_replicas=args.wait_replicas),
        retry=RetryPolicy(max_attempts=args.max_attempts, on_exhausted=args.on_exhausted,
                          max_deliveries=args.max_deliveries or None,
                          min_park_delay_ms=args.min_park_delay_ms),
        handler_timeout_ms=args.handler_timeout_ms,
        hold_key_field=args.hold_key_field,
    )
    hooks: list[Hook] = [] if args.quiet else [print_event]
    hook, stop_metrics = _metrics(args.metrics_port, args.redis_url, hooks)
    if hook is not None:
        handler = hook.timed(handler)
    coordinator = Coordinator(config, handler, client_from_url(args.redis_url), hooks=hooks)
    _Signals(lambda: coordinator.stop(timeout=30))
    err_console.print(f"[bold]{config.consumer}[/] consuming {args.stream}/{args.group} "
                      f"at {args.redis_url} (lease {args.lease_ttl_ms} ms)")
    coordinator.start(max_messages=args.max_messages)
    try:
        while not coordinator.join(timeout=0.5):
            pass
    except (KeyboardInterrupt, SystemExit) as err:  # raised by the handler, in the loop's thread
        err_console.print(f"[bold red]error:[/] the handler raised {type(err).__name__}; "
                          f"{config.consumer} stopped and handed the lease over, the entry it "
                          "was handling stays pending for the next owner")
        return 2
    finally:
        stop_metrics()
    err_console.print(f"[green]{config.consumer} stopped after {coordinator.handled} entries[/]")
    return 0


def cmd_fix(args: argparse.Namespace) -> int:
    repair = load_callable(args.repair) if args.repair else demo_repair
    config = FixerConfig(stream=args.stream, group=args.group,
                         **({"name": args.name} if args.name else {}),
                         batch_size=args.batch, visibility_ms=args.visibility_ms,
                         max_attempts=args.max_attempts, max_parks=args.max_parks)
    hooks: list[Hook] = [] if args.quiet else [print_event]
    hook, stop_metrics = _metrics(args.metrics_port, args.redis_url, hooks)
    if hook is not None:
        hook.watch(args.stream, args.group)
    fixer = Fixer(config, repair, client_from_url(args.redis_url), hooks=hooks)
    _Signals(lambda: fixer.stop(timeout=30))
    err_console.print(f"[bold]{config.name}[/] fixing parked entries of "
                      f"{args.stream}/{args.group} at {args.redis_url}")
    fixer.start()
    try:
        while not fixer.join(timeout=0.5):
            pass
    finally:
        stop_metrics()
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


def cmd_dlq(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    client = client_from_url(args.redis_url)
    connect_check(client)
    dlq = DeadLetters(client, args.stream, args.group)
    action = args.action
    if action == "list":
        counts = dlq.counts()
        if args.graveyard:
            buried = dlq.graveyard(args.limit)
            if args.json:
                console.print_json(json.dumps({"graveyard": buried}))
                return 0
            table = Table(title=f"graveyard of {args.stream}/{args.group} "
                                f"({counts.graveyard} entries)")
            for col in ("graveyard id", "entry id", "reason"):
                table.add_column(col)
            for row in buried:
                table.add_row(row["graveyard_id"], row.get("id", "?"), row.get("reason", ""))
            console.print(table)
            return 0
        items = dlq.entries(args.limit)
        if args.json:
            console.print_json(json.dumps({"counts": attrs.asdict(counts),
                                           "entries": [_entry_row(i) for i in items]}))
            return 0
        due = ("-" if counts.next_due_ms is None else f"{counts.next_due_ms} ms")
        table = Table(title=f"parked in {args.stream}/{args.group}: {counts.parked} scheduled, "
                            f"{counts.followers} held behind, {counts.graveyard} in the graveyard;"
                            f" next due in {due}")
        for col in ("id", "origin", "due in", "role", "reason", "repairs", "fields"):
            table.add_column(col, overflow="fold")
        for item in items:
            e = item.entry
            due_in = "-" if item.due_in_ms is None else f"{item.due_in_ms} ms"
            if item.claimed_by:
                due_in += f" (fixer {item.claimed_by})"
            if e is None:
                table.add_row(item.id, "?", due_in, "?", f"[red]{item.error}[/]", "?", "?")
                continue
            role = e.role if e.hold_key is None else f"{e.role} of {e.hold_key}"
            fields = " ".join(f"{k}={v}" for k, v in e.fields.items())
            table.add_row(item.id, e.origin_id, due_in, role, e.reason,
                          str(e.fixer_attempts), fields[:80])
        console.print(table)
        return 0
    if action == "show":
        shown = dlq.show(args.id)
        if shown is None:
            buried = [g for g in dlq.graveyard(10_000) if g.get("id") == args.id]
            if buried:
                console.print_json(json.dumps({"graveyard": buried[0]}))
                return 0
            err_console.print(f"[red]{args.id} is not parked in {args.stream}/{args.group}[/]")
            return 1
        console.print_json(json.dumps(_entry_row(shown)))
        return 0
    if not args.all and not args.id:
        err_console.print(f"[red]dlq {action}: give an entry ID or --all[/]")
        return 2
    ids = None if args.all else [args.id]
    if action == "retry":
        n = dlq.retry(ids)
        console.print(f"{n} parked entr{'y' if n == 1 else 'ies'} made due now")
    else:
        n = dlq.purge(ids)
        console.print(f"{n} parked entr{'y' if n == 1 else 'ies'} purged")
    return 0 if n or args.all else 1


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from rich.live import Live

    from .._status import group_status
    from .dashboard import render_status

    client = client_from_url(args.redis_url)
    connect_check(client)
    if args.json or not args.watch:
        status = group_status(client, args.stream, args.group)
        if args.json:
            console.print_json(json.dumps(status.as_dict()))
        else:
            console.print(render_status(status))
        return 0
    stop = threading.Event()
    _Signals(stop.set)
    last: tuple[float, int] | None = None
    rate: float | None = None
    with Live(console=console, refresh_per_second=4, screen=False) as live:
        while not stop.is_set():
            status = group_status(client, args.stream, args.group)
            now = time.monotonic()
            if status.entries_read is not None:
                if last is not None and now > last[0]:
                    rate = (status.entries_read - last[1]) / (now - last[0])
                last = (now, status.entries_read)
            live.update(render_status(status, rate=rate))
            stop.wait(args.interval)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args, console)


def _metrics_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", default=os.environ.get("ORDEREDSTREAM_METRICS_PORT"),
                        metavar="[HOST:]PORT",
                        help="serve Prometheus /metrics here (needs the 'prometheus' extra; "
                             "default: $ORDEREDSTREAM_METRICS_PORT, else off)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orderedstream",
        description="Single active consumer, ordered failover and a dead-letter path for "
                    "Redis Streams.")
    parser.add_argument("--version", action="version", version=f"orderedstream {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    server = sub.add_parser("server", help="run the embedded Valkey in the foreground")
    server.add_argument("--port", type=int, default=None, help="default: a free port")
    server.add_argument("--appendonly", action="store_true", help="persist with AOF")
    server.set_defaults(func=cmd_server)

    produce = sub.add_parser("produce", help="append demo entries carrying sequence numbers")
    _common(produce)
    produce.add_argument("--count", type=int, default=0, help="entries to send (0: forever)")
    produce.add_argument("--rate", type=float, default=10.0, help="entries/s (0: flat out)")
    produce.add_argument("--start-seq", type=int, default=1)
    produce.add_argument("--corrupt-every", type=int, default=0,
                         help="make every K-th payload one the demo handler rejects")
    produce.add_argument("--maxlen", type=int, default=None, help="cap the stream (approx.)")
    produce.add_argument("--quiet", action="store_true")
    produce.set_defaults(func=cmd_produce)

    consume = sub.add_parser("consume", help="consume as the single active consumer, or wait "
                                             "as a standby")
    _common(consume)
    consume.add_argument("--name", default=os.environ.get("ORDEREDSTREAM_CONSUMER"),
                         help="consumer name (default: host-pid-random)")
    consume.add_argument("--handler", default=None,
                         help="module:function to import as the handler (default: print)")
    consume.add_argument("--max-messages", type=int, default=None,
                         help="exit (handing the lease over) after N handled")
    consume.add_argument("--lease-ttl-ms", type=int, default=3000)
    consume.add_argument("--batch", type=int, default=100)
    consume.add_argument("--no-watch", action="store_true",
                         help="do not watch the owner's connection; fail over on TTL only")
    consume.add_argument("--wait-replicas", type=int, default=0, metavar="N",
                         help="own only once N replicas acknowledged the new term (WAIT)")
    consume.add_argument("--max-attempts", type=int, default=5)
    consume.add_argument("--on-exhausted", choices=["park", "stop", "block"], default="park")
    consume.add_argument("--max-deliveries", type=int, default=20,
                         help="park an entry the server delivered more often than this without "
                              "an ack, e.g. one that crashes the process (0: no limit; "
                              "default %(default)s)")
    consume.add_argument("--min-park-delay-ms", type=int, default=100,
                         help="floor on every park delay, Defer(delay_ms=0) included "
                              "(default %(default)s)")
    consume.add_argument("--handler-timeout-ms", type=int, default=300_000,
                         help="a handler call running longer than this makes the owner step "
                              "down so a standby takes over (default %(default)s)")
    consume.add_argument("--quiet", action="store_true", help="no event output")
    consume.add_argument("--hold-key-field", default=None,
                         help="hold-key mode: the field with each entry's ordering key")
    _metrics_option(consume)
    consume.set_defaults(func=cmd_consume)

    fix = sub.add_parser("fix", help="repair parked entries when due and re-stream them")
    _common(fix)
    fix.add_argument("--name", default=None, help="fixer name (default: fixer-host-pid-random)")
    fix.add_argument("--repair", default=None,
                     help="module:function to import as the repair (default: the demo's)")
    fix.add_argument("--batch", type=int, default=500)
    fix.add_argument("--visibility-ms", type=int, default=30_000,
                     help="a claimed entry is offered again after this if the fixer dies")
    fix.add_argument("--max-attempts", type=int, default=5,
                     help="failed repairs before an entry goes to the graveyard")
    fix.add_argument("--max-parks", type=int, default=10,
                     help="an entry parked more often than this (it fails again after every "
                          "repair) goes to the graveyard (default %(default)s)")
    fix.add_argument("--quiet", action="store_true", help="no event output")
    _metrics_option(fix)
    fix.set_defaults(func=cmd_fix)

    demo = sub.add_parser("demo", help="the failover demo: producer, consumers and fixer as "
                                       "processes, the owner killed every few seconds, a live "
                                       "panel and a verdict")
    demo.add_argument("--redis-url", default=None,
                      help="use this server (default: start an embedded valkey-server)")
    demo.add_argument("--stream", default=None, help="default: a new demo-xxxxxx stream")
    demo.add_argument("--group", default="workers")
    demo.add_argument("--duration", type=float, default=30.0, help="seconds (Ctrl+C ends too)")
    demo.add_argument("--kill-every", type=float, default=4.0, help="seconds between kills")
    demo.add_argument("--pause", action="store_true",
                      help="SIGSTOP the owner instead of killing it: a zombie, fenced on waking")
    demo.add_argument("--consumers", type=int, default=3)
    demo.add_argument("--rate", type=float, default=200.0, help="entries/s produced")
    demo.add_argument("--corrupt-every", type=int, default=50,
                      help="every K-th payload is corrupted, parked and repaired (0: none)")
    demo.add_argument("--defer-ms", type=int, default=500, help="delay before a repair")
    demo.add_argument("--lease-ttl-ms", type=int, default=1500)
    demo.add_argument("--drain-timeout", type=float, default=30.0)
    demo.add_argument("--json", action="store_true", help="print the verdict as JSON on stdout")
    demo.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    demo.set_defaults(func=cmd_demo)

    status = sub.add_parser("status", help="owner, lease, consumers, lag, dead letters and "
                                           "the failover timeline of a stream/group")
    _common(status)
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl+C")
    status.add_argument("--interval", type=float, default=0.5, help="seconds between refreshes")
    status.add_argument("--json", action="store_true", help="print once, as JSON")
    status.set_defaults(func=cmd_status)

    dlq = sub.add_parser("dlq", help="inspect and act on parked entries")
    dlq_sub = dlq.add_subparsers(dest="action", required=True)
    dlq_list = dlq_sub.add_parser("list", help="parked entries by due time, with counts")
    _common(dlq_list)
    dlq_list.add_argument("--limit", type=int, default=50)
    dlq_list.add_argument("--graveyard", action="store_true", help="list the graveyard")
    dlq_list.add_argument("--json", action="store_true")
    dlq_show = dlq_sub.add_parser("show", help="one parked (or buried) entry, as JSON")
    _common(dlq_show)
    dlq_show.add_argument("id")
    for name, text in (("retry", "make parked entries due now"),
                       ("purge", "drop parked entries for good")):
        one = dlq_sub.add_parser(name, help=text)
        _common(one)
        one.add_argument("id", nargs="?")
        one.add_argument("--all", action="store_true")
    dlq.set_defaults(func=cmd_dlq)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except OrderedStreamError as err:
        err_console.print(f"[bold red]error:[/] {err}")
        return 2
