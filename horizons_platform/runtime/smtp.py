"""The SMTP side of the outbox: one message's bytes, one session, one delivery's outcome.

Pure of the store: it runs in the sender process (runtime/sender.py), which has no
DuckDB and no Kafka, only SMTP sessions.
"""

from __future__ import annotations

import email.policy
import logging
import re
import smtplib
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime

from horizons_platform.services.notifications import header_safe
from horizons_platform.settings import Settings

log = logging.getLogger("horizons_platform.runtime.outbox")


_UNSAFE_7BIT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_LONG_LINE = re.compile(r"[^\n]{990}")  # RFC 5322: lines of at most 998 octets


def render_message(headers: dict[str, str], body: str, *, utf8: bool = False) -> bytes:
    """The RFC 5322 bytes of a plain-text e-mail.

    All-ASCII messages (nearly all) are formatted directly: the email package's header
    registry and generator cost ~10x more, and with the outbox sending hundreds a second
    beside ingest that was a sixth of the host's Python time. Anything else (an encoded
    subject, an internationalised address, a non-ASCII body) goes through ``EmailMessage``;
    with ``utf8`` (an internationalised address, sent with SMTPUTF8) its headers are
    written as UTF-8 (RFC 6532), which an address cannot do without.
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
    policy = email.policy.SMTPUTF8 if utf8 else msg.policy
    return msg.as_bytes(policy=policy.clone(linesep="\r\n"))


IDLE_CHECK_S = 30.0  # an idle session is NOOP-checked before use (servers drop them)


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

    def reset(self) -> None:
        """End the mail transaction a failed message may have left open (after its MAIL
        FROM, say): the next message on this session must start from a clean state."""
        if self._smtp is None:
            return
        try:
            self._smtp.rset()
        except (OSError, smtplib.SMTPException):
            self.drop()

    def drop(self) -> None:
        if self._smtp is not None:
            try:
                self._smtp.quit()
            except (OSError, smtplib.SMTPException):
                self._smtp.close()
            self._smtp = None


def needs_smtputf8(*addresses: str) -> bool:
    """An internationalised address (``用户@例子.广告``) travels only with SMTPUTF8."""
    return not all(address.isascii() for address in addresses)


def message_bytes(settings: Settings, n: Claimed) -> bytes:
    headers = {
        "From": settings.smtp_from,
        "To": n.recipient,  # one recipient, validated when the event came in
        "Subject": header_safe(n.subject),
        "Message-ID": n.message_id,
        "Date": format_datetime(datetime.now(UTC)),
        "X-Horizons-Notification-Id": n.notification_id,
    }
    return render_message(headers, n.body, utf8=needs_smtputf8(settings.smtp_from, n.recipient))


def deliver(settings: Settings, session: SmtpSession, n: Claimed) -> Outcome:
    """Send ``n`` over ``session``: its outcome, never an exception about the message."""
    try:
        msg = message_bytes(settings, n)
    except Exception as exc:  # e.g. a recipient stored before owners were validated
        log.warning("outbox: %s cannot be built: %s", n.notification_id, exc)
        return Outcome(n.notification_id, n.attempts, f"{type(exc).__name__}: {exc}", True)
    options = ["SMTPUTF8"] if needs_smtputf8(settings.smtp_from, n.recipient) else []
    for attempt in (1, 2):
        try:
            session.get().sendmail(settings.smtp_from, [n.recipient], msg, mail_options=options)
            return Outcome(n.notification_id, n.attempts)
        except SmtpConfigError as exc:
            session.lost = True
            return Outcome(n.notification_id, n.attempts, str(exc))
        except smtplib.SMTPNotSupportedError as exc:
            session.reset()
            reason = (
                f"the SMTP server does not offer SMTPUTF8, which the internationalised "
                f"address {n.recipient!r} needs ({exc})"
            )
            return Outcome(n.notification_id, n.attempts, reason[:1000], True)
        except Exception as exc:
            permanent, lost, reason = classify(exc)
            if not lost:
                # This message's failure (a refused or unencodable recipient, say) may
                # leave its transaction open; the session's next message must not find
                # it ("503 nested MAIL command" failed innocent messages for good).
                session.reset()
            if lost:
                session.drop()
                session.lost = True
                if attempt == 1 and isinstance(exc, smtplib.SMTPServerDisconnected):
                    continue  # a kept session the server closed: one fresh try
                log.warning(
                    "outbox: SMTP %s:%s unavailable: %s",
                    settings.smtp_host,
                    settings.smtp_port,
                    reason,
                )
            return Outcome(n.notification_id, n.attempts, reason, permanent)
    raise AssertionError("unreachable")
