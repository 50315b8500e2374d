"""OpenTelemetry: ``traced(handler)`` makes one ``process <stream>`` span per handled entry with
the messaging attributes, linked to the producer's span through the entry's ``traceparent``;
checked with the SDK's in-memory exporter on a real server."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import redis

from orderedstream import Coordinator, CoordinatorConfig, Defer, Message, Producer
from orderedstream.testing import wait_until

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode

from orderedstream.tracing import inject_context, traced


@pytest.fixture
def spans() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_process_spans_link_to_the_producer(client: redis.Redis, stream: str,
                                            spans: tuple[TracerProvider,
                                                         InMemorySpanExporter]) -> None:
    """Each entry is handled inside a CONSUMER span 'process <stream>' carrying
    messaging.system=redis, the stream, the group, the entry id, the epoch and the delivery
    count; an entry sent with inject_context() inside a producer span links to that span, one
    sent without a context has no link; a failing handler marks its span as an error, a Defer
    does not; the handler's own spans are children of the process span."""
    provider, exporter = spans
    tracer = provider.get_tracer("test-producer")
    producer = Producer(client, stream)
    with tracer.start_as_current_span("send orders") as send_span:
        linked_id = producer.send(inject_context({"seq": "1"}))
    plain_id = producer.send(inject_context({"seq": "2"}))  # outside any span: no context
    defer_id = producer.send({"seq": "3"})
    fail_id = producer.send({"seq": "4"})
    failed = []

    def handler(message: Message) -> None:
        with provider.get_tracer("app").start_as_current_span("write"):
            if message.fields["seq"] == "3":
                raise Defer("later", delay_ms=60_000)
            if message.fields["seq"] == "4" and not failed:
                failed.append(message.id)
                raise RuntimeError("downstream down")

    config = CoordinatorConfig(stream=stream, group="g", consumer="a")
    c = Coordinator(config, traced(handler, tracer_provider=provider), client)
    c.start()
    try:
        wait_until(lambda: c.handled >= 4, 10, message="4 entries handled")
        epoch = c.epoch
    finally:
        c.stop(5)
    finished = exporter.get_finished_spans()
    process = [s for s in finished if s.name == f"process {stream}"]
    by_id: dict[str, list] = {}
    for s in process:
        by_id.setdefault(s.attributes["messaging.message.id"], []).append(s)
    assert sorted(by_id) == sorted([linked_id, plain_id, defer_id, fail_id])
    assert len(by_id[fail_id]) == 2  # the failed call and its retry
    for span in process:
        attrs = span.attributes
        assert span.kind is SpanKind.CONSUMER
        assert attrs["messaging.system"] == "redis"
        assert attrs["messaging.destination.name"] == stream
        assert attrs["messaging.consumer.group.name"] == "g"
        assert attrs["messaging.operation.type"] == "process"
        assert attrs["orderedstream.epoch"] == epoch
        assert attrs["orderedstream.delivery_count"] == 1
    (linked,) = by_id[linked_id]
    assert [link.context.span_id for link in linked.links] == [send_span.get_span_context().span_id]
    assert linked.links[0].context.trace_id == send_span.get_span_context().trace_id
    assert linked.context.trace_id != send_span.get_span_context().trace_id  # linked, not child
    assert not by_id[plain_id][0].links
    (deferred,) = by_id[defer_id]
    assert deferred.status.status_code is not StatusCode.ERROR
    assert deferred.attributes["orderedstream.deferred"] == "later"
    first, retry = sorted(by_id[fail_id], key=lambda s: s.attributes["orderedstream.attempt"])
    assert first.status.status_code is StatusCode.ERROR
    assert first.events[0].name == "exception"
    assert retry.status.status_code is not StatusCode.ERROR
    writes = [s for s in finished if s.name == "write"]
    assert {w.parent.span_id for w in writes} == {s.context.span_id for s in process}


def test_inject_context_outside_a_span_adds_nothing() -> None:
    """Without a current span there is no context to carry: the fields are left as they are."""
    assert inject_context({"a": "1"}) == {"a": "1"}


def test_readme_tracing_snippet_runs(server: Any, stream: str,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's OpenTelemetry snippet runs as pasted (REDIS_URL set)."""
    monkeypatch.setenv("REDIS_URL", server.url)
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    code = next(b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "traced(" in b)
    exec(compile(code.replace('"orders"', repr(stream)), "README.md", "exec"), {})
    assert redis.Redis.from_url(server.url).xlen(stream) == 1
