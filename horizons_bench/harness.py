"""The run environment every benchmark shares: a broker, per-run settings (own topics,
own DuckDB file), progress on stderr, and clean-up.

Isolation comes from names, not from new brokers: each benchmark run gets topics named
``bench-<run>-<tag>-<topic>`` and a DuckDB file of its own, so runs never see each
other's events and leave the user's ``var/horizons.duckdb`` alone.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from confluent_kafka.admin import AdminClient
from pydantic import SecretStr

from horizons_platform.kafka.admin import ensure_topics
from horizons_platform.kafka.broker import EmbeddedBroker
from horizons_platform.settings import Settings

HOST = "127.0.0.1"


class Progress:
    """Progress lines on stderr: a live status line on a terminal, sparse lines in logs."""

    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty()
        self.t0 = time.monotonic()
        self._last_status = 0.0
        self._status_open = False

    def say(self, message: str) -> None:
        if self.quiet:
            return
        self._end_status()
        print(f"[{time.monotonic() - self.t0:7.1f}s] {message}", file=self.stream, flush=True)

    def status(self, message: str) -> None:
        """A frequently updated line: redrawn in place on a TTY, every 5 s otherwise."""
        if self.quiet:
            return
        now = time.monotonic()
        if self.tty:
            line = f"[{now - self.t0:7.1f}s] {message}"
            print(f"\r{line[:150]:<150}", end="", file=self.stream, flush=True)
            self._status_open = True
        elif now - self._last_status >= 5.0:
            self._last_status = now
            self.say(message)

    def _end_status(self) -> None:
        if self._status_open:
            print(file=self.stream, flush=True)
            self._status_open = False


def settings_env(settings: Settings) -> dict[str, str]:
    """``HORIZONS_*`` variables reproducing ``settings`` in a subprocess."""
    env: dict[str, str] = {}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, dict):  # HORIZONS_KAFKA__<NAME>
            for key, item in value.items():
                secret = item.get_secret_value() if isinstance(item, SecretStr) else item
                env[f"HORIZONS_{name.upper()}__{key.upper()}"] = str(secret)
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        text = ("true" if value else "false") if isinstance(value, bool) else str(value)
        env[f"HORIZONS_{name.upper()}"] = text
    return env


def subprocess_env(settings: Settings, **extra: object) -> dict[str, str]:
    """The environment of a `horizons` subprocess that must run with ``settings``: this
    process's environment without its own HORIZONS_* variables (they would leak into the
    child), ``settings`` as HORIZONS_*, then ``extra`` settings (``name=value``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HORIZONS_")}
    env.update(settings_env(settings))
    env.update({f"HORIZONS_{k.upper()}": str(v) for k, v in extra.items()})
    return env


def derive(base: Settings, **overrides: Any) -> Settings:
    """A fresh Settings from ``base`` plus overrides (no cached properties carried over)."""
    return Settings(**{**base.model_dump(), **overrides})


@dataclass
class BenchContext:
    """One benchmark run: where its files go, which broker it talks to, how it reports."""

    base: Settings
    name: str
    run_dir: Path
    bootstrap: str
    progress: Progress = field(default_factory=Progress)
    jar_dir: Path | None = None  # Kafka jars, for ConsumerPerformance (None: skip it)
    keep_data: bool = False
    stamp: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"))
    _topics: list[str] = field(default_factory=list)

    def settings(self, tag: str, **overrides: Any) -> Settings:
        """Settings for one part of the run: own topics, own DuckDB file, topics created."""
        prefix = f"bench-{self.stamp.lower()}-{uuid.uuid4().hex[:4]}-{tag}"
        database = self.run_dir / f"{tag}.duckdb"
        n = 1
        while database.exists():  # a tag used twice in one run still gets a fresh file
            n += 1
            database = self.run_dir / f"{tag}-{n}.duckdb"
        fields: dict[str, Any] = {
            "kafka_bootstrap": self.bootstrap,
            "duckdb_path": database,
            "store_port": 0,  # any free port: runs never meet each other or `horizons up`
            "metrics_port": 0,
            # One static member id per bench run: the run's successive hosts replace each
            # other in the groups at once instead of waiting out a session timeout.
            "group_instance_id": f"bench-{self.stamp.lower()}",
            "dagster_home": self.run_dir / "dagster",
            "topic_job_lifecycle": f"{prefix}-job-lifecycle",
            "topic_job_metrics": f"{prefix}-job-metrics",
            "topic_audit_trail": f"{prefix}-audit-trail",
            "topic_system_health": f"{prefix}-system-health",
            "topic_dlq": f"{prefix}-horizons-dlq",
        }
        fields.update(overrides)
        settings = derive(self.base, **fields)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        ensure_topics(settings)
        self._topics += list(settings.topic_partitions())
        return settings

    def cleanup(self) -> None:
        """Drop the run's topics and DuckDB files unless asked to keep them (logs stay)."""
        if self.keep_data:
            return
        if self._topics:
            admin = AdminClient({"bootstrap.servers": self.bootstrap})
            with contextlib.suppress(Exception):
                for future in admin.delete_topics(self._topics, operation_timeout=30).values():
                    with contextlib.suppress(Exception):
                        future.result(timeout=30)
        for path in self.run_dir.glob("*.duckdb*"):
            path.unlink(missing_ok=True)
        shutil.rmtree(self.run_dir / "dagster", ignore_errors=True)


@contextlib.contextmanager
def broker_for(base: Settings, progress: Progress) -> Iterator[tuple[str, Path | None]]:
    """The configured cluster, or the embedded broker (started here and stopped afterwards
    only if it was not already running). Yields (bootstrap, Kafka jar folder or None)."""
    broker = EmbeddedBroker(base)
    jar_dir = broker.jar_dir if (broker.cache_dir / ".complete").exists() else None
    if base.kafka_bootstrap:
        yield base.kafka_bootstrap, jar_dir
        return
    started = False
    if not broker.is_running():
        progress.say(f"starting the embedded broker on {broker.bootstrap}")
        broker.start(progress=progress.say)
        started = True
    try:
        yield broker.bootstrap, broker.jar_dir
    finally:
        if started:
            progress.say("stopping the embedded broker this benchmark started")
            broker.stop()


def ephemeral_ports() -> tuple[int, int]:
    """The range the kernel picks outgoing connections' local ports from."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default


def free_port_block(size: int, attempts: int = 200) -> int:
    """The first of ``size`` consecutive free ports on 127.0.0.1 (an embedded cluster's
    nodes take broker_port, +1, +2, …), below the ephemeral range: a node killed and
    started again must find its port free, and while it was down any client's outgoing
    connection could have been given that port as its own (CI: a restarted node's
    controller port "already in use")."""
    rng = random.Random()
    low, high = ephemeral_ports()
    top = low if low - size > 12_000 else 65_535
    bottom = 10_000 if top == low else high + 1
    for _ in range(attempts):
        base = rng.randrange(bottom, top - size)
        sockets = []
        try:
            for port in range(base, base + size):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind((HOST, port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {size} consecutive free ports found on {HOST}")


def embedded_settings(base: Settings, data_dir: Path, brokers: int = 1) -> Settings:
    """Settings for a private embedded broker or cluster on free ports, data in data_dir."""
    port = free_port_block(2 * brokers)
    return derive(
        base,
        kafka_bootstrap=None,
        broker_port=port,
        broker_controller_port=port + 1,
        broker_count=brokers,
        var_dir=data_dir,
    )


@contextlib.contextmanager
def dedicated_broker(
    base: Settings, data_dir: Path, progress: Progress, brokers: int = 1
) -> Iterator[EmbeddedBroker]:
    """A private broker or cluster (free ports, own data) that a fault scenario may stop,
    kill and restart without disturbing anybody else's broker."""
    settings = embedded_settings(base, data_dir, brokers)
    broker = EmbeddedBroker(settings, data_dir=data_dir / "broker")
    what = "broker" if brokers == 1 else f"{brokers}-node cluster"
    progress.say(f"starting a dedicated {what} on {broker.bootstrap}")
    broker.start(progress=lambda _: None)
    try:
        yield broker
    finally:
        broker.stop()


@contextlib.contextmanager
def bench_context(
    name: str,
    base: Settings,
    progress: Progress,
    *,
    keep_data: bool = False,
) -> Iterator[BenchContext]:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    with broker_for(base, progress) as (bootstrap, jar_dir):
        ctx = BenchContext(
            base=base,
            name=name,
            run_dir=Path(base.var_dir).absolute() / "bench" / f"{name}-{stamp}",
            bootstrap=bootstrap,
            progress=progress,
            jar_dir=jar_dir,
            keep_data=keep_data,
            stamp=stamp,
        )
        try:
            yield ctx
        finally:
            ctx.cleanup()
