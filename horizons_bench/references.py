"""The two yardsticks every throughput figure is divided by, measured in the same run
over the same topics: a bare confluent-kafka loop (fetch only: no decoding, no store)
and Kafka's own ``org.apache.kafka.tools.ConsumerPerformance`` (JVM client)."""

from __future__ import annotations

import csv
import io
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from horizons_bench.harness import Progress
from horizons_bench.offsets import TP
from horizons_platform.settings import Settings

# ConsumerPerformance prints its CSV on stdout; keep log4j quiet and on stderr.
_LOG4J = """\
status = error
appender.err.type = Console
appender.err.name = STDERR
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = %p %m%n
rootLogger.level = WARN
rootLogger.appenderRef.err.ref = STDERR
"""


@dataclass(frozen=True)
class Reference:
    name: str
    messages: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float | None:
        return self.messages / self.seconds if self.seconds > 0 and self.messages else None


@dataclass(frozen=True)
class References:
    bare: Reference | None
    perf: Reference | None

    def ratios(self, rate: float | None) -> tuple[float | None, float | None]:
        def ratio(ref: Reference | None) -> float | None:
            return rate / ref.rate if rate and ref and ref.rate else None

        return ratio(self.bare), ratio(self.perf)

    def as_dict(self) -> dict[str, object]:
        def one(r: Reference | None) -> dict[str, object] | None:
            if r is None:
                return None
            return {
                "messages": r.messages,
                "seconds": round(r.seconds, 3),
                "rate": r.rate,
                "note": r.note,
            }

        return {"bare_confluent_loop": one(self.bare), "consumer_performance": one(self.perf)}


def bare_loop(settings: Settings, ends: dict[TP, int], timeout: float = 300.0) -> Reference:
    """Fetch every message of ``ends`` with the loop's own fetch settings and batch size.

    Assigned, not subscribed: group joining is not throughput, so the clock starts at
    the first message and stops at the last.
    """
    total = sum(ends.values())
    consumer = Consumer(
        settings.kafka_config(
            **{
                "group.id": f"bench-bare-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 20,
            }
        )
    )
    try:
        consumer.assign([TopicPartition(t, p, OFFSET_BEGINNING) for (t, p), n in ends.items() if n])
        seen = first_batch = 0
        first = last = 0.0
        deadline = time.monotonic() + timeout
        while seen < total and time.monotonic() < deadline:
            batch = consumer.consume(
                num_messages=settings.batch_max_messages, timeout=settings.batch_max_wait_s
            )
            good = sum(1 for m in batch if m.error() is None)
            if good:
                last = time.monotonic()
                if not seen:
                    first, first_batch = last, good
                seen += good
        # The clock starts when the first batch has arrived: it is not in the rate.
        return Reference(
            "bare confluent-kafka loop", seen - first_batch, last - first, f"{seen:,} fetched"
        )
    finally:
        consumer.close()


def consumer_performance(
    settings: Settings, jar_dir: Path, ends: dict[TP, int], work_dir: Path
) -> Reference:
    """Run ConsumerPerformance once per topic; sum messages and fetch time (JVM start-up
    and group join excluded, as the tool itself reports them separately)."""
    log4j = work_dir / "consumer-performance-log4j2.properties"
    work_dir.mkdir(parents=True, exist_ok=True)
    log4j.write_text(_LOG4J)
    per_topic: dict[str, int] = {}
    for (topic, _), n in ends.items():
        per_topic[topic] = per_topic.get(topic, 0) + n
    messages, seconds = 0, 0.0
    for topic, n in per_topic.items():
        if not n:
            continue
        command = [
            "java",
            "-Xmx512m",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            f"{jar_dir}/*",
            "org.apache.kafka.tools.ConsumerPerformance",
            "--bootstrap-server",
            settings.bootstrap,
            "--topic",
            topic,
            "--messages",
            str(n),
            "--group",
            f"bench-perf-{uuid.uuid4().hex[:8]}",
            "--timeout",
            "30000",
        ]
        out = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
        row = _parse_csv(out.stdout)
        if out.returncode != 0 or row is None:
            raise RuntimeError(
                f"ConsumerPerformance failed on {topic} (exit {out.returncode}): "
                f"{(out.stderr or out.stdout)[-800:]}"
            )
        messages += int(float(row["data.consumed.in.nMsg"]))
        seconds += float(row["fetch.time.ms"]) / 1000
    return Reference("Kafka ConsumerPerformance", messages, seconds, "fetch time, per topic")


def _parse_csv(stdout: str) -> dict[str, str] | None:
    lines = [ln for ln in stdout.splitlines() if ln.count(",") >= 8]
    if len(lines) < 2:
        return None
    reader = csv.reader(io.StringIO("\n".join(lines[-2:])))
    header, values = (list(map(str.strip, r)) for r in reader)
    return dict(zip(header, values, strict=False))


def measure(
    settings: Settings,
    ends: dict[TP, int],
    jar_dir: Path | None,
    work_dir: Path,
    progress: Progress,
) -> References:
    total = sum(ends.values())
    progress.say(f"reference: bare confluent-kafka loop over {total:,} messages")
    bare = bare_loop(settings, ends)
    perf = None
    if jar_dir is None:
        progress.say("reference: Kafka jars not cached, ConsumerPerformance skipped")
    else:
        progress.say(f"reference: Kafka ConsumerPerformance over {total:,} messages")
        try:
            perf = consumer_performance(settings, jar_dir, ends, work_dir)
        except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
            progress.say(f"reference: ConsumerPerformance failed: {exc}")
    return References(bare, perf)
