"""``orderedstream topic create|describe``, ``produce --topic`` and ``server --cluster``."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from rich.console import Console

from .._demo import demo_payload
from .._recovery import passing_cluster_fault
from .._server import AnyClient, connect_url
from .._topic import Topic, TopicProducer, create_topic, describe_topic, fields_key, load_topic
from ..exceptions import ConfigError


def cmd_topic(args: argparse.Namespace, console: Console) -> int:
    from rich.table import Table

    client = connect_url(args.redis_url)
    try:
        if args.action == "create":
            topic = create_topic(client, args.name, args.partitions)
            console.print(f"topic [bold]{topic.name}[/] has {topic.partitions} partitions "
                          f"(routing: {topic.hash} of the key's UTF-8 bytes, modulo "
                          f"{topic.partitions})")
            return 0
        desc = describe_topic(client, args.name)
        if args.json:
            console.print_json(json.dumps(desc.as_dict()))
            return 0
        topic = desc.topic
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(topic.created_ms / 1000))
        table = Table(title=f"topic {topic.name}: {topic.partitions} partitions, routing "
                            f"{topic.hash}, created {created}"
                            + (" (cluster)" if desc.cluster else ""),
                      title_justify="left")
        for column in ("partition", "stream", "slot", "node", "length"):
            table.add_column(column, justify="right" if column in ("partition", "slot",
                                                                   "length") else "left")
        for p in desc.partitions:
            table.add_row(str(p.index), p.stream, str(p.slot), p.node, str(p.length))
        console.print(table)
        return 0
    finally:
        client.close()


# -- produce --topic ----------------------------------------------------------------------------

def _demo_entries(args: argparse.Namespace) -> Iterator[tuple[str, dict[str, str]]]:
    """Entry ``seq`` has key ``k{(seq-1) % K}`` and is that key's ``kseq``-th entry."""
    keys = args.keys
    seq = args.start_seq
    end = args.start_seq + args.count if args.count else None
    while end is None or seq < end:
        index = (seq - 1) % keys
        corrupt = bool(args.corrupt_every) and seq % args.corrupt_every == 0
        fields = demo_payload(seq, corrupt)
        fields.update(key=f"k{index}", kseq=str((seq - 1) // keys + 1))
        yield fields["key"], fields
        seq += 1


def _user_entries(args: argparse.Namespace) -> Iterator[tuple[Any, dict[str, Any]]]:
    """JSON objects from stdin, one a line, routed by their ``--key-field``."""
    for number, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except ValueError as err:
            raise ConfigError(f"stdin line {number} is not JSON ({err}): give one JSON object "
                              "a line") from err
        if not isinstance(fields, dict) or not fields:
            raise ConfigError(f"stdin line {number} is not a non-empty JSON object")
        flat = {k: v if isinstance(v, str | int | float) and not isinstance(v, bool)
                else json.dumps(v) for k, v in fields.items()}  # objects, lists, true, null
        try:
            yield fields_key(flat, args.key_field), flat
        except ConfigError as err:
            raise ConfigError(f"stdin line {number}: {err}") from err


_fault = passing_cluster_fault  # a fault to wait out: also a cluster's own while it fails over


def _stored_seqs(client: AnyClient, streams: set[str]) -> dict[str, int]:
    """The ``seq`` of the last entry the producer wrote to each stream (0: none, or no seq;
    copies a fixer re-streamed are passed over)."""
    from . import stored_seq

    return {stream: stored_seq(client, stream) or 0 for stream in streams}


def cmd_produce_topic(args: argparse.Namespace, console: Console, err_console: Console,
                      stop: threading.Event) -> int:
    """Demo entries (``seq``, ``key``, ``kseq``) or JSON lines from stdin (``--key-field``),
    each to its key's partition.  A demo batch whose fate is unknown (connection lost, a shard
    failing over) is not simply sent again: once the cluster answers, the entries of each
    partition up to the ``seq`` that partition's stream already holds are skipped.  Entries
    from stdin carry no sequence number to tell: they are sent again, with a warning."""
    if args.keys < 1:
        raise ConfigError(f"--keys must be >= 1, got {args.keys}")
    client = connect_url(args.redis_url)
    try:
        topic: Topic = load_topic(client, args.topic)
        producer = TopicProducer(client, topic, maxlen=args.maxlen)
    finally:
        client.close()
    source = iter(_user_entries(args) if args.key_field else _demo_entries(args))
    interval = 1.0 / args.rate if args.rate > 0 and not args.key_field else 0.0
    started = time.monotonic()
    sent = 0
    pending: list[tuple[Any, dict[str, Any]]] = []
    down: str | None = None
    try:
        while not stop.is_set():
            if not pending:
                chunk = 1 if interval else 500
                pending = [entry for _, entry in zip(range(chunk), source, strict=False)]
                if not pending:
                    break
            try:
                if down is not None and not args.key_field:  # what did the lost send store?
                    streams = {topic.stream_for(k) for k, _ in pending}
                    stored = _stored_seqs(producer.client, streams)
                    unsent = [(k, f) for k, f in pending
                              if int(f["seq"]) > stored[topic.stream_for(k)]]
                    sent += len(pending) - len(unsent)
                    pending = unsent
                    if not pending:
                        err_console.print("[green]server available again[/]")
                        down = None
                        continue
                ids = producer.send_many(pending)
            except Exception as err:
                reason = _fault(err)
                if reason is None:
                    raise
                if down is None:
                    err_console.print(f"[yellow]server unavailable ({reason}); retrying[/]",
                                      soft_wrap=True)
                    if args.key_field:
                        err_console.print(f"[yellow]the {len(pending)} entries being sent "
                                          "will be sent again: some may be written twice[/]")
                down = reason
                stop.wait(0.1)
                if isinstance(producer.client, redis.RedisCluster):
                    try:  # the slot map again: a replica may serve the shard now
                        producer.client.nodes_manager.initialize()
                    except Exception as again:
                        if _fault(again) is None:
                            raise
                continue
            if down is not None:
                err_console.print("[green]server available again[/]")
                down = None
            sent += len(ids)
            if not args.quiet and interval:
                key, fields = pending[-1]
                console.print(f"sent seq={fields.get('seq')} key={key} id={ids[-1]} "
                              f"partition={topic.partition_for(key)}")
            pending = []
            if interval:
                stop.wait(max(0.0, started + sent * interval - time.monotonic()))
    finally:
        producer.close()
    console.print(f"[green]produced {sent} entries to topic {topic.name}[/] "
                  f"({topic.partitions} partitions) in {time.monotonic() - started:.2f}s")
    return 0


# -- server --cluster ---------------------------------------------------------------------------

def cmd_server_cluster(args: argparse.Namespace, console: Console, err_console: Console,
                       done: threading.Event, servers: Any) -> int:
    """Run the embedded cluster ``servers`` (a ClusterServers) until ``done``; a node that
    exits is reported (the cluster fails over), the command goes on."""
    try:
        servers.start()
    except (RuntimeError, TimeoutError) as err:
        raise ConfigError(f"the cluster did not start: {' '.join(str(err).split())[:300]}"
                          ) from err
    binary = Path(servers.servers[0].binary).name
    console.print(f"[bold green]{binary}[/] cluster ready at [bold]{servers.url}[/] "
                  f"({servers.primaries} primaries, {servers.primaries * servers.replicas} "
                  f"replicas, node timeout {servers.node_timeout_ms} ms, data removed on "
                  "exit); Ctrl+C stops it")
    for node in servers.nodes:
        console.print(f"  {node.role:<8} 127.0.0.1:{node.port}"
                      + (f" slots {', '.join(f'{lo}-{hi}' for lo, hi in node.slots)}"
                         if node.slots else ""))
    console.print(f"  export REDIS_URL={servers.url}")
    reported: set[int] = set()
    while not done.wait(0.5):
        for server in servers.servers:
            if (server.proc is not None and server.proc.poll() is not None
                    and server.port not in reported):
                reported.add(server.port)
                err_console.print(f"[yellow]node 127.0.0.1:{server.port} exited "
                                  f"(code {server.proc.returncode}); its replica takes over "
                                  "if it was a primary[/]")
    return 0
