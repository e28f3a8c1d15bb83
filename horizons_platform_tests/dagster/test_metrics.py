"""metrics_hourly / metrics_daily: rollups of real job metrics, percentiles, idempotence,
late arrivals, and the consistency checks."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest

from horizons_platform.defs import metrics
from horizons_platform.settings import Settings
from horizons_platform.store.client import Store
from horizons_platform_tests.dagster.conftest import Populated, check_results, execute, run_job
from horizons_platform_tests.dagster.test_checks import evaluate

COLUMNS = "bucket_start, job_type, outcome, jobs, p50_duration_s, p95_duration_s, cpu_hours"


def _quantile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (DuckDB's quantile_cont)."""
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _bucket(ts: datetime, grain: str) -> datetime:
    ts = ts.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    return ts.replace(hour=0) if grain == "day" else ts


def _rows(store: Store, table: str) -> list[tuple]:
    return store.query(f"SELECT {COLUMNS} FROM {table} ORDER BY ALL")[1]


def test_rollup_job_computes_counts_and_percentiles(
    populated: Populated, copy_of: Callable[..., Settings], instance: dg.DagsterInstance
) -> None:
    settings = copy_of(populated)
    store = Store(settings)
    result = run_job(settings, "metrics_rollup_job", instance)
    assert result.success
    assert {e.check_name: e.passed for e in check_results(result).values()} == {
        "metrics_hourly_consistent": True,
        "metrics_daily_consistent": True,
    }
    # Expected values straight from the job_metrics rows the consumers wrote.
    _, raw = store.query(
        "SELECT occurred_at, job_type, outcome, duration_s FROM job_metrics "
        "WHERE job_id LIKE 'pop-%'"
    )
    assert len(raw) == len(populated.jobs)
    for table, grain in (("metrics_hourly", "hour"), ("metrics_daily", "day")):
        groups: dict[tuple[datetime, str, str], list[float]] = defaultdict(list)
        for occurred, job_type, outcome, duration in raw:
            groups[(_bucket(occurred, grain), job_type, outcome)].append(duration)
        got = {(r[0], r[1], r[2]): r for r in _rows(store, table)}
        assert set(got) == set(groups), table
        for key, durations in groups.items():
            assert got[key][3] == len(durations)
            assert got[key][4] == pytest.approx(_quantile(durations, 0.5))
            assert got[key][5] == pytest.approx(_quantile(durations, 0.95))
    [hourly] = result.asset_materializations_for_node("metrics_hourly")
    assert hourly.metadata["jobs_rolled_up"].value == len(populated.jobs)


def test_rollup_is_idempotent_and_picks_up_late_rows(
    populated: Populated, copy_of: Callable[..., Settings], instance: dg.DagsterInstance
) -> None:
    settings = copy_of(populated)
    store = Store(settings)
    run_job(settings, "metrics_rollup_job", instance)
    first = _rows(store, "metrics_hourly")
    run_job(settings, "metrics_rollup_job", instance)
    assert _rows(store, "metrics_hourly") == first
    # A job from three days ago whose metrics arrive only now lands in its own bucket.
    then = datetime.now(UTC) - timedelta(days=3)
    execute(
        store,
        "INSERT INTO job_metrics (event_id, job_id, job_type, outcome, duration_s, "
        "queue_time_s, cpu_hours, bytes_processed, peak_memory_mb, occurred_at, ingested_at) "
        "VALUES ('late-1', 'late-job', 'imaging', 'completed', 42.0, 1.0, 0.5, 10, 1.0, ?, now())",
        [then],
    )
    run_job(settings, "metrics_rollup_job", instance)
    after = _rows(store, "metrics_hourly")
    assert len(after) == len(first) + 1
    late = [r for r in after if r[0] == then.replace(minute=0, second=0, microsecond=0)]
    assert late and late[0][3] == 1 and late[0][4] == 42.0
    assert evaluate(metrics.metrics_hourly_consistent, settings).passed
    assert evaluate(metrics.metrics_daily_consistent, settings).passed


def test_consistency_check_fails_on_a_wrong_bucket(
    populated: Populated, copy_of: Callable[..., Settings], instance: dg.DagsterInstance
) -> None:
    settings = copy_of(populated)
    run_job(settings, "metrics_rollup_job", instance)
    execute(
        Store(settings),
        "UPDATE metrics_daily SET jobs = jobs + 1000 WHERE job_type = "
        "(SELECT min(job_type) FROM metrics_daily)",
    )
    result = evaluate(metrics.metrics_daily_consistent, settings)
    assert not result.passed and result.metadata["mismatched"].value >= 1
    assert evaluate(metrics.metrics_hourly_consistent, settings).passed
