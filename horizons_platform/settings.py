"""Every knob of the platform, in one pydantic settings model.

Each field can be set from the environment as ``HORIZONS_<FIELD>`` (upper case),
e.g. ``HORIZONS_BROKER_PORT=19092`` or ``HORIZONS_DUCKDB_PATH=/data/h.duckdb``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import socket
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# The consumer groups of the contract, in the order the host starts them.
SERVICE_GROUPS = ("notifications", "compliance-auditor", "metrics", "system-health")


class Settings(BaseSettings):
    # HORIZONS_KAFKA__<PROPERTY> fills ``kafka`` (any librdkafka property, see below).
    model_config = SettingsConfigDict(
        env_prefix="HORIZONS_", extra="ignore", env_nested_delimiter="__"
    )

    # --- state on disk -------------------------------------------------------------
    var_dir: Path = Path("var")
    duckdb_path: Path | None = None  # default: <var_dir>/horizons.duckdb
    dagster_home: Path | None = None  # default: <var_dir>/dagster
    # The Ed25519 key that signs the audit chain's heads: outside DuckDB (default
    # <var_dir>/keys/audit-signing.pem, created 0600 on first start). In production, a
    # path on a volume the database host's other users cannot read.
    audit_signing_key_file: Path | None = None
    audit_head_interval_s: float = 2.0  # a signed head at least this often while events flow
    # How long health samples and resolved alerts are kept (personal data: retention_days).
    health_retention_days: int = 30

    # --- Kafka ---------------------------------------------------------------------
    # An existing cluster; when set, the embedded broker is never started.
    kafka_bootstrap: str | None = None
    broker_port: int = 9092
    broker_controller_port: int | None = None  # default: broker_port + 1
    # Nodes of the embedded cluster (KRaft, each a broker and a controller). Node n
    # (1-based) listens on broker_port + 2(n-1) and controller_port + 2(n-1).
    broker_count: int = Field(default=1, ge=1, le=9)
    broker_heap: str = "512m"
    kafka_version: str = "4.1.1"
    kafka_cache_dir: Path = Path.home() / ".cache" / "horizons" / "kafka"
    broker_start_timeout_s: float = 60.0
    # Passed through to librdkafka for production clusters (SASL/SSL, ...).
    kafka_security_protocol: str | None = None
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_location: str | None = None
    # Any other librdkafka property, from HORIZONS_KAFKA__<NAME> with dots written as
    # underscores: HORIZONS_KAFKA__SASL_OAUTHBEARER_CLIENT_ID=… → sasl.oauthbearer.client.id.
    # Values are secrets until shown otherwise (`horizons config show` masks by name).
    kafka: dict[str, SecretStr] = Field(default_factory=dict)

    topic_job_lifecycle: str = "job-lifecycle"
    topic_job_metrics: str = "job-metrics"
    topic_audit_trail: str = "audit-trail"
    topic_system_health: str = "system-health"
    topic_dlq: str = "horizons-dlq"
    partitions_job_lifecycle: int = 6
    partitions_job_metrics: int = 6
    partitions_audit_trail: int = 3
    partitions_system_health: int = 3
    partitions_dlq: int = 3
    # Unset: 3 on an embedded cluster of 3+ nodes (else its node count); on an existing
    # cluster, the broker's default.replication.factor.
    replication_factor: int | None = None
    # Unset: 2 where topics have 3+ replicas (an acknowledged write is on two nodes),
    # else the broker's default.
    min_insync_replicas: int | None = None

    # --- consumer loop ---------------------------------------------------------------
    batch_max_messages: int = 5000
    # A batch closes after this long (or at batch_max_messages). Every batch is a DuckDB
    # transaction of a few milliseconds' fixed CPU per group whatever its size, so the
    # window sets the host's CPU more than the rate does: 100 ms rather than 50 gave
    # e-mail p99 252-477 ms instead of 493-1,509 and ~15 % less CPU at 1,000 events/s,
    # for ~25 ms more produce → stored at 200 events/s (docs/decisions.md).
    batch_max_wait_s: float = 0.1
    # Static group membership (group.instance.id = "<group>.<this>"): a host restarted
    # after a crash, or its standby, takes its partitions back at once instead of waiting
    # out the dead member's session. Unset: derived from the store file, so the owner and
    # its standbys share it; empty: dynamic membership.
    group_instance_id: str | None = None
    # How far below the consumer threads (in nice steps, Linux) the host's background
    # work runs: the outbox and its SMTP sender, the health monitor, the publication
    # dispatcher. They have seconds to spare; a group's commit does not (docs/decisions.md).
    # 0: everything at one priority.
    background_nice: int = Field(default=10, ge=0, le=19)
    broker_grace_s: float = 30.0  # how long consumers ride out a lost broker
    # How often a running group's stored offsets are compared with the cluster (a
    # replaced cluster, retention overtaking the group), off the polling thread.
    offsets_check_interval_s: float = Field(default=30.0, gt=0)
    # Logs: "text" or "json" (one object per line; read by the CLI before anything else).
    log_format: str = "text"
    # The files `horizons up` writes under var/logs roll over at this size, keeping N.
    log_max_mb: int = 20
    log_backups: int = 5
    # The host's Prometheus /metrics on 127.0.0.1 (0: any free port, logged; -1: off).
    metrics_port: int = 9464
    # How long a consumer retries a failing store (I/O error, out of memory) before it
    # stops without committing (exit 7); never dead-lettered, never skipped.
    store_retry_s: float = 30.0
    shutdown_timeout_s: float = 15.0

    # --- the store (DuckDB, owned by the consumer host, served over Quack) ---------------
    store_port: int = 9494  # 0: any free port (written to store.json)
    store_json: Path | None = None  # default: store.json beside the database
    # How long a client waits for the file or for an owner to serve it (e.g. a takeover).
    store_connect_timeout_s: float = 30.0
    # DuckDB worker threads in the owner (default: all cores but one). A client's big
    # query runs on these; the spare core keeps the consumers committing meanwhile.
    store_threads: int | None = None
    store_checkpoint_mb: int = Field(default=256, ge=1)  # WAL size that triggers a checkpoint
    # The consumers' writer cursors skip DuckDB's optimizer (StoreOwner.lean_writer).
    store_lean_writers: bool = True
    # How often the owner looks for sessions of horizons clients that died, to end them
    # (store/sessions.py: an abandoned transaction holds memory, the WAL and its rows).
    store_reap_interval_s: float = Field(default=2.0, gt=0)

    # --- notifications / SMTP ------------------------------------------------------------
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 8025
    smtp_starttls: bool = False
    smtp_ssl: bool = False  # SMTPS: TLS from the first byte (usually port 465)
    smtp_ca_file: Path | None = None  # trust this CA too (a private relay's certificate)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    # login() sends the password; without TLS anyone on the path can read it.
    smtp_allow_plaintext_auth: bool = False
    smtp_from: str = "horizons@localhost"
    smtp_timeout_s: float = 5.0
    # 10 attempts, 1 s doubling to 60 s: rides out ~4 minutes of SMTP outage.
    smtp_max_attempts: int = 10
    smtp_backoff_initial_s: float = 1.0
    smtp_backoff_max_s: float = 60.0
    notify_on_submit: bool = False
    # SMTP sessions the outbox sends over side by side (a relay that allows fewer
    # connections per client needs this lowered).
    smtp_connections: int = 16
    # Notifications the outbox holds claimed at most (queued for a session or being sent);
    # it claims more when half are gone. What is held when a process dies is claimed again
    # after a timeout and counted as a resend.
    outbox_batch: int = 400

    # --- metrics service --------------------------------------------------------------
    metrics_window_jobs: int = 10_000
    metrics_window_s: float = 3600.0

    # --- health rules ------------------------------------------------------------------
    health_interval_s: float = 5.0
    health_window_s: float = 300.0
    health_lag_messages_threshold: int = 5_000
    health_lag_seconds_threshold: float = 60.0
    health_error_rate_threshold: float = 0.05
    health_dead_letter_rate_threshold: float = 0.05
    health_min_events_for_rate: int = 20
    health_job_failures_threshold: int = 0

    # --- compliance ---------------------------------------------------------------------
    retention_days: int = 90

    # --- Dagster -----------------------------------------------------------------------
    ui_host: str = "127.0.0.1"
    ui_port: int = 3000
    report_materializations: bool = True
    materialization_interval_s: float = 10.0

    producer_name: str = Field(default="horizons-orchestrator")

    @cached_property
    def database(self) -> Path:
        return self.duckdb_path or self.var_dir / "horizons.duckdb"

    @cached_property
    def store_file(self) -> Path:
        # Beside the database (var/store.json by default), so whoever knows the file finds
        # its owner whatever else their environment says; another database in the same
        # folder gets its own (<name>.store.json).
        if self.store_json:
            return self.store_json
        db = self.database
        return db.parent / (
            "store.json" if db.name == "horizons.duckdb" else f"{db.stem}.store.json"
        )

    @cached_property
    def consumer_instance_id(self) -> str | None:
        """This host's ``group.instance.id`` stem, or None for dynamic membership."""
        if self.group_instance_id is not None:
            return self.group_instance_id or None
        digest = hashlib.sha256(str(self.database.resolve()).encode()).hexdigest()[:12]
        return f"{socket.gethostname()}-{digest}"

    @cached_property
    def dagster_dir(self) -> Path:
        return self.dagster_home or self.var_dir / "dagster"

    @cached_property
    def signing_key_file(self) -> Path:
        return self.audit_signing_key_file or self.var_dir / "keys" / "audit-signing.pem"

    @cached_property
    def broker_dir(self) -> Path:
        return self.var_dir / "broker"

    @property
    def embedded_broker(self) -> bool:
        return not self.kafka_bootstrap

    @property
    def bootstrap(self) -> str:
        if self.kafka_bootstrap:
            return self.kafka_bootstrap
        return ",".join(f"127.0.0.1:{port}" for port, _ in self.broker_nodes)

    @property
    def controller_port(self) -> int:
        return self.broker_controller_port or self.broker_port + 1

    @property
    def broker_nodes(self) -> list[tuple[int, int]]:
        """(client port, controller port) of each embedded node, node 1 first."""
        return [
            (self.broker_port + 2 * i, self.controller_port + 2 * i)
            for i in range(self.broker_count)
        ]

    @property
    def topic_replication(self) -> int:
        """Replicas per topic; -1 asks the broker for its default.replication.factor."""
        if self.replication_factor is not None:
            return self.replication_factor
        return min(3, self.broker_count) if self.embedded_broker else -1

    @property
    def topic_min_insync(self) -> int | None:
        if self.min_insync_replicas is not None:
            return self.min_insync_replicas
        return 2 if self.topic_replication >= 3 else None

    def topic_partitions(self) -> dict[str, int]:
        return {
            self.topic_job_lifecycle: self.partitions_job_lifecycle,
            self.topic_job_metrics: self.partitions_job_metrics,
            self.topic_audit_trail: self.partitions_audit_trail,
            self.topic_system_health: self.partitions_system_health,
            self.topic_dlq: self.partitions_dlq,
        }

    def kafka_config(self, **extra: Any) -> dict[str, Any]:
        """librdkafka settings shared by every client, plus ``extra``."""
        # librdkafka's own log lines go through Python logging, not straight to stderr.
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "logger": logging.getLogger("librdkafka"),
        }
        conf.update(self.kafka_properties())
        conf.update(extra)
        if "debug" in conf:
            # Debug volume through the Python logger aborts the process in confluent-kafka
            # 2.16 ("CallState_get: Assertion `cs != NULL' failed", seen with
            # HORIZONS_KAFKA__DEBUG=cgrp,consumer): librdkafka writes to stderr instead.
            conf.pop("logger")
        return conf

    def kafka_properties(self) -> dict[str, str]:
        """The librdkafka properties set by the environment (secrets in clear)."""
        password = self.kafka_sasl_password
        named = {
            "security.protocol": self.kafka_security_protocol,
            "sasl.mechanism": self.kafka_sasl_mechanism,
            "sasl.username": self.kafka_sasl_username,
            "sasl.password": password.get_secret_value() if password else None,
            "ssl.ca.location": self.kafka_ssl_ca_location,
        }
        out = {k: v for k, v in named.items() if v is not None}
        for name, value in self.kafka.items():
            out[name.lower().replace("_", ".")] = value.get_secret_value()
        return out


# librdkafka property names that hold secrets (masked by `horizons config show`).
SECRET_PROPERTY = re.compile(r"password|secret|token|credential|private|\.key\.pem$", re.I)
MASK = "********"


def effective(settings: Settings) -> dict[str, str]:
    """Every setting as the process sees it, secrets masked (`horizons config show`)."""
    out: dict[str, str] = {}
    for name in type(settings).model_fields:
        if name == "kafka":
            continue
        value = getattr(settings, name)
        out[name] = MASK if isinstance(value, SecretStr) else ("" if value is None else str(value))
    for name in ("database", "bootstrap", "store_file", "signing_key_file", "broker_dir"):
        out[f"{name} (derived)"] = str(getattr(settings, name))
    for name, value in sorted(settings.kafka_properties().items()):
        out[f"librdkafka {name}"] = MASK if SECRET_PROPERTY.search(name) else value
    return out
