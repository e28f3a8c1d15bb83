"""What a benchmark hands back: figures (with targets and reference ratios), the machine
it ran on, and the table / JSON renderings of both."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import confluent_kafka
import duckdb
import psutil

import horizons_platform


@dataclass(frozen=True)
class Target:
    """A goal from the issue: ``value`` reached from above (``le``) or below (``ge``)."""

    op: str  # "ge" | "le" | "eq"
    value: float

    def met(self, measured: float | None) -> bool | None:
        if measured is None:
            return None
        if self.op == "ge":
            return measured >= self.value
        if self.op == "le":
            return measured <= self.value
        return measured == self.value

    def __str__(self) -> str:
        sign = {"ge": "≥", "le": "≤", "eq": "="}[self.op]
        return f"{sign} {self.value:,.10g}"


@dataclass
class Figure:
    name: str
    value: float | None
    unit: str
    target: Target | None = None
    vs_bare: float | None = None  # value / bare confluent-kafka loop rate
    vs_perf: float | None = None  # value / Kafka ConsumerPerformance rate
    note: str = ""
    before: float | None = None  # the same figure before the store had one owner

    @property
    def vs_before(self) -> float | None:
        if self.before is None or self.value is None or not self.before:
            return None
        return self.value / self.before

    @property
    def met(self) -> bool | None:
        return self.target.met(self.value) if self.target else None

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["target"] = str(self.target) if self.target else None
        out["met"] = self.met
        out["vs_before"] = self.vs_before
        return out


def machine_info() -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "confluent_kafka": confluent_kafka.version()[0],
        "librdkafka": confluent_kafka.libversion()[0],
        "duckdb": duckdb.__version__,
        "loadavg_1m": round(load[0], 2) if load else None,
    }


def code_info() -> str:
    """Which code ran: the checkout ``horizons_platform`` was imported from, its commit
    and whether it had changes. An A/B run of another commit through PYTHONPATH from
    inside this checkout imports this checkout's code, not the other (``python -m``
    puts the working directory first): the header shows it."""
    root = Path(horizons_platform.__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):  # not a git checkout, or no git
        return str(root)
    return f"{root} @ {commit}{' +changes' if changed else ''}"


@dataclass
class BenchResult:
    name: str
    params: dict[str, Any]
    figures: list[Figure] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    passed: bool = True  # False when a fault run lost or doubled something
    started_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    duration_s: float = 0.0
    command: str = field(default_factory=lambda: " ".join(["horizons", *sys.argv[1:]]))
    machine: dict[str, Any] = field(default_factory=machine_info)
    code: str = field(default_factory=code_info)

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    @property
    def ok(self) -> bool:
        """No figure missed its target (unmeasured figures do not count as misses)."""
        return all(f.met is not False for f in self.figures)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "command": self.command,
            "started_at": self.started_at,
            "duration_s": round(self.duration_s, 1),
            "machine": self.machine,
            "code": self.code,
            "params": self.params,
            "figures": [f.as_dict() for f in self.figures],
            "details": self.details,
            "notes": self.notes,
            "passed": self.passed,
        }

    def write_json(self, directory: Path, stamp: str) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}-{stamp}.json"
        path.write_text(json.dumps(self.as_dict(), indent=2, default=str) + "\n")
        return path

    def table(self) -> str:
        header = [
            "figure",
            "value",
            "unit",
            "target",
            "met",
            "× bare loop",
            "× ConsumerPerf",
            "× before",
            "note",
        ]
        rows = [
            [
                f.name,
                _fmt(f.value),
                f.unit,
                str(f.target) if f.target else "",
                {True: "yes", False: "NO", None: ""}[f.met],
                _fmt(f.vs_bare, ratio=True),
                _fmt(f.vs_perf, ratio=True),
                _fmt(f.vs_before, ratio=True),
                f.note,
            ]
            for f in self.figures
        ]
        widths = [
            max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(header)
        ]
        lines = [
            f"== horizons bench {self.name} ({self.duration_s:.0f} s; {self.machine['cpus']} "
            f"cores, {self.machine['memory_gib']} GiB, load {self.machine['loadavg_1m']}) ==",
            f"code: {self.code}",
            "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(),
            "  ".join("-" * w for w in widths),
        ]
        lines += [
            "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows
        ]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(value: float | None, ratio: bool = False) -> str:
    if value is None:
        return ""
    if ratio:
        return f"{value:.2f}×"
    if abs(value) >= 100 or float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.3g}"
