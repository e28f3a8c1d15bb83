"""Versioned migrations of the DuckDB schema. Append new versions; never edit old ones.

``partition`` and ``offset`` are SQL keywords: quote them ("offset") in hand-written SQL.
"""

from __future__ import annotations

import duckdb

# What ``audit_log.payload`` holds for a row stored under hash rule 2: DuckDB's projection
# of the row's ``raw`` bytes (the hash covers ``raw``; verify-audit checks the column
# against it), NULL for an invalid event. It must be the payload member pydantic
# validated, the one every service acted on. JSON readers disagree on a name given twice:
# pydantic takes the last member, DuckDB's json_extract the first, so an event naming
# ``payload`` twice was e-mailed under one payload and audited under the other. Only when
# the bytes may hold two such members (or spell a name with \u escapes, which DuckDB and
# pydantic both decode) does DuckDB list the members to take the last; otherwise it is
# one json_extract (the search costs ~0.3 µs a row). TRY: bytes pydantic accepted may
# still hold escapes DuckDB's JSON refuses (a lone surrogate): NULL, never a failed batch.
_RAW_TEXT = "decode(raw)"
_MAY_NAME_PAYLOAD_TWICE = (
    f"contains({_RAW_TEXT}, '\\u') OR {_RAW_TEXT} LIKE '%\"payload\"%\"payload\"%'"
)
_LAST_PAYLOAD_MEMBER = (
    f"json_extract({_RAW_TEXT}, '$.*')[len(json_keys({_RAW_TEXT})) + 1 "
    f"- list_position(list_reverse(json_keys({_RAW_TEXT})), 'payload')]"
)
# Frozen: migration 8 re-projects with it. A new projection gets a new name, its own
# migration, and becomes PAYLOAD_OF_RAW.
_PAYLOAD_OF_RAW_V8 = (
    f"CASE WHEN valid THEN TRY(CASE WHEN {_MAY_NAME_PAYLOAD_TWICE} THEN {_LAST_PAYLOAD_MEMBER} "
    f"ELSE json_extract({_RAW_TEXT}, '$.payload') END) END"
)
PAYLOAD_OF_RAW = _PAYLOAD_OF_RAW_V8

MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE job_events (
            event_id VARCHAR PRIMARY KEY,
            event_type VARCHAR NOT NULL,
            job_id VARCHAR NOT NULL,
            occurred_at TIMESTAMPTZ NOT NULL,
            producer VARCHAR,
            schema_version INTEGER,
            trace_id VARCHAR,
            payload JSON,
            topic VARCHAR NOT NULL,
            "partition" INTEGER NOT NULL,
            "offset" BIGINT NOT NULL,
            ingested_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE jobs (
            job_id VARCHAR PRIMARY KEY,
            status VARCHAR NOT NULL,
            owner VARCHAR,
            job_type VARCHAR,
            submitted_at TIMESTAMPTZ,
            started_at TIMESTAMPTZ,
            finished_at TIMESTAMPTZ,
            duration_s DOUBLE,
            queue_time_s DOUBLE,
            last_event_id VARCHAR,
            updated_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE job_metrics (
            event_id VARCHAR PRIMARY KEY,
            job_id VARCHAR NOT NULL,
            job_type VARCHAR,
            outcome VARCHAR,
            duration_s DOUBLE,
            queue_time_s DOUBLE,
            cpu_hours DOUBLE,
            bytes_processed BIGINT,
            peak_memory_mb DOUBLE,
            occurred_at TIMESTAMPTZ NOT NULL,
            ingested_at TIMESTAMPTZ NOT NULL
        );
        CREATE TABLE metrics_hourly (
            bucket_start TIMESTAMPTZ NOT NULL,
            job_type VARCHAR NOT NULL,
            outcome VARCHAR NOT NULL,
            jobs BIGINT NOT NULL,
            p50_duration_s DOUBLE,
            p95_duration_s DOUBLE,
            avg_queue_time_s DOUBLE,
            cpu_hours DOUBLE,
            bytes_processed BIGINT,
            computed_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (bucket_start, job_type, outcome)
        );
        CREATE TABLE metrics_daily (
            bucket_start TIMESTAMPTZ NOT NULL,
            job_type VARCHAR NOT NULL,
            outcome VARCHAR NOT NULL,
            jobs BIGINT NOT NULL,
            p50_duration_s DOUBLE,
            p95_duration_s DOUBLE,
            avg_queue_time_s DOUBLE,
            cpu_hours DOUBLE,
            bytes_processed BIGINT,
            computed_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (bucket_start, job_type, outcome)
        );
        CREATE TABLE audit_log (
            seq BIGINT PRIMARY KEY,
            event_id VARCHAR,
            job_id VARCHAR,
            event_type VARCHAR,
            occurred_at TIMESTAMPTZ,
            recorded_at TIMESTAMPTZ NOT NULL,
            topic VARCHAR NOT NULL,
            "partition" INTEGER NOT NULL,
            "offset" BIGINT NOT NULL,
            valid BOOLEAN NOT NULL,
            validation_error VARCHAR,
            payload JSON,
            raw BLOB,
            prev_hash VARCHAR NOT NULL,
            hash VARCHAR NOT NULL,
            UNIQUE (topic, "partition", "offset")
        );
        CREATE TABLE audit_checkpoints (
            checkpoint_id VARCHAR PRIMARY KEY,
            created_at TIMESTAMPTZ NOT NULL,
            cutoff TIMESTAMPTZ NOT NULL,
            removed_count BIGINT NOT NULL,
            first_removed_seq BIGINT,
            last_removed_seq BIGINT,
            last_removed_hash VARCHAR,
            removed_ranges JSON
        );
        CREATE TABLE compliance_reports (
            report_id VARCHAR PRIMARY KEY,
            generated_at TIMESTAMPTZ NOT NULL,
            total_events BIGINT NOT NULL,
            valid_events BIGINT,
            invalid_events BIGINT,
            jobs_covered BIGINT NOT NULL,
            retention_days INTEGER NOT NULL,
            retention_status VARCHAR NOT NULL,
            retention_compliant BOOLEAN NOT NULL,
            expired_records BIGINT,
            chain_verified BOOLEAN NOT NULL,
            chain_error VARCHAR,
            oldest_event TIMESTAMPTZ,
            newest_event TIMESTAMPTZ,
            report JSON
        );
        CREATE TABLE notifications (
            notification_id VARCHAR PRIMARY KEY,
            event_id VARCHAR NOT NULL,
            job_id VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,
            recipient VARCHAR NOT NULL,
            subject VARCHAR NOT NULL,
            body VARCHAR NOT NULL,
            message_id VARCHAR NOT NULL,
            status VARCHAR NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            created_at TIMESTAMPTZ NOT NULL,
            next_attempt_at TIMESTAMPTZ,
            claimed_at TIMESTAMPTZ,
            sent_at TIMESTAMPTZ,
            resends INTEGER NOT NULL DEFAULT 0,
            error VARCHAR
        );
        CREATE TABLE health_signals (
            observed_at TIMESTAMPTZ NOT NULL,
            source VARCHAR NOT NULL,
            consumer_group VARCHAR,
            topic VARCHAR,
            "partition" INTEGER,
            metric VARCHAR NOT NULL,
            value DOUBLE NOT NULL
        );
        CREATE TABLE health_alerts (
            alert_id VARCHAR PRIMARY KEY,
            rule VARCHAR NOT NULL,
            severity VARCHAR NOT NULL,
            subject VARCHAR NOT NULL,
            value DOUBLE,
            threshold DOUBLE,
            message VARCHAR,
            raised_at TIMESTAMPTZ NOT NULL,
            resolved_at TIMESTAMPTZ,
            resolved_value DOUBLE
        );
        CREATE TABLE dead_letters (
            consumer_group VARCHAR NOT NULL,
            topic VARCHAR NOT NULL,
            "partition" INTEGER NOT NULL,
            "offset" BIGINT NOT NULL,
            error_class VARCHAR NOT NULL,
            error_message VARCHAR NOT NULL,
            raw BLOB,
            "key" BLOB,
            received_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (consumer_group, topic, "partition", "offset")
        );
        CREATE TABLE consumer_offsets (
            consumer_group VARCHAR NOT NULL,
            topic VARCHAR NOT NULL,
            "partition" INTEGER NOT NULL,
            next_offset BIGINT NOT NULL,
            updated_at TIMESTAMPTZ NOT NULL,
            PRIMARY KEY (consumer_group, topic, "partition")
        );
        """,
    ),
    (
        2,
        # The outbox's work list: one row per notification still to deliver (pending or
        # being sent), deleted once it is sent or failed for good. The dispatcher claims
        # from here, so a claim never scans every notification ever sent.
        """
        CREATE TABLE notification_queue (
            notification_id VARCHAR PRIMARY KEY,
            next_attempt_at TIMESTAMPTZ NOT NULL,
            claimed_at TIMESTAMPTZ
        );
        INSERT INTO notification_queue
        SELECT notification_id, coalesce(next_attempt_at, created_at),
               CASE WHEN status = 'sending' THEN claimed_at END
        FROM notifications WHERE status IN ('pending', 'sending');
        """,
    ),
    (
        3,
        # The audit hash moves to SHA-256 over the raw bytes and the record's coordinates
        # (services/audit.py, rule 2); rows written before keep verifying under rule 1.
        """
        ALTER TABLE audit_log ADD COLUMN hash_rule INTEGER;
        UPDATE audit_log SET hash_rule = 1;
        """,
    ),
    (
        4,
        # No silent loss (docs/decisions.md): offsets remember the Kafka cluster they
        # belong to; so do the rows keyed by Kafka coordinates (audit_log, dead_letters),
        # because after a cluster is replaced and a group reset to its beginning, the
        # same topic/partition/offset names another message. DuckDB cannot alter a
        # constraint, so those two tables are rebuilt (rows from before: cluster '').
        # Events that must reach Kafka leave through an outbox (publications); a dead
        # letter remembers that it was replayed.
        """
        ALTER TABLE consumer_offsets ADD COLUMN cluster_id VARCHAR;
        CREATE TABLE publications (
            publication_id VARCHAR PRIMARY KEY,
            topic VARCHAR NOT NULL,
            "key" VARCHAR,
            value VARCHAR NOT NULL,
            headers VARCHAR,
            created_at TIMESTAMPTZ NOT NULL,
            attempts INTEGER NOT NULL,
            last_error VARCHAR
        );
        CREATE TABLE audit_log_v4 (
            seq BIGINT PRIMARY KEY,
            event_id VARCHAR,
            job_id VARCHAR,
            event_type VARCHAR,
            occurred_at TIMESTAMPTZ,
            recorded_at TIMESTAMPTZ NOT NULL,
            topic VARCHAR NOT NULL,
            "partition" INTEGER NOT NULL,
            "offset" BIGINT NOT NULL,
            valid BOOLEAN NOT NULL,
            validation_error VARCHAR,
            payload JSON,
            raw BLOB,
            prev_hash VARCHAR NOT NULL,
            hash VARCHAR NOT NULL,
            hash_rule INTEGER,
            cluster_id VARCHAR NOT NULL,
            UNIQUE (cluster_id, topic, "partition", "offset")
        );
        INSERT INTO audit_log_v4 SELECT *, '' FROM audit_log;
        DROP TABLE audit_log;
        ALTER TABLE audit_log_v4 RENAME TO audit_log;
        CREATE TABLE dead_letters_v4 (
            consumer_group VARCHAR NOT NULL,
            topic VARCHAR NOT NULL,
            "partition" INTEGER NOT NULL,
            "offset" BIGINT NOT NULL,
            error_class VARCHAR NOT NULL,
            error_message VARCHAR NOT NULL,
            raw BLOB,
            "key" BLOB,
            received_at TIMESTAMPTZ NOT NULL,
            cluster_id VARCHAR NOT NULL,
            replayed_at TIMESTAMPTZ,
            replayed_as VARCHAR,
            PRIMARY KEY (consumer_group, cluster_id, topic, "partition", "offset")
        );
        INSERT INTO dead_letters_v4 SELECT *, '', NULL, NULL FROM dead_letters;
        DROP TABLE dead_letters;
        ALTER TABLE dead_letters_v4 RENAME TO dead_letters;
        """,
    ),
    (
        5,
        # Signed heads of the audit chain (services/signing.py); signed, chained retention
        # checkpoints; where the last verification ended (incremental verify-audit); the
        # key and head each report was made under, and each table's retention.
        """
        CREATE TABLE audit_heads (
            seq BIGINT NOT NULL,
            hash VARCHAR NOT NULL,
            signed_at TIMESTAMPTZ NOT NULL,
            key_id VARCHAR NOT NULL,
            signature VARCHAR NOT NULL,
            PRIMARY KEY (key_id, seq)
        );
        ALTER TABLE audit_checkpoints ADD COLUMN prev_checkpoint_id VARCHAR;
        ALTER TABLE audit_checkpoints ADD COLUMN key_id VARCHAR;
        ALTER TABLE audit_checkpoints ADD COLUMN signature VARCHAR;
        CREATE TABLE audit_verifications (
            verified_at TIMESTAMPTZ NOT NULL,
            through_seq BIGINT NOT NULL,
            through_hash VARCHAR NOT NULL,
            head_seq BIGINT,
            full_run BOOLEAN NOT NULL,
            rows_checked BIGINT NOT NULL
        );
        ALTER TABLE compliance_reports ADD COLUMN key_id VARCHAR;
        ALTER TABLE compliance_reports ADD COLUMN public_key VARCHAR;
        ALTER TABLE compliance_reports ADD COLUMN head_seq BIGINT;
        ALTER TABLE compliance_reports ADD COLUMN head_signed_at TIMESTAMPTZ;
        """,
    ),
    (
        6,
        # The job's W3C trace id (32 hex; tracing.py) wherever a job's events are stored,
        # so one query finds them all. job_events.trace_id held the whole traceparent.
        """
        ALTER TABLE audit_log ADD COLUMN trace_id VARCHAR;
        ALTER TABLE jobs ADD COLUMN trace_id VARCHAR;
        ALTER TABLE notifications ADD COLUMN trace_id VARCHAR;
        UPDATE job_events SET trace_id = regexp_extract(trace_id, '^[0-9a-f]{2}-([0-9a-f]{32})-', 1)
        WHERE trace_id IS NOT NULL;
        """,
    ),
    (
        7,
        # The queue remembers when each notification was created, so the outbox's joins
        # with ``notifications`` match on (notification_id, created_at): DuckDB pushes
        # the batch's created_at range into the scan of notifications and skips every
        # older segment by its min/max. Joined on the id alone, each claim scanned the
        # whole table: ~0.6 s a claim at 200,000 notifications, and the outbox fell
        # behind a 1,000 events/s stream within minutes (docs/kpis.md).
        """
        ALTER TABLE notification_queue ADD COLUMN created_at TIMESTAMPTZ;
        UPDATE notification_queue SET created_at = n.created_at
        FROM notifications n WHERE notification_queue.notification_id = n.notification_id;
        """,
    ),
    (
        8,
        # Rows stored before PAYLOAD_OF_RAW took the last of two payload members held the
        # first; they get the one the services acted on. ``payload`` is a projection of
        # ``raw``, outside the hash, so the chain is untouched.
        f"""
        UPDATE audit_log SET payload = ({_PAYLOAD_OF_RAW_V8})
        WHERE hash_rule = 2 AND valid AND payload IS DISTINCT FROM ({_PAYLOAD_OF_RAW_V8});
        """,
    ),
]


class SchemaTooNew(RuntimeError):
    """The file was migrated by a newer version of the platform than this one."""


def migrate(con: duckdb.DuckDBPyConnection) -> int:
    """Apply pending migrations; returns the schema version afterwards. A file migrated
    by a newer version is refused: this code would write rows its tables no longer fit
    (a rollback after an upgrade restores the backup taken before it; docs/runbook.md)."""
    # No function defaults anywhere (applied_at is set explicitly): a column with
    # DEFAULT now() makes a Quack 1.5.5 client's ATTACH fail with 'Catalog "…" does not
    # exist' (docs/decisions.md). Files made before that lose the default here.
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ)"
    )
    con.execute("ALTER TABLE schema_migrations ALTER COLUMN applied_at DROP DEFAULT")
    current = int(
        con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchall()[0][0]
    )
    known = max(version for version, _ in MIGRATIONS)
    if current > known:
        raise SchemaTooNew(
            f"this store is at schema version {current}, written by a newer Horizons "
            f"Platform; this version knows up to {known}. Run the newer version, or roll "
            "back by restoring the copy of the file taken before the upgrade "
            "(docs/runbook.md, Staged rollout)."
        )
    for version, sql in MIGRATIONS:
        if version <= current:
            continue
        con.execute("BEGIN TRANSACTION")
        con.execute(sql)
        con.execute(
            "INSERT INTO schema_migrations (version, applied_at) VALUES (?, now())", [version]
        )
        con.execute("COMMIT")
        current = version
    return current
