"""The orchestrator's traceparents: written directly without an OpenTelemetry SDK, through
OpenTelemetry with one."""

from __future__ import annotations

import re

import pytest

from horizons_platform import tracing

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-01$")


@pytest.mark.parametrize("trace_id", [1, 0xABC, tracing.new_trace_id(), 2**128 - 1])
def test_without_an_sdk_a_traceparent_is_what_opentelemetry_writes(trace_id: int) -> None:
    direct = TRACEPARENT.match(tracing.event_traceparent("job.started", trace_id))
    through_otel = TRACEPARENT.match(tracing._otel_traceparent("job.started", trace_id))
    assert direct and through_otel
    assert direct[1] == through_otel[1] == f"{trace_id:032x}"
    assert int(direct[2], 16) != 0
    assert tracing.trace_int(direct[0]) == trace_id


def test_each_event_gets_a_span_of_its_own() -> None:
    trace_id = tracing.new_trace_id()
    parents = {tracing.event_traceparent("job.submitted", trace_id) for _ in range(200)}
    assert len(parents) == 200
    assert {tracing.trace_id_of(p) for p in parents} == {f"{trace_id:032x}"}


def test_a_configured_sdk_gets_the_spans(monkeypatch: pytest.MonkeyPatch) -> None:
    class SdkProvider:  # stands for an SDK's TracerProvider: anything but the API's own
        pass

    monkeypatch.setattr(tracing.trace, "get_tracer_provider", SdkProvider)
    monkeypatch.setattr(tracing, "_otel_traceparent", lambda name, tid: f"otel:{name}:{tid}")
    assert tracing.event_traceparent("job.completed", 7) == "otel:job.completed:7"
