"""Embedding the Coordinator in a service: a handler that writes to sqlite using the fencing
epoch, so a former owner's late write is refused downstream.

    REDIS_URL=redis://127.0.0.1:6379/0 python demos/embed.py
"""

from __future__ import annotations

import os
import sqlite3
import threading

from orderedstream import Coordinator, CoordinatorConfig, Message, Producer
from orderedstream.testing import wait_until

db = sqlite3.connect(":memory:", check_same_thread=False)
db.execute("CREATE TABLE orders (seq INTEGER PRIMARY KEY, payload TEXT, epoch INTEGER)")
db.execute("CREATE TABLE fence (id INTEGER PRIMARY KEY CHECK (id = 1), epoch INTEGER)")
db.execute("INSERT INTO fence VALUES (1, 0)")
lock = threading.Lock()


def handle(message: Message) -> None:
    """Write only if our epoch is not older than the newest one the database has seen."""
    with lock, db:
        (newest,) = db.execute("SELECT epoch FROM fence").fetchone()
        if message.epoch < newest:
            raise RuntimeError(f"fenced: epoch {message.epoch} < {newest}")
        db.execute("UPDATE fence SET epoch = ?", (message.epoch,))
        db.execute("INSERT OR REPLACE INTO orders VALUES (?, ?, ?)",
                   (int(message.fields["seq"]), message.fields["payload"], message.epoch))


def main() -> None:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    stream = os.environ.get("ORDEREDSTREAM_STREAM", "embed-demo")
    Producer.from_url(url, stream).send_many(
        {"seq": i, "payload": f"order-{i}"} for i in range(1, 101))
    config = CoordinatorConfig(stream=stream, group="billing", consumer="billing-1")
    with Coordinator.from_url(url, config, handle) as coordinator:
        wait_until(lambda: db.execute("SELECT COUNT(*) FROM orders").fetchone()[0] >= 100, 30,
                   message="100 orders stored")
        (rows,) = db.execute("SELECT COUNT(*) FROM orders").fetchone()
        print(f"stored {rows} orders in order under epoch {coordinator.epoch}")


if __name__ == "__main__":
    main()
