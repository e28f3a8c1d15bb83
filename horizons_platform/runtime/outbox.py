"""Delivers the notification outbox over SMTP.

One SMTP session per worker thread, each taking the next claimed notification from a
shared queue as soon as it is free; the dispatcher tops the queue up in a transaction
that also writes the outcomes gathered since the last one. No session waits for
another: a message whose server answers slowly (or times out) holds up its own session
only, never a round. A message that cannot be built or that the server refuses for good
(5xx) is marked ``failed`` with its reason, alone; a transient failure (4xx, a dropped
connection) backs off that message alone.

A row left claimed by a crashed process is claimed again after a timeout and counted in
``resends``: SMTP has no exactly-once, so a resend is possible there, and it carries the
same Message-ID so the receiver can tell. Rows this process still holds (queued, or
being sent) have their claim renewed before it could look stale; what is still queued
when the dispatcher stops is handed back unsent.
"""

from __future__ import annotations

import logging
import re
import smtplib
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
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


IDLE_CLAIM_S = 0.5  # with nothing woken, outcomes are recorded (and the due claimed) this often
MIN_CLAIM_S = 0.1  # claim transactions at most this often, unless the last one came full
IDLE_CHECK_S = 30.0  # an idle session is NOOP-checked before use (servers drop them)
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
    released: bool = False  # never attempted: handed back as it was before the claim


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
    """One SMTP connection, opened on first use and kept across claims."""

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
        # SMTP sessions side by side: every message is 4 round trips, and on a busy
        # machine each one waits for a CPU at both ends, so one session does a few
        # dozen messages/s beside ingest (docs/decisions.md).
        self.sessions = [SmtpSession(settings) for _ in range(max(1, settings.smtp_connections))]
        self.batch = max(1, settings.outbox_batch)
        self._wake = threading.Event()
        self.claim_timeout_s = max(10.0, 2 * settings.smtp_timeout_s)
        # Shared with the session workers, under _cond:
        self._cond = threading.Condition()
        self._queue: deque[Claimed] = deque()  # claimed, not yet taken by a session
        self._held: dict[str, float] = {}  # queued or being sent → when claimed (monotonic)
        self._outcomes: list[Outcome] = []  # not yet recorded (with the next claim)
        self._down: str | None = None  # a session lost the server: why (until the next claim)
        self._closing = False
        self._workers: list[threading.Thread] = []
        self.sent = 0
        self.failed_attempts = 0
        # Told each send's seconds and success (the host's Prometheus metrics).
        self.observe: Callable[[float, bool], None] | None = None

    def wake(self) -> None:
        self._wake.set()

    def run(self) -> None:
        self._start_workers()
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
        self._start_workers()
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
        with self._cond:
            self._closing = True
            released = [Outcome(n.notification_id, n.attempts, released=True) for n in self._queue]
            self._queue.clear()
            self._outcomes.extend(released)
            self._cond.notify_all()
        for worker in self._workers:
            worker.join(self.settings.smtp_timeout_s * 2 + 1)
        self._workers = []
        try:
            self.flush()
        except Exception:
            log.exception("outbox: could not record the last outcomes")
        for session in self.sessions:
            session.drop()

    def _start_workers(self) -> None:
        if self._workers:
            return
        with self._cond:
            self._closing = False
        self._workers = [
            threading.Thread(target=self._work, args=(session,), name=f"smtp_{i}", daemon=True)
            for i, session in enumerate(self.sessions)
        ]
        for worker in self._workers:
            worker.start()

    def _top_up(self) -> bool:
        """Record the outcomes gathered so far and claim enough to fill the queue; True
        when the claim came back full (more is likely due)."""
        with self._cond:
            room = self.batch - len(self._queue)
            idle = room <= 0 and not self._outcomes and not self._to_renew()
        if idle:
            return False
        return room > 0 and self._claim(room) >= room

    def _to_renew(self) -> list[str]:
        """Held claims half way to looking abandoned (call under _cond)."""
        before = time.monotonic() - self.claim_timeout_s / 2
        return [i for i, at in self._held.items() if at < before]

    def _claim(self, limit: int) -> int:
        claimed = self._record(limit)
        now = time.monotonic()
        with self._cond:
            self._down = None  # worth another try
            self._queue.extend(claimed)
            self._held.update((n.notification_id, now) for n in claimed)
            self._cond.notify_all()
        return len(claimed)

    def _work(self, session: SmtpSession) -> None:
        """One session's worker: take the next queued message, send it, keep its outcome."""
        name_this_thread()
        low_water = self.batch // 2
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                if self._closing:
                    return
                n = self._queue.popleft()
                down = self._down
                if len(self._queue) == low_water:
                    self._wake.set()
            if down is not None:  # the server is gone: the rest wait for the next try
                outcome = Outcome(n.notification_id, n.attempts, f"not attempted: {down}")
            else:
                started = time.monotonic()
                try:
                    outcome = self._deliver(session, n)
                except Exception as exc:  # a bug here must not strand the claim
                    log.exception("outbox: sending %s failed", n.notification_id)
                    outcome = Outcome(n.notification_id, n.attempts, f"{type(exc).__name__}: {exc}")
                if self.observe is not None:
                    self.observe(time.monotonic() - started, outcome.error is None)
            with self._cond:
                if outcome.error is not None and session.lost and self._down is None:
                    self._down = outcome.error
                self._outcomes.append(outcome)
                self._held.pop(n.notification_id, None)
                if not self._held:
                    self._cond.notify_all()

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
            # Found by DuckDB by their names in this frame (replacement scans).
            outcome_rows = pa.Table.from_pylist(rows, schema=OUTCOME_SCHEMA)  # noqa: F841
            held_rows = pa.table({"notification_id": renew}, schema=HELD_SCHEMA)  # noqa: F841
            if renew:  # still queued or being sent here: not stale, whatever the clock says
                for table in ("notification_queue", "notifications"):  # (health rule: the 2nd)
                    con.execute(
                        f"""
                        UPDATE {table} SET claimed_at = now()
                        FROM held_rows h WHERE {table}.notification_id = h.notification_id
                        """
                    )
            if rows:
                con.execute(
                    """
                    UPDATE notifications SET status = o.status, sent_at = o.sent_at,
                        next_attempt_at = o.next_attempt_at, attempts = o.attempts,
                        -- a message handed back unsent keeps the reason of its last try
                        error = coalesce(o.error, CASE WHEN o.status = 'pending'
                            THEN notifications.error END)
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
                    if i in self._held:
                        self._held[i] = renewed
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
