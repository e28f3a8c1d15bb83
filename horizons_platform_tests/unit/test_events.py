"""The event model: round trips (property-based), unknown fields kept, clear errors."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from horizons_platform import events as ev

_text = st.text(min_size=1, max_size=30)
# Owners are e-mail addresses (validated on decode): one address, any ordinary shape.
_email = st.builds(
    "{}@{}.{}".format,
    st.from_regex(r"[a-z0-9][a-z0-9._+-]{0,15}[a-z0-9]", fullmatch=True).filter(
        lambda u: ".." not in u
    ),
    # "ab--…" is reserved for Punycode (IDNA): email-validator refuses such a domain label.
    st.from_regex(r"[a-z][a-z0-9-]{0,12}[a-z0-9]", fullmatch=True).filter(lambda d: "--" not in d),
    st.sampled_from(["org", "edu", "example", "observatory"]),
)
_json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**53), 2**53), _text)
_times = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)

_payloads = {
    ev.JobSubmitted: st.fixed_dictionaries(
        {
            "owner": _email,
            "job_type": _text,
            "priority": st.integers(0, 9),
            "params": st.dictionaries(_text, _json_scalar, max_size=3),
        }
    ),
    ev.JobStarted: st.fixed_dictionaries({"owner": _email, "job_type": _text, "worker": _text}),
    ev.JobCompleted: st.fixed_dictionaries(
        {"owner": _email, "job_type": _text, "output_bytes": st.integers(0, 2**40)}
    ),
    ev.JobFailed: st.fixed_dictionaries(
        {
            "owner": _email,
            "job_type": _text,
            "error": _text,
            "exit_code": st.one_of(st.none(), st.integers(0, 255)),
        }
    ),
    ev.JobCancelled: st.fixed_dictionaries({"owner": _email, "job_type": _text, "reason": _text}),
    ev.JobMetrics: st.fixed_dictionaries(
        {
            "job_type": _text,
            "outcome": st.sampled_from(["completed", "failed", "cancelled"]),
            "duration_s": st.floats(0, 1e6),
            "queue_time_s": st.floats(0, 1e6),
            "bytes_processed": st.integers(0, 2**50),
        }
    ),
}


@st.composite
def events(draw: st.DrawFn) -> ev.Envelope:
    cls = draw(st.sampled_from(list(_payloads)))
    payload = draw(_payloads[cls])
    extra = draw(st.dictionaries(st.sampled_from(["x_site", "x_band"]), _json_scalar, max_size=2))
    return cls(
        event_id=draw(st.uuids()),
        job_id=draw(_text),
        occurred_at=draw(_times),
        producer=draw(_text),
        payload=payload,
        **extra,
    )


@settings(max_examples=200, deadline=None)
@given(events())
def test_encode_decode_round_trip(event: ev.Envelope) -> None:
    decoded = ev.decode(ev.encode(event))
    assert type(decoded) is type(event)
    assert decoded == event
    assert ev.encode(decoded) == ev.encode(event)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_crash_the_decoder(raw: bytes) -> None:
    try:
        ev.decode(raw)
    except ev.EventDecodeError as exc:
        assert str(exc)


def _valid() -> dict:
    return json.loads(
        ev.encode(
            ev.new_event(
                ev.JobCompleted,
                producer="t",
                job_id="j",
                payload={"owner": "o@x.example", "job_type": "img"},
            )
        )
    )


def test_unknown_fields_are_kept_at_every_level() -> None:
    data = _valid()
    data["x_new_top"] = {"a": 1}
    data["payload"]["x_new_inner"] = [1, 2]
    event = ev.decode(json.dumps(data).encode())
    again = json.loads(ev.encode(event))
    assert again["x_new_top"] == {"a": 1}
    assert again["payload"]["x_new_inner"] == [1, 2]


@pytest.mark.parametrize(
    ("mutate", "field", "kind"),
    [
        (lambda d: d["payload"].pop("owner"), "payload.owner", "invalid"),
        (lambda d: d.pop("event_id"), "event_id", "invalid"),
        (lambda d: d.update(event_id="not-a-uuid"), "event_id", "invalid"),
        (lambda d: d.update(occurred_at="2026-01-01T00:00:00"), "occurred_at", "invalid"),
        (lambda d: d.update(event_type="job.exploded"), "event_type", "invalid"),
        (lambda d: d.pop("event_type"), "event_type", "invalid"),
        (lambda d: d.update(job_id=""), "job_id", "invalid"),
        (lambda d: d["payload"].update(output_bytes=-1), "payload.output_bytes", "invalid"),
        # Instants, numbers and ints the store (or Python reading it back) cannot hold:
        # refused here, by every group alike, not by one group's insert.
        (lambda d: d.update(occurred_at="9999-12-31T23:59:59-14:00"), "occurred_at", "invalid"),
        (lambda d: d.update(occurred_at="0001-01-01T00:00:00+14:00"), "occurred_at", "invalid"),
        (lambda d: d.update(schema_version=10**30), "schema_version", "invalid"),
        (lambda d: d["payload"].update(output_bytes=2**63), "payload.output_bytes", "invalid"),
    ],
)
def test_decode_error_names_the_field(mutate, field: str, kind: str) -> None:  # type: ignore[no-untyped-def]
    data = _valid()
    mutate(data)
    with pytest.raises(ev.EventDecodeError) as info:
        ev.decode(json.dumps(data).encode())
    assert info.value.field == field
    assert info.value.kind == kind
    assert str(info.value).startswith(field)


@pytest.mark.parametrize("raw", [b"", b"{", b"[1, 2]", b'"text"', b"\xff\xfe", None])
def test_malformed_input_is_reported_as_malformed(raw: bytes | None) -> None:
    with pytest.raises(ev.EventDecodeError) as info:
        ev.decode(raw)
    assert info.value.kind == "malformed"


def test_headers_repeat_type_and_schema_version() -> None:
    event = ev.new_event(
        ev.JobStarted,
        producer="t",
        job_id="j",
        payload={"owner": "o@x.example", "job_type": "t", "worker": "w"},
    )
    assert dict(ev.headers_for(event)) == {"event_type": b"job.started", "schema_version": b"1"}


def test_new_event_defaults_are_fresh_and_utc() -> None:
    a = ev.new_event(ev.AuditRecord, producer="t", payload={"action": "a", "actor": "me"})
    b = ev.new_event(ev.AuditRecord, producer="t", payload={"action": "a", "actor": "me"})
    assert a.event_id != b.event_id and isinstance(a.event_id, uuid.UUID)
    assert a.occurred_at.utcoffset() == timedelta(0)


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_a_metric_is_a_finite_number(number: bytes) -> None:
    data = json.loads(
        ev.encode(
            ev.new_event(
                ev.JobMetrics,
                producer="t",
                job_id="j",
                payload={
                    "job_type": "img",
                    "outcome": "completed",
                    "duration_s": 1.0,
                    "queue_time_s": 0.5,
                },
            )
        )
    )
    raw = json.dumps(data).encode().replace(b'"duration_s": 1.0', b'"duration_s": ' + number)
    assert number in raw
    with pytest.raises(ev.EventDecodeError) as info:
        ev.validate(raw)
    assert info.value.field == "payload.duration_s"
