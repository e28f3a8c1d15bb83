"""`horizons bench cluster`: what three replicas cost, measured in one run.

The same workload runs twice, each time on a private embedded cluster started for it:
one node (replication factor 1), then three nodes (replication factor 3,
min.insync.replicas 2, every write acknowledged by two replicas). Each time the
orchestrator produces the events flat out (acks=all), then one consumer host with all
four services reads them into a fresh DuckDB file and the store is verified.
"""

from __future__ import annotations

import shutil

from horizons_bench.harness import BenchContext, dedicated_broker
from horizons_bench.ingest import produce, run_host_to_end
from horizons_bench.report import BenchResult, Figure
from horizons_bench.smtp import SmtpSink
from horizons_platform.settings import SERVICE_GROUPS

SIZES = (1, 3)


def run(ctx: BenchContext, events: int = 100_000, seed: int = 7) -> BenchResult:
    result = BenchResult("cluster", params={"events": events, "brokers": list(SIZES), "seed": seed})
    produce_rate: dict[int, float] = {}
    e2e_rate: dict[int, float | None] = {}
    for n in SIZES:
        data = ctx.run_dir / f"cluster-{n}"
        with dedicated_broker(ctx.base, data, ctx.progress, brokers=n) as broker:
            sub = BenchContext(
                base=ctx.base,
                name=f"{ctx.name}-{n}",
                run_dir=ctx.run_dir,
                bootstrap=broker.bootstrap,
                progress=ctx.progress,
                stamp=ctx.stamp,
            )
            with SmtpSink() as smtp:
                settings = sub.settings(
                    f"brokers-{n}",
                    smtp_port=smtp.port,
                    replication_factor=min(3, n),
                    min_insync_replicas=2 if n >= 3 else 1,
                )
                ledger, seconds = produce(sub, settings, events, seed)
                host_run = run_host_to_end(
                    sub, settings, ledger, SERVICE_GROUPS, f"all four on {n} broker(s)", 1800.0
                )
        if not ctx.keep_data:
            shutil.rmtree(data, ignore_errors=True)
        produce_rate[n] = ledger.total / seconds
        e2e_rate[n] = host_run.system_rate(ledger.total)
        rf = f"replication factor {min(3, n)}"
        result.add(
            Figure(f"produce, {n} broker(s) (acks=all)", produce_rate[n], "events/s", note=rf)
        )
        result.add(
            Figure(
                f"end to end, {n} broker(s): all four services",
                e2e_rate[n],
                "events/s",
                note="first commit of any group → last group done",
            )
        )
        for group in SERVICE_GROUPS:
            result.add(Figure(f"  {group}, {n} broker(s)", host_run.rate(group), "events/s"))
        if not host_run.verification.ok:
            result.passed = False
            result.notes.append(f"{n} broker(s): " + "; ".join(host_run.verification.problems()))
    one, three = produce_rate.get(1), produce_rate.get(3)
    if one and three:
        result.notes.append(f"produce: 3 brokers ÷ 1 broker = {three / one:.2f}×")
    e1, e3 = e2e_rate.get(1), e2e_rate.get(3)
    if e1 and e3:
        result.notes.append(f"end to end: 3 brokers ÷ 1 broker = {e3 / e1:.2f}×")
    result.details = {"produce_rate": produce_rate, "e2e_rate": e2e_rate}
    return result
