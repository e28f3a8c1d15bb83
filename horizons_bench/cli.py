"""`horizons bench …`: parse, run one benchmark in its own context, print, write JSON."""

from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from horizons_platform.settings import SERVICE_GROUPS, Settings

if TYPE_CHECKING:
    from horizons_bench.harness import Progress

# Benchmark (= module of horizons_bench, imported only when run) → one-line help.
BENCHMARKS: dict[str, str] = {
    "ingest": "throughput produced → committed in DuckDB, per service and all four",
    "latency": "p50/p95/p99 produce → stored at a steady rate, and job → e-mail",
    "memory": "consumer host RSS while it processes N events (default 1,000,000)",
    "burst": "lag rise and drain after a burst, and when the lag alert fired",
    "soak": "steady load for N minutes: memory stays bounded, nothing lost",
    "query": "a ~15 s analytical query through the owner while events stream: commit gaps",
    "outbox": "e-mails/s from the notification outbox to a loopback SMTP server",
    "faults": "fault injection: kills, takeovers, broker restarts and node losses, SMTP down, "
    "poison",
    "failover": "kill -9 the owner host N times with a hot standby: takeover time, nothing lost",
    "cluster": "produce and end-to-end throughput on 1 vs 3 Kafka brokers, in the same run",
    "audit": "verify-audit on a large trail: the full run's records/s, then after 1,000 new",
    "transactions": "one batch's DuckDB transaction per service, without a broker (ms)",
    "checkpoint": "how long a DuckDB checkpoint holds every writer, by events stored (s)",
}
ALL_ORDER = (
    "ingest", "latency", "query", "outbox", "burst", "memory", "soak", "faults", "failover",
    "cluster", "audit", "transactions", "checkpoint",
)  # fmt: skip

