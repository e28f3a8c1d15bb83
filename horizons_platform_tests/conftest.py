"""Fixtures: one real Kafka broker for the session, a real SMTP sink, a DuckDB file per
test, and a consumer host running the real services.

Each test gets its own topics (unique names on the shared broker) and its own DuckDB
file, so tests never see each other's events.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from horizons_bench.harness import embedded_settings
from horizons_bench.smtp import SmtpSink
from horizons_platform.host import Host
from horizons_platform.kafka.admin import ensure_topics
from horizons_platform.kafka.broker import EmbeddedBroker
from horizons_platform.settings import SERVICE_GROUPS, Settings
from horizons_platform.store.client import Store
from horizons_platform.store.owner import free_port
from horizons_platform_tests.support import unique_topics


def _broker_jvms(data_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(str(data_dir) in arg for arg in proc.info["cmdline"] or []):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _children() -> dict[int, psutil.Process]:
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


@pytest.fixture(autouse=True)
def no_process_outlives_its_test() -> Iterator[None]:
    """A consumer host, Dagster instance or sender left running eats the cores the next
    tests time themselves on (CI has seen a 13 s query take over 120 s late in the run).
    Survivors get a few seconds to exit, then are killed and reported as a warning."""
    before = set(_children())
    yield
    survivors = [p for pid, p in _children().items() if pid not in before]
    if not survivors:
        return
    _, alive = psutil.wait_procs(survivors, timeout=10)
    for proc in alive:
        try:
            what = " ".join(proc.cmdline())[:200]
            proc.kill()
        except psutil.Error:
            continue
        warnings.warn(
            f"killed a process the test left running: pid {proc.pid}: {what}", stacklevel=1
        )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--brokers",
        type=int,
        default=int(os.environ.get("HORIZONS_TEST_BROKERS", "1")),
        help="run the scenarios on an embedded cluster of N Kafka nodes (replication "
        "factor 3, min.insync.replicas 2 from 3 nodes); default HORIZONS_TEST_BROKERS or 1",
    )


@pytest.fixture(scope="session")
def kafka_bootstrap(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[str]:
    """A real broker for the whole run: ``HORIZONS_KAFKA_BOOTSTRAP`` or an embedded one
    (a cluster with ``--brokers 3``; topics then take the cluster's 3 replicas)."""
    external = os.environ.get("HORIZONS_KAFKA_BOOTSTRAP")
    if external:
        yield external
        return
    var = tmp_path_factory.mktemp("broker")
    settings = embedded_settings(Settings(), var, brokers=pytestconfig.getoption("brokers"))
    broker = EmbeddedBroker(settings)
    broker.start(progress=lambda _: None)
    try:
        yield broker.bootstrap
    finally:
        broker.stop()
        # The run must leave no JVM behind.
        leftovers = _broker_jvms(broker.data_dir)
        for proc in leftovers:
            proc.kill()
        assert not leftovers, f"broker JVM survived the test session: {leftovers}"


@pytest.fixture
def smtp() -> Iterator[SmtpSink]:
    sink = SmtpSink().start()
    yield sink
    sink.stop()


def make_settings(bootstrap: str, var_dir: Path, smtp_port: int, **overrides: object) -> Settings:
    fields: dict[str, object] = {
        "kafka_bootstrap": bootstrap,
        "var_dir": var_dir,
        "smtp_port": smtp_port,
        "health_interval_s": 1.0,
        "broker_grace_s": 5.0,
        "smtp_backoff_initial_s": 0.2,
        "smtp_backoff_max_s": 1.0,
        "store_port": free_port(),
        "metrics_port": 0,  # any free port (Host.metrics.port)
        # Dynamic membership: the hosts of earlier tests (same group names) never hold
        # partitions for a session timeout (tests of static membership opt in).
        "group_instance_id": "",
        **unique_topics(),
    }
    fields.update(overrides)
    settings = Settings(**fields)  # type: ignore[arg-type]
    ensure_topics(settings)
    return settings


@pytest.fixture
def settings_factory(
    kafka_bootstrap: str, tmp_path: Path, smtp: SmtpSink
) -> Callable[..., Settings]:
    def factory(**overrides: object) -> Settings:
        return make_settings(kafka_bootstrap, tmp_path / "var", smtp.port, **overrides)

    return factory


@pytest.fixture
def settings(settings_factory: Callable[..., Settings]) -> Settings:
    return settings_factory()


@pytest.fixture
def store(settings: Settings) -> Store:
    s = Store(settings)
    s.ensure_schema()
    return s


@pytest.fixture
def host_factory() -> Iterator[Callable[..., Host]]:
    """Start consumer hosts in-process; every one still running is stopped at teardown."""
    hosts: list[Host] = []

    def factory(settings: Settings, groups: tuple[str, ...] = SERVICE_GROUPS) -> Host:
        host = Host(settings, groups)
        host.start()
        hosts.append(host)
        assert host.wait_ready(60), "consumers did not get their partitions within 60 s"
        return host

    yield factory
    for host in hosts:
        host.stop()
    for host in hosts:
        host.join(30)


@pytest.fixture
def host(settings: Settings, host_factory: Callable[..., Host]) -> Host:
    return host_factory(settings)
