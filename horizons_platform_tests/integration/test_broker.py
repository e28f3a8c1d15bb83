"""The embedded Kafka broker against a real JVM: start, inspect, stop, and refuse safely."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from horizons_bench.harness import free_port_block
from horizons_platform.kafka.broker import BrokerError, EmbeddedBroker
from horizons_platform.settings import Settings


def make_broker(tmp_path: Path, **overrides: object) -> EmbeddedBroker:
    port = free_port_block(2)
    fields: dict[str, object] = {
        "broker_port": port,
        "broker_controller_port": port + 1,
        "var_dir": tmp_path,
    }
    fields.update(overrides)
    return EmbeddedBroker(Settings(**fields))  # type: ignore[arg-type]


def jvms_using(data_dir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if any(str(data_dir) in arg for arg in cmdline):
            found.append(proc)
    return found


def create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, partitions, 1)]).values():
        future.result(timeout=30)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    embedded = make_broker(tmp_path)
    yield embedded
    # A failing test must not leave a JVM behind for the next one.
    embedded.stop(timeout=10)


def test_ensure_jars_resolves_once_then_reuses(broker: EmbeddedBroker) -> None:
    first = broker.ensure_jars(progress=lambda _: None)
    started = time.monotonic()
    second = broker.ensure_jars(progress=lambda _: None)
    assert time.monotonic() - started < 2
    assert first == second
    assert any(first.glob("kafka_2.13-*.jar"))
    assert (first.parent / "pom.xml").is_file()


def test_start_status_stop_twice(broker: EmbeddedBroker) -> None:
    for cycle in range(2):
        started = broker.start(progress=lambda _: None)
        assert started.running
        assert started.pid is not None
        assert started.bootstrap == broker.bootstrap
        assert started.kafka_version == broker.settings.kafka_version

        if cycle == 0:
            create_topic(broker.bootstrap, "job-lifecycle", 6)
        status = broker.status()
        assert status.running and status.pid == started.pid
        # The topic made in the first run survives the restart; internals stay hidden.
        assert status.topics == {"job-lifecycle": 6}
        assert broker.pid_path.exists()
        assert broker.log_path.stat().st_size > 0

        assert broker.stop() is True
        stopped = broker.status()
        assert not stopped.running
        assert stopped.pid is None
        assert stopped.topics == {}
        assert not broker.pid_path.exists()
        assert jvms_using(broker.data_dir) == []
    assert broker.stop() is False


def test_a_broker_started_by_a_process_ignoring_sigterm_still_stops_cleanly(
    broker: EmbeddedBroker,
) -> None:
    # Dagster's setup_interrupt_handlers copies SIGINT's disposition to SIGTERM, and
    # SIGINT is ignored in a process started in a script's background (CI): a JVM that
    # inherits an ignored SIGTERM never runs its shutdown, and stop() had to SIGKILL it.
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        broker.start(progress=lambda _: None)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert broker.stop() is True
    log = broker.log_path.read_text(errors="replace")
    assert "Transition from SHUTTING_DOWN to SHUTDOWN" in log, log[-2000:]


def test_start_when_running_is_a_noop(broker: EmbeddedBroker) -> None:
    first = broker.start(progress=lambda _: None)
    messages: list[str] = []
    # A second object, as a second `horizons broker start` would create.
    again = EmbeddedBroker(broker.settings).start(progress=messages.append)
    assert again.pid == first.pid
    assert any("already running" in message for message in messages)
    assert len(jvms_using(broker.data_dir)) == 1


@pytest.mark.parametrize("busy", ["broker_port", "broker_controller_port"])
def test_port_in_use_is_refused(tmp_path: Path, busy: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        broker = make_broker(tmp_path, **{busy: port})
        with pytest.raises(BrokerError, match=str(port)):
            broker.start(progress=lambda _: None)
    assert not broker.pid_path.exists()
    assert jvms_using(broker.data_dir) == []


def test_stale_pid_file_is_cleaned_and_never_killed(broker: EmbeddedBroker) -> None:
    broker.data_dir.mkdir(parents=True)
    # A live pid that is not our broker: this very test process.
    broker.pid_path.write_text(f"{os.getpid()}\n")
    assert broker.is_running() is False
    assert not broker.pid_path.exists()

    broker.pid_path.write_text(f"{os.getpid()}\n")
    assert broker.stop() is False
    assert not broker.pid_path.exists()


def test_broker_exiting_early_reports_its_log(tmp_path: Path) -> None:
    # Far too small a heap: the JVM refuses to start, as a real misconfiguration would.
    broker = make_broker(tmp_path, broker_heap="1k")
    with pytest.raises(BrokerError, match=r"exited during start-up(.|\n)*heap"):
        broker.start(progress=lambda _: None)
    assert not broker.pid_path.exists()
    assert jvms_using(broker.data_dir) == []


def test_topics_take_the_session_clusters_replication(
    settings: Settings, pytestconfig: pytest.Config
) -> None:
    # With --brokers 3 every scenario runs on three replicas, two of them in sync for a
    # write; on one node, on one. (A silently single-replica "cluster run" proves nothing.)
    if os.environ.get("HORIZONS_KAFKA_BOOTSTRAP"):
        pytest.skip("an external cluster decides its own replication")
    brokers = pytestconfig.getoption("brokers")
    admin = AdminClient({"bootstrap.servers": settings.bootstrap})
    meta = admin.list_topics(timeout=10)
    assert len(meta.brokers) == brokers
    topic = meta.topics[settings.topic_job_lifecycle]
    assert {len(p.replicas) for p in topic.partitions.values()} == {min(3, brokers)}
    resource = ConfigResource(ConfigResource.Type.TOPIC, settings.topic_job_lifecycle)
    config = admin.describe_configs([resource])[resource].result(timeout=10)
    assert config["min.insync.replicas"].value == ("2" if brokers >= 3 else "1")


@pytest.mark.slow  # three JVMs started and stopped through the CLI: ~30 s
def test_cluster_commands_start_inspect_kill_restart_stop(tmp_path: Path) -> None:
    port = free_port_block(6)
    env = {
        **os.environ,
        "HORIZONS_VAR_DIR": str(tmp_path),
        "HORIZONS_BROKER_PORT": str(port),
    }
    env.pop("HORIZONS_KAFKA_BOOTSTRAP", None)
    env.pop("HORIZONS_BROKER_COUNT", None)

    def horizons(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "horizons_platform.cli", "broker", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    try:
        started = horizons("start", "--brokers", "3")
        assert started.returncode == 0, started.stderr
        assert "HORIZONS_BROKER_COUNT=3" in started.stdout  # tells the user what to export
        # Later commands find the cluster without --brokers.
        status = horizons("status")
        assert status.returncode == 0, status.stdout
        assert (
            status.stdout.count(" up ") == 3 and "under-replicated partitions: 0" in status.stdout
        )

        assert horizons("kill", "2").returncode == 0
        down = horizons("status")
        assert down.returncode == 1 and "DOWN" in down.stdout
        assert horizons("kill", "4").returncode == 1  # no such node: a clear error
        assert horizons("restart", "2").returncode == 0
        back = horizons("status")
        assert "DOWN" not in back.stdout
    finally:
        stopped = horizons("stop")
    assert stopped.returncode == 0 and "broker stopped" in stopped.stdout
    assert jvms_using(tmp_path / "broker") == []
