"""The asyncio twin of ``service.py``: an AsyncCoordinator with an ``async def`` handler on the
service's event loop, an HTTP health endpoint on the same loop, and SIGTERM that stops it
gracefully (the lease is handed to a standby at once, no TTL wait).

    REDIS_URL=redis://127.0.0.1:6379/0 python demos/async_service.py --name billing-1 --port 8082
    curl -s localhost:8082/health    # {"role": "owner", "epoch": ..., "handled": 120, ...}
    kill -TERM <pid>                 # exits after handing the lease over

Sync and async consumers of one group hand over to each other: run this beside ``service.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import time

import redis.asyncio

from orderedstream import AsyncCoordinator, CoordinatorConfig, LeaseConfig, Message

log = logging.getLogger("demo-async-service")


async def handle(message: Message) -> None:
    """The service's work: here, an awaitable pause and a log line per order."""
    await asyncio.sleep(0)
    log.info("order seq=%s epoch=%s%s", message.fields.get("seq"), message.epoch,
             " (redelivered)" if message.redelivered else "")


async def serve(args: argparse.Namespace) -> int:
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    config = CoordinatorConfig(stream=args.stream, group=args.group, consumer=args.name,
                               lease=LeaseConfig(ttl_ms=3000))
    client = redis.asyncio.Redis.from_url(url)
    coordinator = AsyncCoordinator(config, handle, client)
    started = time.time()

    async def health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readline()
        while (await reader.readline()).strip():
            pass  # the headers
        if request.split()[1:2] != [b"/health"]:
            status, body = "404 Not Found", b"{}"
        else:
            role = coordinator.role.value
            status = "503 Service Unavailable" if role == "stopped" else "200 OK"
            body = json.dumps({"consumer": args.name, "role": role, "epoch": coordinator.epoch,
                               "handled": coordinator.handled,
                               "uptime_s": round(time.time() - started, 1)}).encode()
        writer.write(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        await writer.drain()
        writer.close()

    http = await asyncio.start_server(health, "127.0.0.1", args.port)
    port = http.sockets[0].getsockname()[1]
    print(f"health on http://127.0.0.1:{port}/health", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await coordinator.start()
    await done.wait()
    stopped = await coordinator.stop(timeout=15)  # hands the lease over before returning
    await coordinator.aclose()
    await client.aclose()
    http.close()
    await http.wait_closed()
    log.info("stopped (clean: %s) after %d entries", stopped, coordinator.handled)
    return 0 if stopped else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=f"async-service-{os.getpid()}")
    parser.add_argument("--port", type=int, default=8082, help="health endpoint (0: any free)")
    parser.add_argument("--stream", default=os.environ.get("ORDEREDSTREAM_STREAM", "orders"))
    parser.add_argument("--group", default=os.environ.get("ORDEREDSTREAM_GROUP", "billing"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    return asyncio.run(serve(args))


if __name__ == "__main__":
    raise SystemExit(main())
