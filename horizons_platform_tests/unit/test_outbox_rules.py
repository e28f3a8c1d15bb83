"""Pure rules of the notification path: header values, SMTP failure classes, owners."""

from __future__ import annotations

import email
import email.policy
import smtplib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from horizons_platform import events as ev
from horizons_platform.runtime.smtp import classify, render_message
from horizons_platform.services.notifications import HEADER_MAX, header_safe


@given(st.text())
def test_no_text_can_break_a_header_line(text: str) -> None:
    safe = header_safe(text)
    assert not any(c in safe for c in "\r\n\x0b\x0c\x85\u2028\u2029\x00")
    assert len(safe) <= HEADER_MAX


def test_a_header_keeps_ordinary_text() -> None:
    assert header_safe("[horizons] job j-1 completed") == "[horizons] job j-1 completed"
    assert header_safe("job a\r\nBcc: x@evil.example") == "job a Bcc: x@evil.example"


@pytest.mark.parametrize(
    ("exc", "permanent", "lost"),
    [
        (smtplib.SMTPRecipientsRefused({"a@b.example": (550, b"no such user")}), True, False),
        (smtplib.SMTPRecipientsRefused({"a@b.example": (451, b"later")}), False, False),
        (smtplib.SMTPDataError(554, b"rejected"), True, False),
        (smtplib.SMTPDataError(452, b"mailbox full"), False, False),
        (smtplib.SMTPSenderRefused(421, b"closing", "x@y.example"), False, False),
        (smtplib.SMTPServerDisconnected("gone"), False, True),
        (ConnectionRefusedError(111, "refused"), False, True),
        (ValueError("Header values may not contain linefeed"), True, False),
    ],
)
def test_smtp_failures_are_classified(exc: BaseException, permanent: bool, lost: bool) -> None:
    assert classify(exc)[:2] == (permanent, lost)


@pytest.mark.parametrize(
    "owner",
    [
        "ops@example.org\r\nBcc: victim@evil.example",
        "a@example.org, b@example.org",
        "nobody",
        "x@localhost",
    ],
)
def test_an_owner_that_is_not_one_address_is_rejected_where_the_event_enters(owner: str) -> None:
    event = ev.new_event(
        ev.JobCompleted,
        producer="t",
        job_id="j",
        payload={"owner": "ok@example.org", "job_type": "x"},
    )
    raw = ev.encode(event).replace(b"ok@example.org", owner.encode().replace(b"\r\n", b"\\r\\n"))
    with pytest.raises(ev.EventDecodeError, match=r"payload\.owner"):
        ev.decode(raw)


_HEADERS = {
    "From": "horizons@observatory.example",
    "To": "ada@observatory.example",
    "Subject": "[horizons] job j-1 completed",
    "Message-ID": "<n-1@horizons.local>",
    "Date": "Fri, 27 Nov 2026 08:00:00 +0000",
    "X-Horizons-Notification-Id": "n-1",
}


@pytest.mark.parametrize(
    ("subject", "body"),
    [
        ("[horizons] job j-1 completed", "Your imaging job j-1 completed.\nEvent id: e\n"),
        ("[horizons] job j-✓ completed", "Ünïcode in the body\n"),
        ("[horizons] job j-1 failed", "Error: " + "x" * 3000 + "\n"),
        ("[horizons] job j-1 failed", "a NUL \x00 and a bell \x07\n"),
    ],
)
def test_a_rendered_message_reads_back_as_written(subject: str, body: str) -> None:
    raw = render_message({**_HEADERS, "Subject": subject}, body)
    assert all(len(line) <= 998 for line in raw.split(b"\r\n"))
    assert b"\n" not in raw.replace(b"\r\n", b"")  # CRLF only
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"] == subject and msg["To"] == _HEADERS["To"]
    assert msg["Message-ID"] == _HEADERS["Message-ID"]
    assert msg.get_content().replace("\r\n", "\n") == body
