"""Notifications against hostile input, refusing servers and TLS (issue: hostile input
can't stop them). A real broker, real aiosmtpd servers on loopback, real DuckDB files."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import signal
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from horizons_bench.smtp import SmtpSink
from horizons_platform import events as ev
from horizons_platform.host import Host
from horizons_platform.kafka.producer import Publisher
from horizons_platform.kafka.records import Batch
from horizons_platform.runtime.outbox import OutboxDispatcher
from horizons_platform.runtime.smtp import Claimed, SmtpSession, deliver
from horizons_platform.services.audit_check import check_trail
from horizons_platform.services.notifications import NotificationHandler
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.settings import Settings
from horizons_platform.store.client import Store
from horizons_platform.store.owner import StoreOwner
from horizons_platform.waiting import wait_until
from horizons_platform_tests.support import start_consumer, stop_consumer

HOSTILE_OWNER = "ops@example.org\r\nBcc: victim@evil.example"


def _completed(orch: JobOrchestratorService, job_id: str, owner: str) -> None:
    orch.submit_job(job_id, owner=owner, job_type="imaging")
    orch.start_job(job_id)
    orch.complete_job(job_id)


def test_hostile_owners_and_job_ids_never_stop_or_misdirect_mail(
    settings: Settings, host_factory: Callable[..., Host], smtp: SmtpSink
) -> None:
    host = host_factory(settings, ("notifications", "compliance-auditor"))
    publisher = Publisher(settings)
    # An owner with CR/LF and a second address: invalid, so dead-lettered where it enters.
    bad = ev.new_event(
        ev.JobCompleted,
        producer="test",
        job_id="hostile-owner",
        payload={"owner": "ops@example.org", "job_type": "imaging"},
    )
    raw = json.loads(ev.encode(bad))
    raw["payload"]["owner"] = HOSTILE_OWNER
    publisher.send(settings.topic_job_lifecycle, json.dumps(raw).encode(), key=b"hostile-owner")
    # A job id with a line break: a valid event, whose subject must stay one header line.
    nl = ev.new_event(
        ev.JobCompleted,
        producer="test",
        job_id="evil\r\nBcc: victim@evil.example",
        payload={"owner": "nl@observatory.example", "job_type": "imaging"},
    )
    publisher.send(settings.topic_job_lifecycle, ev.encode(nl), key=b"evil")
    orch = JobOrchestratorService(settings, publisher, wait=False)
    owners = [f"owner-{i}@observatory.example" for i in range(20)]
    for i, owner in enumerate(owners):
        _completed(orch, f"valid-{i}", owner)
    orch.flush()
    expected = sorted([*owners, "nl@observatory.example"])

    store = Store(settings)
    wait_until(lambda: len(smtp.messages) >= len(expected), timeout=30, what="21 e-mails")
    wait_until(
        lambda: store.scalar("SELECT count(*) FROM notifications WHERE status <> 'sent'") == 0,
        timeout=30,
        what="every notification marked sent",
    )
    assert sorted(smtp.recipients) == expected  # each valid owner exactly once, nobody else
    assert all(m["Bcc"] is None for m in smtp.messages)
    subjects = [str(m["Subject"]) for m in smtp.messages]
    assert "[horizons] job evil Bcc: victim@evil.example completed" in subjects
    assert not any("\r" in s or "\n" in s for s in subjects)
    # The hostile owner: dead-lettered with its reason by both groups, audited as invalid.
    _, letters = store.query("SELECT consumer_group, error_message FROM dead_letters ORDER BY ALL")
    assert [g for g, _ in letters] == ["compliance-auditor", "notifications"]
    assert all("payload.owner" in m and "not a valid email" in m for _, m in letters)
    assert (
        store.scalar(
            "SELECT count(*) FROM audit_log WHERE NOT valid AND validation_error LIKE '%owner%'"
        )
        == 1
    )
    assert store.scalar("SELECT count(*) FROM notifications WHERE job_id = 'hostile-owner'") == 0
    # Nothing loops: every claim was delivered at the first attempt.
    assert host.dispatcher is not None
    assert host.dispatcher.failed_attempts == 0
    assert store.scalar("SELECT max(attempts) FROM notifications") == 1


def test_an_event_naming_its_payload_twice_is_audited_as_the_payload_acted_on(
    settings: Settings, host_factory: Callable[..., Host], smtp: SmtpSink
) -> None:
    # JSON readers disagree on a name given twice: pydantic (every service) takes the
    # last payload, DuckDB's json_extract the first. The audit trail's payload column must
    # show the one the e-mail went out under, not one nobody validated.
    host_factory(settings, ("notifications", "compliance-auditor"))
    event = ev.new_event(
        ev.JobCompleted,
        producer="test",
        job_id="two-payloads",
        payload={"owner": "owner@observatory.example", "job_type": "imaging"},
    )
    text = ev.encode(event).decode()
    decoy = '"payload":{"owner":"decoy@evil.example","job_type":"EVIL","output_bytes":-1},'
    raw = text.replace('"payload":', decoy + '"payload":', 1).encode()
    assert raw.count(b'"payload"') == 2
    Publisher(settings).send(settings.topic_job_lifecycle, raw, key=b"two-payloads")

    store = Store(settings)
    wait_until(lambda: len(smtp.messages) >= 1, timeout=30, what="the e-mail")
    wait_until(
        lambda: store.scalar("SELECT count(*) FROM audit_log WHERE job_id = 'two-payloads'") == 1,
        timeout=30,
        what="the audit row",
    )
    assert smtp.recipients == ["owner@observatory.example"]
    _, rows = store.query(
        "SELECT valid, payload->>'owner', payload->>'job_type' FROM audit_log "
        "WHERE job_id = 'two-payloads'"
    )
    assert rows == [(True, "owner@observatory.example", "imaging")]
    assert store.scalar("SELECT recipient FROM notifications") == "owner@observatory.example"
    assert check_trail(store, settings, full=True).ok  # the column matches its raw bytes


def test_a_refused_recipient_fails_alone_and_a_deferred_one_is_retried(
    settings: Settings, host_factory: Callable[..., Host]
) -> None:
    deferred: Counter[str] = Counter()

    def policy(address: str) -> str | None:
        if address.startswith("refused@"):
            return "550 5.1.1 <refused@observatory.example>: no such user"
        if address.startswith("flaky@"):
            deferred[address] += 1
            return "451 4.3.0 try again later" if deferred[address] == 1 else None
        return None

    sink = SmtpSink(rcpt_policy=policy).start()
    try:
        s = settings.model_copy(update={"smtp_port": sink.port})
        host_factory(s, ("notifications",))
        orch = JobOrchestratorService(s, wait=False)
        owners = ["refused@observatory.example", "flaky@observatory.example"] + [
            f"fine-{i}@observatory.example" for i in range(5)
        ]
        for i, owner in enumerate(owners):
            _completed(orch, f"r-{i}", owner)
        orch.flush()
        store = Store(s)
        wait_until(
            lambda: (
                store.scalar(
                    "SELECT count(*) FROM notifications WHERE status IN ('sent', 'failed')"
                )
                == len(owners)
            ),
            timeout=60,
            what="every notification sent or failed",
        )
        _, rows = store.query("SELECT recipient, status, attempts, error FROM notifications")
        by_owner = {r[0]: r[1:] for r in rows}
        status, attempts, error = by_owner["refused@observatory.example"]
        assert status == "failed" and attempts == 1 and "550" in error
        assert by_owner["flaky@observatory.example"][:2] == ("sent", 2)
        assert all(by_owner[o][:2] == ("sent", 1) for o in owners[2:])
        assert sorted(sink.recipients) == sorted(owners[1:])
        assert store.scalar("SELECT count(*) FROM notification_queue") == 0
    finally:
        sink.stop()


def test_stopping_the_hosts_process_group_sends_the_mail_in_flight_once(
    settings: Settings, tmp_path: Path
) -> None:
    """`horizons up` (and a service manager) stops the host with a SIGTERM to its whole
    process group, the SMTP sender included. The host lets the sender's sessions finish
    their messages; a sender that died at the signal lost them (retried after a restart,
    and an error logged at every clean stop)."""
    sink = SmtpSink(rcpt_delay=lambda address: 2.0 if address.startswith("slow@") else 0.0)
    sink.start()
    log = tmp_path / "host.log"
    try:
        s = settings.model_copy(update={"smtp_port": sink.port})
        proc = start_consumer(s, log, services=("notifications",))
        orch = JobOrchestratorService(s, wait=False)
        _completed(orch, "stop-1", "slow@observatory.example")
        orch.flush()
        wait_until(lambda: sink.rcpt_seen, timeout=60, what="the e-mail to reach the server")
        senders = [
            p
            for p in psutil.Process(proc.pid).children()
            if "horizons_platform.runtime.sender" in p.cmdline()
        ]
        assert senders, "the host runs no SMTP sender"
        for pid in (proc.pid, *(p.pid for p in senders)):  # what os.killpg does
            os.kill(pid, signal.SIGTERM)
        assert stop_consumer(proc, log) == 0
        for p in senders:
            p.wait(10)  # psutil.TimeoutExpired if the host left it running
        assert [m["To"] for m in sink.messages] == ["slow@observatory.example"]
        text = log.read_text(errors="replace")
        assert "SMTP sender process exited" not in text, text[-3000:]
        _, rows = Store(s).query("SELECT status, attempts FROM notifications")
        assert rows == [("sent", 1)]
    finally:
        sink.stop()


def test_a_slow_recipient_holds_up_no_other_message(tmp_path: Path) -> None:
    """A relay that takes seconds to answer for one recipient: what is queued meanwhile
    goes out over the other sessions at once, not after the slow one."""
    slow = "slow@observatory.example"
    sink = SmtpSink(rcpt_delay=lambda address: 4.0 if address == slow else 0.0).start()
    s = Settings(
        var_dir=tmp_path / "var", smtp_port=sink.port, smtp_timeout_s=15, smtp_connections=4
    )
    owner = StoreOwner(s, serve=False)
    assert owner.open()
    stop = threading.Event()
    dispatcher = OutboxDispatcher(s, owner, stop)
    thread = threading.Thread(target=dispatcher.run, name="outbox", daemon=True)
    try:
        _queue_one(owner, s, "slow-1", slow)
        thread.start()
        dispatcher.wake()
        wait_until(lambda: slow in sink.rcpt_seen, timeout=10, what="the slow recipient's RCPT")
        fast = [f"fast-{i}@observatory.example" for i in range(6)]
        for i, recipient in enumerate(fast):
            _queue_one(owner, s, f"fast-{i}", recipient)
        dispatcher.wake()
        wait_until(lambda: set(fast) <= set(sink.recipients), timeout=10, what="the other e-mails")
        assert slow not in sink.recipients, "the others waited for the slow recipient"
        wait_until(lambda: slow in sink.recipients, timeout=15, what="the slow e-mail")
        wait_until(
            lambda: owner.scalar("SELECT count(*) FROM notifications WHERE status = 'sent'") == 7,
            timeout=10,
            what="every outcome recorded",
        )
        assert sorted(sink.recipients) == sorted([slow, *fast])
    finally:
        stop.set()
        thread.join(30)
        owner.close()
        sink.stop()


def test_messages_held_longer_than_the_claim_timeout_are_not_claimed_again(
    tmp_path: Path,
) -> None:
    """One session, three slow recipients ahead of a fourth: the fourth waits in this
    process's queue longer than a claim may look abandoned. Its claim is renewed, so it
    is neither claimed a second time nor sent twice."""
    sink = SmtpSink(rcpt_delay=lambda address: 1.2 if address.startswith("slow") else 0.0)
    sink.start()
    s = Settings(var_dir=tmp_path / "var", smtp_port=sink.port, smtp_connections=1)
    owner = StoreOwner(s, serve=False)
    assert owner.open()
    stop = threading.Event()
    dispatcher = OutboxDispatcher(s, owner, stop)
    dispatcher.claim_timeout_s = 2.0  # the slow ones take 3.6 s before the last one goes
    thread = threading.Thread(target=dispatcher.run, name="outbox", daemon=True)
    recipients = [f"slow-{i}@observatory.example" for i in range(3)] + ["last@observatory.example"]
    try:
        for i, recipient in enumerate(recipients):
            _queue_one(owner, s, f"held-{i}", recipient)
        thread.start()
        dispatcher.wake()
        wait_until(
            lambda: owner.scalar("SELECT count(*) FROM notifications WHERE status = 'sent'") == 4,
            timeout=30,
            what="every e-mail sent and recorded",
        )
        assert sorted(sink.recipients) == sorted(recipients)
        assert owner.scalar("SELECT sum(resends) FROM notifications") == 0
    finally:
        stop.set()
        thread.join(30)
        owner.close()
        sink.stop()


# --- transport security (the dispatcher against a real server, no broker needed) -------


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "smtp.crt", tmp / "smtp.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _queue_one(
    owner: StoreOwner, settings: Settings, job_id: str, recipient: str = "tls@observatory.example"
) -> None:
    event = ev.new_event(
        ev.JobCompleted,
        producer="test",
        job_id=job_id,
        payload={"owner": recipient, "job_type": "imaging"},
    )
    batch = Batch.decode(["t"], [0], [0], [None], [ev.encode(event)], [0])
    rows = NotificationHandler(settings).handle(batch)
    with owner.transaction() as con:
        NotificationHandler(settings).persist(con, rows)


def _deliver(settings: Settings, owner: StoreOwner) -> tuple[str, str | None]:
    """One round plus the write of its outcome; (status, error) of the one notification."""
    dispatcher = OutboxDispatcher(settings, owner, threading.Event())
    dispatcher.deliver_due()
    dispatcher.flush()  # records the round's outcome
    dispatcher.close()
    return owner.query("SELECT status, error FROM notifications ORDER BY created_at DESC")[1][0]


@pytest.fixture
def tls_sink(tmp_path: Path):  # type: ignore[no-untyped-def]
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    sink = SmtpSink(tls_context=context).start()
    yield sink, cert
    sink.stop()


def test_starttls_verifies_the_certificate_unless_its_ca_is_configured(
    tmp_path: Path, tls_sink: tuple[SmtpSink, Path]
) -> None:
    sink, cert = tls_sink
    base = Settings(
        var_dir=tmp_path / "var", smtp_port=sink.port, smtp_starttls=True, smtp_backoff_initial_s=0
    )
    owner = StoreOwner(base, serve=False)
    assert owner.open()
    try:
        _queue_one(owner, base, "tls-1")
        status, error = _deliver(base, owner)
        assert status == "pending" and "CERTIFICATE_VERIFY_FAILED" in (error or "")
        assert sink.messages == []
        trusted = base.model_copy(update={"smtp_ca_file": cert})
        assert _deliver(trusted, owner) == ("sent", None)
        assert sink.recipients == ["tls@observatory.example"]
    finally:
        owner.close()


def test_login_without_tls_is_refused_unless_allowed(tmp_path: Path) -> None:
    sink = SmtpSink(auth=True).start()
    base = Settings(
        var_dir=tmp_path / "var",
        smtp_port=sink.port,
        smtp_username="relay",
        smtp_password="s3cret",  # type: ignore[arg-type]
        smtp_backoff_initial_s=0,
    )
    owner = StoreOwner(base, serve=False)
    assert owner.open()
    try:
        _queue_one(owner, base, "plain-1")
        status, error = _deliver(base, owner)
        assert status == "pending" and "without TLS" in (error or "")
        assert sink.messages == []
        assert "s3cret" not in repr(base) and "s3cret" not in str(base.model_dump())
        allowed = base.model_copy(update={"smtp_allow_plaintext_auth": True})
        deadline = time.monotonic() + 10
        while _deliver(allowed, owner)[0] != "sent":
            assert time.monotonic() < deadline, "not delivered with plaintext auth allowed"
        assert sink.recipients == ["tls@observatory.example"]
    finally:
        owner.close()
        sink.stop()


@pytest.mark.parametrize("refused", [False, True])
def test_an_internationalised_owner_never_fails_the_next_message_on_its_session(
    tmp_path: Path, refused: bool
) -> None:
    """An address with non-ASCII characters passes validation; smtplib failed it inside
    RCPT after MAIL FROM (no SMTPUTF8 asked for), and the session's next message met
    "503 nested MAIL command", marked failed for good."""
    international = {"user@bücher.de", "用户@例子.广告"}
    sink = SmtpSink(
        rcpt_policy=lambda a: "550 5.1.3 not here" if refused and a in international else None
    ).start()
    settings = Settings(var_dir=tmp_path, smtp_host="127.0.0.1", smtp_port=sink.port)
    session = SmtpSession(settings)
    owners = [
        "good1@example.org",
        "user@bücher.de",
        "good2@example.org",
        "用户@例子.广告",
        "good3@example.org",
    ]
    try:
        outcomes = {
            owner: deliver(
                settings,
                session,
                Claimed(f"n-{i}", owner, f"job {i} completed", "done", f"<n-{i}@test>", 1),
            )
            for i, owner in enumerate(owners)
        }
    finally:
        session.drop()
        sink.stop()
    for owner in owners:
        if refused and owner in international:
            assert outcomes[owner].permanent and "550" in (outcomes[owner].error or "")
        else:
            assert outcomes[owner].error is None, outcomes[owner]
    assert sink.recipients == [o for o in owners if not (refused and o in international)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread")
def test_the_outbox_and_its_sender_run_below_the_consumers(
    settings: Settings, host_factory: Callable[..., Host], smtp: SmtpSink
) -> None:
    host = host_factory(settings, ("notifications", "system-health"))
    orch = JobOrchestratorService(settings, Publisher(settings), wait=False)
    _completed(orch, "niced-1", "owner@observatory.example")
    orch.flush()
    wait_until(lambda: len(smtp.messages) >= 1, timeout=30, what="the e-mail")

    def nice(tid: int) -> int:
        return os.getpriority(os.PRIO_PROCESS, tid)

    threads = {t.name: t.native_id for t in threading.enumerate() if t.native_id is not None}
    consumer = nice(threads["consumer-notifications"])
    step = min(19, consumer + settings.background_nice) - consumer
    assert step > 0
    for name in ("outbox", "health-monitor", "publications"):
        assert nice(threads[name]) == consumer + step, name
    assert host.dispatcher is not None and host.dispatcher.sender.running
    senders = [
        p for p in psutil.Process().children() if "horizons_platform.runtime.sender" in p.cmdline()
    ]
    assert senders, "no SMTP sender process"
    for sender in senders:  # the process, and each of its SMTP sessions' threads
        assert {nice(t.id) for t in sender.threads()} == {consumer + step}
