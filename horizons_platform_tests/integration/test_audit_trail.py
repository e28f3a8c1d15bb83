"""An audit trail an auditor would accept (issue 12): each attack on a real trail —
written by the real auditor from a real broker, its heads signed and published — is
detected and named; retention goes by the platform's clock in every table."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from horizons_platform.host import Host
from horizons_platform.runtime.publications import DISPATCH_AFTER_S
from horizons_platform.services import audit
from horizons_platform.services.audit_check import check_trail
from horizons_platform.services.compliance import build_report, generate_report, run_retention
from horizons_platform.services.signing import HEAD_KEY, key_id, public_pem, sign_checkpoint
from horizons_platform.settings import Settings
from horizons_platform.store.client import Store
from horizons_platform.store.owner import free_port
from horizons_platform.waiting import wait_until
from horizons_platform_tests.support import horizons, read_topic, record_in_the_past, run_jobs

AUDITOR = "compliance-auditor"


@pytest.fixture
def trail(
    settings_factory: Callable[..., Settings], host_factory: Callable[..., Host]
) -> Iterator[Settings]:
    """A trail of a few hundred records under several signed heads, the newest head
    published on audit-trail; the host stopped (the attacker edits the file)."""
    settings = settings_factory(audit_head_interval_s=0.2)
    store = Store(settings)
    host = host_factory(settings, (AUDITOR,))
    expected = 0
    for round_ in range(4):
        expected += run_jobs(settings, f"t{round_}", 15)
        wait_until(
            lambda n=expected: (
                store.scalar("SELECT count(*) FROM audit_log WHERE job_id LIKE 't%'") == n
            ),
            60,
            what="the auditor to store the round",
        )
    host.stop()
    host.join(30)
    assert store.scalar("SELECT count(*) FROM publications") == 0  # the last head published
    assert store.scalar("SELECT count(*) FROM audit_heads") >= 2
    assert store.scalar("SELECT max(seq) FROM audit_heads") == store.scalar(
        "SELECT max(seq) FROM audit_log"
    )
    yield settings


def test_a_signed_head_reaches_kafka_right_after_its_commit(
    settings_factory: Callable[..., Settings], host_factory: Callable[..., Host]
) -> None:
    """Kafka is the head's witness: until a head is on audit-trail, cutting the tail it
    signs goes unseen. It leaves with its batch's commit, not with the outbox's sweep of
    rows older than DISPATCH_AFTER_S (which once delayed every head by ~6 s)."""
    settings = settings_factory(audit_head_interval_s=0.2)
    store = Store(settings)
    host_factory(settings, (AUDITOR,))
    expected = run_jobs(settings, "w", 10)
    wait_until(
        lambda: store.scalar("SELECT count(*) FROM audit_log WHERE job_id LIKE 'w-%'") == expected,
        60,
        what="the auditor to store the jobs",
    )
    head = store.scalar("SELECT max(seq) FROM audit_heads")
    assert head is not None and head > 0

    def published_back() -> bool:
        # The auditor reads its own heads back from audit-trail into audit_log.
        return bool(
            store.scalar(
                "SELECT count(*) FROM audit_log WHERE event_type = 'audit.record' "
                "AND json_extract_string(decode(raw), '$.payload.details.seq') = ?",
                [str(head)],
            )
        )

    wait_until(published_back, DISPATCH_AFTER_S / 2, what=f"head {head} on audit-trail")


def test_a_clean_stop_publishes_its_last_signed_head(
    settings_factory: Callable[..., Settings], host_factory: Callable[..., Host]
) -> None:
    """The head signed at shutdown reaches Kafka before the host exits (the broker is
    up): left in the outbox, the rows after the previous published head could be cut
    from the stopped host's file, outbox row and all, with no witness to say so."""
    settings = settings_factory(audit_head_interval_s=3600)  # the first batch's, then the stop's
    store = Store(settings)
    host = host_factory(settings, (AUDITOR,))
    expected = 0
    for round_ in ("s1", "s2"):  # the second round's rows come after the first head
        expected += run_jobs(settings, round_, 8)
        wait_until(
            lambda n=expected: (
                store.scalar("SELECT count(*) FROM audit_log WHERE job_id LIKE 's%'") == n
            ),
            60,
            what="the auditor to store the jobs",
        )
    assert store.scalar("SELECT max(seq) FROM audit_heads") < store.scalar(
        "SELECT max(seq) FROM audit_log"
    )
    host.stop()
    assert host.join(30) == 0
    tail = store.scalar("SELECT max(seq) FROM audit_log")
    assert store.scalar("SELECT max(seq) FROM audit_heads") == tail
    assert store.scalar("SELECT count(*) FROM publications") == 0
    published = [
        json.loads(m.value())["payload"]["details"]
        for m in read_topic(settings, settings.topic_audit_trail)
        if m.key() == HEAD_KEY
    ]
    assert tail in [int(d["seq"]) for d in published], published


