"""Delivers the notification outbox over SMTP.

The dispatcher (here, in the store's owner) claims due notifications and records their
outcomes, each time in one transaction with the outcomes gathered since the last one;
the SMTP sessions run in a process of their own (runtime/sender.py: their Python would
otherwise share the consumer loops' GIL), each taking the next claimed notification as
soon as it is free. No session waits for another: a message whose server answers slowly
(or times out) holds up its own session only. A message that cannot be built or that
the server refuses for good (5xx) is marked ``failed`` with its reason, alone; a
transient failure (4xx, a dropped connection) backs off that message alone.

A row left claimed by a crashed process is claimed again after a timeout and counted in
``resends``: SMTP has no exactly-once, so a resend is possible there, and it carries the
same Message-ID so the receiver can tell. Rows this process still holds (queued, or
being sent) have their claim renewed before it could look stale; what is still queued
when the dispatcher stops is handed back unsent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from horizons_platform.runtime.sender import SmtpSender
from horizons_platform.runtime.smtp import Claimed, Outcome, classify, render_message
from horizons_platform.settings import Settings
from horizons_platform.store.base import StoreBase
from horizons_platform.store.tables import scan_once

__all__ = ["Claimed", "OutboxDispatcher", "Outcome", "backoff", "classify", "render_message"]

log = logging.getLogger(__name__)


IDLE_CLAIM_S = 0.5  # with nothing woken, outcomes are recorded (and the due claimed) this often
MIN_CLAIM_S = 0.1  # claim transactions at most this often, unless the last one came full
OUTCOME_SCHEMA = pa.schema(
    [
        ("notification_id", pa.string()),
        ("status", pa.string()),
        ("sent_at", pa.timestamp("us", tz="UTC")),
        ("next_attempt_at", pa.timestamp("us", tz="UTC")),
        ("error", pa.string()),
        ("attempts", pa.int32()),
    ]
)
HELD_SCHEMA = pa.schema([("notification_id", pa.string())])


def backoff(settings: Settings, attempts: int) -> float:
    return min(
        settings.smtp_backoff_initial_s * 2 ** max(0, attempts - 1), settings.smtp_backoff_max_s
    )


@dataclass(slots=True)
class _Held:
    """A notification claimed by this process and not yet given an outcome."""

    claimed_at: float  # monotonic; renewed with the claim
    attempts: int
    sender: int  # the generation of the sender process it went to


class OutboxDispatcher:
    def __init__(self, settings: Settings, store: StoreBase, stop_event: threading.Event) -> None:
        self.settings = settings
        self.store = store
        self.stop_event = stop_event
        # SMTP sessions side by side (settings.smtp_connections, in the sender process):
        # every message is 4 round trips, and on a busy machine each one waits for a CPU
        # at both ends, so one session does a few dozen messages/s beside ingest.
        self.sender = SmtpSender(settings, self._on_outcome, self._on_sender_exit)
        self.batch = max(1, settings.outbox_batch)
        self._low_water = self.batch // 2
        self._wake = threading.Event()
        self.claim_timeout_s = max(10.0, 2 * settings.smtp_timeout_s)
        # Shared with the sender's reader thread, under _cond:
        self._cond = threading.Condition()
        self._held: dict[str, _Held] = {}  # queued in the sender or being sent
        self._outcomes: list[Outcome] = []  # not yet recorded (with the next claim)
        self.sent = 0
        self.failed_attempts = 0
        # Told each send's seconds and success (the host's Prometheus metrics).
        self.observe: Callable[[float, bool], None] | None = None

    def wake(self) -> None:
        self._wake.set()

    def run(self) -> None:
        # The sender process starts with the first claim that has mail to send: its
        # interpreter's start costs a second of CPU that a starting host (and a host
        # that sends no mail) should not pay.
        try:
            while not self.stop_event.is_set():
                self._wake.wait(timeout=IDLE_CLAIM_S)
                self._wake.clear()
                started = time.monotonic()
                full = False
                try:
                    full = self._top_up()
                except Exception:
                    log.exception("outbox: claim failed; will retry")
                    self.stop_event.wait(1.0)
                # A claim is a transaction of a few DuckDB statements (milliseconds each,
                # beside four ingesting groups): with nothing more due, at most one per
                # MIN_CLAIM_S. Woken by every notifications commit, the dispatcher once ran
                # ~40 a second and took a quarter of a core at 200 events/s. A full claim
                # means more is due: the next one follows as soon as the queue runs low.
                if not full:
                    self.stop_event.wait(max(0.0, MIN_CLAIM_S - (time.monotonic() - started)))
        finally:
            self.close()

    def deliver_due(self, limit: int | None = None) -> int:
        """Claim what is due (up to ``limit``) and wait until every claimed message has an
        outcome, recorded with the next claim or ``flush()``; returns how many were claimed."""
        claimed = self._claim(limit or self.batch)
        with self._cond:
            self._cond.wait_for(lambda: not self._held)
        return claimed

    def flush(self) -> None:
        """Record the outcomes gathered so far now (what was sent must not be sent again
        after a restart) without claiming more."""
        self._claim(0)

    def close(self) -> None:
        """Let each session finish the message it is sending, hand back what is still
        queued, record every outcome and close the sessions."""
        released = self.sender.close()
        with self._cond:
            for i in released:
                held = self._held.pop(i, None)
                if held is not None:
                    self._outcomes.append(Outcome(i, held.attempts, released=True))
        try:
            self.flush()
        except Exception:
            log.exception("outbox: could not record the last outcomes")

    def _top_up(self) -> bool:
        """Record the outcomes gathered so far and claim enough to fill the queue; True
        when the claim came back full (more is likely due)."""
        with self._cond:
            room = self.batch - len(self._held)
            idle = room <= 0 and not self._outcomes and not self._to_renew()
        if idle:
            return False
        return room > 0 and self._claim(room) >= room

    def _to_renew(self) -> list[str]:
        """Held claims half way to looking abandoned (call under _cond)."""
        before = time.monotonic() - self.claim_timeout_s / 2
        return [i for i, h in self._held.items() if h.claimed_at < before]

    def _claim(self, limit: int) -> int:
        claimed = self._record(limit)
        if not claimed and not self.sender.running:
            return 0
        now = time.monotonic()
        with self._cond:
            # Held before they are sent: an outcome can come back before send() returns.
            generation = self.sender.generation if self.sender.running else -1
            for n in claimed:
                self._held[n.notification_id] = _Held(now, n.attempts, generation)
        sent_to = self.sender.send(claimed)  # also: the server is worth another try
        if sent_to != generation:  # a new sender process was started for them
            with self._cond:
                for n in claimed:
                    held = self._held.get(n.notification_id)
                    if held is not None:
                        held.sender = sent_to
        return len(claimed)

    def _on_outcome(self, outcome: Outcome, seconds: float | None) -> None:
        """On the sender's reader thread: one message's outcome."""
        if seconds is not None and self.observe is not None:
            self.observe(seconds, outcome.error is None)
        with self._cond:
            if self._held.pop(outcome.notification_id, None) is None:
                return  # already given up on with its sender (see _on_sender_exit)
            self._outcomes.append(outcome)
            if len(self._held) <= self._low_water:
                self._wake.set()
            if not self._held:
                self._cond.notify_all()

    def _on_sender_exit(self, generation: int, reason: str) -> None:
        """A sender process died with messages of ours: whether they went out is unknown,
        so each is retried after its backoff (the same Message-ID if it is sent twice)."""
        with self._cond:
            lost = [i for i, h in self._held.items() if h.sender == generation]
            for i in lost:
                self._outcomes.append(Outcome(i, self._held.pop(i).attempts, reason))
            self._cond.notify_all()
        self._wake.set()

    # --- the store side ------------------------------------------------------------------
    # A claim's transaction runs beside four ingesting groups, and each DuckDB statement
    # costs milliseconds of fixed overhead here: the statements below are the fewest that
    # do the work (no temp tables; the Arrow tables are found by name), and a claim with
    # nothing to record and nothing due runs one SELECT.

    def _record(self, limit: int = 0) -> list[Claimed]:
        """Write the outcomes gathered since the last claim and claim up to ``limit`` due
        notifications, in one transaction (a write-write conflict with the ingesting
        consumer is retried)."""
        with self._cond:
            outcomes, self._outcomes = self._outcomes, []
            renew = self._to_renew()
        if not (outcomes or renew or limit):
            return []
        rows = [self._outcome_row(o) for o in outcomes]
        retry = any(r["status"] == "pending" for r in rows)
        done = any(r["status"] != "pending" for r in rows)

        def work(con: Any) -> list[Claimed]:
            # Found by DuckDB by their names in this frame (replacement scans), each
            # statement reading a stream of its own (tables.scan_once).
            outcomes = pa.Table.from_pylist(rows, schema=OUTCOME_SCHEMA)
            held = pa.table({"notification_id": renew}, schema=HELD_SCHEMA)
            # Every join with ``notifications`` also matches the created_at the queue
            # keeps: DuckDB then skips the table's older segments by their min/max
            # instead of scanning all of it (schema.py, migration 7): a claim of 100
            # beside 2,000,000 stored took 524 ms on the id alone, ~20 ms so (kpis.md).
            if renew:  # still queued or being sent here: not stale, whatever the clock says
                held_rows = scan_once(held)
                con.execute(
                    """
                    UPDATE notification_queue SET claimed_at = now() FROM held_rows h
                    WHERE notification_queue.notification_id = h.notification_id
                    """
                )
                held_rows = scan_once(held)  # noqa: F841
                con.execute(  # (what the stuck-claim health rule reads)
                    """
                    UPDATE notifications SET claimed_at = now()
                    FROM notification_queue q
                    WHERE q.notification_id IN (SELECT notification_id FROM held_rows)
                      AND notifications.notification_id = q.notification_id
                      AND notifications.created_at = q.created_at
                    """
                )
            if rows:
                outcome_rows = scan_once(outcomes)
                con.execute(
                    """
                    UPDATE notifications SET status = o.status, sent_at = o.sent_at,
                        next_attempt_at = o.next_attempt_at, attempts = o.attempts,
                        -- a message handed back unsent keeps the reason of its last try
                        error = coalesce(o.error, CASE WHEN o.status = 'pending'
                            THEN notifications.error END)
                    FROM outcome_rows o, notification_queue q
                    WHERE q.notification_id = o.notification_id
                      AND notifications.notification_id = o.notification_id
                      AND notifications.created_at = q.created_at
                    """
                )
            if retry:
                outcome_rows = scan_once(outcomes)
                con.execute(
                    """
                    UPDATE notification_queue SET claimed_at = NULL,
                        next_attempt_at = o.next_attempt_at
                    FROM outcome_rows o
                    WHERE notification_queue.notification_id = o.notification_id
                      AND o.status = 'pending'
                    """
                )
            if done:
                outcome_rows = scan_once(outcomes)  # noqa: F841
                con.execute(
                    """
                    DELETE FROM notification_queue WHERE notification_id IN
                        (SELECT notification_id FROM outcome_rows WHERE status <> 'pending')
                    """
                )
            if not limit:
                return []
            due_rows = con.execute(
                f"""
                SELECT notification_id, created_at, claimed_at IS NOT NULL AS stale
                FROM notification_queue
                WHERE (claimed_at IS NULL AND next_attempt_at <= now())
                   OR claimed_at < now() - INTERVAL {self.claim_timeout_s:.0f} SECOND
                ORDER BY next_attempt_at LIMIT {int(limit)}
                """
            ).to_arrow_table()
            if due_rows.num_rows == 0:
                return []
            due = scan_once(due_rows)
            con.execute(
                """
                UPDATE notification_queue SET claimed_at = now()
                FROM due WHERE notification_queue.notification_id = due.notification_id
                """
            )
            due = scan_once(due_rows)  # noqa: F841
            found = con.execute(
                """
                UPDATE notifications SET
                    resends = resends + CASE WHEN due.stale THEN 1 ELSE 0 END,
                    status = 'sending', attempts = attempts + 1, claimed_at = now()
                FROM due WHERE notifications.notification_id = due.notification_id
                    AND notifications.created_at = due.created_at
                RETURNING notifications.notification_id, recipient, subject, body,
                    message_id, attempts
                """
            ).fetchall()
            return [Claimed(*r) for r in found]

        try:
            claimed = self.store.write(work)
        except BaseException:
            with self._cond:  # not recorded: they go with the next try
                self._outcomes[:0] = outcomes
            raise
        if renew:
            renewed = time.monotonic()
            with self._cond:
                for i in renew:
                    held = self._held.get(i)
                    if held is not None:
                        held.claimed_at = renewed
        for o in outcomes:
            if o.released:
                continue
            if o.error is None:
                self.sent += 1
            else:
                self.failed_attempts += 1
        return claimed

    def _outcome_row(self, o: Outcome) -> dict[str, Any]:
        now = datetime.now(UTC)
        if o.released:  # as it was before the claim: due now, the attempt not counted
            return {
                "notification_id": o.notification_id,
                "status": "pending",
                "sent_at": None,
                "next_attempt_at": now,
                "error": None,
                "attempts": o.attempts - 1,
            }
        if o.error is None:
            status, next_at = "sent", None
        elif o.permanent or o.attempts >= self.settings.smtp_max_attempts:
            status, next_at = "failed", None
        else:
            status = "pending"
            next_at = now + timedelta(seconds=backoff(self.settings, o.attempts))
        return {
            "notification_id": o.notification_id,
            "status": status,
            "sent_at": now if o.error is None else None,
            "next_attempt_at": next_at,
            "error": o.error,
            "attempts": o.attempts,
        }
