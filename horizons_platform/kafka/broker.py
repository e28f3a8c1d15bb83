"""An embedded single-node Apache Kafka broker (KRaft), run from Maven Central jars.

The jars are resolved once with Maven into a cache outside the clone
(``settings.kafka_cache_dir / settings.kafka_version``) and reused by every clone and
process afterwards. The broker runs as a detached JVM (``kafka.Kafka``) whose state
lives under ``settings.broker_dir``: ``server.properties``, ``broker.pid``,
``broker.log`` and the KRaft log directory.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from horizons_platform.settings import Settings

HOST = "127.0.0.1"
SCALA_VERSION = "2.13"
# Kafka 4.0/4.1 depend on slf4j-api 1.7, whose log4j2 binding is log4j-slf4j-impl
# (log4j-slf4j2-impl would bind nothing and the broker would log silently).
LOG4J_VERSION = "2.25.3"
MIN_JAVA = 17
LOG4J_CONFIG = Path(__file__).with_name("log4j2.properties")
MAIN_CLASS = "kafka.Kafka"
# Kafka's own launcher flags (kafka-run-class.sh), minus the 1 GiB default heap.
JVM_FLAGS = (
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
)
LOG_TAIL_LINES = 30
COMPLETE_MARKER = ".complete"
MAVEN_TIMEOUT_S = 900.0

INSTALL_JAVA_HINT = (
    "Install a Java 17+ runtime, e.g. `sudo apt-get install openjdk-17-jre-headless` "
    "(Debian/Ubuntu), `sudo dnf install java-17-openjdk-headless` (Fedora) or "
    "`brew install openjdk@17` (macOS), or set JAVA_HOME to one. "
    "To use an existing Kafka cluster instead, set HORIZONS_KAFKA_BOOTSTRAP=host:port."
)
INSTALL_MAVEN_HINT = (
    "Maven is needed once, to download the Kafka jars into {cache}. "
    "Install it with `sudo apt-get install maven` (Debian/Ubuntu) or `brew install maven` "
    "(macOS), or copy a populated {cache} from another machine."
)

POM_TEMPLATE = """\
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <!-- Written by horizons_platform.kafka.broker: the runtime classpath of the
       embedded broker, resolved with `mvn dependency:copy-dependencies`. -->
  <modelVersion>4.0.0</modelVersion>
  <groupId>horizons</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{kafka}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka_{scala}</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId>
      <version>{kafka}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""


class BrokerError(RuntimeError):
    """A broker problem, with a message that tells the user what to do about it."""


@dataclass
class BrokerStatus:
    running: bool
    pid: int | None
    port: int
    bootstrap: str
    kafka_version: str
    log_path: Path
    topics: dict[str, int] = field(default_factory=dict)


# --- prerequisites ------------------------------------------------------------------


def _java_executable() -> str | None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        candidate = Path(java_home) / "bin" / "java"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("java")


def _parse_java_major(version_output: str) -> int | None:
    match = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if not match:
        return None
    major = int(match.group(1))
    # Java 8 and older report themselves as "1.<major>".
    return int(match.group(2) or 0) if major == 1 else major


@functools.cache
def _java_major(java: str) -> int | None:
    try:
        result = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return _parse_java_major(result.stderr + result.stdout)


def _require_java() -> str:
    java = _java_executable()
    if java is None:
        raise BrokerError(f"Java was not found on PATH (or in JAVA_HOME). {INSTALL_JAVA_HINT}")
    major = _java_major(java)
    if major is None or major < MIN_JAVA:
        found = f"Java {major}" if major else "a Java whose version could not be read"
        raise BrokerError(
            f"Apache Kafka needs Java {MIN_JAVA}+, but {java} is {found}. {INSTALL_JAVA_HINT}"
        )
    return java


def _require_maven(cache: Path) -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        hint = INSTALL_MAVEN_HINT.format(cache=cache)
        raise BrokerError(f"Maven (mvn) was not found on PATH. {hint}")
    return mvn


