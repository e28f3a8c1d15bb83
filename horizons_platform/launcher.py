"""`horizons up`: the embedded broker, the consumer host and Dagster, as one command.

Every process it starts runs in its own session, so a terminal's Ctrl-C reaches only
this launcher, which then stops them in order: the demo traffic, Dagster (webserver,
daemon, code servers), the consumers (which flush their last batch), and last the broker
— only if this launcher started it. Whatever is still alive after its grace period is
killed, so nothing outlives ``horizons up``.
"""

import argparse
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from horizons_platform.logs import RotatingFile, pump
from horizons_platform.settings import Settings
from horizons_platform.threads import on_signals

log = logging.getLogger(__name__)
SESSION_VAR = "HZUP_SESSION"  # not HORIZONS_*: it is no setting

DAGSTER_STOP_TIMEOUT_S = 30.0
UI_READY_TIMEOUT_S = 240.0
CHILD_POLL_S = 0.5
LOCATION_QUERY = (
    '{"query": "{ workspaceOrError { ... on Workspace { locationEntries '
    '{ name loadStatus locationOrLoadError { __typename } } } } }"}'
)


def repo_root() -> Path:
    """Where workspace.yaml and dagster.yaml live: the working directory, else the clone."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (candidate / "workspace.yaml").exists() and (candidate / "dagster.yaml").exists():
            return candidate
    raise FileNotFoundError(
        "workspace.yaml and dagster.yaml not found: run `horizons up` from the repository root"
    )


def prepare_dagster_home(settings: Settings, root: Path) -> Path:
    """DAGSTER_HOME = var/dagster, holding a copy of the repository's dagster.yaml.

    Dagster reads dagster.yaml only from DAGSTER_HOME; the copy is refreshed on every
    start so edits to the repository's file take effect.
    """
    home = settings.dagster_dir.resolve()
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / "dagster.yaml", home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)  # dagster.yaml refers to it
    # Create (or migrate) the SQLite storage now, once: otherwise the webserver, the
    # daemon and the consumers' materialization reporter would race to create it.
    from dagster import DagsterInstance

    DagsterInstance.from_config(str(home)).dispose()
    return home


def _ui_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/server_info", timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def location_status(url: str) -> str | None:
    """The code location's load status as the webserver sees it (LOADED, LOADING, ...)."""
    request = urllib.request.Request(
        f"{url}/graphql",
        data=LOCATION_QUERY.encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            body = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    entries = body.get("data", {}).get("workspaceOrError", {}).get("locationEntries") or []
    for entry in entries:
        if entry["name"] == "horizons_platform":
            error = (entry.get("locationOrLoadError") or {}).get("__typename") == "PythonError"
            return "ERROR" if error else entry["loadStatus"]
    return None


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Child:
    """A process we started (own session), its log, and every descendant seen so far."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_pump: threading.Thread  # copies its output into a rotating log file
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    def remember_descendants(self) -> None:
        try:
            parent = psutil.Process(self.proc.pid)
            for p in [parent, *parent.children(recursive=True)]:
                self.seen.setdefault(p.pid, p)
        except psutil.Error:
            pass

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def stop(self, sig: int, timeout: float) -> int | None:
        """Signal the process group, wait, then kill whatever of it is left."""
        self.remember_descendants()
        if self.proc.poll() is None:
            self.signal_group(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        if self.proc.poll() is None:
            log.warning("%s did not stop within %.0fs: killing it", self.name, timeout)
            self.signal_group(signal.SIGKILL)
            self.proc.wait(10)
        # Descendants may have left the group or outlive their parent briefly.
        leftovers = [p for p in self.seen.values() if p.is_running() and p.pid != self.proc.pid]
        _, alive = psutil.wait_procs(leftovers, timeout=5)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.log_pump.join(5)
        return self.proc.returncode


class Launcher:
    def __init__(
        self,
        settings: Settings,
        *,
        demo: bool = False,
        rate: float = 20.0,
        out: Callable[[str], None] = print,
    ) -> None:
        self.settings = settings
        self.demo = demo
        self.rate = rate
        self.out = out
        self.stop_event = threading.Event()
        self.children: list[Child] = []
        self.broker: Any = None  # EmbeddedBroker, when this launcher started it
        self.smtp: Any = None
        self.demo_thread: threading.Thread | None = None
        self.exit_code = 0
        self.url = f"http://{settings.ui_host}:{settings.ui_port}"
        self.log_dir = settings.var_dir.resolve() / "logs"
        # Marks every process this launcher's children start, however deep, so that the
        # shutdown finds those that left the process tree (re-parented to init).
        self.session = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"

    # --- signals ---------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        """On the signal watcher's thread (threads.on_signals), never in the handler."""
        if self.stop_event.is_set():
            # A second Ctrl-C: stop waiting politely.
            for child in self.children:
                child.signal_group(signal.SIGKILL)
            return
        self.stop_event.set()  # first: a terminal that went away with the Ctrl-C
        with contextlib.suppress(OSError):  # (`horizons up | tee`) cannot keep us running
            self.out(f"\n{signal.Signals(signum).name}: stopping everything `horizons up` started…")

    # --- start -------------------------------------------------------------------------

    def _child_env(self, dagster_home: Path, root: Path) -> dict[str, str]:
        env = dict(os.environ)
        # The code location imports horizons_platform even from a checkout not installed.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
        env.update(
            {
                "DAGSTER_HOME": str(dagster_home),
                # Absolute, so every process finds the same file whatever its cwd.
                "HORIZONS_VAR_DIR": str(self.settings.var_dir.resolve()),
                "HORIZONS_DUCKDB_PATH": str(self.settings.database.resolve()),
                "HORIZONS_DAGSTER_HOME": str(dagster_home),
                "HORIZONS_KAFKA_BOOTSTRAP": self.settings.bootstrap,
                "PYTHONUNBUFFERED": "1",
                SESSION_VAR: self.session,
            }
        )
        return env

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log_file = RotatingFile(
            log_path, self.settings.log_max_mb * 2**20, self.settings.log_backups
        )
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Own session: Ctrl-C in the terminal reaches only the launcher, and
            # `dagster dev` honours SIGINT/SIGTERM only when it leads its own session.
            start_new_session=True,
        )
        assert proc.stdout is not None
        child = Child(name, proc, log_path, pump(proc.stdout, log_file))
        self.children.append(child)
        return child

    def start_broker(self) -> None:
        from horizons_platform.kafka.admin import ensure_topics
        from horizons_platform.kafka.broker import EmbeddedBroker

        if self.settings.embedded_broker:
            broker = EmbeddedBroker(self.settings)
            if broker.is_running():
                self.out(f"broker: already running on {broker.bootstrap} (left running at exit)")
            else:
                self.out(f"broker: starting Apache Kafka on {broker.bootstrap}…")
                broker.start(progress=lambda msg: self.out(f"broker: {msg}"))
                self.broker = broker
        else:
            self.out(f"broker: using HORIZONS_KAFKA_BOOTSTRAP={self.settings.kafka_bootstrap}")
        topics = ensure_topics(self.settings)
        self.out("topics: " + ", ".join(f"{t}({n})" for t, n in topics.items()))

    def start_smtp_sink(self) -> None:
        """Demo only: a local mailbox so notifications are delivered, not retried forever."""
        host, port = self.settings.smtp_host, self.settings.smtp_port
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                self.out(f"smtp: using the server already on {host}:{port}")
                return
        from aiosmtpd.controller import Controller
        from aiosmtpd.handlers import Mailbox

        maildir = self.settings.var_dir.resolve() / "demo-mail"
        logging.getLogger("mail.log").setLevel(logging.WARNING)  # a line per SMTP command
        self.smtp = Controller(Mailbox(maildir), hostname=host, port=port)
        self.smtp.start()
        self.out(f"smtp: demo mailbox on {host}:{port}, mail kept in {maildir}")

    def start_consumers(self, env: dict[str, str], root: Path) -> Child:
        argv = [sys.executable, "-m", "horizons_platform.cli", "consume"]
        child = self._spawn("consumers", argv, env, root)
        self.out(f"consumers: pid {child.proc.pid}, log {child.log_path}")
        self._wait_for_store(child)
        return child

    def _wait_for_store(self, child: Child, timeout: float = 60.0) -> None:
        """Dagster starts once the store is served, so its first runs go over Quack."""
        from horizons_platform.store.endpoint import read_owner

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and child.proc.poll() is None:
            owner = read_owner(self.settings)
            if owner is not None:
                ours = owner.pid == child.proc.pid
                role = "" if ours else f" by pid {owner.pid}; ours is a standby"
                self.out(f"store: {self.settings.database} served on {owner.uri}{role}")
                return
            time.sleep(0.1)
        self.out("store: not served yet; Dagster runs will wait for it")

    def start_dagster(self, env: dict[str, str], root: Path, dagster_home: Path) -> Child:
        argv = [
            sys.executable,
            "-m",
            "dagster",
            "dev",
            "-h",
            self.settings.ui_host,
            "-p",
            str(self.settings.ui_port),
            "-w",
            str(root / "workspace.yaml"),
            "--log-level",
            "warning",
        ]
        # From DAGSTER_HOME: Dagster warns about any other dagster.yaml in its cwd.
        child = self._spawn("dagster", argv, env, dagster_home)
        self.out(f"dagster: pid {child.proc.pid}, log {child.log_path}")
        return child

    def wait_for_ui(self, dagster: Child, started: float) -> bool:
        """Until the webserver answers and the code location loaded; False if stopped."""
        printed = False
        deadline = time.monotonic() + UI_READY_TIMEOUT_S
        while not self.stop_event.is_set():
            if dagster.proc.poll() is not None:
                raise RuntimeError(
                    f"dagster exited with {dagster.proc.returncode}:\n{_tail(dagster.log_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Dagster UI did not come up within {UI_READY_TIMEOUT_S:.0f}s:\n"
                    f"{_tail(dagster.log_path)}"
                )
            if not printed and _ui_answers(self.url):
                self.out(f"dagster: webserver answering after {time.monotonic() - started:.1f}s")
                printed = True
            if printed:
                status = location_status(self.url)
                if status == "ERROR":
                    raise RuntimeError(
                        "the code location horizons_platform failed to load; see the UI "
                        f"({self.url}/locations) or {dagster.log_path}"
                    )
                if status == "LOADED":
                    return True
            self.stop_event.wait(0.5)
        return False

    def start_demo_traffic(self) -> None:
        self.demo_thread = threading.Thread(target=self._demo_loop, name="demo", daemon=True)
        self.demo_thread.start()
        self.out(f"demo: simulated jobs at about {self.rate:g} events/s")

    def _demo_loop(self) -> None:
        from horizons_platform.services.orchestrator import JobOrchestratorService
        from horizons_platform.simulate import apply_step, interleave, plan

        orch = JobOrchestratorService(self.settings, recover=False, wait=False)
        rng = random.Random()
        batch = 0
        while not self.stop_event.is_set():
            batch += 1
            jobs = plan(20, seed=rng.randrange(1 << 30), prefix=f"demo-{int(time.time())}")
            for job, step in interleave(jobs, seed=batch):
                if self.stop_event.wait(1.0 / self.rate if self.rate > 0 else 0):
                    break
                try:
                    apply_step(orch, job, step, rng)
                except Exception as exc:  # a broker hiccup must not end the demo
                    log.warning("demo traffic: %s", exc)
            orch.publisher.flush(5.0)

    def run(self) -> int:
        unwatch = on_signals((signal.SIGINT, signal.SIGTERM, signal.SIGHUP), self._on_signal)
        try:
            return self._run()
        finally:
            unwatch()

    def _run(self) -> int:
        started = time.monotonic()
        root = repo_root()
        home = prepare_dagster_home(self.settings, root)
        try:
            self.start_broker()
            if self.stop_event.is_set():
                return self.shutdown()
            if self.demo:
                self.start_smtp_sink()
            env = self._child_env(home, root)
            consumers = self.start_consumers(env, root)
            dagster = self.start_dagster(env, root, home)
            if not self.wait_for_ui(dagster, started):
                return self.shutdown()
            self.out(f"\nHorizons is up in {time.monotonic() - started:.1f}s")
            self.out(f"  Dagster UI   {self.url}")
            self.out(f"  DuckDB       {self.settings.database.resolve()}")
            self.out(f"  Kafka        {self.settings.bootstrap}")
            self.out(f"  logs         {self.log_dir}")
            self.out("Ctrl-C stops everything.")
            if self.demo:
                self.start_demo_traffic()
            self.supervise([consumers, dagster])
        except Exception as exc:
            self.out(f"error: {exc}")
            self.exit_code = 1
        return self.shutdown()

    def supervise(self, children: list[Child]) -> None:
        """Until a signal, or until a child dies (which takes the rest down too)."""
        while not self.stop_event.wait(CHILD_POLL_S):
            for child in children:
                child.remember_descendants()
                code = child.proc.poll()
                if code is not None:
                    self.out(
                        f"{child.name} exited unexpectedly with {code}; stopping the rest. "
                        f"Last lines of {child.log_path}:\n{_tail(child.log_path)}"
                    )
                    self.exit_code = code or 1
                    self.stop_event.set()
                    return

    # --- stop ----------------------------------------------------------------------------

    def _sweep(self) -> None:
        """Stop what a child started that outlived it outside its process tree (Dagster's
        code servers are re-parented to init when their parent exits first)."""
        strays = []
        for p in psutil.process_iter(["environ"]):
            with contextlib.suppress(psutil.Error):
                environ = p.info["environ"] or {}
                if p.pid != os.getpid() and environ.get(SESSION_VAR) == self.session:
                    strays.append(p)
        for p in strays:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(strays, timeout=10)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()
        if strays:
            log.info("stopped %d process(es) left behind by dagster or the consumers", len(strays))

    def shutdown(self) -> int:
        self.stop_event.set()
        if self.demo_thread is not None:
            self.demo_thread.join(10)
        by_name = {c.name: c for c in self.children}
        if "dagster" in by_name:
            self.out("stopping dagster…")
            by_name["dagster"].stop(signal.SIGTERM, DAGSTER_STOP_TIMEOUT_S)
        if "consumers" in by_name:
            self.out("stopping consumers (flushing their last batch)…")
            timeout = self.settings.shutdown_timeout_s + self.settings.broker_grace_s
            by_name["consumers"].stop(signal.SIGTERM, timeout)
        self._sweep()
        if self.smtp is not None:
            self.smtp.stop()
        if self.broker is not None:
            self.out("stopping the broker…")
            self.broker.stop()
        self.out("all stopped.")
        return self.exit_code


def cmd_up(args: argparse.Namespace) -> int:
    settings = Settings()
    return Launcher(settings, demo=args.demo, rate=args.rate, out=_say).run()


def _say(line: str) -> None:
    print(line, flush=True)


def add_up_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "up",
        help="broker + consumers + Dagster UI on 127.0.0.1:$HORIZONS_UI_PORT",
        description="Start the embedded Kafka broker (unless HORIZONS_KAFKA_BOOTSTRAP is "
        "set), the consumer services and Dagster (webserver + daemon, DAGSTER_HOME="
        "var/dagster), and print the UI's address. Ctrl-C or SIGTERM stops them all.",
    )
    p.add_argument(
        "--demo",
        action="store_true",
        help="keep simulated job traffic flowing (and a local SMTP mailbox if none runs)",
    )
    p.add_argument("--rate", type=float, default=20.0, help="demo traffic in events/s (default 20)")
    p.set_defaults(func=cmd_up)
