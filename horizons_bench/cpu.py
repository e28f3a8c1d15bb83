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


def _thread_times(pid: int) -> dict[int, tuple[str, float, float]]:
    """Every thread of ``pid``: its OS name, CPU seconds (user + system) and seconds spent
    runnable but waiting for a CPU (the kernel's schedstat; 0 where it is not kept)."""
    out: dict[int, tuple[str, float, float]] = {}
    with contextlib.suppress(psutil.Error):
        for thread in psutil.Process(pid).threads():
            task = Path(f"/proc/{pid}/task/{thread.id}")
            with contextlib.suppress(OSError):
                name = (task / "comm").read_text().strip()
                waited = 0.0
                with contextlib.suppress(OSError, ValueError, IndexError):
                    waited = int((task / "schedstat").read_text().split()[1]) / 1e9
                out[thread.id] = (name, thread.user_time + thread.system_time, waited)
    return out


class ThreadShares:
    """Cores per kind of thread of one process (the host names its threads for the OS:
    horizons_platform/threads.py) between :meth:`start` and :meth:`stop` (Linux)."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._start: dict[int, tuple[str, float, float]] = {}
        self._t0 = 0.0
        # Per kind of thread, the share of the window it was runnable but had no CPU: on
        # a saturated machine this, not the work itself, is where latency goes.
        self.waiting: dict[str, float] = {}

    def start(self) -> ThreadShares:
        self._t0 = time.monotonic()
        if self.pid is not None:
            self._start = _thread_times(self.pid)
        return self

    def stop(self) -> dict[str, float]:
        """Cores by thread name, numbered siblings together ("smtp_3" → "smtp"), the
        busiest first."""
        if self.pid is None:
            return {}
        elapsed = max(1e-9, time.monotonic() - self._t0)
        totals: dict[str, float] = {}
        waiting: dict[str, float] = {}
        for tid, (name, seconds, waited) in _thread_times(self.pid).items():
            _, cpu_before, waited_before = self._start.get(tid, (name, 0.0, 0.0))
            kind = re.sub(r"[_-]?\d+$", "", name) or name
            totals[kind] = totals.get(kind, 0.0) + (seconds - cpu_before) / elapsed
            waiting[kind] = waiting.get(kind, 0.0) + (waited - waited_before) / elapsed
        busiest = sorted(totals.items(), key=lambda kv: kv[1], reverse=True)
        kept = {name: round(cores, 3) for name, cores in busiest if cores >= 0.005}
        self.waiting = {name: round(waiting[name], 3) for name in kept}
        return kept
