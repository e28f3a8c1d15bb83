"""Hostile input through a live host, interleaved with valid job traffic: random bytes,
random JSON, broken events, hostile edge cases, oversized messages.

The oracle for "valid" is :func:`horizons_platform.events.decode` itself; the claims
under test are the consumers': no crash, every valid event stored by every service,
every invalid message dead-lettered by every group that reads it (table and DLQ topic)
and still recorded, flagged invalid, by the auditor.
"""

from __future__ import annotations

import json
import random
import time
from typing import Any

from horizons_bench.faults.common import (
    DELIVERY_TIMEOUT_S,
    Check,
    FaultOutcome,
    FaultRun,
)
from horizons_bench.harness import BenchContext
from horizons_bench.offsets import OffsetProbe
from horizons_bench.smtp import SmtpSink
from horizons_bench.workload import INVALID, LedgerPublisher
from horizons_platform import events as ev

# Inputs that have broken JSON-handling code before; each must be stored by the auditor.
HOSTILE: dict[str, bytes | None] = {
    "tombstone (no value)": None,
    "empty value": b"",
    "lone surrogate escape in job_id": b'{"event_type":"job.started","job_id":"\\ud800x"}',
    "lone surrogate escape in event_type": b'{"event_type":"\\udfff","job_id":"j"}',
    "JSON nested 50,000 deep": b"[" * 50_000 + b"]" * 50_000,
    "object nested 50,000 deep": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "NUL characters": b'{"event_type":"job.started","job_id":"a\\u0000b","x":"\\u0000"}',
    "5,000-digit number": b'{"event_type":"job.started","job_id":' + b"9" * 5000 + b"}",
    "invalid UTF-8": b'{"event_type":"job.started","job_id":"\xff\xfe"}',
    "UTF-8 BOM": b'\xef\xbb\xbf{"event_type":"job.started"}',
}
# The broker accepts up to message.max.bytes = 1,048,588 per record batch by default.
BROKER_LIMIT_BYTES = 1_040_000


def classify(value: bytes | None) -> str:
    try:
        return ev.decode(value).event_type
    except ev.EventDecodeError:
        return INVALID


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kinds = ["str", "int", "float", "bool", "null"] + (["dict", "list"] if depth < 4 else [])
    kind = rng.choice(kinds)
    if kind == "dict":
        keys = ["event_id", "event_type", "job_id", "occurred_at", "payload", "producer"]
        return {
            rng.choice(keys) if rng.random() < 0.5 else f"k{rng.randint(0, 99)}": _random_json(
                rng, depth + 1
            )
            for _ in range(rng.randint(0, 6))
        }
    if kind == "list":
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {
        "str": lambda: "".join(chr(rng.randint(32, 0x2FFF)) for _ in range(rng.randint(0, 20))),
        "int": lambda: rng.randint(-(2**70), 2**70),
        "float": lambda: rng.uniform(-1e9, 1e9),
        "bool": lambda: rng.random() < 0.5,
        "null": lambda: None,
    }[kind]()


def broken_event(rng: random.Random) -> bytes:
    """A real lifecycle event with one thing made wrong."""
    event = ev.new_event(
        ev.JobCompleted,
        producer="bench-poison",
        job_id=f"poison-{rng.randint(0, 10**9)}",
        payload={"owner": "ada@observatory.example", "job_type": "imaging"},
    )
    data = json.loads(ev.encode(event))
    how = rng.randrange(6)
    if how == 0:
        del data[rng.choice(["event_id", "occurred_at", "producer", "payload"])]
    elif how == 1:
        data["occurred_at"] = "yesterday"
    elif how == 2:
        data["event_type"] = "job.exploded"
    elif how == 3:
        data["job_id"] = rng.randint(0, 100)
    elif how == 4:
        data["payload"]["output_bytes"] = -1
    else:
        return json.dumps(data).encode()[: rng.randint(1, 60)]  # truncated
    return json.dumps(data).encode()


def random_payloads(seed: int, count: int) -> list[bytes]:
    """Seeded fuzz (the pytest suite draws the same kinds of input with hypothesis)."""
    rng = random.Random(seed)
    out: list[bytes] = []
    for i in range(count):
        if i % 3 == 0:
            out.append(rng.randbytes(rng.randint(0, 2000)))
        elif i % 3 == 1:
            out.append(json.dumps(_random_json(rng)).encode())
        else:
            out.append(broken_event(rng))
    return out


def oversized(seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    big_valid = ev.new_event(
        ev.JobSubmitted,
        producer="bench-poison",
        job_id="poison-big-valid",
        payload={
            "owner": "ada@observatory.example",
            "job_type": "imaging",
            "params": {"blob": "x" * 900_000},
        },
    )
    return {
        "valid event with a 900 KB payload": ev.encode(big_valid),
        f"{BROKER_LIMIT_BYTES:,} random bytes (just under the broker limit)": rng.randbytes(
            BROKER_LIMIT_BYTES
        ),
    }


def fuzz_inputs(seed: int = 7, count: int = 300) -> list[tuple[str, bytes | None]]:
    return [("fuzz", p) for p in random_payloads(seed, count)]


def hostile_inputs() -> list[tuple[str, bytes | None]]:
    return list(HOSTILE.items())


def oversized_inputs(seed: int = 7) -> list[tuple[str, bytes | None]]:
    return list(oversized(seed).items())


def run(
    ctx: BenchContext,
    smtp: SmtpSink,
    inputs: list[tuple[str, bytes | None]],
    title: str,
    seed: int = 7,
    tag: str = "poison",
) -> FaultOutcome:
    """Send ``inputs`` (label, value) amid 2,000 valid job events; judge the consumers."""
    fault = FaultRun(ctx, tag, smtp)
    # Big messages need a producer that may send them (librdkafka's default is 1 MB).
    sender = LedgerPublisher(
        fault.settings,
        fault.ledger,
        delivery_timeout_s=DELIVERY_TIMEOUT_S,
        **{"message.max.bytes": 2_000_000},
    )
    topics = [fault.settings.topic_job_lifecycle, fault.settings.topic_job_metrics]
    try:
        fault.host()
        fault.stream(events=2_000, rate=500.0, seed=seed)
        for i, (_, value) in enumerate(inputs):
            # Both topics: the lifecycle one is read by all four groups, metrics by two.
            sender.send_async(topics[i % 2], value, key=f"poison-{i}", kind=classify(value))
            sender.poll(0)
            if i % 20 == 0:
                time.sleep(0.05)  # spread over several batches, amid valid traffic
        if sender.flush(DELIVERY_TIMEOUT_S):
            raise RuntimeError("poison messages not acknowledged by Kafka")
        fault.wait_traffic()
        verification = fault.finish()
        dlq = OffsetProbe(fault.settings, {"dlq": [fault.settings.topic_dlq]}).end_offsets()
    finally:
        fault.stop_all()
    dead_expected = next(t.expected for t in verification.tables if t.table == "dead_letters")
    on_topic = sum(dlq.values())
    return fault.outcome(
        f"{title}: {len(inputs)} messages amid valid traffic",
        verification,
        [
            Check(
                "DLQ topic holds every dead letter",
                on_topic >= dead_expected,
                f"{on_topic} on the topic, {dead_expected} expected",
            ),
        ],
        {
            "inputs": [k for k, _ in inputs if k != "fuzz"] or len(inputs),
            "invalid": fault.ledger.by_kind[INVALID],
        },
    )
