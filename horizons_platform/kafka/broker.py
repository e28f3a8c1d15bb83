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
from confluent_kafka.admin import AdminClient, ClusterMetadata

from horizons_platform.kafka.admin import short_of_replicas
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


def _default_stop_signals() -> None:
    """In the broker's process, between fork and exec: SIGTERM, SIGINT and SIGHUP back to
    their defaults. An ignored signal stays ignored across exec, and a JVM started with
    SIGTERM ignored never runs its shutdown: stop() then waits 30 s, SIGKILLs it, and
    the next start waits out the dead broker's registration. A parent can ignore SIGTERM
    without knowing: Dagster's setup_interrupt_handlers copies SIGINT's disposition to
    SIGTERM, and SIGINT is ignored in any process started in the background of a script
    (CI's test run: every broker stop took 30 s)."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


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
    nodes: list[NodeStatus] = field(default_factory=list)
    # "topic[partition]" with fewer in-sync replicas than replicas, or no leader.
    under_replicated: list[str] = field(default_factory=list)


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


def listener_pid(port: int) -> int | None:
    """The process listening on TCP ``port`` on this machine (best effort: may need
    privileges)."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN:
                return conn.pid
    return None


def _port_owner(port: int) -> str:
    """Best-effort description of who listens on ``port``."""
    pid = listener_pid(port)
    if pid is not None:
        with contextlib.suppress(psutil.Error):
            return f"{psutil.Process(pid).name()} (pid {pid})"
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


def _server_properties(node_id: int, nodes: list[tuple[int, int]], log_dir: Path) -> str:
    """One node's configuration. Every node is a broker and a controller (combined mode):
    a three-controller quorum survives the loss of any one node, and on a two-core box
    three JVMs are the most that fit beside the platform (separate controllers would
    double them; Kafka recommends them for production, where this file is not used)."""
    port, controller_port = nodes[node_id - 1]
    count = len(nodes)
    replicas = str(min(3, count))
    min_isr = "2" if count >= 3 else "1"
    props = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dir),
        "num.partitions": "1",
        # Internal topics replicated like ours: losing one node loses no group offset.
        "default.replication.factor": replicas,
        "min.insync.replicas": min_isr,
        "offsets.topic.replication.factor": replicas,
        "offsets.topic.num.partitions": "3",
        "transaction.state.log.replication.factor": replicas,
        "transaction.state.log.min.isr": min_isr,
        "share.coordinator.state.topic.replication.factor": replicas,
        "share.coordinator.state.topic.min.isr": min_isr,
        # Tests and `horizons up` start consumers right away; the default 3 s delay
        # only helps when many members join a group at once.
        "group.initial.rebalance.delay.ms": "0",
    }
    if count == 1:
        props["controller.quorum.bootstrap.servers"] = f"{HOST}:{controller_port}"
    else:
        # A static quorum: the voters are fixed by configuration, formatted alike.
        props["controller.quorum.voters"] = ",".join(
            f"{n}@{HOST}:{c}" for n, (_, c) in enumerate(nodes, start=1)
        )
        # A killed node is fenced, and its partitions led elsewhere, after 3 s instead
        # of 9: drills (and a development cluster) fail over in seconds.
        props["broker.session.timeout.ms"] = "3000"
        props["broker.heartbeat.interval.ms"] = "1000"
        props["replica.lag.time.max.ms"] = "10000"
        # acks=all waits for the followers' next fetch; at the default 500 ms the p99 of
        # produce → consume was 536 ms here, at 100 ms 141 ms (idle CPU: 20 → 33 % of
        # a core for the three nodes; 50 ms cost 52 % for no better p99).
        props["replica.fetch.wait.max.ms"] = "100"
    header = "# Written by horizons_platform.kafka.broker on every start; edits are lost.\n"
    return header + "".join(f"{key}={value}\n" for key, value in props.items())


# --- one node ----------------------------------------------------------------------


