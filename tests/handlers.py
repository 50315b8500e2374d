"""Handlers that test processes load with ``--handler tests.handlers:NAME`` (run from the
repository root, where the CLI finds the ``tests`` package)."""

from __future__ import annotations

import os

from orderedstream import Message
from orderedstream.testing import record_handler


def crash_on_poison(message: Message) -> None:
    """Records every entry like ``record_handler``, except the one whose ``seq`` is
    ``$POISON_SEQ``: on that one the process dies at once (as a segfault or an OOM kill
    would), before anything is acknowledged."""
    if message.fields.get("seq") == os.environ.get("POISON_SEQ"):
        os._exit(3)
    record_handler(message)


def interrupt(message: Message) -> None:
    """Raises KeyboardInterrupt from inside the handler."""
    raise KeyboardInterrupt


def record_batch(messages: list[Message]) -> None:
    """A batch handler: records each entry like ``record_handler``, in one call per batch."""
    for message in messages:
        record_handler(message)


async def record_async(message: Message) -> None:
    """``record_handler`` as an ``async def``, for ``consume --async``."""
    record_handler(message)