# --- small helpers -------------------------------------------------------------------


def _random_cluster_id() -> str:
    """A cluster id as ``StorageTool random-uuid`` makes one, without starting a JVM."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        # Kafka rejects ids starting with "-": they would read as command-line flags.
        if not text.startswith("-"):
            return text


def _last_lines(text: str, lines: int = LOG_TAIL_LINES) -> str:
    # Maven colours its output even in batch mode; escape codes only garble a message.
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return "\n".join(line for line in plain.splitlines()[-lines:] if line.strip())


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 256 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log written)"
    return _last_lines(text, lines)


def _port_owner(port: int) -> str:
    """Best-effort description of who listens on ``port`` (may need privileges)."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                if conn.pid is None:
                    break
                proc = psutil.Process(conn.pid)
                return f"{proc.name()} (pid {conn.pid})"
    except (psutil.Error, OSError):
        pass
    return "another process"


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Like the JVM, ignore TIME_WAIT leftovers of a broker we just stopped.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def _accepts_connections(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _server_properties(log_dir: Path, port: int, controller_port: int) -> str:
    props = {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"{HOST}:{controller_port}",
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dir),
        "num.partitions": "1",
        # One node: every internal topic must fit on it.
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "3",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        # Tests and `horizons up` start consumers right away; the default 3 s delay
        # only helps when many members join a group at once.
        "group.initial.rebalance.delay.ms": "0",
    }
    header = "# Written by horizons_platform.kafka.broker on every start; edits are lost.\n"
    return header + "".join(f"{key}={value}\n" for key, value in props.items())


# --- the broker ----------------------------------------------------------------------