def _copy(settings: Settings, tmp_path: Path) -> tuple[Settings, Store]:
    """The trail in a file of its own (the keys and Kafka stay the same)."""
    target = tmp_path / f"attacked-{uuid.uuid4().hex[:6]}.duckdb"
    shutil.copyfile(settings.database, target)
    copy = Settings(**{**settings.model_dump(), "duckdb_path": target})  # no cached paths
    return copy, Store(copy)


def _sql(store: Store, *statements: str) -> None:
    with store.transaction() as con:
        for sql in statements:
            con.execute(sql)


def test_the_untouched_trail_verifies_incrementally_and_through_the_cli(trail: Settings) -> None:
    store = Store(trail)
    full = check_trail(store, trail, full=True)
    assert full.ok, full.summary()
    assert any("Kafka's newest published head" in n for n in full.notes), full.notes
    again = check_trail(store, trail)  # nothing new: starts where the full run ended
    assert again.ok and again.checked == 0 and again.incremental_from == full.through[0]  # type: ignore[index]
    cli = horizons(trail, "verify-audit")
    assert cli.returncode == 0 and "audit trail verified" in cli.stdout, cli.stdout + cli.stderr


def test_verify_audit_without_kafka_says_so_in_one_line_and_without_a_store_at_once(
    trail: Settings, tmp_path: Path
) -> None:
    settings, _ = _copy(trail, tmp_path)
    closed = free_port()  # nothing listens: a broker that is down
    offline = Settings(**{**settings.model_dump(), "kafka_bootstrap": f"127.0.0.1:{closed}"})
    cli = horizons(offline, "verify-audit")
    assert cli.returncode == 0 and "audit trail verified" in cli.stdout, cli.stdout + cli.stderr
    assert "Kafka not asked (unreachable" in cli.stdout, cli.stdout
    assert "librdkafka" not in cli.stderr, cli.stderr[:2000]  # one note, not a log per retry
    missing = Settings(**{**offline.model_dump(), "duckdb_path": tmp_path / "never-created.duckdb"})
    started = time.monotonic()
    cli = horizons(missing, "verify-audit")
    assert cli.returncode == 1 and "no DuckDB file" in cli.stderr, cli.stdout + cli.stderr
    assert time.monotonic() - started < 5.0, "waited for Kafka before finding no store"


def test_an_old_row_edited_in_place_fails_verify_audit_and_the_report(
    trail: Settings, tmp_path: Path
) -> None:
    settings, store = _copy(trail, tmp_path)
    assert check_trail(store, settings).ok  # an incremental run: the trail is verified so far
    _sql(store, "UPDATE audit_log SET job_id = 'TAMPERED' WHERE seq = 5")
    quick = horizons(settings, "verify-audit", "--incremental")
    assert quick.returncode == 0, quick.stdout + quick.stderr  # below its starting point
    cli = horizons(settings, "verify-audit")  # every record, by default
    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert "broken at seq 5" in cli.stdout, cli.stdout
    report = generate_report(store)
    assert report["chain_verified"] is False


