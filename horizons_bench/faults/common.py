"""What every fault scenario shares: a run with its own topics and DuckDB file, traffic in
the background, consumer hosts that may be killed, and the final reckoning — every
group caught up, produced vs stored per table, and the scenario's own checks."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from horizons_bench.harness import BenchContext
from horizons_bench.hostproc import HostExited, HostProcess
from horizons_bench.offsets import OffsetProbe
from horizons_bench.runner import all_caught_up, watch
from horizons_bench.smtp import SmtpSink
from horizons_bench.verify import Verification, verify
from horizons_bench.workload import Ledger, LedgerPublisher, produce_jobs
from horizons_platform.kafka.producer import DeliveryError
from horizons_platform.services.registry import group_topics
from horizons_platform.settings import SERVICE_GROUPS
from horizons_platform.waiting import wait_until

# Faults take the broker away for a while: the bench's producer must outlast that, so a
# message it counts as produced really is in Kafka (the consumers are under test here).
DELIVERY_TIMEOUT_S = 300.0


@dataclass
class Check:
    what: str
    ok: bool
    detail: str = ""


@dataclass
class FaultOutcome:
    name: str
    verification: Verification
    checks: list[Check] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.verification.ok and all(c.ok for c in self.checks)

    @property
    def native_crashes(self) -> int:
        """Hosts killed by SIGSEGV/SIGABRT: a crash inside librdkafka or DuckDB."""
        return sum(1 for c in self.details.get("host_exits", []) if c in (-11, -6))

    def problems(self) -> list[str]:
        return self.verification.problems() + [
            f"{c.what}: {c.detail}" for c in self.checks if not c.ok
        ]

    def render(self) -> str:
        lines = [
            f"-- fault: {self.name}: {'PASS' if self.ok else 'FAIL'}",
            self.verification.render(),
        ]
        lines += [
            f"[{'ok' if c.ok else 'FAIL'}] {c.what}" + (f" ({c.detail})" if c.detail else "")
            for c in self.checks
        ]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "problems": self.problems(),
            "checks": [c.__dict__ for c in self.checks],
            "verification": self.verification.as_dict(),
            **self.details,
        }


def _exit_name(code: int) -> str:
    """-11 → "SIGSEGV" (a crash in native code: librdkafka, DuckDB), 1 → "exit 1"."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return signal.Signals(-code).name
    return f"exit {code}"


