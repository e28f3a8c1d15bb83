"""A consumer host as a real subprocess (`horizons consume`), as operators run it.

A subprocess is the honest thing to measure: its RSS is the host's alone, SIGKILL is a
real crash, and the benchmark's own producing and measuring never share its GIL.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from horizons_bench.harness import subprocess_env
from horizons_platform.settings import Settings

READY_LINE = "consumers ready"


class HostExited(RuntimeError):
    """The host process ended while we were waiting for it to do something."""


class HostProcess:
    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        groups: tuple[str, ...] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.groups = groups
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.ready_at: float | None = None
        # Set when the exit is ours (kill, stop) or foreseen by a scenario (broker loss);
        # any other exit is a crash.
        self.exit_expected = False
        self._log_offset = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> HostProcess:
        command = [sys.executable, "-m", "horizons_platform.cli", "consume"]
        for group in self.groups or ():
            command += ["--service", group]
        env = {**subprocess_env(self.settings), **self.extra_env}
        env["PYTHONUNBUFFERED"] = "1"
        # A native crash (librdkafka, DuckDB) then leaves every thread's Python stack in
        # the host log instead of a bare "exit -11".
        env["PYTHONFAULTHANDLER"] = "1"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env
            )
        self.started_at = time.monotonic()
        self.ready_at = None
        return self

    def _new_log(self) -> str:
        try:
            with self.log_path.open("rb") as handle:
                handle.seek(self._log_offset)
                return handle.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self._new_log().splitlines()[-lines:])

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Block until every consumer has its partitions; returns seconds since start."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if READY_LINE in self._new_log():
                self.ready_at = time.monotonic()
                return self.ready_at - self.started_at
            if self.returncode is not None:
                raise HostExited(
                    f"consumer host exited ({self.returncode}) before it was ready:\n"
                    + self.log_tail()
                )
            time.sleep(0.05)
        raise TimeoutError(f"consumer host not ready after {timeout:.0f} s:\n{self.log_tail()}")

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss(self) -> int | None:
        with contextlib.suppress(psutil.Error):
            return int(psutil.Process(self.pid).memory_info().rss)
        return None

    def cpu_seconds(self) -> float | None:
        """The host's CPU time, its live children's (the SMTP sender) included."""
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(self.pid)
            total = 0.0
            for p in [proc, *proc.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
            return total
        return None

    def sender_pid(self) -> int | None:
        """The host's SMTP sender process (runtime/sender.py), if it runs one."""
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.pid).children():
                if "horizons_platform.runtime.sender" in child.cmdline():
                    return int(child.pid)
        return None

    def kill(self) -> int:
        """SIGKILL: a crash with no chance to flush, commit or close anything."""
        assert self.proc is not None
        self.exit_expected = True
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait()

    def wait(self, timeout: float) -> int | None:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the host's clean stop); if it is still there after ``timeout``, its
        threads' stacks into its log (SIGUSR1), then SIGKILL."""
        if self.proc is None:
            return 0
        self.exit_expected = True
        code = stop_process(self.proc, self.log_path, timeout)
        return self.proc.wait() if code is None else code


def stop_process(proc: subprocess.Popen[bytes], log_path: Path, timeout: float) -> int | None:
    """SIGTERM a `horizons consume` process; its exit code. One still there after
    ``timeout`` writes its threads' stacks to ``log_path`` (SIGUSR1: where it hangs), is
    killed, and None is returned."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        size = log_path.stat().st_size if log_path.exists() else 0
        proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and log_path.stat().st_size <= size:
            time.sleep(0.1)  # the stacks are written by a C handler; no event to wait on
        proc.kill()
        proc.wait(10)
        return None

    def __enter__(self) -> HostProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
