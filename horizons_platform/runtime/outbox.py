"""Delivers the notification outbox over SMTP.

A round: write the previous round's outcomes and claim the next due notifications, in
one transaction → send each over a persistent SMTP session → keep the outcomes for the
next round's transaction. A message that cannot be built or that the server refuses
for good (5xx) is marked ``failed`` with its reason, alone; a transient failure (4xx, a
dropped connection) backs off that message alone; nothing else in the round waits.

A row left claimed by a crashed process is claimed again after a timeout and counted in
``resends``: SMTP has no exactly-once, so a resend is possible there, and it carries the
same Message-ID so the receiver can tell.
"""

from __future__ import annotations

import logging
import re
import smtplib
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

import pyarrow as pa

from horizons_platform.services.notifications import header_safe
from horizons_platform.settings import Settings
from horizons_platform.store.base import StoreBase
from horizons_platform.threads import name_this_thread

log = logging.getLogger(__name__)


_UNSAFE_7BIT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_LONG_LINE = re.compile(r"[^\n]{990}")  # RFC 5322: lines of at most 998 octets


def render_message(headers: dict[str, str], body: str) -> bytes:
    """The RFC 5322 bytes of a plain-text e-mail.

    All-ASCII messages (nearly all) are formatted directly: the email package's header
    registry and generator cost ~10x more, and with the outbox sending hundreds a second
    beside ingest that was a sixth of the host's Python time. Anything else (an encoded
    subject, an internationalised address, a non-ASCII body) goes through ``EmailMessage``.
    """
    text = "".join(headers.values()) + body
    if text.isascii() and not _UNSAFE_7BIT.search(text) and not _LONG_LINE.search(body):
        lines = [f"{name}: {value}" for name, value in headers.items()]
        lines += ["MIME-Version: 1.0", 'Content-Type: text/plain; charset="utf-8"']
        lines += ["Content-Transfer-Encoding: 7bit", ""]
        content = body.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\r\n")
        if not content.endswith("\r\n"):
            content += "\r\n"
        return ("\r\n".join(lines) + "\r\n" + content).encode("ascii")
    msg = EmailMessage()
    for name, value in headers.items():
        msg[name] = value
    msg.set_content(body)
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


IDLE_ROUND_S = 0.5  # with nothing woken, outcomes are recorded (and the due claimed) this often
MIN_ROUND_S = 0.1  # rounds (claim transactions) at most this often, unless they come full
IDLE_CHECK_S = 30.0  # an idle session is NOOP-checked before use (servers drop them)
OUTCOME_SCHEMA = pa.schema(
    [
        ("notification_id", pa.string()),
        ("status", pa.string()),
        ("sent_at", pa.timestamp("us", tz="UTC")),
        ("next_attempt_at", pa.timestamp("us", tz="UTC")),
        ("error", pa.string()),
    ]
)


class SmtpConfigError(RuntimeError):
    """The settings ask for something unsafe (a password over plaintext)."""


@dataclass(frozen=True)
class Claimed:
    notification_id: str
    recipient: str
    subject: str
    body: str
    message_id: str
    attempts: int


@dataclass(frozen=True)
class Outcome:
    notification_id: str
    attempts: int
    error: str | None = None  # None: accepted by the server
    permanent: bool = False


def backoff(settings: Settings, attempts: int) -> float:
    return min(
        settings.smtp_backoff_initial_s * 2 ** max(0, attempts - 1), settings.smtp_backoff_max_s
    )


def classify(exc: BaseException) -> tuple[bool, bool, str]:
    """(permanent, connection_lost, reason) for an error while sending one message."""
    reason = f"{type(exc).__name__}: {exc}"[:1000]
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        codes = [code for code, _ in exc.recipients.values()]
        return bool(codes) and all(c >= 500 for c in codes), False, reason
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return False, True, reason
    if isinstance(exc, smtplib.SMTPResponseException):
        return exc.smtp_code >= 500, False, reason
    if isinstance(exc, OSError | smtplib.SMTPException):
        return False, True, reason
    return True, False, reason  # building the message failed: retrying cannot help