class FaultRun:
    """One scenario's moving parts. Hosts are subprocesses; traffic runs on threads."""

    def __init__(self, ctx: BenchContext, tag: str, smtp: SmtpSink, **overrides: Any) -> None:
        self.ctx = ctx
        self.tag = tag
        self.smtp = smtp
        self.settings = ctx.settings(tag, smtp_port=smtp.port, **overrides)
        self.ledger = Ledger()
        self.publisher = LedgerPublisher(
            self.settings, self.ledger, delivery_timeout_s=DELIVERY_TIMEOUT_S
        )
        self.groups = list(SERVICE_GROUPS)
        self.probe = OffsetProbe(self.settings, group_topics(self.settings))
        self.hosts: list[HostProcess] = []
        self.stop_traffic = threading.Event()
        self._traffic: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self.unfinished: str | None = None  # why the final catch-up did not complete

    def host(
        self, env: dict[str, str] | None = None, wait: bool = True, log_name: str = ""
    ) -> HostProcess:
        """A new `horizons consume`; hosts that run side by side need their own
        ``log_name``, or one's "ready" line could be read as the other's."""
        log = self.ctx.run_dir / f"host-{self.tag}{log_name}.log"
        host = HostProcess(self.settings, log, env=env).start()
        self.hosts.append(host)
        if wait:
            host.wait_ready()
        return host

    @property
    def current(self) -> HostProcess | None:
        """The newest live host (a standby started later may already be stopped)."""
        return next((h for h in reversed(self.hosts) if h.alive), None)

    def stream(self, events: int, rate: float, seed: int = 7) -> None:
        """Job traffic in the background, until ``events`` or ``stop_traffic``."""

        def produce() -> None:
            try:
                produce_jobs(
                    self.settings,
                    events,
                    self.publisher,
                    rate=rate,
                    seed=seed,
                    stop=self.stop_traffic,
                )
            except DeliveryError:
                # Messages Kafka did not acknowledge are not in the ledger, so they are
                # not expected in the store; the failure itself is judged in checks().
                pass
            except BaseException as exc:  # re-raised by wait_traffic()
                self._errors.append(exc)

        thread = threading.Thread(target=produce, name=f"traffic-{self.tag}", daemon=True)
        thread.start()
        self._traffic.append(thread)

    def wait_traffic(self, stop: bool = False) -> None:
        if stop:
            self.stop_traffic.set()
        for thread in self._traffic:
            thread.join()
        if self._errors:
            raise self._errors[0]

    def finish(self, timeout: float = 300.0, emails: bool = True) -> Verification:
        """End traffic, let a live host consume everything (and send every e-mail), stop
        it, and compare the store with the ledger."""
        self.wait_traffic()
        self.publisher.flush(DELIVERY_TIMEOUT_S)
        host = self.current
        try:
            if host is None or not host.alive:
                host = self.host()
            watch(
                self.probe,
                host,
                until=all_caught_up(self.groups),
                timeout=timeout,
                progress=self.ctx.progress,
                label=f"{self.tag}: catching up",
            )
            ends = self.probe.end_offsets()
            # The ends are what the store is judged against, so the host must have read
            # up to them: the platform's own events (an alert recovering, a signed head)
            # can land after the caught-up sample and before the ends are read, and a
            # host stopped at once then never stored them (CI: the auditor "6 short").
            wait_until(
                lambda: self._stored_up_to(ends),
                timeout,
                what=f"{self.tag}: every group up to the end offsets",
                interval=0.25,
            )
        except (HostExited, TimeoutError) as exc:
            # Still count what got stored: the verdict names what went wrong.
            self.unfinished = str(exc).splitlines()[0]
            ends = self.probe.end_offsets()
        if emails and self.unfinished is None:
            self._wait_for_emails(timeout)
        for h in self.hosts:
            h.stop()
        received = self.smtp.snapshot()
        return verify(
            self.settings,
            self.ledger,
            ends,
            self.groups,
            emails=(len({r.message_id for r in received}), len(received)) if emails else None,
        )

    def _stored_up_to(self, ends: dict[tuple[str, int], int]) -> bool:
        """Every group's committed offsets (Kafka's, committed after DuckDB's) reach
        ``ends`` on each of its partitions."""
        for group in self.groups:
            committed = self.probe.committed(group)
            if any(committed.get(tp, 0) < ends.get(tp, 0) for tp in self.probe.tps(group)):
                return False
        return True

    def _wait_for_emails(self, timeout: float) -> None:
        """Until every terminal event's e-mail arrived, or none came for longer than the
        outbox's longest retry pause (then none will)."""
        quiet = max(10.0, 2 * self.settings.smtp_backoff_max_s)
        deadline = time.monotonic() + timeout
        last_count, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            count = self.smtp.distinct()
            if count >= self.ledger.terminal:
                return
            if count != last_count:
                last_count, last_change = count, time.monotonic()
            elif time.monotonic() - last_change > quiet:
                return
            time.sleep(0.5)

    def checks(self) -> list[Check]:
        """What every scenario demands of the hosts themselves."""
        crashed = [
            _exit_name(h.returncode) for h in self.hosts if h.returncode and not h.exit_expected
        ]
        return [
            Check(
                "no consumer host crashed",
                not crashed,
                f"unexpected exits: {', '.join(crashed)}"
                if crashed
                else f"{len(self.hosts)} host process(es)",
            ),
            Check("consumers caught up at the end", self.unfinished is None, self.unfinished or ""),
            Check(
                "Kafka acknowledged every message the bench produced",
                not self.ledger.failed,
                f"{self.ledger.failed} failed: {dict(self.ledger.errors)}"
                if self.ledger.failed
                else "",
            ),
        ]

    def outcome(
        self,
        name: str,
        verification: Verification,
        checks: list[Check],
        details: dict[str, Any] | None = None,
    ) -> FaultOutcome:
        """The scenario's verdict: its own checks plus what every scenario demands."""
        return FaultOutcome(
            name,
            verification,
            [*checks, *self.checks()],
            {
                **(details or {}),
                "produced": self.ledger.summary(),
                "host_exits": [h.returncode for h in self.hosts],
            },
        )

    def stop_all(self) -> None:
        self.stop_traffic.set()
        for host in self.hosts:
            if host.alive:
                host.stop()
