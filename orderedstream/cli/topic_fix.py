"""``orderedstream fix --topic`` and ``orderedstream dlq ... --topic``: the dead-letter path of
every partition of a topic."""

from __future__ import annotations

import argparse
import json
from typing import Any

import attrs
from rich.console import Console
from rich.markup import escape

from .._config import TopicFixerConfig
from .._demo import demo_repair
from .._dlq import DeadLetterCounts, DeadLetters
from .._events import Event, Hook
from .._keys import id_order
from .._server import connect_url
from .._topic import Topic, load_topic
from .._topic_fixer import TopicFixer
from ..exceptions import ConfigError


def _printer(topic: Topic) -> Hook:
    """The CLI's event lines, each with the partition it concerns."""
    from . import print_event

    index = {stream: i for i, stream in enumerate(topic.streams)}

    def hook(event: Event) -> None:
        partition = index.get(event.stream)
        print_event(event, "" if partition is None else f"p{partition} ")
    return hook


def cmd_fix_topic(args: argparse.Namespace, err_console: Console) -> int:
    from . import _metrics, _Signals, fixer_settings, load_callable, redact, wait_stopped

    repair = load_callable(args.repair) if args.repair else demo_repair
    config = TopicFixerConfig(topic=args.topic, group=args.group, **fixer_settings(args))
    client = connect_url(args.redis_url)
    try:
        topic = load_topic(client, args.topic)  # not there: one line, before anything starts
        hooks: list[Hook] = [] if args.quiet else [_printer(topic)]
        _hook, stop_metrics = _metrics(args.metrics_port, args.redis_url, hooks)
        fixer = TopicFixer(config, repair, client, hooks=hooks)
        _Signals(lambda: fixer.stop(timeout=30), text="stopping... again to force")
        err_console.print(f"[bold]{escape(config.name)}[/] fixing parked entries of "
                          f"{args.topic}/{args.group} ({topic.partitions} partitions) at "
                          f"{redact(args.redis_url)}", soft_wrap=True)
        fixer.start()
        wait_stopped(fixer, stop_metrics)
    finally:
        client.close()
    totals = fixer.totals
    err_console.print(f"[green]{config.name} stopped: re-streamed {totals['restreamed']}, "
                      f"rescheduled {totals['rescheduled']}, buried {totals['buried']}[/]")
    return 0


def _total(counts: list[DeadLetterCounts]) -> DeadLetterCounts:
    """The counts of every partition, summed (the next due time: the soonest)."""
    due = [c.next_due_ms for c in counts if c.next_due_ms is not None]
    return DeadLetterCounts(parked=sum(c.parked for c in counts),
                            followers=sum(c.followers for c in counts),
                            claimed=sum(c.claimed for c in counts),
                            graveyard=sum(c.graveyard for c in counts),
                            held_keys=sum(c.held_keys for c in counts),
                            next_due_ms=min(due) if due else None)


def _buried_here(dlq: DeadLetters, entry_id: str) -> list[dict[str, Any]]:
    return [g for g in dlq.graveyard(10_000) if entry_id in (g.get("id"), g["graveyard_id"])]


def cmd_dlq_topic(args: argparse.Namespace, console: Console, err_console: Console) -> int:
    """``dlq`` over every partition of ``--topic`` (or ``--partition N`` only).  An entry id
    names one entry per partition (two partitions written in the same millisecond hand out
    the same id): an id found in several partitions needs ``--partition`` to act on it."""
    from . import _entry_row, dlq_act, dlq_entries_table, due_text, graveyard_table

    client = connect_url(args.redis_url)
    try:
        topic = load_topic(client, args.topic)
        if args.partition is not None and not 0 <= args.partition < topic.partitions:
            raise ConfigError(f"--partition {args.partition}: topic {topic.name} has partitions "
                              f"0..{topic.partitions - 1}")
        chosen = (list(range(topic.partitions)) if args.partition is None
                  else [args.partition])
        letters = DeadLetters.of_topic(client, [topic.streams[i] for i in chosen], args.group)
        pairs = list(zip(chosen, letters, strict=True))
        where = (f"{topic.name}/{args.group}" + (f" partition {args.partition}"
                                                  if args.partition is not None else
                                                  f" ({topic.partitions} partitions)"))
        action = args.action
        if action == "list":
            per = [d.counts() for d in letters]
            counts = _total(per)
            if args.graveyard:
                buried = [(p, row) for p, d in pairs for row in d.graveyard(args.limit)]
                buried.sort(key=lambda pr: id_order(pr[1]["graveyard_id"]), reverse=True)
                buried = buried[:args.limit]
                if args.json:
                    console.print_json(json.dumps({"graveyard": [dict(row, partition=p)
                                                                 for p, row in buried]}))
                    return 0
                console.print(graveyard_table(
                    f"graveyard of {where}: {counts.graveyard} entries (dlq requeue "
                    "ID|--all, dlq purge --graveyard ID|--all; an ID: with --partition N)",
                    buried))
                return 0
            items = [(p, item) for p, d in pairs for item in d.entries(args.limit)]
            items.sort(key=lambda pi: (pi[1].due_in_ms is None, pi[1].due_in_ms or 0))
            items = items[:args.limit]
            if args.json:
                console.print_json(json.dumps({
                    "counts": attrs.asdict(counts),
                    "partitions": [{"partition": p, "stream": d.stream, **attrs.asdict(c)}
                                   for (p, d), c in zip(pairs, per, strict=True)],
                    "entries": [dict(_entry_row(item), partition=p) for p, item in items]}))
                return 0
            console.print(dlq_entries_table(
                f"parked in {where}: {counts.parked} scheduled, {counts.followers} held "
                f"behind, {counts.graveyard} in the graveyard; next "
                f"{due_text(counts.next_due_ms)}", items))
            return 0
        if action == "show":
            shown = [(p, item) for p, d in pairs if (item := d.show(args.id)) is not None]
            buried = [(p, row) for p, d in pairs for row in _buried_here(d, args.id)]
            if not shown and not buried:
                err_console.print(f"[red]{args.id} is not parked in {where}, nor in its "
                                  "graveyard[/]")
                return 1
            # a list: the id may name an entry in several partitions
            console.print_json(json.dumps(
                [dict(_entry_row(item), partition=p) for p, item in shown]
                + [{"graveyard": dict(row, partition=p)} for p, row in buried]))
            return 0
        if not args.all and not args.id:
            err_console.print(f"[bold red]error:[/] dlq {action}: give an entry ID or --all")
            return 2
        if args.id and not args.all and len(pairs) > 1:
            in_graveyard = action == "requeue" or args.graveyard
            pairs = [(p, d) for p, d in pairs
                     if (_buried_here(d, args.id) if in_graveyard else d.show(args.id))]
            if len(pairs) > 1:
                raise ConfigError(f"{args.id} names an entry in partitions "
                                  f"{', '.join(str(p) for p, _ in pairs)} of {topic.name}: "
                                  "say which with --partition N")
        n = dlq_act([d for _, d in pairs], args)
        return 0 if n or args.all else 1
    finally:
        client.close()
