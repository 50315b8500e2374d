"""Server CPU of one fenced read, per entry: what bounds the coordinator's throughput now.

Three ways to ack a batch and read the next 500 new entries, each run over the same pre-filled
stream through a fresh group, on one connection, one after the other (no overlap), timed by the
server's own CPU time (user + system of the server process, ``/proc/<pid>/stat``):

* raw:       ``XACK`` + ``XREADGROUP COUNT 500`` (not fenced: what a hand-written loop sends);
* deliver:   what the coordinator sends today: the fenced ``deliver`` script (checks the lease
  token, acks, ``XREADGROUP`` inside Lua, replies with ids only) + ``XRANGE`` for the bodies;
* watch:     a fence by ``WATCH``: ``WATCH lease`` + ``GET lease`` (the token is ours), then
  ``MULTI`` / ``XACK`` / ``XREADGROUP COUNT 500`` / ``EXEC`` (EXEC does nothing if the lease
  changed or expired after the WATCH; the script checks that both servers abort on expiry).

The difference between raw and deliver is mostly the conversion of the ``XREADGROUP`` reply into
Lua tables, and the second read of the bodies.  A ``WATCH`` fence is not what DESIGN.md §4 says
(one atomic script per fenced operation); this measures what it would save.

    python benchmarks/fenced_read.py [--server-bin /usr/bin/redis-server] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import redis

from orderedstream import GroupKeys
from orderedstream._scripts import Scripts
from orderedstream._server import parse_info
from orderedstream.testing import ServerProcess, fill_stream

STREAM = "bench-fenced-read"
BATCH = 500


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rows_of(reply: Any) -> list[Any]:
    """The entries of an XREADGROUP reply (RESP2 list or RESP3 map)."""
    if isinstance(reply, dict):
        return list(next(iter(reply.values())))
    return list(reply[0][1])


def read_all(conn: Any, scripts: Scripts, keys: GroupKeys, mode: str, total: int) -> None:
    acks: list[Any] = []
    after = "0"
    done = 0
    while done < total:
        if mode == "raw":
            commands: list[tuple[Any, ...]] = [("XACK", STREAM, keys.group, *acks)] if acks else []
            commands.append(("XREADGROUP", "GROUP", keys.group, "c", "COUNT", BATCH,
                             "STREAMS", STREAM, ">"))
            conn.send_packed_command(conn.pack_commands(commands))
            replies = [conn.read_response() for _ in commands]
            rows = rows_of(replies[-1])
        elif mode == "deliver":
            conn.send_packed_command(conn.pack_commands([
                scripts.deliver_command(keys, "tok", "c", BATCH, acks),
                ("XRANGE", STREAM, f"({after}", "+", "COUNT", BATCH)]))
            conn.read_response()
            rows = list(conn.read_response())
        else:
            conn.send_packed_command(conn.pack_commands([("WATCH", keys.lease),
                                                         ("GET", keys.lease)]))
            conn.read_response()
            if conn.read_response() != b"tok":
                raise RuntimeError("not the owner")
            commands = [("MULTI",), ("XACK", STREAM, keys.group, *acks) if acks else ("PING",),
                        ("XREADGROUP", "GROUP", keys.group, "c", "COUNT", BATCH,
                         "STREAMS", STREAM, ">"), ("EXEC",)]
            conn.send_packed_command(conn.pack_commands(commands))
            for _ in commands[:-1]:
                conn.read_response()
            rows = rows_of(conn.read_response()[1])
        acks = [row[0] for row in rows]
        after = acks[-1].decode()
        done += len(rows)
    conn.send_command("XACK", STREAM, keys.group, *acks)
    conn.read_response()


def watch_aborts_on_expiry(client: redis.Redis) -> bool:
    """Does EXEC abort when the WATCHed key expired after the WATCH (no write to it)?"""
    client.set("bench-fenced-read-lease", "tok", px=100)
    pipe = client.pipeline(transaction=True)
    pipe.watch("bench-fenced-read-lease")
    assert pipe.get("bench-fenced-read-lease") == b"tok"
    time.sleep(0.3)
    pipe.multi()
    pipe.set("bench-fenced-read-probe", 1)
    try:
        pipe.execute()
    except redis.WatchError:
        return True
    finally:
        client.delete("bench-fenced-read-probe")
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-bin", default=None)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    modes = ("raw", "deliver", "watch")
    used: dict[str, list[float]] = {mode: [] for mode in modes}
    with ServerProcess(args.server_bin) as server:
        client = server.client(protocol=2)
        label = parse_info(client.info("server")).label
        fill_stream(client, STREAM, args.entries)
        scripts = Scripts(client)
        client.execute_command(*scripts.load_command("deliver"))  # type: ignore[no-untyped-call]
        for r in range(args.rounds):
            for mode in modes:
                keys = GroupKeys(STREAM, f"{mode}{r}")
                client.xgroup_create(STREAM, keys.group, id="0")
                client.set(keys.lease, "tok")
                conn = client.connection_pool.get_connection()
                before = cpu_seconds(server.proc.pid)
                read_all(conn, scripts, keys, mode, args.entries)
                used[mode].append((cpu_seconds(server.proc.pid) - before) / args.entries * 1e6)
                client.connection_pool.release(conn)
                client.xgroup_destroy(STREAM, keys.group)
        aborts = watch_aborts_on_expiry(client)
    print(f"server CPU per entry on {label} ({args.entries} entries, batches of {BATCH}, "
          f"{args.rounds} rounds; /proc/<pid>/stat, 10 ms ticks):")
    for mode in modes:
        print(f"  {mode:<8} median {statistics.median(used[mode]):5.2f} us  "
              f"runs {', '.join(f'{u:.2f}' for u in used[mode])}")
    print(f"  EXEC aborts when the WATCHed lease expired after the WATCH: {aborts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
