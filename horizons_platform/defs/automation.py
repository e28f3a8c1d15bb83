"""Global policies applied to every asset in one place: the automation sensor and the
checks job (there is no ``dagster asset check`` command; CI and operators run this job)."""

import dagster as dg

# Declared here because Dagster's implicit automation sensor starts STOPPED: the
# derived assets' automation conditions would otherwise never fire on a fresh instance.
automation_sensor = dg.AutomationConditionSensorDefinition(
    "horizons_automation_sensor",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
    description="Evaluates the automation conditions of metrics_hourly, metrics_daily "
    "and health_status.",
)

checks_job = dg.define_asset_job(
    "checks_job",
    selection=dg.AssetSelection.all_asset_checks(),
    description="Every asset check, without materializing anything: the release gate "
    "(CI fails on any failed check).",
)

SENSORS = [automation_sensor]
JOBS = [checks_job]
