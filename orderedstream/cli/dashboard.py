"""Rich rendering of a :class:`~orderedstream._status.GroupStatus` (``status`` and ``demo``)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from .._status import GroupStatus

STATE_STYLE = {"owner": "bold green", "standby": "yellow", "dead": "bold red", "gone": "dim",
               "unknown": "dim"}


def _ms(value: int | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 10_000:
        return f"{value / 1000:.1f} s"
    return f"{value} ms"


def render_status(status: GroupStatus, *, rate: float | None = None,
                  failovers: Sequence[tuple[str, str, str, float | None]] = (),
                  title: str | None = None) -> RenderableType:
    """The status panel; ``rate`` (entries/s) and ``failovers`` (time, killed, new owner,
    ms) come from a caller that watches over time (``status --watch``, ``demo``)."""
    head = Text()
    if status.owner is not None:
        head.append("owner ", style="bold")
        head.append(status.owner, style="bold green")
        head.append(f"  epoch {status.epoch}  lease {_ms(status.lease_remaining_ms)} left")
        if status.owner_since_ms:
            head.append(f"  owning for {_ms(status.server_ms - status.owner_since_ms)}")
    else:
        head.append("no owner", style="bold red")
        head.append(" (the lease is free: a standby takes it within its wait)")
    lag = status.lag if status.lag is not None else "?"
    flow = Text(f"stream length {status.stream_length}   lag {lag}   pending {status.pending}"
                f" (oldest {_ms(status.oldest_pending_age_ms)})")
    if rate is not None:
        flow.append(f"   throughput {rate:,.0f}/s", style="bold")
    dl = status.dead_letters
    letters = Text(f"delay set {dl.parked} (claimed {dl.claimed}, next due "
                f"{_ms(dl.next_due_ms)})   held behind {dl.followers}   graveyard "
                f"{dl.graveyard}", style="cyan" if dl.parked or dl.graveyard else "")

    consumers = Table(expand=True, title="consumers", title_justify="left")
    for col in ("name", "state", "pid", "pending", "idle", "inactive"):
        consumers.add_column(col)
    dead = [c for c in status.consumers if c.state in ("dead", "gone")]
    shown = [c for c in status.consumers if c.state not in ("dead", "gone")] + dead[:3]
    for c in shown:
        consumers.add_row(c.name, Text(c.state, style=STATE_STYLE.get(c.state, "")),
                          str(c.pid or "-"), str(c.pending), _ms(c.idle_ms), _ms(c.inactive_ms))

    if len(dead) > 3:
        consumers.caption = f"and {len(dead) - 3} more dead or gone"
    parts: list[RenderableType] = [head, flow, letters, consumers]
    if failovers:
        table = Table(expand=True, title="failovers", title_justify="left")
        for col in ("at", "killed", "new owner", "took"):
            table.add_column(col)
        for at, victim, new_owner, took in list(failovers)[-8:]:
            table.add_row(at, victim, new_owner, "-" if took is None else f"{took:.0f} ms")
        parts.append(table)
    if status.timeline:
        table = Table(expand=True, title="timeline (server events)", title_justify="left")
        for col in ("time", "event", "consumer", "epoch", "detail"):
            table.add_column(col, overflow="fold")
        for ev in list(status.timeline)[-8:]:
            detail = " ".join(f"{k}={v}" for k, v in ev.detail.items() if k != "reason")
            if "reason" in ev.detail:
                detail += f" ({ev.detail['reason']})"
            table.add_row(time.strftime("%H:%M:%S", time.localtime(ev.ts_ms / 1000))
                          + f".{ev.ts_ms % 1000:03d}", ev.type, ev.consumer,
                          str(ev.epoch if ev.epoch is not None else "-"), detail)
        parts.append(table)
    return Panel(Group(*parts), title=title or f"{status.stream} / {status.group}",
                 border_style="blue")
