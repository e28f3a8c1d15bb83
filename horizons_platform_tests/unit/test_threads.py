"""Host threads carry their names to the OS (top -H, /proc), shortened to 15 bytes."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from horizons_platform.threads import name_this_thread, os_name


@pytest.mark.parametrize(
    ("python_name", "expected"),
    [
        ("store-compliance-auditor_0", "store-auditor"),
        ("consumer-notifications", "loop-notify"),
        ("store-system-health_0", "store-health"),
        ("smtp_3", "smtp_3"),
        ("a-very-long-thread-name", "a-very-long-thr"),
    ],
)
def test_os_names_fit_linux_and_keep_the_service(python_name: str, expected: str) -> None:
    assert os_name(python_name) == expected
    assert len(expected.encode()) <= 15


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc comm is Linux's")
def test_a_thread_names_itself_for_the_os() -> None:
    seen: list[str] = []

    def run() -> None:
        name_this_thread()
        comm = Path(f"/proc/self/task/{threading.get_native_id()}/comm")
        seen.append(comm.read_text().strip())

    thread = threading.Thread(target=run, name="store-metrics_0")
    thread.start()
    thread.join()
    assert seen == ["store-metrics"]