class EmbeddedBroker:
    """Start, stop and inspect the single-node development broker."""

    def __init__(self, settings: Settings, *, data_dir: Path | None = None) -> None:
        self.settings = settings
        self.data_dir = Path(data_dir or settings.broker_dir).absolute()
        self.properties_path = self.data_dir / "server.properties"
        self.pid_path = self.data_dir / "broker.pid"
        self.log_path = self.data_dir / "broker.log"
        self.kraft_dir = self.data_dir / "kraft"
        self.cache_dir = (Path(settings.kafka_cache_dir) / settings.kafka_version).absolute()
        self.jar_dir = self.cache_dir / "libs"
        # Set when this object started the JVM, so stop() can reap it (no zombie).
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.settings.broker_port}"

    @property
    def kafka_version(self) -> str:
        for jar in self.jar_dir.glob(f"kafka_{SCALA_VERSION}-*.jar"):
            match = re.fullmatch(rf"kafka_{re.escape(SCALA_VERSION)}-(\d[\w.]*)\.jar", jar.name)
            if match:
                return match.group(1)
        return self.settings.kafka_version

    # --- jars --------------------------------------------------------------------------

    def ensure_jars(self, progress: Callable[[str], None] = print) -> Path:
        """Return the folder of Kafka's runtime jars, resolving them on first use."""
        marker = self.cache_dir / COMPLETE_MARKER
        if marker.exists():
            return self.jar_dir
        lock = self.cache_dir.with_name(f"{self.cache_dir.name}.lock")
        with _file_lock(lock):
            # Another process may have finished the download while we waited.
            if marker.exists():
                return self.jar_dir
            self._resolve_jars(progress)
            jars = len(list(self.jar_dir.glob("*.jar")))
            marker.write_text(f"{jars} jars\n")
        return self.jar_dir

    def _resolve_jars(self, progress: Callable[[str], None]) -> None:
        mvn = _require_maven(self.cache_dir)
        version = self.settings.kafka_version
        progress(
            f"Downloading Apache Kafka {version} jars from Maven Central into "
            f"{self.cache_dir} (one time, ~55 MB)..."
        )
        # No marker means a previous attempt died half-way: start from scratch.
        shutil.rmtree(self.jar_dir, ignore_errors=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        pom = self.cache_dir / "pom.xml"
        pom.write_text(POM_TEMPLATE.format(kafka=version, scala=SCALA_VERSION, log4j=LOG4J_VERSION))
        command = [
            mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies",
            f"-DoutputDirectory={self.jar_dir}", "-DincludeScope=runtime",
        ]  # fmt: skip
        started = time.monotonic()
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=MAVEN_TIMEOUT_S, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise BrokerError(
                f"Maven did not finish resolving Kafka {version} within {MAVEN_TIMEOUT_S:.0f} s. "
                "Check the network (or the proxy in ~/.m2/settings.xml) and retry."
            ) from exc
        if result.returncode != 0 or not any(self.jar_dir.glob(f"kafka_{SCALA_VERSION}-*.jar")):
            output = _last_lines(result.stdout + result.stderr)
            raise BrokerError(
                f"Maven could not resolve Apache Kafka {version} from Maven Central "
                f"(`{' '.join(command)}` exited {result.returncode}). Check that "
                "HORIZONS_KAFKA_VERSION names a released 4.x version and that Maven Central "
                f"is reachable (proxy settings live in ~/.m2/settings.xml).\n{output}"
            )
        progress(f"Kafka jars ready in {time.monotonic() - started:.1f} s.")

    # --- lifecycle ---------------------------------------------------------------------

    def start(self, progress: Callable[[str], None] = print) -> BrokerStatus:
        """Start the broker unless it runs already; return once it answers metadata."""
        if self.is_running():
            status = self.status()
            progress(f"Kafka broker already running at {self.bootstrap} (pid {status.pid}).")
            return status
        java = _require_java()
        jar_dir = self.ensure_jars(progress)
        self._check_ports_free()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ports = (self.settings.broker_port, self.settings.controller_port)
        self.properties_path.write_text(_server_properties(self.kraft_dir, *ports))
        self._format_storage(java, jar_dir, progress)
        progress(f"Starting Kafka {self.kafka_version} broker at {self.bootstrap}...")
        started = time.monotonic()
        proc = self._launch(java, jar_dir)
        self._wait_until_ready(proc)
        progress(
            f"Kafka broker ready at {self.bootstrap} (pid {proc.pid}) in "
            f"{time.monotonic() - started:.1f} s; log: {self.log_path}"
        )
        return self.status()

    def _check_ports_free(self) -> None:
        roles = {"client": self.settings.broker_port, "controller": self.settings.controller_port}
        for role, port in roles.items():
            if not _port_is_free(port):
                raise BrokerError(
                    f"Port {port} on {HOST} (the broker's {role} port) is already in use by "
                    f"{_port_owner(port)}. Stop that process, or choose free ports with "
                    "HORIZONS_BROKER_PORT / HORIZONS_BROKER_CONTROLLER_PORT, or use a running "
                    "cluster with HORIZONS_KAFKA_BOOTSTRAP=host:port."
                )

    def _format_storage(self, java: str, jar_dir: Path, progress: Callable[[str], None]) -> None:
        if (self.kraft_dir / "meta.properties").exists():
            return
        progress(f"Formatting KRaft storage in {self.kraft_dir}...")
        command = [
            java, "-cp", f"{jar_dir}/*", f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "kafka.tools.StorageTool", "format", "-t", _random_cluster_id(),
            "-c", str(self.properties_path), "--standalone", "--ignore-formatted",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            output = _last_lines(result.stdout + result.stderr)
            raise BrokerError(
                f"Formatting the broker storage in {self.kraft_dir} failed "
                f"(exit {result.returncode}). If the folder holds data from another setup, "
                f"remove {self.data_dir} and start again.\n{output}"
            )

    def _launch(self, java: str, jar_dir: Path) -> subprocess.Popen[bytes]:
        if self.log_path.exists():
            # Keep the previous run's log: it explains why a restart was needed.
            self.log_path.replace(self.log_path.with_name("broker.log.1"))
        command = [
            java, f"-Xmx{self.settings.broker_heap}", *JVM_FLAGS,
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}", "-cp", f"{jar_dir}/*",
            MAIN_CLASS, str(self.properties_path),
        ]  # fmt: skip
        with self.log_path.open("wb") as log:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                # Its own session: a Ctrl-C aimed at the CLI or a test run must not
                # kill the broker behind the caller's back; stop() is the way.
                start_new_session=True,
            )
        self._proc = proc
        self.pid_path.write_text(f"{proc.pid}\n")
        return proc

    def _wait_until_ready(self, proc: subprocess.Popen[bytes]) -> None:
        timeout = self.settings.broker_start_timeout_s
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._forget_pid()
                raise BrokerError(
                    f"The Kafka broker exited during start-up (exit {proc.returncode}). "
                    f"Last lines of {self.log_path}:\n{_tail(self.log_path)}"
                )
            if self._answers_metadata():
                return
            time.sleep(0.2)
        tail = _tail(self.log_path)
        self.stop(timeout=10)
        raise BrokerError(
            f"The Kafka broker did not answer at {self.bootstrap} within {timeout:.0f} s "
            f"(HORIZONS_BROKER_START_TIMEOUT_S); it was stopped. Last lines of "
            f"{self.log_path}:\n{tail}"
        )

    def _answers_metadata(self) -> bool:
        # Probe the socket first: librdkafka logs every refused connection to stderr.
        if not _accepts_connections(self.settings.broker_port):
            return False
        return self._list_topics(2.0) is not None

    def stop(self, timeout: float = 30) -> bool:
        """Stop our broker (SIGTERM, then SIGKILL after ``timeout``); True if one ran."""
        proc = self._our_process()
        if proc is None:
            self._forget_pid()
            return False
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
        if not self._wait_exit(proc, timeout):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
            self._wait_exit(proc, 10)
        self._forget_pid()
        return True

    def _wait_exit(self, proc: psutil.Process, timeout: float) -> bool:
        try:
            if self._proc is not None and self._proc.pid == proc.pid:
                # Our own child: wait through Popen so it is reaped and not left a zombie.
                self._proc.wait(timeout)
            else:
                proc.wait(timeout)
        except (subprocess.TimeoutExpired, psutil.TimeoutExpired):
            return False
        except psutil.NoSuchProcess:
            pass
        return True

    def _forget_pid(self) -> None:
        self.pid_path.unlink(missing_ok=True)
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    # --- inspection --------------------------------------------------------------------

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _our_process(self) -> psutil.Process | None:
        """The broker process named by the pid file, if it is really ours and alive.

        A pid file can outlive its process and the pid can be reused, so the process
        must also be a ``kafka.Kafka`` JVM running our properties file.
        """
        pid = self._read_pid()
        if pid is None:
            return None
        if self._proc is not None and self._proc.pid == pid:
            self._proc.poll()  # reaps our child if it died, so it reads as gone
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            cmdline = proc.cmdline()
        except psutil.Error:
            return None
        if MAIN_CLASS in cmdline and str(self.properties_path) in cmdline:
            return proc
        return None

    def is_running(self) -> bool:
        if self._our_process() is not None:
            return True
        if self.pid_path.exists():
            self._forget_pid()  # stale: its process is gone or is someone else's
        return False

    def status(self) -> BrokerStatus:
        proc = self._our_process()
        if proc is None and self.pid_path.exists():
            self._forget_pid()
        topics = (self._list_topics(5.0) or {}) if proc is not None else {}
        return BrokerStatus(
            running=proc is not None,
            pid=proc.pid if proc is not None else None,
            port=self.settings.broker_port,
            bootstrap=self.bootstrap,
            kafka_version=self.kafka_version,
            log_path=self.log_path,
            topics=topics,
        )

    def _list_topics(self, timeout: float) -> dict[str, int] | None:
        """Topic -> partition count, internal topics left out; None if unreachable."""
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        try:
            metadata = admin.list_topics(timeout=timeout)
        except KafkaException:
            return None
        return {
            name: len(topic.partitions)
            for name, topic in sorted(metadata.topics.items())
            if not name.startswith("__")
        }
