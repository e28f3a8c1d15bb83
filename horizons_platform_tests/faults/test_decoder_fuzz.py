"""Random bytes, random JSON and broken events through the decoder and the auditor's
row builder (no broker): nothing may raise except EventDecodeError, and whatever the
auditor makes of an invalid message must be storable."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given

from horizons_bench.faults import poison
from horizons_platform import events as ev
from horizons_platform.kafka.records import Batch, now
from horizons_platform.services.audit import _AUDIT_SCHEMA, audit_columns, chain_columns
from horizons_platform_tests.faults.strategies import broken_events, payloads


def _audit_table(raw: bytes | None) -> pa.Table:
    """What the auditor makes of one message, as the Arrow table it would insert."""
    batch = Batch.decode(["job-lifecycle"], [0], [0], [None], [raw], [0])
    columns = audit_columns(batch, now())
    chain_columns(columns, 0, None)
    return pa.table({f.name: columns[f.name] for f in _AUDIT_SCHEMA}, _AUDIT_SCHEMA)


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
def test_validate_and_decode_agree_on_every_input(raw: bytes) -> None:
    """The hot path's dict validator and the models give one verdict, one error."""
    try:
        model = ev.decode(raw)
    except ev.EventDecodeError as exc:
        with pytest.raises(ev.EventDecodeError) as again:
            ev.validate(raw)
        assert (str(again.value), again.value.kind) == (str(exc), exc.kind)
    else:
        assert ev.validate(raw) == {**model.model_dump(), "event_id": str(model.event_id)}


@given(payloads)
def test_the_auditor_can_store_whatever_it_receives(raw: bytes) -> None:
    _audit_table(raw)


@pytest.mark.parametrize("name", list(poison.HOSTILE))
def test_hostile_input_still_yields_a_storable_audit_row(name: str) -> None:
    table = _audit_table(poison.HOSTILE[name])
    assert table.column("valid").to_pylist() == [False]
