"""`horizons bench cluster`: what three replicas cost, measured in one run.

The same workload runs twice, each time on a private embedded cluster started for it:
one node (replication factor 1), then three nodes (replication factor 3,
min.insync.replicas 2, every write acknowledged by two replicas). Each time the
orchestrator produces the events flat out (acks=all), then one consumer host with all
four services reads them into a fresh DuckDB file and the store is verified. As a
reference, Kafka alone: a bare confluent-kafka producer (acks=all, idempotent) and
consumer on a topic of the same cluster, produce → consume latency at 200 messages/s.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from horizons_bench.harness import BenchContext, dedicated_broker
from horizons_bench.ingest import produce, run_host_to_end
from horizons_bench.report import BenchResult, Figure
from horizons_bench.smtp import SmtpSink
from horizons_bench.stats import summary_ms
from horizons_platform.settings import SERVICE_GROUPS
from horizons_platform.waiting import wait_until

SIZES = (1, 3)
REFERENCE_RATE = 200.0  # messages/s: the contract's scenario 12 rate
REFERENCE_SECONDS = 10.0


def kafka_latency(bootstrap: str, replicas: int) -> dict[str, float | int | None]:
    """Produce → consume latency of Kafka alone on a fresh topic (what the platform's own
    latency on this cluster should be compared with)."""
    topic = f"bench-reference-{uuid.uuid4().hex[:6]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    config = {"min.insync.replicas": "2"} if replicas >= 3 else {}
    admin.create_topics([NewTopic(topic, 6, replicas, config=config)])[topic].result(30)
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": topic,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 20,
        }
    )
    assigned = threading.Event()
    consumer.subscribe([topic], on_assign=lambda _consumer, _partitions: assigned.set())
    latencies: list[float] = []
    total = int(REFERENCE_RATE * REFERENCE_SECONDS)

    def consume() -> None:
        deadline = time.monotonic() + REFERENCE_SECONDS + 30
        while len(latencies) < total and time.monotonic() < deadline:
            # poll, not consume(n, t): consume waits out its timeout for n messages.
            msg = consumer.poll(0.1)
            if msg is not None and msg.error() is None and msg.value():
                latencies.append(time.time() - float(msg.value() or b"0"))

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    try:
        # Steady state only: what is produced before the group has its partitions waits
        # for the join and would measure that instead.
        wait_until(assigned.is_set, 60, what="the reference consumer's partitions")
        started = time.monotonic()
        for i in range(total):
            producer.produce(topic, key=str(i), value=repr(time.time()))
            producer.poll(0)
            delay = started + (i + 1) / REFERENCE_RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the producer, not synchronisation
        producer.flush(30)
        reader.join(REFERENCE_SECONDS + 30)
    finally:
        consumer.close()
        admin.delete_topics([topic])
    return summary_ms(latencies)


def run(ctx: BenchContext, events: int = 100_000, seed: int = 7) -> BenchResult:
    result = BenchResult("cluster", params={"events": events, "brokers": list(SIZES), "seed": seed})
    produce_rate: dict[int, float] = {}
    e2e_rate: dict[int, float | None] = {}
    latency: dict[int, dict[str, float | int | None]] = {}
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
                # Last, on a warmed-up cluster: three fresh JVMs compiling their hot paths
                # on two cores are slow for their first tens of seconds.
                ctx.progress.say(f"{n} broker(s): Kafka alone, produce → consume latency")
                reference = kafka_latency(broker.bootstrap, min(3, n))
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
        result.add(
            Figure(
                f"reference: Kafka alone, produce → consume p99, {n} broker(s)",
                reference["p99_ms"],
                "ms",
                note=f"p50 {reference['p50_ms']} ms at {REFERENCE_RATE:.0f} msg/s, acks=all",
            )
        )
        latency[n] = reference
        if not host_run.verification.ok:
            result.passed = False
            result.notes.append(f"{n} broker(s): " + "; ".join(host_run.verification.problems()))
    one, three = produce_rate.get(1), produce_rate.get(3)
    if one and three:
        result.notes.append(f"produce: 3 brokers ÷ 1 broker = {three / one:.2f}×")
    e1, e3 = e2e_rate.get(1), e2e_rate.get(3)
    if e1 and e3:
        result.notes.append(f"end to end: 3 brokers ÷ 1 broker = {e3 / e1:.2f}×")
    result.details = {
        "produce_rate": produce_rate,
        "e2e_rate": e2e_rate,
        "kafka_alone_latency": latency,
    }
    return result
