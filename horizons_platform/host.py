"""The consumer host: wires the four services to the one consumer loop (`horizons consume`).

The host owns the store (:class:`StoreOwner`): it opens the DuckDB file — waiting as a
hot standby while another host holds it — and serves it to every other process.

Each selected service gets its own ConsumerLoop (own consumer group) on a thread, plus
its side workers from SIDE_WORKERS (the notification service's outbox dispatcher, the
health service's monitor).
SIGTERM / SIGINT stop every loop after its current batch. If a loop loses the broker
past the grace period, the whole host shuts down cleanly with that loop's exit code.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol, cast

from horizons_platform import events as ev
from horizons_platform.kafka.admin import ensure_topics
from horizons_platform.kafka.consumer import EXIT_BROKER_LOST, EXIT_OK, AlertSink, ConsumerLoop
from horizons_platform.kafka.producer import Publisher
from horizons_platform.kafka.records import Handler
from horizons_platform.runtime.monitor import HealthMonitor, apply_evaluations
from horizons_platform.runtime.outbox import OutboxDispatcher
from horizons_platform.runtime.prometheus import HostMetrics
from horizons_platform.runtime.publications import PublicationDispatcher, enqueue
from horizons_platform.services.health_rules import Evaluation
from horizons_platform.services.notifications import NotificationHandler
from horizons_platform.services.registry import HANDLERS
from horizons_platform.settings import SERVICE_GROUPS, Settings
from horizons_platform.store.owner import StoreOwner
from horizons_platform.threads import (
    dump_stacks_after,
    name_this_thread,
    on_signals,
    run_in_background,
)

log = logging.getLogger(__name__)

# Each group's writer thread runs its transaction in DuckDB without the GIL, then needs
# the GIL back after every statement — while the polling threads decode in pure Python
# and hand the GIL over only every switch interval (5 ms by default). At 5 ms the
# writers spent more time waiting for the GIL than writing.
GIL_SWITCH_INTERVAL_S = 0.0005
# The hot path allocates a few container objects per message (the validated event, its
# payload, the batch's lists), so at CPython's default threshold (700) a young
# collection ran every ~200 messages, and each older one walked everything start-up
# made again. That is frozen out of collection once the host is up, and the young
# generation waits for 50,000 allocations: validating a batch cost
# 6.7-7.0 instead of 9.3-10.0 µs per message (docs/kpis.md, thirteenth session).
GC_THRESHOLDS = (50_000, 20, 100)


@dataclass
class Host:
    settings: Settings
    groups: tuple[str, ...] = SERVICE_GROUPS
    stop_event: threading.Event = field(default_factory=threading.Event)
    loops: dict[str, ConsumerLoop] = field(default_factory=dict)
    # Each service's side workers, by name (see SIDE_WORKERS).
    workers: dict[str, Worker] = field(default_factory=dict)
    exit_codes: dict[str, int] = field(default_factory=dict)
    # Extra periodic hooks (e.g. reporting materializations to Dagster); never block ingest.
    background: list[Callable[[threading.Event, StoreOwner], None]] = field(default_factory=list)
    on_standby: Callable[[str], None] | None = None

    def __post_init__(self) -> None:
        unknown = set(self.groups) - set(HANDLERS)
        if unknown:
            raise ValueError(f"unknown service(s) {sorted(unknown)}; choose from {list(HANDLERS)}")
        self.store = StoreOwner(self.settings)
        self.publisher = Publisher(self.settings)
        self._threads: list[threading.Thread] = []
        self.publications: PublicationDispatcher | None = None  # set by start()

    def start(self) -> bool:
        """Take the store (as a standby, wait for it), then start every service.
        False when stopped while still a standby."""
        if not self.store.open(self.stop_event, self.on_standby):
            return False
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        ensure_topics(self.settings)
        self.metrics = HostMetrics(self.settings, self.store, self.groups)
        self.store.observe = self.metrics.observe_transaction
        self.store.observe_checkpoint = self.metrics.observe_checkpoint
        if self.settings.metrics_port >= 0:
            try:
                port = self.metrics.serve(self.settings.metrics_port)
                log.info("metrics: http://127.0.0.1:%d/metrics", port)
            except OSError as exc:  # a busy port must not keep the consumers down
                log.error(
                    "metrics NOT served on 127.0.0.1:%d (%s); set HORIZONS_METRICS_PORT",
                    self.settings.metrics_port,
                    exc,
                )
        for group in self.groups:
            handler = HANDLERS[group](self.settings)
            self.loops[group] = ConsumerLoop(
                handler,
                self.settings,
                self.store,
                publisher=self.publisher,
                stop_event=self.stop_event,
                raise_alerts=self._alert_sink(group),
                metrics=self.metrics,
            )
            for name, make in SIDE_WORKERS.get(group, {}).items():
                worker = self.workers[name] = make(self, handler)
                self._spawn(name, worker.run, background=True)
        # Alerts and audit records written while the broker was away leave from here.
        publications = self.publications = PublicationDispatcher(
            self.settings, self.store, self.publisher, self.stop_event
        )
        for loop in self.loops.values():
            loop.handler.publish_soon = publications.publish_soon
        self._spawn("publications", publications.run, background=True)
        for hook in self.background:
            self._spawn(
                getattr(hook, "__name__", "background"),
                functools.partial(hook, self.stop_event, self.store),
                background=True,
            )
        for group, loop in self.loops.items():
            self._spawn(f"consumer-{group}", functools.partial(self._run_loop, group, loop))
        self._announce(ev.ConsumerStarted, "started")
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        return True

    @property
    def dispatcher(self) -> OutboxDispatcher | None:
        return cast("OutboxDispatcher | None", self.workers.get("outbox"))

    @property
    def monitor(self) -> HealthMonitor | None:
        return cast("HealthMonitor | None", self.workers.get("health-monitor"))

    def _alert_sink(self, group: str) -> AlertSink:
        def raise_alert(
            rule: str, subject: str, value: float, threshold: float, severity: str, text: str
        ) -> object:
            found = Evaluation(rule, subject, value, threshold, severity, True, text)
            return apply_evaluations(
                self.settings,
                self.store,
                self.publisher,
                [found],
                actor=f"consumer:{group}",
                stop=self.stop_event,
            )

        return raise_alert

    def observe_send(self, seconds: float, ok: bool) -> None:
        self.metrics.outbox_send_seconds.observe(seconds)
        self.metrics.outbox_sent.labels("sent" if ok else "failed").inc()

    def _spawn(self, name: str, target: Callable[[], None], *, background: bool = False) -> None:
        """A thread of the host. ``background`` work (outboxes, the monitor) yields the
        CPU to the consumer loops and their writers: at 1,000 events/s on two cores the
        outbox's claims took as much CPU as the busiest group's commits, at the same
        moments, and every group's produce → stored p99 waited on it."""

        def run() -> None:
            name_this_thread()
            if background:
                run_in_background(self.settings.background_nice)
            target()

        thread = threading.Thread(target=run, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _run_loop(self, group: str, loop: ConsumerLoop) -> None:
        try:
            code = loop.run()
        except Exception:
            log.exception("%s: consumer loop crashed", group)
            code = 1
        self.exit_codes[group] = code
        if code != EXIT_OK:
            # One service lost the broker or the store: stop the others cleanly too.
            self.stop_event.set()

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """True once every consumer has its partitions; False after ``timeout`` or as
        soon as the host is stopped. A SIGTERM that lands while the consumers are still
        joining their groups must not wait out the timeout: a loop that stops before
        its assignment never becomes ready (CI: a host stopped right after its start
        took 60 s to leave, and its supervisor gave up on it)."""
        deadline = time.monotonic() + timeout
        for loop in self.loops.values():
            while not loop.ready.wait(0.05):
                if self.stop_event.is_set() or time.monotonic() >= deadline:
                    return False
        return True

    def stop(self) -> None:
        self.stop_event.set()

    def join(self, timeout: float | None = None) -> int:
        # One deadline for all of them: a thread each given the whole timeout would make
        # the stop of a host with eight of them take up to eight timeouts.
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            log.error("still running %.0f s after the stop: %s", timeout or 0, ", ".join(stuck))
        if not any(self.exit_codes.values()):
            self._announce(ev.ConsumerStopped, "stopped")
        lost = [g for g, code in self.exit_codes.items() if code == EXIT_BROKER_LOST]
        if lost:
            self._record_broker_lost(lost)
        elif not stuck and self.publications is not None:
            self.publications.drain()
        self.publisher.flush(2.0)
        self.store.close()
        return max(self.exit_codes.values(), default=EXIT_OK)

    def _record_broker_lost(self, groups: list[str]) -> None:
        """``consumer.broker_lost`` per group, through the publication outbox: the broker
        is gone now, the next host publishes it once it is back."""
        try:
            with self.store.transaction() as con:
                for group in groups:
                    event = ev.new_event(
                        ev.ConsumerBrokerLost,
                        producer="consumer-host",
                        payload={
                            "consumer_group": group,
                            "host": socket.gethostname(),
                            "pid": os.getpid(),
                            "detail": f"broker unreachable for {self.settings.broker_grace_s:.0f}s",
                        },
                    )
                    enqueue(con, self.settings.topic_system_health, event, key=group)
        except Exception:
            log.exception("could not record the lost broker")

    def _announce(self, cls: type[ev.Envelope], detail: str) -> None:
        for group in self.groups:
            event = ev.new_event(
                cls,
                producer="consumer-host",
                payload={
                    "consumer_group": group,
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "detail": detail,
                },
            )
            self.publisher.send_async(
                self.settings.topic_system_health,
                ev.encode(event),
                key=group,
                headers=ev.headers_for(event),
            )


class Worker(Protocol):
    def run(self) -> None: ...


def _outbox(host: Host, handler: Handler) -> OutboxDispatcher:
    """Delivers the notification outbox; the handler wakes it after each commit."""
    dispatcher = OutboxDispatcher(host.settings, host.store, host.stop_event)
    dispatcher.observe = host.observe_send
    assert isinstance(handler, NotificationHandler)
    handler.on_new_notifications = dispatcher.wake
    return dispatcher


def _monitor(host: Host, handler: Handler) -> HealthMonitor:
    """Measures lag and rates and raises the health alerts on a timer."""
    return HealthMonitor(host.settings, host.store, host.publisher, host.stop_event)


# The services' side workers, started beside their consumer loops: group → {name: maker}.
SIDE_WORKERS: dict[str, dict[str, Callable[[Host, Handler], Worker]]] = {
    "notifications": {"outbox": _outbox},
    "system-health": {"health-monitor": _monitor},
}


def run_host(
    settings: Settings,
    groups: Iterable[str] = SERVICE_GROUPS,
    on_ready: Callable[[Host], None] | None = None,
    background: Iterable[Callable[[threading.Event, StoreOwner], None]] = (),
    on_standby: Callable[[str], None] | None = None,
) -> int:
    """Run until SIGINT/SIGTERM (exit 0) or a lost broker (non-zero)."""
    host = Host(settings, tuple(groups), background=list(background), on_standby=on_standby)

    def _stop(signum: int) -> None:
        host.stop()  # first: whatever the log does, the host stops
        log.info("received %s: stopping after the current batches", signal.Signals(signum).name)
        dump_stacks_after(settings.shutdown_timeout_s)

    unwatch = on_signals((signal.SIGTERM, signal.SIGINT), _stop)
    try:
        if not host.start():
            return 0  # stopped while waiting as a standby
        if host.wait_ready() and on_ready:
            on_ready(host)
        while not host.stop_event.wait(0.5):
            pass
        return host.join(settings.shutdown_timeout_s + settings.broker_grace_s)
    finally:
        unwatch()