EPILOG = """\
Each benchmark starts the embedded broker on HORIZONS_BROKER_PORT if it is not running
(and stops it afterwards), unless HORIZONS_KAFKA_BOOTSTRAP names a cluster. Topics and
the DuckDB file are the run's own (bench-<timestamp>-…, var/bench/<name>-<ts>/), and are
removed afterwards unless --keep-data. Results: a table on stdout, JSON in
var/bench/<name>-<timestamp>.json, progress on stderr.
"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=7, help="simulation seed (default 7)")
    p.add_argument(
        "--keep-data", action="store_true", help="keep the run's topics and DuckDB files"
    )
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _services(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument(
        "--service",
        action="append",
        choices=SERVICE_GROUPS,
        metavar="NAME",
        help=f"consumer group (repeatable; default: {default_help})",
    )


def _parser(bench: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    text = BENCHMARKS[name]
    return bench.add_parser(
        name, help=text, description=text[0].upper() + text[1:] + ".", epilog=EPILOG
    )


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="benchmarks and fault injection (prints a table, writes JSON)",
        description="Benchmarks against the real broker, consumer hosts and DuckDB.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")

    p = _parser(bench, "ingest")
    p.add_argument("--events", type=int, default=100_000, help="events (default 100,000)")
    _services(p, "each of the four alone")
    p.add_argument("--no-together", action="store_true", help="skip the all-four run")
    p.add_argument("--timeout", type=float, default=1800.0, help="per host run, seconds")
    _common(p)

    p = _parser(bench, "latency")
    p.add_argument("--rate", type=float, default=1000.0, help="events/s (default 1,000)")
    p.add_argument("--seconds", type=float, default=30.0, help="duration (default 30)")
    p.add_argument(
        "--warmup",
        type=float,
        default=20.0,
        help="seconds at the same rate before measuring (default 20; 0: none — a fresh "
        "broker then spends half a core compiling)",
    )
    p.add_argument(
        "--producer",
        choices=("replay", "orchestrator"),
        default="replay",
        help="replay: the orchestrator encodes the events before the measured window and "
        "they are replayed at the rate (default; ~0.04 cores at 1,000/s); orchestrator: "
        "it encodes and sends them live, on the cores the platform is measured on "
        "(~0.23 cores at 1,000/s; how runs before 2026-12-07 were made)",
    )
    _common(p)

    p = _parser(bench, "query")
    p.add_argument("--rate", type=float, default=1000.0, help="events/s (default 1,000)")
    p.add_argument(
        "--rows",
        type=int,
        default=60_000_000,
        help="size of the query's range (default 60,000,000: ~15 s on 2 idle cores)",
    )
    _common(p)

    p = _parser(bench, "outbox")
    p.add_argument("--emails", type=int, default=30_000, help="e-mails (default 30,000)")
    _common(p)

    p = _parser(bench, "memory")
    p.add_argument("--events", type=int, default=1_000_000, help="events (default 1,000,000)")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=15.0,
        help="stop consuming after this long even if not done (default 15)",
    )
    _services(p, "all four in one host")
    _common(p)

    p = _parser(bench, "burst")
    p.add_argument("--burst", type=int, default=30_000, help="burst size, events (30,000)")
    p.add_argument("--rate", type=float, default=200.0, help="steady rate around it (200/s)")
    p.add_argument(
        "--threshold", type=int, default=2_000, help="lag alert threshold, messages (2,000)"
    )
    _common(p)

    p = _parser(bench, "soak")
    p.add_argument("--minutes", type=float, default=5.0, help="duration (default 5)")
    p.add_argument("--rate", type=float, default=200.0, help="events/s (default 200)")
    _common(p)

    p = _parser(bench, "faults")
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs of the host (default 20)")
    p.add_argument("--restarts", type=int, default=5, help="short broker outages (default 5)")
    p.add_argument(
        "--only",
        action="append",
        metavar="SCENARIO",
        help="run only these scenarios (repeatable): kills, failover, broker, nodes, dblock, "
        "smtp, fuzz, hostile, oversized",
    )
    _common(p)

    p = _parser(bench, "failover")
    p.add_argument("--kills", type=int, default=5, help="SIGKILLs of the owner (default 5)")
    p.add_argument("--rate", type=float, default=400.0, help="events/s meanwhile (default 400)")
    _common(p)

    p = _parser(bench, "cluster")
    p.add_argument("--events", type=int, default=100_000, help="events per run (default 100,000)")
    _common(p)

    p = _parser(bench, "audit")
    p.add_argument("--records", type=int, default=3_000_000, help="trail size (default 3,000,000)")
    p.add_argument(
        "--new", type=int, default=1_000, help="records added before the incremental run"
    )
    _common(p)

    p = _parser(bench, "transactions")
    p.add_argument("--jobs", type=int, default=20_000, help="simulated jobs (default 20,000)")
    p.add_argument(
        "--batch", type=int, default=100, help="messages per batch (default 100: 1,000/s)"
    )
    p.add_argument(
        "--history",
        type=int,
        default=2_000_000,
        help="finished jobs and sent notifications stored before the run (default "
        "2,000,000: hours to days of a 1,000 events/s stream); batches and the outbox's "
        "claims are timed against them",
    )
    _common(p)

    p = _parser(bench, "checkpoint")
    p.add_argument(
        "--events",
        type=int,
        default=50_000,
        help="events whose rows one timed checkpoint writes (default 50,000: ~50 s of "
        "a 1,000 events/s stream)",
    )
    p.add_argument(
        "--sizes",
        type=_counts,
        default=(0, 1_000_000),
        help="events stored before each timed checkpoint, comma-separated (default "
        "0,1000000: a fresh store, then ~17 minutes of 1,000 events/s)",
    )
    p.add_argument("--batch", type=int, default=500, help="messages per batch (default 500)")
    _common(p)

    p = bench.add_parser("all", help="every benchmark above with its defaults", epilog=EPILOG)
    _common(p)
    parser.set_defaults(func=cmd_bench)


def _counts(text: str) -> tuple[int, ...]:
    """``"0,1000000"`` → (0, 1000000); underscores allowed (1_000_000)."""
    try:
        counts = tuple(int(part) for part in text.replace("_", "").split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of counts: {text!r}"
        ) from None
    if not counts or min(counts) < 0:
        raise argparse.ArgumentTypeError(f"counts must be 0 or more: {text!r}")
    return counts


def _kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The options of one benchmark, as keyword arguments of its ``run``."""
    skip = {"command", "benchmark", "func", "verbose", "keep_data", "quiet"}
    kwargs = {k: v for k, v in vars(args).items() if k not in skip}
    if "service" in kwargs:
        services = kwargs.pop("service")
        if services:
            kwargs["services"] = tuple(services)
    if "no_together" in kwargs:
        kwargs["together"] = not kwargs.pop("no_together")
    return kwargs


def cmd_bench(args: argparse.Namespace) -> int:
    from horizons_bench.harness import Progress, broker_for

    settings = Settings()
    progress = Progress(quiet=args.quiet)
    names = ALL_ORDER if args.benchmark == "all" else (args.benchmark,)
    failed = False
    with broker_for(settings, progress):  # one broker for all of `bench all`
        for name in names:
            kwargs = {"seed": args.seed} if args.benchmark == "all" else _kwargs(args)
            failed |= not _run_one(name, kwargs, settings, progress, args.keep_data)
    return 1 if failed else 0


def _run_one(
    name: str, kwargs: dict[str, Any], settings: Settings, progress: Progress, keep: bool
) -> bool:
    from horizons_bench.harness import bench_context

    module = importlib.import_module(f"horizons_bench.{name}")
    run: Callable[..., Any] = module.run
    started = time.monotonic()
    progress.say(f"bench {name}: {kwargs}")
    with bench_context(name, settings, progress, keep_data=keep) as ctx:
        result = run(ctx, **kwargs)
        result.duration_s = time.monotonic() - started
        path = result.write_json(Path(settings.var_dir).absolute() / "bench", ctx.stamp)
    progress.say(f"bench {name}: done in {result.duration_s:.0f} s")
    print(result.table())
    print(f"(JSON: {path})\n", flush=True)
    # Missing a performance target is a result, not an error; a fault that lost or
    # doubled something is an error.
    return result.passed
