"""Realistic job traffic for demos, tests and benchmarks, driven through the orchestrator.

``plan`` is pure (seeded): which jobs, which fate, which metrics. ``run_simulation``
interleaves many jobs' steps at a target event rate, like a busy telescope backend.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from horizons_platform.services.orchestrator import JobOrchestratorService

JOB_TYPES = ("calibration", "imaging", "rfi-flagging", "beamforming", "correlation", "spectral-fit")
OWNERS = (
    "ada@observatory.example",
    "vera@observatory.example",
    "jocelyn@observatory.example",
    "henrietta@observatory.example",
    "karl@observatory.example",
)
ERRORS = (
    "out of memory on worker",
    "corrupt visibility block",
    "calibrator not found",
    "node preempted",
    "disk quota exceeded",
)


@dataclass
class JobPlan:
    job_id: str
    owner: str
    job_type: str
    fate: str  # completed | failed | cancelled | cancelled-queued
    metrics: dict[str, Any] = field(default_factory=dict)

    def steps(self) -> list[str]:
        if self.fate == "cancelled-queued":
            return ["submit", "cancel", "metrics"]
        return [
            "submit",
            "start",
            {"completed": "complete", "failed": "fail", "cancelled": "cancel"}[self.fate],
            "metrics",
        ]

    @property
    def outcome(self) -> str:
        return "cancelled" if self.fate.startswith("cancelled") else self.fate


def plan(
    n_jobs: int,
    seed: int = 7,
    fail_rate: float = 0.1,
    cancel_rate: float = 0.05,
    prefix: str | None = None,
) -> list[JobPlan]:
    rng = random.Random(seed)
    prefix = prefix or f"sim-{uuid.uuid4().hex[:6]}"
    jobs = []
    for i in range(n_jobs):
        roll = rng.random()
        if roll < fail_rate:
            fate = "failed"
        elif roll < fail_rate + cancel_rate:
            fate = rng.choice(["cancelled", "cancelled-queued"])
        else:
            fate = "completed"
        duration = round(rng.lognormvariate(4.0, 1.0), 3)
        job = JobPlan(f"{prefix}-{i:06d}", rng.choice(OWNERS), rng.choice(JOB_TYPES), fate)
        job.metrics = {
            "duration_s": 0.0 if fate == "cancelled-queued" else duration,
            "queue_time_s": round(rng.expovariate(1 / 30), 3),
            "cpu_hours": round(duration * rng.uniform(1, 64) / 3600, 4),
            "bytes_processed": int(rng.lognormvariate(20, 1.5)),
            "peak_memory_mb": round(rng.uniform(256, 64_000), 1),
        }
        jobs.append(job)
    return jobs


def interleave(
    jobs: list[JobPlan], seed: int = 7, concurrency: int = 50
) -> Iterator[tuple[JobPlan, str]]:
    """Steps of many jobs, interleaved; each job's own steps stay in order."""
    rng = random.Random(seed)
    pending = list(reversed(jobs))
    active: list[tuple[JobPlan, list[str]]] = []
    while pending or active:
        while pending and len(active) < concurrency:
            job = pending.pop()
            active.append((job, job.steps()))
        i = rng.randrange(len(active))
        job, steps = active[i]
        yield job, steps.pop(0)
        if not steps:
            active.pop(i)


def apply_step(orch: JobOrchestratorService, job: JobPlan, step: str, rng: random.Random) -> None:
    if step == "submit":
        orch.submit_job(
            job.job_id,
            owner=job.owner,
            job_type=job.job_type,
            priority=rng.randint(0, 9),
            params={"band": rng.choice(["L", "S", "C", "X"])},
        )
    elif step == "start":
        orch.start_job(job.job_id, worker=f"node-{rng.randint(1, 64):02d}")
    elif step == "complete":
        orch.complete_job(job.job_id, output_bytes=job.metrics["bytes_processed"])
    elif step == "fail":
        orch.fail_job(job.job_id, error=rng.choice(ERRORS), exit_code=rng.choice([1, 137, 139]))
    elif step == "cancel":
        orch.cancel_job(job.job_id, reason="superseded by a newer request", cancelled_by=job.owner)
    elif step == "metrics":
        orch.publish_metrics(job.job_id, outcome=job.outcome, **job.metrics)


def run_simulation(
    orch: JobOrchestratorService,
    jobs: list[JobPlan],
    rate: float = 0.0,
    seed: int = 7,
    progress: Callable[[int, int], None] | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Publish every step; ``rate`` is events/s (0 = as fast as the broker takes them).
    ``stop`` ends it early (a stream that lasts as long as something else)."""
    rng = random.Random(seed)
    total = sum(len(j.steps()) for j in jobs)
    start = time.monotonic()
    sent = 0
    for job, step in interleave(jobs, seed):
        if stop is not None and stop.is_set():
            break
        apply_step(orch, job, step, rng)
        sent += 1
        if rate > 0:
            delay = start + sent / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the producer, not synchronisation
        if progress and sent % 1000 == 0:
            progress(sent, total)
    if not orch.wait:
        orch.flush()
    if progress:
        progress(sent, total)
    return sent
