"""Watching a consumer host work: offsets, lag and RSS sampled on one clock.

Every benchmark and fault scenario runs a host and waits for it to catch up; this
module is that loop, so they all measure the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from horizons_bench.harness import Progress
from horizons_bench.hostproc import HostExited, HostProcess
from horizons_bench.offsets import GroupState, OffsetProbe


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the watch started
    states: dict[str, GroupState]
    rss: int | None

    @property
    def done(self) -> int:
        return sum(s.done for s in self.states.values())

    @property
    def lag(self) -> int:
        return sum(s.lag for s in self.states.values())


@dataclass
class Timeline:
    t0: float  # time.monotonic() at t = 0
    samples: list[Sample] = field(default_factory=list)

    def first_progress(self, group: str) -> Sample | None:
        return next((s for s in self.samples if s.states[group].done > 0), None)

    def caught_up(self, group: str) -> Sample | None:
        return next((s for s in self.samples if s.states[group].caught_up), None)

    def steady_rate(self, group: str) -> float | None:
        """Messages/s from the first commit seen to catching up (start-up excluded)."""
        first, last = self.first_progress(group), self.caught_up(group)
        if first is None or last is None or last.t <= first.t:
            return None
        return (last.states[group].done - first.states[group].done) / (last.t - first.t)

    def windows(self, group: str, seconds: float = 5.0) -> list[dict[str, float]]:
        """Throughput per window: shows whether the rate holds as the tables grow."""
        out: list[dict[str, float]] = []
        start = self.first_progress(group)
        if start is None:
            return out
        prev = start
        for s in self.samples:
            if s.t - prev.t >= seconds or (s is self.samples[-1] and s.t > prev.t):
                delta = s.states[group].done - prev.states[group].done
                out.append(
                    {
                        "t": round(s.t, 1),
                        "done": s.states[group].done,
                        "rate": round(delta / (s.t - prev.t), 1),
                    }
                )
                prev = s
            if s.states[group].caught_up:
                break
        return out

    def compact(self, every: float = 1.0) -> list[dict[str, Any]]:
        """Samples thinned to about one per ``every`` seconds, for the JSON."""
        out: list[dict[str, Any]] = []
        last = -every
        for s in self.samples:
            if s.t - last >= every or s is self.samples[-1]:
                last = s.t
                out.append(
                    {
                        "t": round(s.t, 2),
                        "rss_mib": round(s.rss / 2**20, 1) if s.rss else None,
                        **{f"{g}.done": st.done for g, st in s.states.items()},
                        **{f"{g}.lag": st.lag for g, st in s.states.items()},
                    }
                )
        return out


def watch(
    probe: OffsetProbe,
    host: HostProcess | None,
    *,
    until: Callable[[Sample], bool],
    timeout: float,
    progress: Progress,
    label: str,
    interval: float = 0.25,
    timeline: Timeline | None = None,
    allow_exit: bool = False,
    raise_on_timeout: bool = True,
) -> Timeline:
    """Sample until ``until(sample)`` holds. Raises TimeoutError (or just returns, when
    not ``raise_on_timeout``), or HostExited if the host dies (unless ``allow_exit``:
    fault scenarios expect some exits)."""
    timeline = timeline or Timeline(time.monotonic())
    deadline = time.monotonic() + timeout
    while True:
        tick = time.monotonic()
        sample = Sample(tick - timeline.t0, probe.snapshot(), host.rss() if host else None)
        timeline.samples.append(sample)
        rss = f", RSS {sample.rss / 2**20:,.0f} MiB" if sample.rss else ""
        states = " ".join(f"{g}={s.done:,}/{s.total:,}" for g, s in sample.states.items())
        progress.status(f"{label}: {states}{rss}")
        if until(sample):
            return timeline
        if host is not None and not allow_exit and host.returncode is not None:
            raise HostExited(f"consumer host exited ({host.returncode}):\n{host.log_tail()}")
        if tick > deadline:
            if not raise_on_timeout:
                return timeline
            raise TimeoutError(f"{label}: not done after {timeout:.0f} s ({states})")
        time.sleep(max(0.0, interval - (time.monotonic() - tick)))


def all_caught_up(groups: list[str]) -> Callable[[Sample], bool]:
    return lambda s: all(s.states[g].caught_up for g in groups)
