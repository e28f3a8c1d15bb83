"""The four consumer services by consumer-group name."""

from __future__ import annotations

from horizons_platform.kafka.records import Handler
from horizons_platform.services.audit import AuditHandler
from horizons_platform.services.health import HealthHandler
from horizons_platform.services.metrics import MetricsHandler
from horizons_platform.services.notifications import NotificationHandler
from horizons_platform.settings import SERVICE_GROUPS, Settings

HANDLERS: dict[str, type[Handler]] = {
    "notifications": NotificationHandler,
    "compliance-auditor": AuditHandler,
    "metrics": MetricsHandler,
    "system-health": HealthHandler,
}
assert tuple(HANDLERS) == SERVICE_GROUPS


def group_topics(settings: Settings) -> dict[str, list[str]]:
    return {group: cls(settings).topics() for group, cls in HANDLERS.items()}
