"""`horizons bench faults`: fault injection against live consumer hosts.

Each scenario prints its produced-vs-stored table as soon as it ends; the summary table
has one lost / doubled line per scenario (target 0) and the run fails if any scenario
lost, doubled or crashed anything. The same scenarios back the pytest ``faults`` suite,
at smaller sizes.
"""

from __future__ import annotations

from collections.abc import Callable

from horizons_bench.faults import broker, dblock, failover, nodes, poison, smtp_down
from horizons_bench.faults import kills as kill_loop
from horizons_bench.faults.common import FaultOutcome
from horizons_bench.harness import BenchContext
from horizons_bench.report import BenchResult, Figure, Target
from horizons_bench.smtp import SmtpSink

SCENARIOS = (
    "kills", "failover", "broker", "nodes", "dblock", "smtp", "fuzz", "hostile", "oversized"
)  # fmt: skip
ZERO = Target("eq", 0)
RESTART_TARGET = Target("le", 2000)  # ms, kill -9 → a new host's partitions assigned: p50


def run(
    ctx: BenchContext,
    kills: int = 20,
    restarts: int = 5,
    only: list[str] | None = None,
    seed: int = 7,
) -> BenchResult:
    chosen = [s for s in SCENARIOS if not only or s in only]
    result = BenchResult(
        "faults", params={"kills": kills, "restarts": restarts, "scenarios": chosen, "seed": seed}
    )
    runners: dict[str, Callable[[SmtpSink], FaultOutcome]] = {
        "kills": lambda smtp: kill_loop.run(ctx, smtp, kills=kills, seed=seed),
        "failover": lambda smtp: failover.run(ctx, smtp, kills=5, seed=seed),
        "broker": lambda smtp: broker.run(ctx, smtp, restarts=restarts, seed=seed),
        "nodes": lambda smtp: nodes.run(ctx, smtp, seed=seed),
        "dblock": lambda smtp: dblock.run(ctx, smtp, seed=seed),
        "smtp": lambda smtp: smtp_down.run(ctx, smtp, seed=seed),
        "fuzz": lambda smtp: poison.run(
            ctx, smtp, poison.fuzz_inputs(seed), "random bytes / JSON / broken events", seed, "fuzz"
        ),
        "hostile": lambda smtp: poison.run(
            ctx, smtp, poison.hostile_inputs(), "hostile edge cases", seed, "hostile"
        ),
        "oversized": lambda smtp: poison.run(
            ctx, smtp, poison.oversized_inputs(seed), "oversized messages", seed, "oversized"
        ),
    }
    outcomes: dict[str, FaultOutcome] = {}
    for name in chosen:
        ctx.progress.say(f"faults: scenario {name}")
        with SmtpSink() as smtp:
            outcome = runners[name](smtp)
        outcomes[name] = outcome
        print(outcome.render(), end="\n\n", flush=True)
        lost, doubled = outcome.verification.lost, outcome.verification.doubled
        verdict = "pass" if outcome.ok else "FAIL: " + "; ".join(outcome.problems())
        result.add(Figure(f"{name}: lost", lost, "rows", ZERO, note=outcome.name))
        result.add(Figure(f"{name}: doubled", doubled, "rows", ZERO, note=verdict[:120]))
        ready = outcome.details.get("restart_to_ready_ms")
        if ready and ready["n"]:
            first = outcome.details.get("first_start_to_ready_ms")
            result.add(
                Figure(
                    f"{name}: restart → ready p50",
                    ready["p50_ms"],
                    "ms",
                    RESTART_TARGET,
                    note=f"n={ready['n']}, p95 {ready['p95_ms']:,.0f} / max "
                    f"{ready['max_ms']:,.0f} ms; first start {first:,.0f} ms",
                )
            )
    result.passed = all(o.ok for o in outcomes.values())
    result.details = {name: o.as_dict() for name, o in outcomes.items()}
    failed = [n for n, o in outcomes.items() if not o.ok]
    if failed:
        result.notes.append("failed scenarios: " + ", ".join(failed) + " (details in the JSON)")
    return result
