"""Kafka nodes lost mid-stream, on a private 3-node KRaft cluster (replication factor 3,
min.insync.replicas 2): kill -9 one node, bring it back, kill another, bring it back.

The producer must see every message acknowledged (a write needs two in-sync replicas,
and one node down leaves two), the host must not notice beyond a pause while leaders
move, every table must be exact afterwards, the audit chain must verify, and the health
monitor must raise an under-replication alert while a node is down and recover it once
the node has caught up.
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from horizons_bench.faults.common import Check, FaultOutcome, FaultRun
from horizons_bench.harness import BenchContext, dedicated_broker
from horizons_bench.smtp import SmtpSink
from horizons_platform.kafka.broker import EmbeddedBroker
from horizons_platform.services.health_rules import UNDER_REPLICATED
from horizons_platform.store.client import Store
from horizons_platform.waiting import wait_until

NODES = 3
ALERT_SQL = (
    "SELECT count(*), count(resolved_at) FROM health_alerts WHERE rule = ?",
    [UNDER_REPLICATED],
)


def run(
    ctx: BenchContext,
    smtp: SmtpSink,
    events: int = 20_000,
    rate: float = 500.0,
    kills: tuple[int, ...] = (2, 3),
    seed: int = 7,
) -> FaultOutcome:
    data = ctx.run_dir / "private-cluster"
    with dedicated_broker(ctx.base, data, ctx.progress, brokers=NODES) as cluster:
        outcome = _run(ctx, smtp, cluster, events, rate, kills, seed)
    if not ctx.keep_data:
        shutil.rmtree(data, ignore_errors=True)
    return outcome


def _alerts(store: Store) -> tuple[int, int]:
    raised, resolved = store.query(*ALERT_SQL)[1][0]
    return int(raised), int(resolved)


def _wait_for_alert(store: Store, more_than: int) -> None:
    wait_until(lambda: _alerts(store)[0] > more_than, 60, what="an under-replication alert")


def _run(
    ctx: BenchContext,
    smtp: SmtpSink,
    cluster: EmbeddedBroker,
    events: int,
    rate: float,
    kills: tuple[int, ...],
    seed: int,
) -> FaultOutcome:
    fault = FaultRun(
        ctx,
        "nodes",
        smtp,
        kafka_bootstrap=cluster.bootstrap,
        replication_factor=NODES,
        min_insync_replicas=2,
        health_interval_s=1.0,
    )
    store = Store(fault.settings)
    drills: list[dict[str, Any]] = []
    checks: list[Check] = []
    try:
        host = fault.host()
        fault.stream(events=events, rate=rate, seed=seed)
        for node in kills:
            wait_until(lambda: fault.ledger.total > 2_000 * (len(drills) + 1), 120, what="traffic")
            killed = time.monotonic()
            cluster.kill(node)
            ctx.progress.say(f"nodes: killed node {node} (kill -9)")
            _wait_for_alert(store, more_than=_alerts(store)[0])
            raised_after = time.monotonic() - killed
            cluster.restart(node, progress=lambda _: None)
            back = time.monotonic()
            wait_until(lambda: not cluster.status().under_replicated, 120, what="ISR complete")
            in_sync_after = time.monotonic() - back
            wait_until(lambda: _alerts(store)[1] == _alerts(store)[0], 60, what="alert recovered")
            drills.append(
                {
                    "node": node,
                    "alert_after_s": round(raised_after, 2),
                    "in_sync_after_restart_s": round(in_sync_after, 2),
                    "recovered_after_restart_s": round(time.monotonic() - back, 2),
                }
            )
            ctx.progress.say(f"nodes: node {node} back and in sync: {drills[-1]}")
        checks.append(
            Check(
                f"host rode out {len(kills)} node losses",
                host.alive,
                "" if host.alive else f"exit {host.returncode}: {host.log_tail(5)}",
            )
        )
        verification = fault.finish()
    finally:
        fault.stop_all()
    raised, resolved = _alerts(Store(fault.settings))
    checks.append(
        Check(
            "under-replication alert raised and recovered for every node loss",
            raised >= len(kills) and resolved == raised,
            f"{raised} raised, {resolved} recovered",
        )
    )
    return fault.outcome(
        f"kill -9 of Kafka nodes {', '.join(map(str, kills))} of {NODES}",
        verification,
        checks,
        {"drills": drills, "alerts_raised": raised, "alerts_recovered": resolved},
    )
