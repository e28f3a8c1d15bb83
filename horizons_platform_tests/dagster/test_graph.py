"""A snapshot of the code location: an accidental change to the asset graph, the checks,
the jobs or the automation shows up here in review. Also loads the repository's
workspace.yaml / dagster.yaml the way `horizons up` does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from horizons_platform.definitions import build_definitions, defs
from horizons_platform.defs.resources import DUCKDB_POOL
from horizons_platform.launcher import prepare_dagster_home
from horizons_platform.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

ASSETS = {
    "audit_log": [],
    "job_events": [],
    "jobs": [],
    "job_metrics": [],
    "notifications": [],
    "health_signals": [],
    "dead_letters": [],
    "metrics_hourly": ["job_metrics"],
    "metrics_daily": ["job_metrics"],
    "compliance_report": ["audit_log"],
    "health_status": ["dead_letters", "health_signals"],
}
CHECKS = {
    "audit_log:audit_chain_verifies": True,
    "audit_log:audit_retention_compliant": True,
    "audit_log:audit_records_well_formed": True,
    "job_events:event_schemas_compatible": True,
    "job_events:job_events_required_fields": True,
    "job_events:job_events_per_job_ordering": True,
    "notifications:terminal_jobs_notified": True,
    "dead_letters:invalid_events_rejected_consistently": True,
    "compliance_report:compliance_report_complete": True,
    "metrics_hourly:metrics_hourly_consistent": False,
    "metrics_daily:metrics_daily_consistent": False,
    "health_status:consumer_lag_under_threshold": False,
    "health_status:error_rate_under_threshold": False,
    "health_status:dead_letter_rate_under_threshold": False,
}
JOBS = {
    "checks_job",
    "compliance_report_job",
    "retention_job",
    "metrics_rollup_job",
    "health_alert_job",
    "validation_lifecycle",
    "validation_throughput",
    "validation_latency",
    "validation_memory_bounded",
    "validation_parallel_groups",
}
SENSORS = {
    "consumer_lag_sensor": 15,
    "error_rate_sensor": 15,
    "run_failure_sensor": 15,
    "run_recovery_sensor": 15,
    "horizons_automation_sensor": 30,
}
SCHEDULES = {"retention_schedule": "0 2 * * *", "compliance_report_schedule": "30 2 * * *"}


def test_definitions_load() -> None:
    dg.Definitions.validate_loadable(defs)


def test_asset_graph_snapshot() -> None:
    graph = defs.get_repository_def().asset_graph
    got = {
        key.to_user_string(): sorted(p.to_user_string() for p in graph.get(key).parent_keys)
        for key in graph.get_all_asset_keys()
    }
    assert got == ASSETS
    external = {k.to_user_string() for k in graph.get_all_asset_keys() if graph.get(k).is_external}
    assert external == {k for k, parents in ASSETS.items() if not parents}


def test_checks_snapshot() -> None:
    graph = defs.get_repository_def().asset_graph
    got = {k.to_user_string(): graph.get_check_spec(k).blocking for k in graph.asset_check_keys}
    assert got == CHECKS


def test_jobs_sensors_schedules_snapshot() -> None:
    repo = defs.get_repository_def()
    assert {j.name for j in repo.get_all_jobs()} - {"__ASSET_JOB"} == JOBS
    sensors = {s.name: s for s in repo.sensor_defs}
    assert {n: s.minimum_interval_seconds for n, s in sensors.items()} == SENSORS
    assert all(s.default_status == dg.DefaultSensorStatus.RUNNING for s in sensors.values())
    schedules = {s.name: s for s in repo.schedule_defs}
    assert {n: s.cron_schedule for n, s in schedules.items()} == SCHEDULES
    assert all(s.default_status == dg.DefaultScheduleStatus.RUNNING for s in schedules.values())


def test_every_duckdb_writer_takes_the_pool() -> None:
    job = build_definitions().resolve_job_def
    writers = {
        "compliance_report_job": "compliance_report",
        "metrics_rollup_job": "metrics_hourly",
        "retention_job": "apply_retention",
        "health_alert_job": "raise_health_alerts",
    }
    for job_name, node in writers.items():
        assert job(job_name).graph.node_named(node).definition.pool == DUCKDB_POOL, job_name


def test_dagster_yaml_configures_pool_and_storage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As `horizons up` does it: copy the repository's dagster.yaml into DAGSTER_HOME.
    monkeypatch.setenv("DAGSTER_HOME", "unset-by-the-launcher")
    home = prepare_dagster_home(Settings(var_dir=tmp_path), ROOT)
    assert home == tmp_path / "dagster" and os.environ["DAGSTER_HOME"] == str(home)
    instance = dg.DagsterInstance.get()
    try:
        pools = instance.get_concurrency_config().pool_config
        assert pools.default_pool_limit == 1 and pools.pool_granularity.value == "run"
        assert instance.event_log_storage.supports_global_concurrency_limits
        assert not instance.telemetry_enabled
        assert (home / "history").exists()  # SQLite storage under DAGSTER_HOME
    finally:
        instance.dispose()


def test_dagster_cli_validates_the_workspace(tmp_path: Path) -> None:
    shutil.copyfile(ROOT / "dagster.yaml", tmp_path / "dagster.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "dagster", "definitions", "validate", "-w", "workspace.yaml"],
        cwd=ROOT,
        env={**os.environ, "DAGSTER_HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