class BrokerNode:
    """One KRaft node: its JVM, properties, pid file and log under ``data_dir``."""

    def __init__(self, settings: Settings, node_id: int, data_dir: Path) -> None:
        self.settings = settings
        self.node_id = node_id
        self.port, self.controller_port = settings.broker_nodes[node_id - 1]
        self.data_dir = data_dir
        self.properties_path = data_dir / "server.properties"
        self.pid_path = data_dir / "broker.pid"
        self.log_path = data_dir / "broker.log"
        self.kraft_dir = data_dir / "kraft"
        # Set when this object started the JVM, so stop() can reap it (no zombie).
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    def check_ports_free(self) -> None:
        roles = {"client": self.port, "controller": self.controller_port}
        for role, port in roles.items():
            if not _port_is_free(port):
                raise BrokerError(
                    f"Port {port} on {HOST} (node {self.node_id}'s {role} port) is already in "
                    f"use by {_port_owner(port)}. Stop that process, or choose free ports with "
                    "HORIZONS_BROKER_PORT / HORIZONS_BROKER_CONTROLLER_PORT, or use a running "
                    "cluster with HORIZONS_KAFKA_BOOTSTRAP=host:port."
                )

    def write_properties(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.properties_path.write_text(
            _server_properties(self.node_id, self.settings.broker_nodes, self.kraft_dir)
        )

    def format_storage(self, java: str, jar_dir: Path, cluster_id: str, standalone: bool) -> None:
        if (self.kraft_dir / "meta.properties").exists():
            return
        command = [
            java, "-cp", f"{jar_dir}/*", f"-Dlog4j2.configurationFile={LOG4J_CONFIG}",
            "kafka.tools.StorageTool", "format", "-t", cluster_id,
            "-c", str(self.properties_path), "--ignore-formatted",
        ]  # fmt: skip
        if standalone:
            command.append("--standalone")
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            output = _last_lines(result.stdout + result.stderr)
            raise BrokerError(
                f"Formatting the broker storage in {self.kraft_dir} failed "
                f"(exit {result.returncode}). If the folder holds data from another setup, "
                f"remove {self.data_dir} and start again.\n{output}"
            )

    def launch(self, java: str, jar_dir: Path) -> subprocess.Popen[bytes]:
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
                preexec_fn=_default_stop_signals,
            )
        self._proc = proc
        self.pid_path.write_text(f"{proc.pid}\n")
        return proc

    def exited(self) -> int | None:
        """The exit code of the JVM this object launched, once it has exited."""
        return None if self._proc is None else self._proc.poll()

    def answers_metadata(self) -> bool:
        # Probe the socket first: librdkafka logs every refused connection to stderr.
        if not _accepts_connections(self.port):
            return False
        return _list_topics(self.bootstrap, 2.0) is not None

    def signal(self, sig: signal.Signals) -> psutil.Process | None:
        proc = self.process()
        if proc is not None:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(sig)
        return proc

    def kill(self) -> bool:
        """SIGKILL: a node lost without warning (fault drills). True if one ran."""
        proc = self.signal(signal.SIGKILL)
        if proc is None:
            return False
        self.wait_exit(proc, 30)
        self.forget_pid()
        return True

    def wait_exit(self, proc: psutil.Process, timeout: float) -> bool:
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

    def forget_pid(self) -> None:
        self.pid_path.unlink(missing_ok=True)
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def process(self) -> psutil.Process | None:
        """The JVM named by the pid file, if it is really ours and alive.

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
        if self.process() is not None:
            return True
        if self.pid_path.exists():
            self.forget_pid()  # stale: its process is gone or is someone else's
        return False


@dataclass
class NodeStatus:
    node_id: int
    running: bool
    pid: int | None
    port: int
    controller_port: int
    roles: str = "broker,controller"


# --- the cluster ---------------------------------------------------------------------


class EmbeddedBroker:
    """Start, stop and inspect the development broker: one node by default, or a
    cluster of ``settings.broker_count`` nodes (``horizons broker start --brokers 3``)."""

    def __init__(self, settings: Settings, *, data_dir: Path | None = None) -> None:
        self.settings = settings
        self.data_dir = Path(data_dir or settings.broker_dir).absolute()
        count = settings.broker_count
        # One node keeps the layout it always had; a cluster has a folder per node.
        self.nodes = [
            BrokerNode(settings, n, self.data_dir if count == 1 else self.data_dir / f"node-{n}")
            for n in range(1, count + 1)
        ]
        first = self.nodes[0]
        self.properties_path = first.properties_path
        self.pid_path = first.pid_path
        self.log_path = first.log_path
        self.kraft_dir = first.kraft_dir
        self.cluster_id_path = self.data_dir / "cluster.id"
        self.cache_dir = (Path(settings.kafka_cache_dir) / settings.kafka_version).absolute()
        self.jar_dir = self.cache_dir / "libs"

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    @property
    def kafka_version(self) -> str:
        for jar in self.jar_dir.glob(f"kafka_{SCALA_VERSION}-*.jar"):
            match = re.fullmatch(rf"kafka_{re.escape(SCALA_VERSION)}-(\d[\w.]*)\.jar", jar.name)
            if match:
                return match.group(1)
        return self.settings.kafka_version

    def node(self, node_id: int) -> BrokerNode:
        if not 1 <= node_id <= len(self.nodes):
            raise BrokerError(
                f"There is no node {node_id}: the embedded cluster has {len(self.nodes)} "
                f"node(s) 1..{len(self.nodes)} (HORIZONS_BROKER_COUNT / --brokers)."
            )
        return self.nodes[node_id - 1]

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

    def _cluster_id(self) -> str:
        """One id for every node of this data folder, kept for nodes formatted later."""
        try:
            return self.cluster_id_path.read_text().strip()
        except FileNotFoundError:
            cluster_id = _random_cluster_id()
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self.cluster_id_path.write_text(cluster_id + "\n")
            return cluster_id

    def start(self, progress: Callable[[str], None] = print) -> BrokerStatus:
        """Start every node that is not running; return once all answer metadata."""
        down = [node for node in self.nodes if not node.is_running()]
        if not down:
            status = self.status()
            progress(f"Kafka broker already running at {self.bootstrap} (pid {status.pid}).")
            return status
        java = _require_java()
        jar_dir = self.ensure_jars(progress)
        for node in down:
            node.check_ports_free()
        cluster_id = self._cluster_id()
        for node in down:
            node.write_properties()
            if not (node.kraft_dir / "meta.properties").exists():
                progress(f"Formatting KRaft storage in {node.kraft_dir}...")
            node.format_storage(java, jar_dir, cluster_id, standalone=len(self.nodes) == 1)
        what = "broker" if len(self.nodes) == 1 else f"{len(down)} of {len(self.nodes)} nodes"
        progress(f"Starting Kafka {self.kafka_version} {what} at {self.bootstrap}...")
        started = time.monotonic()
        for node in down:
            node.launch(java, jar_dir)
        self._wait_until_ready(down)
        pids = ", ".join(str(node.pid_path.read_text().strip()) for node in down)
        progress(
            f"Kafka broker ready at {self.bootstrap} (pid {pids}) in "
            f"{time.monotonic() - started:.1f} s; log: {self.log_path}"
        )
        return self.status()

    def _wait_until_ready(self, nodes: list[BrokerNode]) -> None:
        timeout = self.settings.broker_start_timeout_s
        deadline = time.monotonic() + timeout
        waiting = list(nodes)
        while time.monotonic() < deadline:
            for node in list(waiting):
                code = node.exited()
                if code is not None:
                    node.forget_pid()
                    self.stop(timeout=10)
                    raise BrokerError(
                        f"Kafka node {node.node_id} exited during start-up (exit {code}). "
                        f"Last lines of {node.log_path}:\n{_tail(node.log_path)}"
                    )
                if node.answers_metadata():
                    waiting.remove(node)
            if not waiting:
                return
            time.sleep(0.2)
        node = waiting[0]
        tail = _tail(node.log_path)
        self.stop(timeout=10)
        raise BrokerError(
            f"Kafka node {node.node_id} did not answer at {node.bootstrap} within "
            f"{timeout:.0f} s (HORIZONS_BROKER_START_TIMEOUT_S); the broker was stopped. "
            f"Last lines of {node.log_path}:\n{tail}"
        )

    def stop(self, timeout: float = 30) -> bool:
        """Stop every node (SIGTERM, then SIGKILL after ``timeout``); True if one ran."""
        running = [(node, node.signal(signal.SIGTERM)) for node in self.nodes]
        stopped = False
        for node, proc in running:
            if proc is None:
                node.forget_pid()
                continue
            stopped = True
            if not node.wait_exit(proc, timeout):
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.kill()
                node.wait_exit(proc, 10)
            node.forget_pid()
        return stopped

    def kill(self, node_id: int) -> bool:
        """SIGKILL one node, as a crashed machine would vanish; True if it ran."""
        return self.node(node_id).kill()

    def restart(self, node_id: int, progress: Callable[[str], None] = print) -> BrokerStatus:
        """Start one node again (after ``kill``) and wait until it answers."""
        node = self.node(node_id)
        if node.is_running():
            node.signal(signal.SIGTERM)
            proc = node.process()
            if proc is not None and not node.wait_exit(proc, 30):
                node.kill()
            node.forget_pid()
        java = _require_java()
        jar_dir = self.ensure_jars(progress)
        node.check_ports_free()
        node.write_properties()
        node.launch(java, jar_dir)
        self._wait_until_ready([node])
        progress(f"Kafka node {node_id} back at {node.bootstrap}")
        return self.status()

    # --- inspection --------------------------------------------------------------------

    def is_running(self) -> bool:
        """True when any node runs (a cluster with a node down is still running)."""
        return any([node.is_running() for node in self.nodes])

    def status(self) -> BrokerStatus:
        nodes = []
        for node in self.nodes:
            proc = node.process()
            if proc is None and node.pid_path.exists():
                node.forget_pid()
            nodes.append(
                NodeStatus(
                    node.node_id,
                    proc is not None,
                    proc.pid if proc is not None else None,
                    node.port,
                    node.controller_port,
                )
            )
        live = [n for n in nodes if n.running]
        metadata = _metadata(self.bootstrap, 5.0) if live else None
        topics = _user_topics(metadata) if metadata is not None else {}
        under = short_of_replicas(metadata) if metadata is not None else []
        return BrokerStatus(
            running=bool(live),
            pid=nodes[0].pid if nodes[0].running else (live[0].pid if live else None),
            port=self.settings.broker_port,
            bootstrap=self.bootstrap,
            kafka_version=self.kafka_version,
            log_path=self.log_path,
            topics=topics,
            nodes=nodes,
            under_replicated=under,
        )


def _metadata(bootstrap: str, timeout: float) -> ClusterMetadata | None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        return admin.list_topics(timeout=timeout)
    except KafkaException:
        return None


def _user_topics(metadata: ClusterMetadata) -> dict[str, int]:
    """Topic -> partition count, internal topics left out."""
    return {
        name: len(topic.partitions)
        for name, topic in sorted(metadata.topics.items())
        if not name.startswith("__")
    }


def _list_topics(bootstrap: str, timeout: float) -> dict[str, int] | None:
    """:func:`_user_topics` of the cluster at ``bootstrap``; None if unreachable."""
    metadata = _metadata(bootstrap, timeout)
    return None if metadata is None else _user_topics(metadata)
