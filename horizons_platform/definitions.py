"""The Dagster code location ``horizons_platform.definitions`` (see workspace.yaml)."""

import warnings

import dagster as dg

from horizons_platform.defs import automation, compliance, health, ingest, metrics, validation
from horizons_platform.defs.resources import build_resources
from horizons_platform.settings import Settings

# Dagster itself passes the beta `owners` argument when it binds jobs to sensors.
warnings.filterwarnings(
    "ignore", message="Parameter `owners` of initializer", category=dg.BetaWarning
)


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    """The code location; ``settings`` pins the resources (tests), else HORIZONS_* apply."""
    return dg.Definitions(
        assets=[*ingest.ASSETS, *compliance.ASSETS, *metrics.ASSETS, *health.ASSETS],
        asset_checks=[*ingest.CHECKS, *compliance.CHECKS, *metrics.CHECKS, *health.CHECKS],
        jobs=[*compliance.JOBS, *metrics.JOBS, *health.JOBS, *validation.JOBS, *automation.JOBS],
        schedules=compliance.SCHEDULES,
        sensors=[*health.SENSORS, *automation.SENSORS],
        resources=build_resources(settings),
        # One DuckDB file, one writer at a time: separate step processes would only
        # queue on its lock, after paying a Python start-up each.
        executor=dg.in_process_executor,
    )


defs = build_definitions()
