"""``orderedstream status --topic NAME --group G``: a topic's group at a glance (each
partition's owner, epoch, lag and parked count; each member's partitions against the stored
target; the rebalance and failover timeline), once, as JSON or refreshed (``--watch``).

The panel fits the terminal it is drawn on (80x24 included) like the single-stream one
(:mod:`.dashboard`): lines are cut, never wrapped, and the three tables share the rows left.
When the partitions do not all fit, the compact form shows those that need a look first (no
owner, then the most entries waiting, then parked ones) and sums up the rest in one line."""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from collections.abc import Sequence

from rich import box
from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .._recovery import passing_fault
from .._server import AnyClient, connect_url
from .._status import PartitionState, TopicEvent, TopicStatus, topic_status
from .._topic import Topic, load_topic
from ..exceptions import ConfigError, TopicMissing
from .dashboard import _detail, _line, ms_text, render_problem


def _table() -> Table:
    # no title, no rule: a table costs one header line (the panel must fit 24 rows)
    return Table(box=None, show_edge=False, pad_edge=False, expand=True,
                 header_style="bold cyan", padding=(0, 1))


def _ranges(parts: Sequence[int]) -> str:
    """``0,1,2,5,7,8`` -> ``0-2,5,7-8``."""
    out: list[str] = []
    run: list[int] = []
    for p in sorted(parts):
        if run and p == run[-1] + 1:
            run.append(p)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [p]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out) or "-"


def _rows(budget: int, want: dict[str, int]) -> dict[str, int]:
    """Rows per table within ``budget``: a few timeline rows and members first, then every
    partition that fits, then the rest of the members and the timeline."""
    rows = dict.fromkeys(want, 0)
    left = budget
    for name, first in (("timeline", 3), ("members", 4), ("partitions", want["partitions"]),
                        ("members", 8), ("timeline", 12)):
        n = max(0, min(want[name], first, rows[name] + left) - rows[name])
        rows[name] += n
        left -= n
    return rows


def _epoch(epoch: int | None) -> str:
    """An epoch for the panel: its last 7 digits (epochs carry the server's clock in ms, 16
    digits; the JSON has them whole)."""
    if epoch is None:
        return "-"
    text = str(epoch)
    return text if len(text) <= 8 else "…" + text[-7:]


def _clock(ts_ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts_ms / 1000)) + f".{ts_ms % 1000:03d}"


def render_topic_status(status: TopicStatus, *, rate: float | None = None,
                        events: Sequence[TopicEvent] = (), note: str | None = None,
                        title: str | None = None, height: int | None = None) -> RenderableType:
    """The panel; ``rate`` (entries/s handled) and ``events`` (the caller's own, e.g. the
    demo's kills, merged into the timeline) come from a caller that watches over time;
    ``height``: the lines the panel may take (None: everything)."""
    parts = status.partitions
    count = len(parts)
    orphans = count - status.owned
    head = Text()
    head.append(f"{status.owned}/{count} owned",
                style="bold red" if orphans else "bold green")
    live = [m for m in status.members if m.live]
    head.append(f"  {len(live)} members  target v{status.target_version}")
    lag = sum(p.lag or 0 for p in parts)
    head.append(f"  lag {lag}  pending {sum(p.pending for p in parts)}")
    parked = sum(p.parked for p in parts)
    head.append(f"  parked {parked}", style="cyan" if parked else "")
    if rate is not None:
        head.append(f"  {rate:,.0f}/s", style="bold")
    lines: list[RenderableType] = [_line(head)]
    if note:
        lines.append(_line(Text(note, style="yellow")))
    if not any(p.entries_read is not None or p.owner for p in parts) and not status.members:
        lines.append(_line(Text(f"no member has joined group {status.group} yet: start one "
                                f"with `orderedstream consume --topic {status.topic} --group "
                                f"{status.group}`", style="yellow")))

    timeline = sorted([*status.timeline, *events], key=lambda e: e.ts_ms)
    want = {"partitions": count, "members": len(status.members), "timeline": len(timeline)}
    if height is None:
        rows = dict(want)
    else:
        # the border (2), the lines above, one header per table
        budget = height - 2 - len(lines) - 3
        rows = _rows(budget, want)
        if rows["partitions"] < count:  # the compact form: its summary line costs a row
            rows = _rows(budget - 1, want)

    table = _table()
    table.add_column("part", justify="right", no_wrap=True)
    table.add_column("owner", no_wrap=True, overflow="ellipsis", ratio=2)
    for column in ("epoch", "lease", "lag", "pending", "parked"):
        table.add_column(column, justify="right", no_wrap=True)
    if status.cluster:
        table.add_column("node", no_wrap=True, overflow="ellipsis", min_width=9)
    shown = list(parts)
    if rows["partitions"] < count:
        def urgency(p: PartitionState) -> tuple[bool, int, int, int]:
            return (p.owner is not None, -((p.lag or 0) + p.pending), -p.parked, p.index)

        shown = sorted(sorted(parts, key=urgency)[: rows["partitions"]], key=lambda p: p.index)
    for p in shown:
        cells: list[RenderableType] = [str(p.index),
                 Text(p.owner, style="green") if p.owner else Text("nobody", style="bold red"),
                 _epoch(p.epoch), ms_text(p.lease_remaining_ms),
                 "?" if p.lag is None else str(p.lag), str(p.pending),
                 Text(str(p.parked), style="cyan" if p.parked else "")]
        if status.cluster:
            cells.append(p.node)
        table.add_row(*cells)
    lines.append(table)
    if len(shown) < count:
        rest = [p for p in parts if p not in shown]
        lines.append(_line(Text(
            f"... {len(rest)} more partitions (owned {sum(1 for p in rest if p.owner)}, lag "
            f"{sum(p.lag or 0 for p in rest)}, pending {sum(p.pending for p in rest)}, parked "
            f"{sum(p.parked for p in rest)})", style="dim")))

    members = _table()
    members.add_column("member", no_wrap=True, overflow="ellipsis", ratio=2)
    members.add_column("state", no_wrap=True)
    members.add_column("expires", justify="right", no_wrap=True)
    members.add_column("owns", justify="right", no_wrap=True)
    members.add_column("partitions", no_wrap=True, overflow="ellipsis", ratio=3)
    members.add_column("target", no_wrap=True, overflow="ellipsis", ratio=2)
    for m in status.members[: rows["members"]]:
        if m.live:
            state = Text("live", style="green")
        else:
            state = Text("not live", style="bold red" if m.owned else "dim")
        if set(m.target) == set(m.owned):
            target = Text("= owned", style="green")
        else:
            gain = sorted(set(m.target) - set(m.owned))
            lose = sorted(set(m.owned) - set(m.target))
            target = Text(" ".join(([f"+{_ranges(gain)}"] if gain else [])
                                   + ([f"-{_ranges(lose)}"] if lose else [])), style="yellow")
        members.add_row(m.name, state, ms_text(m.expires_in_ms) if m.live else "-",
                        str(len(m.owned)), _ranges(m.owned), target)
    hidden = len(status.members) - rows["members"]
    if hidden > 0:
        members.columns[0].header = f"member (+{hidden})"
    lines.append(members)

    events_table = _table()
    events_table.add_column("time", no_wrap=True)
    events_table.add_column("event", no_wrap=True)
    events_table.add_column("member", no_wrap=True, overflow="ellipsis", max_width=12)
    events_table.add_column("part", justify="right", no_wrap=True)
    events_table.add_column("epoch", justify="right", no_wrap=True)
    events_table.add_column("detail", no_wrap=True, overflow="ellipsis", ratio=1)
    for ev in timeline[len(timeline) - rows["timeline"]:] if rows["timeline"] else []:
        detail = dict(ev.detail)
        if "partitions" in detail:
            with contextlib.suppress(ValueError):
                detail["partitions"] = _ranges([int(x) for x in
                                                detail["partitions"].split(",") if x])
        events_table.add_row(_clock(ev.ts_ms), ev.type, ev.member,
                             "-" if ev.partition is None else str(ev.partition),
                             _epoch(ev.epoch), _detail(detail))
    lines.append(events_table)
    return Panel(Group(*lines), box=box.ROUNDED, border_style="blue",
                 title=title or f"topic {status.topic} / {status.group} (timeline: newest last)")


