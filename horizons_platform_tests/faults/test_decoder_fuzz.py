"""Random bytes, random JSON and broken events through the decoder and the auditor's
row builder (no broker): nothing may raise except EventDecodeError, and whatever the
auditor makes of an invalid message must be storable."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given

from horizons_platform import events as ev
from horizons_platform.bench.faults import poison
from horizons_platform.services.audit import audit_row
from horizons_platform.services.base import Record
from horizons_platform_tests.faults.strategies import broken_events, payloads


def _record(raw: bytes | None) -> Record:
    record = Record("job-lifecycle", 0, 0, None, raw, 0)
    try:
        record.event = ev.decode(raw)
    except ev.EventDecodeError as exc:
        record.error = exc
    return record


@given(payloads)
def test_decode_raises_only_event_decode_error_with_a_storable_message(raw: bytes) -> None:
    try:
        ev.decode(raw)
    except ev.EventDecodeError as exc:
        assert exc.kind in ("malformed", "invalid")
        str(exc).encode("utf-8")  # it goes into dead_letters.error_message


@given(broken_events)
def test_broken_events_are_rejected(raw: bytes) -> None:
    with pytest.raises(ev.EventDecodeError):
        ev.decode(raw)


@given(payloads)
def test_the_auditor_can_store_whatever_it_receives(raw: bytes) -> None:
    pa.Table.from_pylist([audit_row(_record(raw))])


@pytest.mark.parametrize("name", list(poison.HOSTILE))
def test_hostile_input_still_yields_a_storable_audit_row(name: str) -> None:
    row = audit_row(_record(poison.HOSTILE[name]))
    assert row["valid"] is False
    pa.Table.from_pylist([row])
