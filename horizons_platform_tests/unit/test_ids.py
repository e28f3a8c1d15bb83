"""Time-ordered ids: what the store's primary keys need to stay cheap to checkpoint."""

from __future__ import annotations

import uuid

from horizons_platform import events as ev
from horizons_platform.ids import derived_from, is_time_ordered, uuid7
from horizons_platform.services.notifications import _NAMESPACE, notification_id


def test_a_uuid7_carries_its_milliseconds_first_then_random_bits() -> None:
    ms = 1_765_000_000_123
    ids = [uuid7(ms) for _ in range(1000)]
    assert len(set(ids)) == 1000
    for u in ids:
        assert u.version == 7 and u.variant == uuid.RFC_4122
        assert u.int >> 80 == ms
        assert is_time_ordered(str(u))


def test_uuid7_text_sorts_by_time() -> None:
    minted = [str(uuid7(ms)) for ms in range(1_700_000_000_000, 1_700_000_100_000, 997)]
    assert minted == sorted(minted)


def test_fresh_events_get_time_ordered_ids() -> None:
    event = ev.new_event(ev.AuditRecord, producer="t", payload={"action": "a", "actor": "me"})
    assert event.event_id.version == 7
    assert not is_time_ordered(str(uuid.uuid4()))


def test_an_id_derived_from_a_uuid7_sorts_with_it_and_is_stable() -> None:
    source = str(uuid7())
    a = derived_from(source, bytes(range(20)))
    assert a == derived_from(source, bytes(range(20)))
    assert a != derived_from(source, bytes(range(1, 21)))
    parsed = uuid.UUID(a)
    assert parsed.version == 8 and parsed.variant == uuid.RFC_4122
    assert a[:13] == source[:13]  # the same milliseconds, in the same text positions


def test_notification_ids_of_time_ordered_events_sort_with_their_events() -> None:
    early, late = str(uuid7(1_700_000_000_000)), str(uuid7(1_700_000_000_001))
    kinds = ("completed", "failed", "cancelled", "submitted")
    ids = {kind: notification_id(early, kind) for kind in kinds}
    assert len(set(ids.values())) == len(kinds)
    assert all(notification_id(early, k) == i for k, i in ids.items())  # stable
    assert all(i[:13] == early[:13] and uuid.UUID(i).version == 8 for i in ids.values())
    assert max(ids.values()) < notification_id(late, "completed")
    # Never the uuid5 an older (v4) event's notification keeps:
    assert ids["completed"] != str(uuid.uuid5(_NAMESPACE, f"{early}:completed"))
