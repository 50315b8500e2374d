"""``orderedstream consume --topic``: one member of a topic's consumer group."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from .._config import MemberConfig
from .._events import Hook
from .._member import TopicMember
from .._server import connect_url
from ..exceptions import ConfigError


def cmd_consume_topic(args: argparse.Namespace, err_console: Console) -> int:
    from . import (
        _metrics,
        _Signals,
        consumer_settings,
        demo_handler,
        load_callable,
        print_event,
        redact,
        wait_stopped,
    )

    if args.use_async or args.batch_handler:
        raise ConfigError("consume --topic runs plain handlers for now: drop --async and "
                          "--batch-handler")
    handler = load_callable(args.handler) if args.handler else demo_handler
    config = MemberConfig(topic=args.topic, group=args.group,
                          **({"name": args.name} if args.name else {}),
                          **consumer_settings(args))
    hooks: list[Hook] = [] if args.quiet else [print_event]
    client = connect_url(args.redis_url)
    hook, stop_metrics = _metrics(args.metrics_port, args.redis_url, hooks)
    if hook is not None:
        handler = hook.timed(handler)
    member = TopicMember(config, handler, client, hooks=hooks)
    _Signals(lambda: member.stop(timeout=30))
    err_console.print(f"[bold]{escape(config.name)}[/] member of {args.topic}/{args.group} at "
                      f"{redact(args.redis_url)} (lease {args.lease_ttl_ms} ms)",
                      soft_wrap=True)
    member.start()
    try:
        wait_stopped(member, stop_metrics)
    except (KeyboardInterrupt, SystemExit) as err:  # raised by the handler
        err_console.print(f"[bold red]error:[/] the handler raised {type(err).__name__}; "
                          f"{config.name} stopped and handed its partitions over")
        return 2
    finally:
        client.close()
    err_console.print(f"[green]{config.name} stopped[/]")
    return 0
