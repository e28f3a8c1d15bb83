"""W3C trace context for jobs (OpenTelemetry API; exporting is the operator's choice).

The orchestrator starts one trace per job; every event of the job carries it as a
``traceparent`` — in the envelope's ``trace_id`` field and as a Kafka header — each with
a span of its own. With an OpenTelemetry SDK configured in the process, those spans are
recorded and exported as usual; without one (the API alone), ids are still generated
here so the context travels. The store keeps the 32-hex trace id (``trace_id`` columns),
so a job's events can be found by it.
"""

from __future__ import annotations

import random

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()
_TRACER = trace.get_tracer("horizons_platform")
SAMPLED = TraceFlags(TraceFlags.SAMPLED)


def new_trace_id() -> int:
    return random.getrandbits(128) or 1


def _span_id() -> int:
    return random.getrandbits(64) or 1


# What ``trace.get_tracer_provider()`` is while no SDK is configured in this process.
_API_ONLY = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)


def event_traceparent(name: str, trace_id: int) -> str:
    """A span for one event of the trace ``trace_id``; its ``traceparent``."""
    if isinstance(trace.get_tracer_provider(), _API_ONLY):
        # No SDK: the API's span would record nothing and carry the parent's ids, so the
        # context is written here as _otel_traceparent() would write it. Its calls were
        # 26 µs of the orchestrator's ~60 per event (cProfile, no Kafka).
        return f"00-{trace_id:032x}-{_span_id():016x}-01"
    return _otel_traceparent(name, trace_id)


def _otel_traceparent(name: str, trace_id: int) -> str:
    """The span through OpenTelemetry (recorded and exported by a configured SDK)."""
    parent = SpanContext(
        trace_id, _span_id(), is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED)
    )
    context = trace.set_span_in_context(NonRecordingSpan(parent))
    with _TRACER.start_as_current_span(name, context=context) as span:
        current = span.get_span_context()
    if not current.is_valid:  # the API without an SDK: a context of our own
        current = SpanContext(
            trace_id, _span_id(), False, trace_flags=TraceFlags(TraceFlags.SAMPLED)
        )
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(NonRecordingSpan(current)))
    return carrier["traceparent"]


def trace_id_of(traceparent: str | None) -> str | None:
    """The 32-hex trace id of a validated ``traceparent`` (the envelope's pattern,
    events.TRACEPARENT_PATTERN, already checked it: every group calls this per event, so
    it slices rather than matching again)."""
    return traceparent[3:35] if traceparent else None


def trace_int(traceparent: str | None) -> int | None:
    tid = trace_id_of(traceparent)
    return int(tid, 16) if tid else None
