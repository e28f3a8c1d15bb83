"""Fixtures for the fault-injection suite: a benchmark context on the session broker.

The scenarios themselves live in :mod:`horizons_bench.faults` (the same code
`horizons bench faults` runs at full size); here they run small enough for CI. Every
consumer host is a real `horizons consume` subprocess; the broker-restart scenario
starts a private broker of its own, so the session broker is never stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from horizons_bench.harness import BenchContext, Progress
from horizons_bench.smtp import SmtpSink
from horizons_platform.settings import Settings


@pytest.fixture
def bench(kafka_bootstrap: str, tmp_path: Path) -> Iterator[BenchContext]:
    base = Settings(kafka_bootstrap=kafka_bootstrap, var_dir=tmp_path / "var")
    ctx = BenchContext(
        base=base,
        name="faults",
        run_dir=tmp_path / "bench",
        bootstrap=kafka_bootstrap,
        progress=Progress(),
    )
    yield ctx
    ctx.cleanup()


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as smtp:
        yield smtp