class SmtpSession:
    """One SMTP connection, opened on first use and kept across rounds."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._smtp: smtplib.SMTP | None = None
        self._used_at = 0.0
        self.lost = False  # the last send lost the connection (or never got one)

    def _context(self) -> ssl.SSLContext:
        # Certificate and host name verified; a private CA can be added, never skipped.
        cafile = str(self.settings.smtp_ca_file) if self.settings.smtp_ca_file else None
        return ssl.create_default_context(cafile=cafile)

    def _open(self) -> smtplib.SMTP:
        s = self.settings
        secure = s.smtp_ssl or s.smtp_starttls
        if s.smtp_username and not secure and not s.smtp_allow_plaintext_auth:
            raise SmtpConfigError(
                "refusing to send the SMTP password without TLS: set HORIZONS_SMTP_STARTTLS "
                "or HORIZONS_SMTP_SSL (or HORIZONS_SMTP_ALLOW_PLAINTEXT_AUTH=true for a "
                "trusted local relay)"
            )
        smtp: smtplib.SMTP
        if s.smtp_ssl:
            smtp = smtplib.SMTP_SSL(
                s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_s, context=self._context()
            )
        else:
            smtp = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.smtp_timeout_s)
        try:
            if s.smtp_starttls and not s.smtp_ssl:
                smtp.starttls(context=self._context())
            if s.smtp_username:
                password = s.smtp_password.get_secret_value() if s.smtp_password else ""
                smtp.login(s.smtp_username, password)
        except BaseException:
            smtp.close()
            raise
        return smtp

    def get(self) -> smtplib.SMTP:
        if self._smtp is not None and time.monotonic() - self._used_at > IDLE_CHECK_S:
            try:
                self._smtp.noop()
            except (OSError, smtplib.SMTPException):
                self.drop()
        if self._smtp is None:
            self.lost = True  # until the connection is up
            self._smtp = self._open()
        self.lost = False
        self._used_at = time.monotonic()
        return self._smtp

    def drop(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (OSError, smtplib.SMTPException):
                self._smtp.close()
            self._smtp = None


class OutboxDispatcher:
    def __init__(self, settings: Settings, store: StoreBase, stop_event: threading.Event) -> None:
        self.settings = settings
        self.store = store
        self.stop_event = stop_event
        # A few SMTP sessions side by side: one smtplib session does a few hundred
        # messages/s (every message is 4–5 round trips), and the stream needs more.
        self.sessions = [SmtpSession(settings) for _ in range(max(1, settings.smtp_connections))]
        self._pool = ThreadPoolExecutor(
            len(self.sessions), thread_name_prefix="smtp", initializer=name_this_thread
        )
        self._wake = threading.Event()
        self.claim_timeout_s = max(10.0, 2 * settings.smtp_timeout_s)
        self._unwritten: list[Outcome] = []  # sent or failed, recorded with the next claim
        self.sent = 0
        self.failed_attempts = 0
        # Told each send's seconds and success (the host's Prometheus metrics).
        self.observe: Callable[[float, bool], None] | None = None

    def wake(self) -> None:
        self._wake.set()

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self._wake.wait(timeout=IDLE_ROUND_S)
                self._wake.clear()
                started = time.monotonic()
                try:
                    # Full rounds follow each other at once; a round that took what was
                    # due leaves its outcomes to the next one (at the next wake-up, at
                    # most IDLE_ROUND_S later) instead of a transaction of their own.
                    while (
                        self.deliver_due() >= self.settings.outbox_batch
                        and not self.stop_event.is_set()
                    ):
                        pass
                except Exception:
                    log.exception("outbox: delivery round failed; will retry")
                    self.stop_event.wait(1.0)
                # Every round is a transaction of a few DuckDB statements (milliseconds
                # each, beside four ingesting groups): at most one per MIN_ROUND_S. Woken
                # by every notifications commit, the dispatcher once ran ~40 a second and
                # took a quarter of a core at 200 events/s.
                self.stop_event.wait(max(0.0, MIN_ROUND_S - (time.monotonic() - started)))
        finally:
            try:
                self.flush()
            except Exception:
                log.exception("outbox: could not record the last round's outcomes")
            self.close()

    def flush(self) -> None:
        """Record the last round's outcomes now (what was sent must not be sent again
        after a restart) without claiming more."""
        self._record()

    def close(self) -> None:
        for session in self.sessions:
            session.drop()
        self._pool.shutdown(wait=False)

    def deliver_due(self, limit: int | None = None) -> int:
        """One round; returns how many notifications it claimed (0: nothing due)."""
        claimed = self._record(limit or self.settings.outbox_batch)
        n = len(self.sessions)
        shares = [claimed[i::n] for i in range(n)]
        parts = self._pool.map(self._deliver_share, self.sessions, shares)
        self._unwritten = [o for part in parts for o in part]
        return len(claimed)

    def _deliver_share(self, session: SmtpSession, share: list[Claimed]) -> list[Outcome]:
        """One session's share of a round, in order."""
        outcomes: list[Outcome] = []
        unavailable: str | None = None
        for n in share:
            if unavailable is not None:  # the server is gone: the rest wait for the next try
                outcomes.append(Outcome(n.notification_id, n.attempts, unavailable))
                continue
            started = time.monotonic()
            outcome = self._deliver(session, n)
            if self.observe is not None:
                self.observe(time.monotonic() - started, outcome.error is None)
            if outcome.error is not None and session.lost:
                unavailable = f"not attempted: {outcome.error}"
            outcomes.append(outcome)
        return outcomes

    # --- the store side ------------------------------------------------------------------
    # A round's transaction runs beside four ingesting groups, and each DuckDB statement
    # costs milliseconds of fixed overhead here: the statements below are the fewest that
    # do the work (no temp tables; the Arrow tables are found by name), and a round with
    # nothing due runs one SELECT.

    def _record(self, limit: int = 0) -> list[Claimed]:
        """Write the previous round's outcomes and claim up to ``limit`` due
        notifications, in one transaction (a write-write conflict with the ingesting
        consumer is retried)."""
        outcomes = self._unwritten
        rows = [self._outcome_row(o) for o in outcomes]
        retry = any(r["status"] == "pending" for r in rows)
        done = any(r["status"] != "pending" for r in rows)

        def work(con: Any) -> list[Claimed]:
            # Found by DuckDB by its name in this frame (a replacement scan).
            outcome_rows = pa.Table.from_pylist(rows, schema=OUTCOME_SCHEMA)  # noqa: F841
            if rows:
                con.execute(
                    """
                    UPDATE notifications SET status = o.status, sent_at = o.sent_at,
                        next_attempt_at = o.next_attempt_at, error = o.error
                    FROM outcome_rows o
                    WHERE notifications.notification_id = o.notification_id
                    """
                )
            if retry:
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
                con.execute(
                    """
                    DELETE FROM notification_queue WHERE notification_id IN
                        (SELECT notification_id FROM outcome_rows WHERE status <> 'pending')
                    """
                )
            if not limit:
                return []
            due = con.execute(
                f"""
                SELECT notification_id, claimed_at IS NOT NULL AS stale
                FROM notification_queue
                WHERE (claimed_at IS NULL AND next_attempt_at <= now())
                   OR claimed_at < now() - INTERVAL {self.claim_timeout_s:.0f} SECOND
                ORDER BY next_attempt_at LIMIT {int(limit)}
                """
            ).to_arrow_table()
            if due.num_rows == 0:
                return []
            con.execute(
                """
                UPDATE notification_queue SET claimed_at = now()
                FROM due WHERE notification_queue.notification_id = due.notification_id
                """
            )
            found = con.execute(
                """
                UPDATE notifications SET
                    resends = resends + CASE WHEN due.stale THEN 1 ELSE 0 END,
                    status = 'sending', attempts = attempts + 1, claimed_at = now()
                FROM due WHERE notifications.notification_id = due.notification_id
                RETURNING notifications.notification_id, recipient, subject, body,
                    message_id, attempts
                """
            ).fetchall()
            return [Claimed(*r) for r in found]

        claimed = self.store.write(work)
        self._unwritten = []
        for o in outcomes:
            if o.error is None:
                self.sent += 1
            else:
                self.failed_attempts += 1
        return claimed

    def _outcome_row(self, o: Outcome) -> dict[str, Any]:
        now = datetime.now(UTC)
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
        }

    # --- the SMTP side -------------------------------------------------------------------

    def _message(self, n: Claimed) -> bytes:
        headers = {
            "From": self.settings.smtp_from,
            "To": n.recipient,  # one recipient, validated when the event came in
            "Subject": header_safe(n.subject),
            "Message-ID": n.message_id,
            "Date": format_datetime(datetime.now(UTC)),
            "X-Horizons-Notification-Id": n.notification_id,
        }
        return render_message(headers, n.body)

    def _deliver(self, session: SmtpSession, n: Claimed) -> Outcome:
        try:
            msg = self._message(n)
        except Exception as exc:  # e.g. a recipient stored before owners were validated
            log.warning("outbox: %s cannot be built: %s", n.notification_id, exc)
            return Outcome(n.notification_id, n.attempts, f"{type(exc).__name__}: {exc}", True)
        for attempt in (1, 2):
            try:
                session.get().sendmail(self.settings.smtp_from, [n.recipient], msg)
                return Outcome(n.notification_id, n.attempts)
            except SmtpConfigError as exc:
                session.lost = True
                return Outcome(n.notification_id, n.attempts, str(exc))
            except Exception as exc:
                permanent, lost, reason = classify(exc)
                if lost:
                    session.drop()
                    session.lost = True
                    if attempt == 1 and isinstance(exc, smtplib.SMTPServerDisconnected):
                        continue  # a kept session the server closed: one fresh try
                    log.warning(
                        "outbox: SMTP %s:%s unavailable: %s",
                        self.settings.smtp_host,
                        self.settings.smtp_port,
                        reason,
                    )
                return Outcome(n.notification_id, n.attempts, reason, permanent)
        raise AssertionError("unreachable")
