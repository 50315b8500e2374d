"""OpenTelemetry spans for handlers (the optional extra ``otel``: ``opentelemetry-api`` only; the
application brings the SDK and its exporters).

>>> fields = inject_context({"order": "42"})      # producer: carry the current trace context
>>> producer.send(fields)                          # doctest: +SKIP
>>> Coordinator(config, traced(handler), client)   # doctest: +SKIP

:func:`traced` wraps a handler: each call runs in a ``process <stream>`` span (kind CONSUMER)
with the messaging semantic-convention attributes (``messaging.system`` = ``redis``,
``messaging.destination.name``, ``messaging.consumer.group.name``, ``messaging.message.id``,
``messaging.operation.type`` = ``process``) and orderedstream's own (``orderedstream.epoch``,
``orderedstream.delivery_count``, ``orderedstream.redelivered``, ``orderedstream.attempt``).
An entry that carries a W3C ``traceparent`` field (written by :func:`inject_context`) gets a
span link to the producer's context, as the messaging conventions advise for consumers: the
process span stays in the consumer's own trace.  A handler that raises marks the span as an
error (a :class:`~orderedstream.Defer` does not: it is control flow) and the exception goes on
to the coordinator unchanged.

Without an SDK installed and configured, the API's no-op tracer makes this nearly free.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

try:
    from opentelemetry import propagate, trace
    from opentelemetry.trace import Link, SpanKind, Status, StatusCode, TracerProvider
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("orderedstream.tracing needs opentelemetry-api: "
                      "pip install 'orderedstream[otel]'") from err

from ._handling import Handler
from ._message import Message
from .exceptions import Defer

__all__ = ["TRACE_FIELDS", "inject_context", "link_from", "traced"]

TRACE_FIELDS = ("traceparent", "tracestate")
"""The entry fields that carry a trace context (W3C Trace Context names)."""

_SCOPE = "orderedstream"


def inject_context(fields: MutableMapping[str, Any] | None = None) -> MutableMapping[str, Any]:
    """Add the current trace context (``traceparent``, ``tracestate``) to ``fields`` (a new
    dict when None) through the globally configured propagator, and return it: pass the
    result to :meth:`Producer.send`.  Outside any span, nothing is added."""
    carrier: MutableMapping[str, Any] = {} if fields is None else fields
    propagate.inject(carrier)
    return carrier


def link_from(message: Message) -> Link | None:
    """A span link to the context the producer put in ``message`` (None when it carries none
    or an invalid one)."""
    raw = message.raw
    carrier: dict[str, str] = {}
    for name in TRACE_FIELDS:
        value = raw.get(name.encode())
        if value is not None:
            carrier[name] = value.decode("ascii", "replace")
    if not carrier:
        return None
    context = trace.get_current_span(propagate.extract(carrier)).get_span_context()
    return Link(context) if context.is_valid else None


def traced(handler: Handler, *, tracer_provider: TracerProvider | None = None) -> Handler:
    """``handler`` with a ``process <stream>`` span around each call (see the module's doc).
    ``tracer_provider``: default the global one."""
    from . import __version__

    tracer = trace.get_tracer(_SCOPE, __version__, tracer_provider=tracer_provider)

    def traced_handler(message: Message) -> object:
        link = link_from(message)
        attributes: dict[str, Any] = {
            "messaging.system": "redis",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": message.stream,
            "messaging.consumer.group.name": message.group,
            "messaging.message.id": message.id,
            "orderedstream.epoch": message.epoch,
            "orderedstream.delivery_count": message.delivery_count,
            "orderedstream.redelivered": message.redelivered,
            "orderedstream.attempt": message.attempt,
        }
        with tracer.start_as_current_span(
                f"process {message.stream}", kind=SpanKind.CONSUMER, attributes=attributes,
                links=[link] if link is not None else None, record_exception=False,
                set_status_on_exception=False) as span:
            try:
                return handler(message)
            except Defer as deferred:
                span.set_attribute("orderedstream.deferred", deferred.reason)
                raise
            except BaseException as err:
                span.record_exception(err)
                span.set_status(Status(StatusCode.ERROR, f"{type(err).__name__}: {err}"))
                raise

    traced_handler.__wrapped__ = handler  # type: ignore[attr-defined]
    return traced_handler

