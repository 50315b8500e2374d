"""A service that embeds the Coordinator: the consumer runs in its own thread, an HTTP health
endpoint reports its role, and SIGTERM stops it gracefully (the lease is handed to a standby at
once, no TTL wait).

    REDIS_URL=redis://127.0.0.1:6379/0 python demos/service.py --name billing-1 --port 8081
    curl -s localhost:8081/health    # {"role": "owner", "epoch": 3, "handled": 120, ...}
    kill -TERM <pid>                 # exits after handing the lease over

GET /health answers 200 while the coordinator runs (owner or standby; a load balancer should
keep a standby), 503 once it has stopped.  Events go to stdlib logging (this service configures
it; the library never does).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from orderedstream import Coordinator, CoordinatorConfig, LeaseConfig, Message, Role

log = logging.getLogger("demo-service")


def handle(message: Message) -> None:
    """The service's work: here, a log line per order."""
    log.info("order seq=%s epoch=%s%s", message.fields.get("seq"), message.epoch,
             " (redelivered)" if message.redelivered else "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default=f"service-{os.getpid()}")
    parser.add_argument("--port", type=int, default=8081, help="health endpoint (0: any free)")
    parser.add_argument("--stream", default=os.environ.get("ORDEREDSTREAM_STREAM", "orders"))
    parser.add_argument("--group", default=os.environ.get("ORDEREDSTREAM_GROUP", "billing"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    config = CoordinatorConfig(stream=args.stream, group=args.group, consumer=args.name,
                               lease=LeaseConfig(ttl_ms=3000))
    coordinator = Coordinator.from_url(url, config, handle)
    started = time.time()

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/health":
                self.send_error(404)
                return
            role = coordinator.role
            body = json.dumps({"consumer": args.name, "role": role.value,
                               "epoch": coordinator.epoch, "handled": coordinator.handled,
                               "uptime_s": round(time.time() - started, 1)}).encode()
            self.send_response(503 if role is Role.STOPPED else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *values: object) -> None:
            pass  # keep health probes out of the log

    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print(f"health on http://127.0.0.1:{httpd.server_address[1]}/health", flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    coordinator.start()
    while not done.wait(0.5):
        if coordinator.join(timeout=0):  # the loop ended on its own: a fatal error
            break
    stopped = coordinator.stop(timeout=15)  # hands the lease over before returning
    httpd.shutdown()
    log.info("stopped (clean: %s) after %d entries", stopped, coordinator.handled)
    return 0 if stopped else 1


if __name__ == "__main__":
    raise SystemExit(main())