def cmd_status_topic(args: argparse.Namespace, console: Console) -> int:
    """``status --topic``: once (a panel or ``--json``) or ``--watch``."""
    from . import _Signals

    if args.is_owner is not None:
        raise ConfigError("--is-owner asks about one stream: leave out --topic, or read "
                          "`status --topic ... --json` (partitions[].owner)")
    client = connect_url(args.redis_url)
    try:
        if args.json or not args.watch:
            status = topic_status(client, args.topic, args.group)
            if args.json:
                console.print_json(json.dumps(status.as_dict()))
            else:
                console.print(render_topic_status(status))
            return 0
        stop = threading.Event()
        _Signals(stop.set, text="stopping")
        watch_topic(client, args.topic, args.group, console, stop, args.interval)
        return 0
    finally:
        client.close()


def watch_topic(client: AnyClient, name: str, group: str, console: Console,
                stop: threading.Event, interval: float) -> None:
    """Refresh the panel until ``stop``; a missing topic or a shard failing over is shown and
    looked at again (the topic's metadata, fixed for its life, is read once)."""
    from rich.live import Live

    topic: Topic | None = None
    last: tuple[float, int] | None = None
    rate: float | None = None
    title = f"topic {name} / {group}"
    with Live(console=console, refresh_per_second=4, screen=False) as live:
        while not stop.is_set():
            try:
                if topic is None:
                    topic = load_topic(client, name)
                status = topic_status(client, topic, group)
            except TopicMissing as err:
                live.update(render_problem(f"{err}; waiting for it (Ctrl+C ends)", title))
                stop.wait(interval)
                continue
            except Exception as err:
                reason = _fault(err)
                if reason is None:
                    raise
                live.update(render_problem(f"{reason}; trying again (Ctrl+C ends)", title))
                _refresh(client)
                stop.wait(interval)
                continue
            now = time.monotonic()
            done = sum(p.entries_read or 0 for p in status.partitions)
            if last is not None and now > last[0]:
                rate = max(0.0, (done - last[1]) / (now - last[0]))
            last = (now, done)
            live.update(render_topic_status(status, rate=rate, height=console.height - 1))
            stop.wait(interval)


def _fault(err: BaseException) -> str | None:
    from .topic import _fault as fault

    return fault(err) or passing_fault(err)


def _refresh(client: object) -> None:
    """A cluster's slot map again (a replica may serve a shard now)."""
    import redis

    if isinstance(client, redis.RedisCluster):
        try:
            client.nodes_manager.initialize()
        except Exception as err:
            if _fault(err) is None:
                raise
