"""Host threads carry their names to the OS (top -H, /proc), shortened to 15 bytes; a
stopped host exits even when a thread it does not own never ends; SIGUSR1 shows every
thread's stack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from horizons_platform.threads import name_this_thread, on_signals, os_name, run_in_background


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


def test_a_thread_that_never_ends_cannot_keep_the_process_alive() -> None:
    """A stopped host leaves even if a library's non-daemon thread never returns, and
    says where that thread was."""
    script = (
        "import threading\n"
        "from horizons_platform.threads import exit_within\n"
        "def stuck_in_a_library():\n"
        "    threading.Event().wait()\n"
        "threading.Thread(target=stuck_in_a_library).start()\n"
        "exit_within(1.0)\n"
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert time.monotonic() - started < 30
    assert done.returncode == 1
    assert "stuck_in_a_library" in done.stderr


def test_sigusr1_writes_every_threads_stack_and_the_process_goes_on() -> None:
    """`kill -USR1 <host>`: where each thread is, even when they are all blocked."""
    script = (
        "import sys, threading\n"
        "from horizons_platform.threads import dump_stacks_on\n"
        "def waiting_in_a_worker():\n"
        "    threading.Event().wait()\n"
        "dump_stacks_on()\n"
        "threading.Thread(target=waiting_in_a_worker, daemon=True).start()\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "print('still here', flush=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGUSR1)
    proc.stdin.write("\n")
    proc.stdin.flush()
    out, err = proc.communicate(timeout=30)
    assert "still here" in out
    assert "waiting_in_a_worker" in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a nice value per thread")
def test_background_work_lowers_only_its_own_threads_priority() -> None:
    me = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, me)
    seen: dict[str, int] = {}

    def background() -> None:
        tid = threading.get_native_id()
        run_in_background(5)
        seen["lowered"] = os.getpriority(os.PRIO_PROCESS, tid) - before
        run_in_background(0)  # 0: left as it is
        seen["unchanged"] = os.getpriority(os.PRIO_PROCESS, tid) - before
        run_in_background(30)  # capped at 19, not refused
        seen["capped"] = os.getpriority(os.PRIO_PROCESS, tid)

    worker = threading.Thread(target=background)
    worker.start()
    worker.join()
    lowered = min(19, before + 5) - before  # 5 unless the tests already run niced
    assert seen == {"lowered": lowered, "unchanged": lowered, "capped": 19}
    assert os.getpriority(os.PRIO_PROCESS, me) == before  # the rest of the process: as it was


_STOPPED_BY_SIGNALS = """
import signal, sys, threading
from horizons_platform.threads import on_signals
stop = threading.Event()
seen = []
def act(signum):
    seen.append(signum)
    stop.set()
unwatch = on_signals((signal.SIGTERM,), act)
print("ready", flush=True)
while not stop.wait(0.001):  # the host's main thread waits on its stop event like this
    pass
unwatch()
ignored = signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
print(f"stopped after {len(seen)} of them; ignored now: {ignored}", flush=True)
"""


def test_a_burst_of_stop_signals_stops_the_process_and_never_hangs_it() -> None:
    """A supervisor's SIGTERM, `horizons up`'s to the whole process group, an operator's
    Ctrl-C: stop signals come in bursts. A handler that set the stop event itself could
    run while the main thread held that event's lock (inside ``wait``, or a first
    handler's ``set``) and wait for it for ever: CI saw a host hang so (about one burst
    in twenty, measured with a throw-away script). ``on_signals`` acts off the handler."""
    for _ in range(10):
        proc = subprocess.Popen(
            [sys.executable, "-c", _STOPPED_BY_SIGNALS], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for _ in range(200):
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                break
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError("a burst of SIGTERMs left the process hanging") from None
        assert proc.returncode == 0, out
        # Acted on at least once; every later signal ignored once the process stops.
        assert "stopped after" in out and "ignored now: True" in out, out


def test_a_signal_is_acted_on_off_the_main_thread() -> None:
    acted = threading.Event()
    threads: list[str] = []

    def act(signum: int) -> None:
        threads.append(threading.current_thread().name)
        acted.set()

    previous = signal.getsignal(signal.SIGUSR2)
    unwatch = on_signals((signal.SIGUSR2,), act)
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        assert acted.wait(5)
        assert threads == ["signals"]
    finally:
        unwatch()
        signal.signal(signal.SIGUSR2, previous)


def test_an_action_that_raises_leaves_the_next_signal_acted_on() -> None:
    # `horizons up | tee`: Ctrl-C kills tee too, and the first action's print raises.
    # The second Ctrl-C (kill the children) must still be heard.
    calls: list[int] = []
    second = threading.Event()

    def act(signum: int) -> None:
        calls.append(signum)
        if len(calls) == 1:
            raise BrokenPipeError("the terminal is gone")
        second.set()

    previous = signal.getsignal(signal.SIGUSR2)
    unwatch = on_signals((signal.SIGUSR2,), act)
    try:
        os.kill(os.getpid(), signal.SIGUSR2)
        deadline = time.monotonic() + 5
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert second.wait(5), f"acted on {len(calls)} signal(s)"
    finally:
        unwatch()
        signal.signal(signal.SIGUSR2, previous)
