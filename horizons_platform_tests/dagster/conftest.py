"""Fixtures for the Dagster layer: a DuckDB file filled by real traffic through the real
broker and consumers (shared, read-only: tests that break data work on a copy), and
helpers to run the code location's jobs and checks in-process."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from horizons_bench.smtp import SmtpSink
from horizons_platform.definitions import build_definitions
from horizons_platform.defs.resources import build_resources
from horizons_platform.defs.validation import Probe
from horizons_platform.host import Host
from horizons_platform.kafka.admin import end_offsets
from horizons_platform.kafka.producer import Publisher
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.settings import Settings
from horizons_platform.simulate import JobPlan, plan, run_simulation
from horizons_platform.store.client import Store
from horizons_platform.waiting import wait_until
from horizons_platform_tests.conftest import make_settings


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Dagster's own internals: it passes the beta `owners` argument when binding sensors
    # to jobs, and calls a deprecated accessor when initialising nested resources.
    quiet = [
        pytest.mark.filterwarnings("ignore:Parameter `owners`"),
        pytest.mark.filterwarnings("ignore:InitResourceContext.dagster_run is deprecated"),
    ]
    for item in items:
        if "/dagster/" in str(item.path):
            for mark in quiet:
                item.add_marker(mark)


@dataclass
class Populated:
    """A finished traffic run: settings pointing at its DuckDB file and topics."""

    settings: Settings
    jobs: list[JobPlan]
    events: int
    bad_messages: int


def caught_up(settings: Settings, timeout: float = 60.0) -> None:
    """Wait until every consumer group stored offsets up to the topics' current ends."""
    probe = Probe(Store(settings), settings)
    ends = end_offsets(settings, list(settings.topic_partitions()))
    wait_until(
        lambda: not any(probe.behind(ends).values()),
        timeout=timeout,
        what="every consumer group to catch up",
    )


def missing_fields_event(job_id: str) -> bytes:
    """Valid JSON, but a job.submitted without its owner (scenario 9)."""
    event = {
        "event_id": str(uuid.uuid4()),
        "event_type": "job.submitted",
        "job_id": job_id,
        "occurred_at": datetime.now(UTC).isoformat(),
        "producer": "test",
        "payload": {"job_type": "imaging"},
    }
    return json.dumps(event).encode()


@pytest.fixture(scope="session")
def populated(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Populated:
    """40 simulated jobs (some failed or cancelled) plus two bad messages, fully consumed."""
    smtp = SmtpSink().start()
    var = tmp_path_factory.mktemp("populated") / "var"
    settings = make_settings(kafka_bootstrap, var, smtp.port)
    host = Host(settings)
    host.start()
    try:
        assert host.wait_ready(60)
        jobs = plan(40, seed=3, fail_rate=0.2, cancel_rate=0.15, prefix="pop")
        events = run_simulation(JobOrchestratorService(settings, recover=False, wait=False), jobs)
        publisher = Publisher(settings)
        publisher.send(settings.topic_job_lifecycle, b"{corrupted json", key="pop-bad")
        publisher.send(
            settings.topic_job_lifecycle, missing_fields_event("pop-missing"), key="pop-missing"
        )
        caught_up(settings)
        store = Store(settings)
        wait_until(
            lambda: store.scalar("SELECT count(*) FROM notifications WHERE status <> 'sent'") == 0,
            timeout=30,
            what="every notification sent",
        )
    finally:
        host.stop()
        host.join(30)
        smtp.stop()
    return Populated(settings, jobs, events, bad_messages=2)


def pinned(settings: Settings, **overrides: Any) -> Settings:
    """The same settings with some fields replaced (a fresh model: no cached paths)."""
    return Settings(**{**settings.model_dump(), **overrides})


@pytest.fixture
def copy_of(tmp_path: Path) -> Any:
    """A private copy of a populated DuckDB file, for tests that damage data."""

    def make(populated: Populated, **overrides: Any) -> Settings:
        target = tmp_path / f"copy-{uuid.uuid4().hex[:6]}.duckdb"
        shutil.copyfile(populated.settings.database, target)
        return pinned(populated.settings, duckdb_path=target, **overrides)

    return make


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as inst:
        yield inst


def run_job(
    settings: Settings,
    name: str,
    instance: dg.DagsterInstance | None = None,
    run_config: dict[str, Any] | None = None,
    raise_on_error: bool = True,
) -> dg.ExecuteInProcessResult:
    defs = build_definitions(settings)
    return defs.resolve_job_def(name).execute_in_process(
        run_config=run_config, instance=instance, raise_on_error=raise_on_error
    )


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    """Check name → its evaluation, from a run."""
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def resources(settings: Settings) -> dict[str, Any]:
    return build_resources(settings)


def execute(store: Store, sql: str, params: list[Any] | None = None) -> None:
    with store.transaction() as con:
        con.execute(sql, params or [])
