"""Appending to a stream, with no automatic retry (a retried XADD can write an entry twice)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import redis

from ._server import client_from_url, clone_client

FieldValue = str | bytes | int | float
Fields = Mapping[Any, FieldValue]  # str or bytes keys


def _plain(fields: Fields) -> dict[Any, Any]:
    return dict(fields)


def append(target: Any, stream: str, fields: Fields, maxlen: int | None) -> Any:
    """XADD ``fields`` to ``stream`` on a client or pipeline, sync or asyncio (its reply, or
    the awaitable of it), approximately capped at ``maxlen``."""
    return target.xadd(stream, _plain(fields), maxlen=maxlen, approximate=True)


def entry_ids(replies: Iterable[Any]) -> list[str]:
    """XADD replies as id strings."""
    return [i.decode() if isinstance(i, bytes) else str(i) for i in replies]


class Producer:
    """``send`` one entry or ``send_many`` in one pipelined round trip.

    ``maxlen`` caps the stream (approximate trimming, the cheap kind).  A trimmed entry that was
    still pending is reported by the coordinator as trimmed, never silently skipped.
    """

    client: redis.Redis
    """The producer's own client (no automatic retries)."""

    def __init__(self, client: redis.Redis, stream: str, *, maxlen: int | None = None,
                 socket_timeout_s: float = 5.0) -> None:
        self.stream = stream
        self._maxlen = maxlen
        self.client = clone_client(client, name="os:producer", socket_timeout_s=socket_timeout_s)

    @classmethod
    def from_url(cls, url: str, stream: str, *, maxlen: int | None = None) -> Producer:
        return cls(client_from_url(url), stream, maxlen=maxlen)

    def send(self, fields: Fields) -> str:
        """Append one entry; returns its id."""
        return entry_ids([append(self.client, self.stream, fields, self._maxlen)])[0]

    def send_many(self, batch: Iterable[Fields]) -> list[str]:
        """Append many entries, in order, in one pipelined round trip (no MULTI)."""
        pipe = self.client.pipeline(transaction=False)
        for fields in batch:
            append(pipe, self.stream, fields, self._maxlen)
        return entry_ids(pipe.execute())

    def close(self) -> None:
        self.client.close()