def test_deleting_the_newest_rows_is_a_cut_tail(trail: Settings, tmp_path: Path) -> None:
    settings, store = _copy(trail, tmp_path)
    last = store.scalar("SELECT max(seq) FROM audit_log")
    _sql(store, f"DELETE FROM audit_log WHERE seq > {last - 10}")
    result = check_trail(store, settings, full=True)
    assert not result.ok and result.first_bad_seq == last - 9, result.summary()
    assert "tail cut" in result.reason
    # Removing the heads that cover them too leaves Kafka's copy as the witness.
    _sql(store, f"DELETE FROM audit_heads WHERE seq > {last - 10}")
    result = check_trail(store, settings, full=True)
    assert not result.ok and result.first_bad_seq == last - 9, result.summary()
    assert "Kafka witnessed a head" in result.reason
    cli = horizons(settings, "verify-audit")
    assert cli.returncode == 1 and f"seq {last - 9}" in cli.stdout, cli.stdout


def test_an_edited_row_with_every_later_hash_recomputed_is_a_rewritten_chain(
    trail: Settings, tmp_path: Path
) -> None:
    settings, store = _copy(trail, tmp_path)
    edited = 17
    with store.transaction() as con:
        rows = list(audit.iter_rows(con, after_seq=edited - 1))
        rows[0]["job_id"] = "forged"
        prev = rows[0]["prev_hash"]
        for row in rows:  # the project's own hash function, as an attacker would use it
            row["prev_hash"] = prev
            row["hash"] = prev = audit.link(prev, row)
            con.execute(
                "UPDATE audit_log SET job_id = ?, prev_hash = ?, hash = ? WHERE seq = ?",
                [row["job_id"], row["prev_hash"], row["hash"], row["seq"]],
            )
    with store.reader() as con:
        assert audit.verify_store(con).ok  # the chain alone cannot tell
    result = check_trail(store, settings, full=True)
    first_head = store.scalar(f"SELECT min(seq) FROM audit_heads WHERE seq >= {edited}")
    assert not result.ok and result.first_bad_seq == first_head, result.summary()
    assert "chain rewritten" in result.reason
    incremental = check_trail(store, settings)  # the last verified point moved: all again
    assert not incremental.ok and incremental.first_bad_seq == first_head


def test_a_deleted_range_excused_by_a_forged_checkpoint_is_detected(
    trail: Settings, tmp_path: Path
) -> None:
    store = Store(trail)
    lo, hi = 40, 49
    last_hash = store.scalar(f"SELECT hash FROM audit_log WHERE seq = {hi}")
    checkpoint = {
        "checkpoint_id": str(uuid.uuid4()),
        "created_at": datetime.now(UTC),
        "cutoff": datetime.now(UTC),
        "removed_count": hi - lo + 1,
        "first_removed_seq": lo,
        "last_removed_seq": hi,
        "last_removed_hash": last_hash,
        "removed_ranges": json.dumps([[lo, hi, last_hash]]),
        "prev_checkpoint_id": None,
    }
    for forged in (checkpoint, sign_checkpoint(Ed25519PrivateKey.generate(), checkpoint)):
        settings, store = _copy(trail, tmp_path)
        with store.transaction() as con:
            con.execute(f"DELETE FROM audit_log WHERE seq BETWEEN {lo} AND {hi}")
            con.execute(f"DELETE FROM audit_heads WHERE seq BETWEEN {lo} AND {hi}")
            columns = ", ".join(forged)
            marks = ", ".join("?" for _ in forged)
            con.execute(
                f"INSERT INTO audit_checkpoints ({columns}) VALUES ({marks})", list(forged.values())
            )
        result = check_trail(store, settings, full=True)
        assert not result.ok and result.first_bad_seq == lo, result.summary()
        assert "not signed by the trusted key" in result.reason


def test_a_report_whose_public_key_was_replaced_is_detected(
    trail: Settings, tmp_path: Path
) -> None:
    settings, store = _copy(trail, tmp_path)
    report = generate_report(store)
    assert report["chain_verified"] and report["key_id"] and report["head_seq"]
    other = Ed25519PrivateKey.generate().public_key()
    with store.transaction() as con:
        con.execute(
            "UPDATE compliance_reports SET key_id = ?, public_key = ?",
            [key_id(other), public_pem(other)],
        )
    result = check_trail(store, settings, full=True)
    assert not result.ok and "the report was altered" in result.reason, result.summary()


