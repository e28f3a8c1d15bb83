"""The store client on a real file (no owner running): migrations, idempotent inserts,
waiting for a file another process holds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest

from horizons_platform.events import validate
from horizons_platform.settings import Settings
from horizons_platform.store import tables
from horizons_platform.store.base import StoreUnavailable
from horizons_platform.store.client import Store
from horizons_platform.store.owner import StoreOwner, program
from horizons_platform.store.schema import MIGRATIONS, PAYLOAD_OF_RAW, SchemaTooNew, migrate

HOLD = """
import duckdb, sys, time
con = duckdb.connect(sys.argv[1])
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
con.close()
"""


def _hold_lock(path: Path, seconds: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def _store(tmp_path: Path, **overrides: object) -> Store:
    store = Store(Settings(var_dir=tmp_path, **overrides))  # type: ignore[arg-type]
    store.ensure_schema()
    return store


def test_a_file_migrated_by_a_newer_version_is_refused(tmp_path: Path) -> None:
    # An old standby promoted after an upgrade must not write into tables it does not know.
    path = tmp_path / "newer.duckdb"
    with duckdb.connect(str(path)) as con:
        newest = migrate(con)
        con.execute("INSERT INTO schema_migrations VALUES (?, now())", [newest + 1])
        with pytest.raises(SchemaTooNew, match=rf"schema version {newest + 1}.*up to {newest}"):
            migrate(con)


def _file_at_version(tmp_path: Path, version: int) -> duckdb.DuckDBPyConnection:
    """A store file as the platform left it at schema ``version``."""
    con = duckdb.connect(str(tmp_path / f"v{version}.duckdb"))
    con.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ)"
    )
    for number, sql in MIGRATIONS[:version]:
        con.execute(sql)
        con.execute("INSERT INTO schema_migrations VALUES (?, now())", [number])
    return con


def test_migration_7_gives_queued_notifications_their_created_at(tmp_path: Path) -> None:
    # The outbox joins the queue with notifications on (id, created_at): a queued row
    # left without its notification's created_at would never be claimed again.
    with _file_at_version(tmp_path, 6) as con:
        created = datetime(2026, 11, 30, 8, 15, 1, 123456, tzinfo=UTC)
        con.execute(
            "INSERT INTO notifications (notification_id, event_id, job_id, kind, recipient, "
            "subject, body, message_id, status, attempts, created_at, resends) VALUES "
            "('n-1', 'e-1', 'j-1', 'completed', 'a@example.org', 's', 'b', '<n-1@x>', "
            "'pending', 0, ?, 0)",
            [created],
        )
        con.execute("INSERT INTO notification_queue VALUES ('n-1', ?, NULL)", [created])
        assert migrate(con) == MIGRATIONS[-1][0]
        assert con.execute("SELECT created_at FROM notification_queue").fetchall() == [(created,)]


_ENVELOPE = (
    '"event_id":"01a252f9-0387-747e-8281-d708eb0826af","event_type":"job.completed",'
    '"job_id":"j-1","occurred_at":"2026-12-07T10:00:00Z","producer":"p"'
)
_GOOD = '{"owner":"good@example.org","job_type":"imaging"}'
_EVIL = '{"owner":"evil@example.org","job_type":"EVIL"}'
# Valid events whose payload member DuckDB's json_extract and pydantic read differently
# (the first and the last of two), or where a naive text search could miss the member.
_PAYLOADS = {
    "named twice": f'{{{_ENVELOPE},"payload":{_EVIL},"payload":{_GOOD}}}',
    "named twice, once spelled with an escape": (
        f'{{{_ENVELOPE},"pay\\u006coad":{_EVIL},"payload":{_GOOD}}}'
    ),
    "the escaped one last": f'{{"payload":{_EVIL},{_ENVELOPE},"pa\\u0079load":{_GOOD}}}',
    "named once": f'{{{_ENVELOPE},"payload":{_GOOD}}}',
    "a nested member of the same name": (
        f'{{"payload":{{"owner":"good@example.org","job_type":"imaging",'
        f'"params":{{"payload":{_EVIL}}}}},{_ENVELOPE}}}'
    ),
    "the name inside a string": (
        f'{{{_ENVELOPE},"producer":"\\"payload\\": {{}}","payload":{_GOOD}}}'
    ),
}


@pytest.mark.parametrize("text", _PAYLOADS.values(), ids=_PAYLOADS.keys())
def test_the_audit_payload_is_the_member_pydantic_validated(text: str) -> None:
    # Every service acts on pydantic's reading; the audit trail must show the same one.
    raw = text.encode()
    validated = validate(raw)["payload"]
    with duckdb.connect() as con:
        (projected,) = con.execute(
            f"SELECT {PAYLOAD_OF_RAW} FROM (SELECT ?::BLOB AS raw, true AS valid)", [raw]
        ).fetchone()  # type: ignore[misc]
    payload = json.loads(projected)
    assert (payload["owner"], payload["job_type"]) == (
        validated["owner"],
        validated["job_type"],
    )
    assert payload.get("params", {}) == validated.get("params", {})


def test_migration_8_gives_audit_rows_the_payload_member_pydantic_validated(
    tmp_path: Path,
) -> None:
    with _file_at_version(tmp_path, 7) as con:
        twice, once = _PAYLOADS["named twice"], _PAYLOADS["named once"]
        for seq, text, stored in ((1, twice, _EVIL), (2, once, _GOOD)):
            # How version 7 stored them: json_extract, the first member.
            con.execute(
                'INSERT INTO audit_log (seq, recorded_at, topic, "partition", "offset", '
                "valid, payload, raw, prev_hash, hash, hash_rule, cluster_id) "
                "VALUES (?, now(), 't', 0, ?, true, ?, ?, 'p', 'h', 2, 'c')",
                [seq, seq, stored, text.encode()],
            )
        before = con.execute("SELECT seq, hash, raw FROM audit_log ORDER BY seq").fetchall()
        assert migrate(con) == MIGRATIONS[-1][0]
        owners = con.execute("SELECT payload->>'owner' FROM audit_log ORDER BY seq").fetchall()
        assert owners == [("good@example.org",), ("good@example.org",)]
        # The evidence and its chain are untouched.
        assert con.execute("SELECT seq, hash, raw FROM audit_log ORDER BY seq").fetchall() == before


def test_schema_is_migrated_once_and_versioned(tmp_path: Path) -> None:
    store = _store(tmp_path)
    assert store.scalar("SELECT max(version) FROM schema_migrations") == MIGRATIONS[-1][0]
    _, rows = store.query("SELECT table_name FROM information_schema.tables")
    names = {r[0] for r in rows}
    assert {
        "job_events",
        "jobs",
        "job_metrics",
        "metrics_hourly",
        "metrics_daily",
        "audit_log",
        "audit_checkpoints",
        "compliance_reports",
        "notifications",
        "health_signals",
        "health_alerts",
        "dead_letters",
        "consumer_offsets",
    } <= names


def test_inserts_are_idempotent_on_the_key(tmp_path: Path) -> None:
    store = _store(tmp_path)
    now = datetime.now(UTC)
    row = {
        "consumer_group": "g",
        "topic": "t",
        "partition": 0,
        "offset": 5,
        "error_class": "E",
        "error_message": "m",
        "raw": b"x",
        "key": None,
        "received_at": now,
        "cluster_id": "c1",
    }
    for _ in range(3):
        with store.transaction() as con:
            tables.insert(con, "dead_letters", [row, {**row, "offset": 6}])
    assert store.scalar("SELECT count(*) FROM dead_letters") == 2


def test_offsets_upsert(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with store.transaction() as con:
        tables.save_offsets(con, "g", {("t", 0): 10, ("t", 1): 3})
    with store.transaction() as con:
        tables.save_offsets(con, "g", {("t", 0): 12})
        assert tables.stored_offsets(con, "g") == {("t", 0): 12, ("t", 1): 3}


def test_a_failed_transaction_leaves_nothing(tmp_path: Path) -> None:
    store = _store(tmp_path)
    with pytest.raises(RuntimeError), store.transaction() as con:
        tables.save_offsets(con, "g", {("t", 0): 10})
        raise RuntimeError("boom")
    assert store.scalar("SELECT count(*) FROM consumer_offsets") == 0


def test_client_waits_for_a_process_holding_the_file(tmp_path: Path) -> None:
    store = _store(tmp_path)
    holder = _hold_lock(store.path, 1.5)
    started = time.monotonic()
    with store.transaction() as con:
        tables.save_offsets(con, "g", {("t", 0): 1})
    waited = time.monotonic() - started
    holder.wait(10)
    assert waited >= 0.5, "it did not actually wait for the file"
    assert store.scalar("SELECT next_offset FROM consumer_offsets") == 1


def test_a_holder_that_does_not_serve_ends_in_a_clear_error(tmp_path: Path) -> None:
    store = _store(tmp_path, store_connect_timeout_s=0.5)
    holder = _hold_lock(store.path, 5)
    try:
        with pytest.raises(StoreUnavailable, match=rf"held by pid {holder.pid} \(.*no live owner"):
            store.query("SELECT 1")
    finally:
        holder.kill()
        holder.wait(10)


def test_a_corrupt_file_fails_at_once_with_duckdbs_own_error(tmp_path: Path) -> None:
    """Not taken for a held lock (its message names a "block"): no wait, no "pid ?"."""
    store = _store(tmp_path, store_connect_timeout_s=3)
    with duckdb.connect(str(store.path)) as con:
        con.execute("CREATE TABLE filler AS SELECT range AS n FROM range(300000)")
    # A WAL left behind (the writer died) is replayed on open, which reads the table.
    died = (
        "import duckdb, os, sys; "
        "duckdb.connect(sys.argv[1]).execute('INSERT INTO filler VALUES (1)'); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", died, str(store.path)], check=True)
    size = store.path.stat().st_size
    with store.path.open("r+b") as f:  # into every block past DuckDB's 12 KiB header
        for block in range(12288 + 64, size, 262144):
            f.seek(block)
            f.write(b"\xff" * 64)
    started = time.monotonic()
    with pytest.raises(duckdb.IOException, match="Corrupt database file"):
        store.query("SELECT sum(n) FROM filler")
    assert time.monotonic() - started < 2


def test_reading_a_missing_store_says_how_to_create_it(tmp_path: Path) -> None:
    store = Store(Settings(var_dir=tmp_path))
    with pytest.raises(FileNotFoundError, match="horizons consume"):
        store.query("SELECT 1")


def test_a_client_on_the_file_reads_timestamps_in_utc_whatever_its_tz(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(Settings(var_dir=tmp_path))
    store.ensure_schema()
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        day = store.scalar(
            "SELECT date_trunc('day', TIMESTAMPTZ '2024-01-01 03:00:00+00')::VARCHAR"
        )
    finally:
        monkeypatch.undo()
        time.tzset()
    assert day == "2024-01-01 00:00:00+00"


def _job(status: str, at: datetime, **fields: object) -> dict[str, object]:
    column = {"submitted": "submitted_at", "running": "started_at"}.get(status, "finished_at")
    return {
        "job_id": "j",
        "status": status,
        "last_event_id": status,
        "updated_at": at,
        column: at,
        **fields,
    }


def test_a_job_state_only_moves_forward_whatever_order_events_arrive_in(tmp_path: Path) -> None:
    store = _store(tmp_path)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    t = [t0.replace(minute=m) for m in range(4)]
    batches = [
        [_job("submitted", t[0], owner="o@example.org"), _job("running", t[1])],
        [_job("completed", t[2])],
        # replayed: an old job.started, a job.submitted, then a late cancellation
        [_job("running", t[3])],
        [_job("submitted", t[3], owner="other@example.org"), _job("cancelled", t[3])],
    ]
    for updates in batches:
        with store.transaction() as con:
            tables.upsert_jobs(con, _columns(tables.fold_job_updates(updates)))
    _, rows = store.query(
        "SELECT status, owner, submitted_at, started_at, finished_at, duration_s, "
        "last_event_id FROM jobs"
    )
    assert rows == [("completed", "o@example.org", t[0], t[1], t[2], 60.0, "completed")]


def test_folding_one_batch_keeps_the_furthest_state() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    folded = tables.fold_job_updates(
        [_job("completed", t0.replace(minute=2)), _job("running", t0.replace(minute=1))]
    )
    assert folded[0]["status"] == "completed" and folded[0]["last_event_id"] == "completed"
    assert folded[0]["started_at"] == t0.replace(minute=1)  # a gap filled, nothing overwritten


def _columns(rows: list[dict[str, object]]) -> dict[str, list[object]]:
    return {name: [r[name] for r in rows] for name in rows[0]}


def _filter_pushed_into_scan(con: duckdb.DuckDBPyConnection) -> bool:
    plan = con.execute(
        "EXPLAIN SELECT next_offset FROM consumer_offsets WHERE consumer_group = 'g'"
    ).fetchall()[0][1]
    return "FILTER" not in plan


def test_a_lean_writer_skips_the_optimizer_except_where_a_read_needs_it(tmp_path: Path) -> None:
    owner = StoreOwner(Settings(var_dir=tmp_path), serve=False)
    owner.open()
    try:

        def writer() -> tuple[bool, bool, tuple[int, str | None], bool]:
            before = _filter_pushed_into_scan(owner.cursor())
            owner.lean_writer()
            con = owner.cursor()
            lean = not _filter_pushed_into_scan(con)
            with tables.optimized(con):
                inside = _filter_pushed_into_scan(con)
            tail = tables.audit_tail(con)
            return before and lean, inside, tail, not _filter_pushed_into_scan(con)

        with ThreadPoolExecutor(1) as pool:
            lean, inside, tail, still_lean = pool.submit(writer).result()
        assert lean  # the writer's own cursor lost the optimizer...
        assert inside  # ...except inside optimized()...
        assert tail == (0, None)
        assert still_lean  # ...and is lean again after it
        assert _filter_pushed_into_scan(owner.cursor())  # other threads' cursors untouched
    finally:
        owner.close()


def test_a_batch_of_jobs_reads_only_its_own_rows_of_a_big_table(tmp_path: Path) -> None:
    """A batch's jobs are found through the primary key, not by reading every stored
    id: with DuckDB's default (keys pushed into the scan for joins of ≤ 50 keys) a batch
    of more than 50 jobs with random ids scanned the whole table — O(stored jobs) per
    batch (144 ms a batch beside 2,000,000 jobs)."""
    owner = StoreOwner(Settings(var_dir=tmp_path), serve=False)
    owner.open()
    try:
        con = owner.cursor()
        stored = 100_000
        con.execute(
            "INSERT INTO jobs (job_id, status, updated_at) "
            f"SELECT uuid()::VARCHAR, 'completed', now() FROM range({stored})"
        )
        old = [
            r[0] for r in con.execute("SELECT job_id FROM jobs USING SAMPLE 150 ROWS").fetchall()
        ]
        ids = old + [str(uuid.uuid4()) for _ in range(150)]
        now = datetime.now(UTC)
        columns: dict[str, list[object]] = {name: [None] * len(ids) for name in tables._JOB_COLUMNS}
        columns.update(job_id=ids, status=["running"] * len(ids), updated_at=[now] * len(ids))
        profile = tmp_path / "profile.json"
        con.execute("PRAGMA enable_profiling = 'json'")
        con.execute(f"PRAGMA profiling_output = '{profile}'")
        con.execute("BEGIN")
        tables.upsert_jobs(con, columns)
        con.execute("COMMIT")
        con.execute("PRAGMA disable_profiling")
        scans = [
            node["operator_rows_scanned"]
            for node in _plan_nodes(json.loads(profile.read_text()))
            if str(node.get("extra_info", {}).get("Table", "")).endswith(".jobs")
        ]
        assert scans and max(scans) < 1_000, scans
        # Forward-only: the stored jobs stay completed, the new ones are running.
        assert con.execute(
            "SELECT status, count(*) FROM jobs GROUP BY ALL ORDER BY ALL"
        ).fetchall() == [("completed", stored), ("running", 150)]
    finally:
        owner.close()


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("children", []):
        yield from _plan_nodes(child)


def test_a_checkpoint_inside_a_commit_is_named_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """DuckDB checkpoints inside the COMMIT that takes the WAL past the threshold and says
    nothing; the owner sees the WAL shrink and reports it once (log line and hook), with
    the WAL bytes it wrote. Commits below the threshold report nothing."""
    owner = StoreOwner(Settings(var_dir=tmp_path, store_checkpoint_mb=1), serve=False)
    owner.open()
    seen: list[tuple[int, float]] = []
    owner.observe_checkpoint = lambda wal_bytes, took: seen.append((wal_bytes, took))
    try:
        with owner.transaction() as con:
            con.execute("CREATE TABLE blobs (b BLOB)")
        small = b"x" * 10_000
        with owner.transaction() as con:  # ~10 KB of WAL: no checkpoint
            con.execute("INSERT INTO blobs VALUES (?)", [small])
        assert seen == []
        big = [(bytes([i % 251]) * 100_000,) for i in range(15)]  # ~1.5 MB: past 1 MB
        with caplog.at_level("INFO", logger="horizons_platform.store.owner"):
            for row in big:
                with owner.transaction() as con:
                    con.execute("INSERT INTO blobs VALUES (?)", list(row))
        assert len(seen) == 1, seen
        wal_bytes, took = seen[0]
        assert wal_bytes >= 1_000_000 and took >= 0
        assert [r for r in caplog.records if "DuckDB checkpoint" in r.getMessage()]
        assert owner.scalar("SELECT count(*) FROM blobs") == 16  # nothing lost by it
    finally:
        owner.close()


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (
            [b"/x/.venv/bin/python", b"-m", b"horizons_platform.cli", b"query", b"SELECT 1"],
            "horizons query SELECT 1",
        ),
        ([b"/x/.venv/bin/python", b"/x/.venv/bin/horizons", b"consume", b""], "horizons consume"),
        ([b"/x/.venv/bin/python3.11", b"-m", b"dagster", b"api", b"grpc"], "dagster api grpc"),
        ([b"/usr/bin/duckdb", b"var/horizons.duckdb"], "duckdb var/horizons.duckdb"),
        ([b"/x/bin/python", b"script.py", b"--flag"], "script.py --flag"),
        ([b"python", b"-c", b"x" * 100], "-c " + "x" * 57 + "…"),
        ([], ""),
    ],
)
def test_a_process_is_named_by_the_command_a_person_typed(argv: list[bytes], shown: str) -> None:
    assert program(argv) == shown
