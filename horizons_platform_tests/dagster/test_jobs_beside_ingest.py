"""Dagster's writing and scanning jobs run beside a consumer host at full speed: they are
clients of the owner, so they succeed and the consumers never fall behind.

Before the store had one owner, every Dagster run took the DuckDB file away from the
consumers for as long as it worked."""

from __future__ import annotations

import threading
from pathlib import Path

import dagster as dg

from horizons_bench.offsets import OffsetProbe
from horizons_platform.services.orchestrator import JobOrchestratorService
from horizons_platform.services.registry import group_topics
from horizons_platform.settings import Settings
from horizons_platform.simulate import plan, run_simulation
from horizons_platform.store.endpoint import read_owner
from horizons_platform.waiting import wait_until
from horizons_platform_tests.dagster.conftest import run_job
from horizons_platform_tests.support import start_consumer, stop_consumer

JOBS = ("compliance_report_job", "retention_job", "metrics_rollup_job", "checks_job")


def test_report_retention_and_checks_succeed_while_the_host_streams(
    settings: Settings, instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    host_log = tmp_path / "host.log"
    host = start_consumer(settings, host_log)
    stop = threading.Event()
    try:
        wait_until(lambda: read_owner(settings), timeout=60, what="the host serving the store")
        probe = OffsetProbe(settings, group_topics(settings))
        orch = JobOrchestratorService(settings, recover=False, wait=False)
        traffic = threading.Thread(
            target=run_simulation,
            # ~200 s at 1,000/s, more than the jobs take even on a loaded machine (CI once
            # saw a 40 s stream end first); stopped as soon as they are done.
            args=(orch, plan(50_000, seed=5, prefix="dj")),
            kwargs={"rate": 1000.0, "stop": stop},
            daemon=True,
        )
        traffic.start()
        wait_until(
            lambda: all(s.done for s in probe.snapshot().values()),
            timeout=60,
            what="every group committing",
        )
        worst: dict[str, int] = {}

        def watch() -> None:
            while not stop.wait(0.2):
                for group, state in probe.snapshot().items():
                    worst[group] = max(worst.get(group, 0), state.lag)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        outcomes = {}
        for name in JOBS:
            result = run_job(settings, name, instance, raise_on_error=False)
            failures = [
                (e.check_name, e.description)
                for e in result.get_asset_check_evaluations()
                if not e.passed and e.severity == dg.AssetCheckSeverity.ERROR
            ]
            outcomes[name] = (result.success, failures)
        assert traffic.is_alive(), "the stream ended before the jobs did: not measured beside it"
        stop.set()
        watcher.join(10)
        print(f"\njobs: {outcomes}\nworst lag per group while they ran: {worst}")
        assert all(ok for ok, _ in outcomes.values()), outcomes
        threshold = settings.health_lag_messages_threshold
        assert worst and max(worst.values()) < threshold, worst
        traffic.join(60)
    finally:
        stop.set()
        stop_consumer(host, host_log)
