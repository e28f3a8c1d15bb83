"""Delivers the notification outbox over SMTP.

claim (status → sending, attempts + 1) → send → mark (sent / pending with backoff /
failed after N attempts). A row left in ``sending`` by a crashed process is claimed
again after a timeout and counted in ``resends``: SMTP has no exactly-once, so a resend
is possible there, and it carries the same Message-ID so the receiver can tell.
"""

from __future__ import annotations

import logging
import smtplib
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime

import pyarrow as pa

from horizons_platform.settings import Settings
from horizons_platform.store.base import StoreBase

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claimed:
    notification_id: str
    recipient: str
    subject: str
    body: str
    message_id: str
    attempts: int


def backoff(settings: Settings, attempts: int) -> float:
    return min(
        settings.smtp_backoff_initial_s * 2 ** max(0, attempts - 1), settings.smtp_backoff_max_s
    )


class OutboxDispatcher:
    def __init__(self, settings: Settings, store: StoreBase, stop_event: threading.Event) -> None:
        self.settings = settings
        self.store = store
        self.stop_event = stop_event
        self._wake = threading.Event()
        self.claim_timeout_s = max(10.0, 2 * settings.smtp_timeout_s)
        self.sent = 0
        self.failed_attempts = 0

    def wake(self) -> None:
        self._wake.set()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self._wake.wait(timeout=0.5)
            self._wake.clear()
            try:
                while self.deliver_due() and not self.stop_event.is_set():
                    pass
            except Exception:
                log.exception("outbox: delivery round failed; will retry")
                self.stop_event.wait(1.0)

    def deliver_due(self, limit: int = 25) -> int:
        """One round: claim due notifications, send them, record the outcome.

        Small rounds keep the e-mails at risk of a resend after a crash few.
        """
        claimed = self._claim(limit)
        if not claimed:
            return 0
        outcomes = self._send(claimed)
        self._mark(claimed, outcomes)
        return len(claimed)

    def _claim(self, limit: int) -> list[Claimed]:
        with self.store.transaction() as con:
            rows = con.execute(
                f"""
                UPDATE notifications SET
                    resends = resends + CASE WHEN status = 'sending' THEN 1 ELSE 0 END,
                    status = 'sending', attempts = attempts + 1, claimed_at = now()
                WHERE notification_id IN (
                    SELECT notification_id FROM notifications
                    WHERE (status = 'pending' AND next_attempt_at <= now())
                       OR (status = 'sending'
                           AND claimed_at < now() - INTERVAL {self.claim_timeout_s:.0f} SECOND)
                    ORDER BY created_at LIMIT {int(limit)})
                RETURNING notification_id, recipient, subject, body, message_id, attempts
                """
            ).fetchall()
        return [Claimed(*r) for r in rows]

    def _message(self, n: Claimed) -> EmailMessage:
        msg = EmailMessage()
        msg["From"] = self.settings.smtp_from
        msg["To"] = n.recipient
        msg["Subject"] = n.subject
        msg["Message-ID"] = n.message_id
        msg["Date"] = format_datetime(datetime.now(UTC))
        msg["X-Horizons-Notification-Id"] = n.notification_id
        msg.set_content(n.body)
        return msg

    def _send(self, claimed: list[Claimed]) -> dict[str, str | None]:
        """notification_id → None when sent, else the error."""
        s = self.settings
        outcomes: dict[str, str | None] = {}
        try:
            with smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_s) as smtp:
                if s.smtp_starttls:
                    smtp.starttls()
                if s.smtp_username:
                    smtp.login(s.smtp_username, s.smtp_password or "")
                for n in claimed:
                    try:
                        smtp.send_message(self._message(n))
                        outcomes[n.notification_id] = None
                    except smtplib.SMTPException as exc:
                        outcomes[n.notification_id] = f"{type(exc).__name__}: {exc}"
        except (OSError, smtplib.SMTPException) as exc:
            reason = f"{type(exc).__name__}: {exc}"
            log.warning("outbox: SMTP %s:%s unavailable: %s", s.smtp_host, s.smtp_port, reason)
            for n in claimed:
                outcomes.setdefault(n.notification_id, reason)
        return outcomes

    def _mark(self, claimed: list[Claimed], outcomes: dict[str, str | None]) -> None:
        now = datetime.now(UTC)
        rows = []
        for n in claimed:
            error = outcomes.get(n.notification_id, "not attempted")
            if error is None:
                status, next_at = "sent", None
                self.sent += 1
            elif n.attempts >= self.settings.smtp_max_attempts:
                status, next_at = "failed", None
            else:
                status = "pending"
                next_at = now + timedelta(seconds=backoff(self.settings, n.attempts))
            if error is not None:
                self.failed_attempts += 1
            rows.append(
                {
                    "notification_id": n.notification_id,
                    "status": status,
                    "sent_at": now if error is None else None,
                    "next_attempt_at": next_at,
                    "error": error,
                }
            )
        schema = pa.schema(
            [
                ("notification_id", pa.string()),
                ("status", pa.string()),
                ("sent_at", pa.timestamp("us", tz="UTC")),
                ("next_attempt_at", pa.timestamp("us", tz="UTC")),
                ("error", pa.string()),
            ]
        )
        with self.store.transaction() as con:
            con.register("_horizons_outcomes", pa.Table.from_pylist(rows, schema=schema))
            try:
                con.execute(
                    """
                    UPDATE notifications SET status = o.status, sent_at = o.sent_at,
                        next_attempt_at = o.next_attempt_at, error = o.error
                    FROM _horizons_outcomes o
                    WHERE notifications.notification_id = o.notification_id
                    """
                )
            finally:
                con.unregister("_horizons_outcomes")
