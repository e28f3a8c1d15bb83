"""Resources every Horizons asset, check, job and sensor gets injected.

Three of them, so a run's config page shows what it talks to:

* ``settings`` — the platform :class:`~horizons_platform.settings.Settings` (``HORIZONS_*``
  variables, optionally overridden per deployment or per test);
* ``duckdb`` — the store's client (:class:`Store`): over Quack to the consumer host that
  owns the DuckDB file, or the file itself when no host runs. Queries run on the owner
  beside the consumers and never stall them;
* ``kafka`` — the idempotent publisher (alerts, audit records, validation traffic).
"""

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr, SecretStr

from horizons_platform.kafka.producer import Publisher
from horizons_platform.settings import Settings
from horizons_platform.store.client import Store

# Runs that write the store take a slot of this pool; dagster.yaml limits it to one (run
# granularity), so two retention or rollup runs never overlap.
DUCKDB_POOL = "duckdb"


class HorizonsSettings(dg.ConfigurableResource):
    """``HORIZONS_*`` settings; ``overrides`` (field → value as text) win over the environment."""

    overrides: dict[str, str] = Field(
        default_factory=dict,
        description="Settings fields to override, e.g. {'retention_days': '30'}.",
    )

    def get(self) -> Settings:
        values = {k: json.loads(v) if k in DICT_FIELDS else v for k, v in self.overrides.items()}
        return Settings(**values)  # type: ignore[arg-type]  # text: pydantic parses it

    @classmethod
    def from_settings(cls, settings: Settings) -> "HorizonsSettings":
        """Pin every field of ``settings`` (tests, one-off runs against another store)."""
        out: dict[str, str] = {}
        for name, value in settings.model_dump(exclude_none=True).items():
            if name in DICT_FIELDS:  # HORIZONS_KAFKA__*: as JSON text, secrets in clear
                out[name] = json.dumps({k: _text(v) for k, v in value.items()})
            else:
                out[name] = _text(value)
        return cls(overrides=out)


DICT_FIELDS = ("kafka",)


def _text(value: object) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else str(value)


class DuckDBStore(dg.ConfigurableResource):
    """The platform's DuckDB connector, built from the settings."""

    settings: HorizonsSettings

    def get(self) -> Store:
        store = Store(self.settings.get())
        store.ensure_schema()
        return store


class KafkaPublisher(dg.ConfigurableResource):
    """One idempotent producer per run process, flushed when the step ends."""

    settings: HorizonsSettings
    _publisher: Publisher | None = PrivateAttr(default=None)

    def get(self) -> Publisher:
        if self._publisher is None:
            self._publisher = Publisher(self.settings.get())
        return self._publisher

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._publisher is not None:
            self._publisher.flush(10.0)

    @contextmanager
    def session(self) -> Iterator[Publisher]:
        """A publisher for code outside a run (sensors), flushed on exit."""
        publisher = Publisher(self.settings.get())
        try:
            yield publisher
        finally:
            publisher.flush(10.0)


def build_resources(settings: Settings | None = None) -> dict[str, Any]:
    """The resource dict of the code location; ``settings`` pins them (tests)."""
    base = HorizonsSettings.from_settings(settings) if settings else HorizonsSettings()
    return {
        "settings": base,
        "duckdb": DuckDBStore(settings=base),
        "kafka": KafkaPublisher(settings=base),
    }
