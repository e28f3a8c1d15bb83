"""NotificationService: an outbox row per notification, written with the ingest batch.

The outbox row's id is derived from the event id and the kind, so a replayed event can
never create a second notification, and its Message-ID is derived from that id, so a
resend after a crash is recognisable as the same message.
"""

from __future__ import annotations

import uuid
from hashlib import sha1 as _sha1
from typing import Any

from horizons_platform.events import (
    JOB_CANCELLED,
    JOB_COMPLETED,
    JOB_FAILED,
    JOB_SUBMITTED,
    EventDict,
)
from horizons_platform.ids import derived_from, is_time_ordered
from horizons_platform.kafka.records import Batch, Handler, Tables, now
from horizons_platform.services.base import reused_in_store, rows_to_columns
from horizons_platform.tracing import trace_id_of

_NAMESPACE = uuid.UUID("6f1c3f0e-6d38-4c8e-9a55-8c1e6f3a2b10")
_NAMESPACE_BYTES = _NAMESPACE.bytes
KINDS = {
    JOB_COMPLETED: "completed",
    JOB_FAILED: "failed",
    JOB_CANCELLED: "cancelled",
    JOB_SUBMITTED: "submitted",
}


def notification_id(event_id: str, kind: str) -> str:
    """The notification's idempotency key, from its event's id and kind.

    For a time-ordered (v7) event id, an id that sorts with it (ids.derived_from): the
    notifications table's primary key then stays cheap to checkpoint as it grows. For
    any other event id, ``str(uuid.uuid5(_NAMESPACE, f"{event_id}:{kind}"))`` as always:
    every id already stored must come out the same, or a replayed old event would be
    notified twice.

    Built without the UUID object: its constructor and ``__str__`` are Python and cost
    three times the SHA-1 (py-spy: ``uuid5`` 6 % of the GIL in a four-group host). A unit
    test holds the two to the same text."""
    digest = _sha1(_NAMESPACE_BYTES + f"{event_id}:{kind}".encode()).digest()
    if is_time_ordered(event_id):
        return derived_from(event_id, digest)
    out = bytearray(digest[:16])
    out[6] = (out[6] & 0x0F) | 0x50  # version 5
    out[8] = (out[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = out.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def message_id(notification: str) -> str:
    return f"<{notification}@horizons.local>"


HEADER_MAX = 200
# Line breaks of any kind (CR, LF, NEL, LS, PS …) and other control characters.
_UNSAFE_IN_HEADER = {c: " " for c in [*range(0x20), 0x7F, 0x85, 0x2028, 0x2029]}


def header_safe(text: str, limit: int = HEADER_MAX) -> str:
    """``text`` fit for an e-mail header: no control character can start a new header
    line, and a producer's 1 MB job id cannot make a 1 MB subject."""
    clean = " ".join(text.translate(_UNSAFE_IN_HEADER).split())
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


def render(event: EventDict, kind: str) -> tuple[str, str]:
    """Subject and body of the e-mail for one lifecycle event (a validated event dict)."""
    p = event["payload"]
    job_id = event["job_id"]
    subject = header_safe(f"[horizons] job {job_id} {kind}")
    lines = [
        f"Your {p['job_type']} job {job_id} {kind} at {event['occurred_at'].isoformat()}.",
    ]
    if kind == "failed":
        exit_code = p.get("exit_code")
        lines.append(
            f"Error: {p['error']}" + (f" (exit code {exit_code})" if exit_code is not None else "")
        )
    elif kind == "cancelled" and p.get("reason"):
        by = p.get("cancelled_by")
        lines.append(f"Reason: {p['reason']}" + (f" (by {by})" if by else ""))
    elif kind == "completed" and p.get("output_bytes"):
        lines.append(f"Output: {p['output_bytes']} bytes.")
    lines.append(f"Event id: {event['event_id']}")
    return subject, "\n".join(lines) + "\n"


class NotificationHandler(Handler):
    group = "notifications"

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        wanted = {JOB_COMPLETED, JOB_FAILED, JOB_CANCELLED}
        if settings.notify_on_submit:
            wanted.add(JOB_SUBMITTED)
        self.kinds = frozenset(wanted)

    def topics(self) -> list[str]:
        return [self.settings.topic_job_lifecycle]

    def handle(self, batch: Batch) -> Tables:
        rows: list[dict[str, Any]] = []
        created = now()
        for i in batch.where(self.kinds):
            event: Any = batch.events[i]
            kind = KINDS[event["event_type"]]
            event_id = event["event_id"]
            nid = notification_id(event_id, kind)
            subject, body = render(event, kind)
            rows.append(
                {
                    "notification_id": nid,
                    "event_id": event_id,
                    "job_id": event["job_id"],
                    "kind": kind,
                    "recipient": event["payload"]["owner"],
                    "subject": subject,
                    "body": body,
                    "message_id": message_id(nid),
                    "status": "pending",
                    "attempts": 0,
                    "created_at": created,
                    "next_attempt_at": created,
                    "trace_id": trace_id_of(event["trace_id"]),
                }
            )
        if not rows:
            return {}
        ids = [r["notification_id"] for r in rows]
        return {
            "notification_queue": {
                "notification_id": ids,
                "next_attempt_at": [created] * len(ids),
                "created_at": [created] * len(ids),
            },
            "notifications": rows_to_columns(rows),
        }

    def reused_ids(self, con: Any, batch: Batch) -> dict[int, str]:
        """Also an id whose notification went to another job or owner: a second event
        under it would otherwise never be notified (its notification id is taken)."""
        out = super().reused_ids(con, batch)
        wanted: dict[str, list[int]] = {}
        for i in batch.where(self.kinds):
            if i not in out:
                event: Any = batch.events[i]
                kind = KINDS[event["event_type"]]
                wanted.setdefault(notification_id(event["event_id"], kind), []).append(i)
        return {
            **out,
            **reused_in_store(
                con,
                batch,
                wanted,
                "SELECT notification_id, job_id, recipient FROM notifications "
                "WHERE notification_id IN ({keys})",
                lambda e, stored: (
                    None
                    if (e["job_id"], e["payload"]["owner"]) == stored
                    else f"notified for job {stored[0]}"
                ),
            ),
        }

    def after_commit(self, rows: Tables) -> None:
        if rows.get("notifications") and self.on_new_notifications is not None:
            self.on_new_notifications()

    # Set by the host to wake the outbox dispatcher without waiting for its next tick.
    on_new_notifications: Any = None
