"""Rich rendering of a :class:`~orderedstream._status.GroupStatus` (``status`` and ``demo``).

The panel fits the terminal it is drawn on (80x24 included): every line is cut rather than
wrapped, and the tables (consumers, failovers, the server's timeline) share the rows left,
newest events first, so the failover just caused is always on screen."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .._status import GroupStatus

STATE_STYLE = {"owner": "bold green", "standby": "yellow", "dead": "bold red", "gone": "dim",
               "unknown": "dim"}


def ms_text(value: float | None) -> str:
    """A duration for people: ``850 ms``, ``12.3 s``, ``41 min``; never 16 digits."""
    if value is None:
        return "-"
    size = abs(value)
    if size < 10:
        return f"{value:.1f} ms" if value != int(value) else f"{int(value)} ms"
    if size < 10_000:
        return f"{value:.0f} ms"
    if size < 600_000:
        return f"{value / 1000:.1f} s"
    if size < 36_000_000:
        return f"{value / 60_000:.0f} min"
    return f"{value / 3_600_000:.0f} h"


def _ms(value: int | None) -> str:
    return ms_text(value)


def _detail(detail: dict[str, str]) -> str:
    parts = []
    for key, value in detail.items():
        if key == "reason":
            continue
        if key.endswith("_ms"):
            try:
                value = ms_text(float(value))
                key = key[:-3]
            except ValueError:
                pass
        parts.append(f"{key}={value}")
    text = " ".join(parts)
    if "reason" in detail:
        text += f" ({detail['reason']})"
    return text


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_edge=False,
                 pad_edge=False, expand=True, title_style="bold")


def _line(text: Text) -> Text:
    text.no_wrap = True
    text.overflow = "ellipsis"
    return text


def render_status(status: GroupStatus, *, rate: float | None = None,
                  failovers: Sequence[tuple[str, str, str, float | None]] = (),
                  title: str | None = None, height: int | None = None) -> RenderableType:
    """The status panel; ``rate`` (entries/s) and ``failovers`` (time, killed, new owner,
    ms; oldest first) come from a caller that watches over time (``status --watch``,
    ``demo``); ``height``: the lines the panel may take (the terminal's)."""
    head = Text()
    if status.owner is not None:
        head.append("owner ", style="bold")
        head.append(status.owner, style="bold green")
        head.append(f"  epoch {status.epoch}  lease {_ms(status.lease_remaining_ms)} left")
        if status.owner_since_ms:
            head.append(f"  owning {_ms(status.server_ms - status.owner_since_ms)}")
    else:
        head.append("no owner", style="bold red")
        head.append(" (the lease is free: a standby takes it within its wait)")
    lag = status.lag if status.lag is not None else "?"
    flow = Text(f"length {status.stream_length}  lag {lag}  pending {status.pending}"
                f" (oldest {_ms(status.oldest_pending_age_ms)})")
    if rate is not None:
        flow.append(f"  throughput {rate:,.0f}/s", style="bold")
    dl = status.dead_letters
    if dl.next_due_ms is None:
        due = "-"
    elif dl.next_due_ms > 0:
        due = f"in {_ms(dl.next_due_ms)}"
    else:
        due = "now" if dl.next_due_ms > -1000 else f"overdue {_ms(-dl.next_due_ms)}"
    letters = Text(f"delay set {dl.parked} (claimed {dl.claimed}, next due {due})  held "
                   f"behind {dl.followers}  graveyard {dl.graveyard}",
                   style="cyan" if dl.parked or dl.graveyard else "")

    # rows: the panel's border (2), three lines, then each table: title, header, rule, rows
    budget = (height - 2 - 3) if height is not None else 10_000
    dead = [c for c in status.consumers if c.state in ("dead", "gone")]
    live = [c for c in status.consumers if c.state not in ("dead", "gone")]
    want = {"consumers": len(live) + min(len(dead), 3), "failovers": len(failovers),
            "timeline": len(status.timeline)}
    rows = _share(budget, want, caps={"consumers": 8, "failovers": 8, "timeline": 12})

    consumers = _table("consumers")
    consumers.add_column("name", no_wrap=True, overflow="ellipsis", ratio=3)
    consumers.add_column("state", no_wrap=True)
    for col in ("pid", "pending", "idle", "inactive"):
        consumers.add_column(col, no_wrap=True, justify="right")
    shown = (live + dead)[: rows["consumers"]]
    for c in shown:
        consumers.add_row(c.name, Text(c.state, style=STATE_STYLE.get(c.state, "")),
                          str(c.pid or "-"), str(c.pending), _ms(c.idle_ms), _ms(c.inactive_ms))
    hidden = len(status.consumers) - len(shown)
    if hidden:
        consumers.title = f"consumers (and {hidden} more, dead or gone)"
    parts: list[RenderableType] = [_line(head), _line(flow), _line(letters), consumers]
    if failovers and rows["failovers"]:
        table = _table("failovers, newest first")
        table.add_column("at", no_wrap=True)
        table.add_column("killed", no_wrap=True, overflow="ellipsis", ratio=2)
        table.add_column("new owner", no_wrap=True, overflow="ellipsis", ratio=2)
        table.add_column("took", no_wrap=True, justify="right")
        for at, victim, new_owner, took in list(reversed(failovers))[: rows["failovers"]]:
            table.add_row(at, victim, new_owner, "-" if took is None else _ms(round(took)))
        parts.append(table)
    if status.timeline and rows["timeline"]:
        table = _table("timeline (server events), newest first")
        table.add_column("time", no_wrap=True)
        table.add_column("event", no_wrap=True)
        table.add_column("consumer", no_wrap=True, overflow="ellipsis", max_width=14)
        table.add_column("epoch", no_wrap=True)
        table.add_column("detail", no_wrap=True, overflow="ellipsis", ratio=1)
        for ev in list(reversed(status.timeline))[: rows["timeline"]]:
            table.add_row(time.strftime("%H:%M:%S", time.localtime(ev.ts_ms / 1000))
                          + f".{ev.ts_ms % 1000:03d}", ev.type, ev.consumer,
                          str(ev.epoch if ev.epoch is not None else "-"), _detail(ev.detail))
        parts.append(table)
    return Panel(Group(*parts), title=title or f"{status.stream} / {status.group}",
                 border_style="blue")


def render_problem(text: str, title: str) -> RenderableType:
    """What ``status --watch`` shows while the group cannot be read (e.g. it does not exist
    yet): the reason, refreshed until it can."""
    return Panel(_line(Text(text, style="yellow")), title=title, border_style="yellow")


def _share(budget: int, want: dict[str, int], caps: dict[str, int]) -> dict[str, int]:
    """Rows per table within ``budget`` lines (3 lines of frame per table shown): the newest
    failover and timeline rows first, then as many consumers as fit, then the rest in turn."""
    rows = dict.fromkeys(want, 0)
    left = budget - 3  # the consumers table is always there
    order = ("failovers", "timeline", "consumers")
    # first pass: one row each of failovers / timeline (with its frame), two consumers
    for name, first in (("consumers", 2), ("failovers", 1), ("timeline", 2)):
        n = min(want[name], first, caps[name])
        cost = n + (3 if name != "consumers" and n else 0)
        if n and cost <= left:
            rows[name] = n
            left -= cost
    grew = True
    while left > 0 and grew:
        grew = False
        for name in order:
            if rows[name] < min(want[name], caps[name]) and left > 0:
                if rows[name] == 0:
                    if name != "consumers" and left < 4:
                        continue
                    left -= 3 if name != "consumers" else 0
                rows[name] += 1
                left -= 1
                grew = True
    return rows
