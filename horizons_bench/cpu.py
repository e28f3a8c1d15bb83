"""Where the machine's cores went during a measured window, process by process.

On a small machine the broker, the consumer host, the load generator and the SMTP sink
share the cores, and a latency figure means little without knowing which of them was
busy: a freshly started broker's JIT compiler, for one, took half a core for its first
minute here (docs/kpis.md).
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

import psutil


def listener_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1:``port`` (a local broker), if any."""
    with contextlib.suppress(psutil.Error):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return conn.pid
    return None


class CpuShares:
    """CPU seconds of named processes between :meth:`start` and :meth:`stop`, as cores."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.procs: dict[str, psutil.Process] = {}
        for name, pid in pids.items():
            if pid is not None:
                with contextlib.suppress(psutil.Error):
                    self.procs[name] = psutil.Process(pid)
        self._start: dict[str, float] = {}
        self._machine_start = 0.0
        self._t0 = 0.0
        self.cores: dict[str, float] = {}

    @staticmethod
    def _cpu(proc: psutil.Process) -> float | None:
        with contextlib.suppress(psutil.Error):
            t = proc.cpu_times()
            return float(t.user + t.system)  # not children: reaped ones would count
        return None

    @staticmethod
    def _machine() -> float:
        t = psutil.cpu_times()
        return float(t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0))

    def start(self) -> CpuShares:
        self._t0 = time.monotonic()
        self._machine_start = self._machine()
        for name, proc in self.procs.items():
            cpu = self._cpu(proc)
            if cpu is not None:
                self._start[name] = cpu
        return self

    def stop(self) -> dict[str, float]:
        """Cores used per process over the window, plus ``machine`` (all processes)."""
        elapsed = max(1e-9, time.monotonic() - self._t0)
        for name, proc in self.procs.items():
            cpu = self._cpu(proc)
            if cpu is not None and name in self._start:
                self.cores[name] = (cpu - self._start[name]) / elapsed
        self.cores["machine"] = (self._machine() - self._machine_start) / elapsed
        return self.cores


def _thread_ticks(pid: int) -> dict[str, tuple[str, int]]:
    """Every thread of ``pid``: its OS name and CPU ticks (user + system)."""
    out: dict[str, tuple[str, int]] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (task / "stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            ticks = int(fields[11]) + int(fields[12])
            out[task.name] = ((task / "comm").read_text().strip(), ticks)
    return out


class ThreadShares:
    """Cores per kind of thread of one process (the host names its threads for the OS:
    horizons_platform/threads.py) between :meth:`start` and :meth:`stop` (Linux)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._start: dict[str, tuple[str, int]] = {}
        self._t0 = 0.0

    def start(self) -> ThreadShares:
        self._t0 = time.monotonic()
        if self.pid is not None:
            self._start = _thread_ticks(self.pid)
        return self

    def stop(self) -> dict[str, float]:
        """Cores by thread name, numbered siblings together ("smtp_3" → "smtp"), the
        busiest first."""
        if self.pid is None:
            return {}
        elapsed = max(1e-9, time.monotonic() - self._t0)
        hz = 100.0  # USER_HZ: /proc counts CPU time in hundredths of a second
        totals: dict[str, float] = {}
        for tid, (name, ticks) in _thread_ticks(self.pid).items():
            before = self._start.get(tid, (name, 0))[1]
            kind = re.sub(r"[_-]?\d+$", "", name) or name
            totals[kind] = totals.get(kind, 0.0) + (ticks - before) / hz / elapsed
        busiest = sorted(totals.items(), key=lambda kv: kv[1], reverse=True)
        return {name: round(cores, 3) for name, cores in busiest if cores >= 0.005}