def test_retention_leaves_no_personal_data_older_than_the_period_in_any_table(
    settings: Settings, host_factory: Callable[..., Host]
) -> None:
    store = Store(settings)
    old_owner = "expired.owner@observatory.example"
    long_ago = datetime.now(UTC) - timedelta(days=120)
    event = {
        "event_id": str(uuid.uuid4()),
        "event_type": "job.submitted",
        "job_id": "old-job",
        "occurred_at": "2030-01-01T00:00:00Z",  # the producer's clock says: keep me
        "producer": "archive",
        "schema_version": 1,
        "payload": {"owner": old_owner, "job_type": "imaging"},
    }
    raw = json.dumps(event).encode()
    record_in_the_past(store, [(raw, long_ago)])
    with store.transaction() as con:  # what the services wrote 120 days ago
        con.execute(
            "INSERT INTO job_events VALUES (?, 'job.submitted', 'old-job', ?, 'archive', 1, "
            "NULL, ?, 'archive', 0, 0, ?)",
            [event["event_id"], long_ago, json.dumps(event["payload"]), long_ago],
        )
        con.execute(
            "INSERT INTO jobs (job_id, status, owner, updated_at) VALUES "
            "('old-job', 'completed', ?, ?)",
            [old_owner, long_ago],
        )
        con.execute(
            "INSERT INTO notifications (notification_id, event_id, job_id, kind, recipient, "
            "subject, body, message_id, status, attempts, created_at, resends) VALUES "
            "('n-old', ?, 'old-job', 'completed', ?, 's', ?, '<m@x>', 'sent', 1, ?, 0)",
            [event["event_id"], old_owner, f"Dear {old_owner}", long_ago],
        )
        con.execute(
            'INSERT INTO dead_letters (consumer_group, topic, "partition", "offset", '
            "error_class, error_message, raw, received_at, cluster_id) VALUES "
            "('metrics', 'archive', 0, 99, 'E', 'm', ?, ?, '')",
            [raw, long_ago],
        )
    host_factory(settings)
    fresh = run_jobs(settings, "fresh", 3)
    # Every group that keeps them, not the auditor alone: the metrics group stores its
    # job_events a moment later, and the test compares them after retention (CI once saw
    # 0 of 9 there when only audit_log was waited for).
    wait_until(
        lambda: store.scalar(
            "SELECT (SELECT count(*) FROM audit_log WHERE job_id LIKE 'fresh-%') = ? "
            "AND (SELECT count(*) FROM job_events WHERE job_id LIKE 'fresh-%') = ?",
            [fresh, fresh],
        ),
        60,
        what="fresh jobs in audit_log and job_events",
    )
    with store.reader() as con:
        before = build_report(con, settings)
    overdue = {t for t, p in before["tables"].items() if not p["within_policy"]}
    assert overdue == {"audit_log", "job_events", "jobs", "notifications", "dead_letters"}
    assert before["retention_compliant"] is False

    with store.transaction() as con:
        checkpoint = run_retention(con, settings)
    print(f"removed per table: {checkpoint['removed_per_table']}")
    with store.reader() as con:
        after = build_report(con, settings)
        leftovers = {
            table: con.execute(
                f"SELECT count(*) FROM {table} WHERE CAST(COLUMNS(*) AS VARCHAR) LIKE ?",
                [f"%{old_owner}%"],
            ).fetchall()[0][0]
            for table in ("audit_log", "job_events", "jobs", "notifications", "dead_letters")
        }
    assert leftovers == dict.fromkeys(leftovers, 0), leftovers
    assert all(p["within_policy"] for p in after["tables"].values()), after["tables"]
    assert after["retention_compliant"] is True
    assert store.scalar("SELECT count(*) FROM job_events WHERE job_id LIKE 'fresh-%'") == fresh
