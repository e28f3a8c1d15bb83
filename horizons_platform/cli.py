"""`horizons` — the command line. Thin: parse, call, print."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from horizons_platform.output import print_table
from horizons_platform.settings import SERVICE_GROUPS, Settings

if TYPE_CHECKING:
    from horizons_platform.kafka.broker import EmbeddedBroker


def _settings() -> Settings:
    return Settings()


# --- broker -----------------------------------------------------------------------------


def _broker_settings(args: argparse.Namespace) -> Settings:
    settings = _settings()
    count = getattr(args, "brokers", None)
    if count is None and settings.broker_count == 1:
        # A cluster started with --brokers N is still found by a later stop/status/kill.
        nodes = sorted(settings.broker_dir.glob("node-*/server.properties"))
        if nodes and not (settings.broker_dir / "broker.pid").exists():
            count = len(nodes)
    if count is not None and count != settings.broker_count:
        settings = Settings(**{**settings.model_dump(), "broker_count": count})
    return settings


def cmd_broker(args: argparse.Namespace) -> int:
    from horizons_platform.kafka.admin import ensure_topics
    from horizons_platform.kafka.broker import BrokerError, EmbeddedBroker

    settings = _broker_settings(args)
    if not settings.embedded_broker and args.action != "status":
        print(
            f"HORIZONS_KAFKA_BOOTSTRAP={settings.kafka_bootstrap} is set: the embedded "
            "broker is not used.",
            file=sys.stderr,
        )
        return 2
    broker = EmbeddedBroker(settings)
    try:
        if args.action == "start":
            broker.start()
            parts = ensure_topics(settings)
            print("topics: " + ", ".join(f"{t}({n})" for t, n in parts.items()))
            print(f"broker ready on {broker.bootstrap}")
            if settings.broker_count > 1 and os.environ.get("HORIZONS_BROKER_COUNT") is None:
                print(
                    f"export HORIZONS_BROKER_COUNT={settings.broker_count} so every other "
                    "command (up, consume, simulate, ...) bootstraps from all nodes."
                )
        elif args.action == "stop":
            print("broker stopped" if broker.stop() else "broker was not running")
        elif args.action in ("kill", "restart"):
            if args.node is None:
                print(f"error: broker {args.action} needs a node number", file=sys.stderr)
                return 2
            if args.action == "kill":
                killed = broker.kill(args.node)
                print(f"node {args.node} killed" if killed else f"node {args.node} was not running")
            else:
                broker.restart(args.node)
        else:
            return _print_broker_status(broker)
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _print_broker_status(broker: EmbeddedBroker) -> int:
    st = broker.status()
    if not st.running:
        print(f"broker not running ({st.bootstrap}, Kafka {st.kafka_version})")
        print(f"log: {st.log_path}")
        return 1
    print(f"running: {st.bootstrap}, Kafka {st.kafka_version}")
    print_table(
        ["node", "state", "pid", "port", "controller port", "roles"],
        [
            (n.node_id, "up" if n.running else "DOWN", n.pid, n.port, n.controller_port, n.roles)
            for n in st.nodes
        ],
    )
    print(f"log: {st.log_path}")
    print_table(["topic", "partitions"], sorted(st.topics.items()))
    if st.under_replicated:
        shown = ", ".join(st.under_replicated[:12])
        more = f" (+{len(st.under_replicated) - 12} more)" if len(st.under_replicated) > 12 else ""
        print(f"under-replicated partitions: {len(st.under_replicated)}: {shown}{more}")
    else:
        print("under-replicated partitions: 0")
    down = [n for n in st.nodes if not n.running]
    return 1 if down or st.under_replicated else 0


# --- consumers, traffic, queries ------------------------------------------------------------


def cmd_consume(args: argparse.Namespace) -> int:
    from horizons_platform.host import run_host
    from horizons_platform.threads import dump_stacks_on, exit_within

    groups = tuple(args.service) if args.service else SERVICE_GROUPS
    settings = _settings()
    dump_stacks_on()  # `kill -USR1 <pid>`: every thread's stack into this output
    print(
        f"consuming from {settings.bootstrap} into {settings.database}: {', '.join(groups)}",
        file=sys.stderr,
    )
    background = []
    if settings.report_materializations:
        # Tells Dagster when the consumer-fed tables change (a thread; never blocks ingest).
        from horizons_platform.runtime.materializations import materialization_reporter

        background.append(materialization_reporter(settings))
    code = run_host(
        settings,
        groups,
        on_ready=lambda host: print(
            f"consumers ready; the store is served on {host.store.info.uri}"
            if host.store.info
            else "consumers ready",
            "(Ctrl-C to stop)",
            file=sys.stderr,
        ),
        background=background,
        on_standby=lambda message: print(message, file=sys.stderr),
    )
    print(f"consumers stopped (exit {code})", file=sys.stderr)
    exit_within(settings.shutdown_timeout_s)
    return code


def cmd_simulate(args: argparse.Namespace) -> int:
    from horizons_platform.kafka.admin import ensure_topics
    from horizons_platform.progress import progress
    from horizons_platform.services.orchestrator import JobOrchestratorService
    from horizons_platform.simulate import plan, run_simulation

    settings = _settings()
    ensure_topics(settings)
    orch = JobOrchestratorService(settings, recover=False, wait=False)
    jobs = plan(args.jobs, seed=args.seed, fail_rate=args.fail_rate, cancel_rate=args.cancel_rate)

    with progress("publishing events") as update:
        sent = run_simulation(orch, jobs, rate=args.rate, seed=args.seed, progress=update)
    print(f"published {sent} events for {len(jobs)} jobs to {settings.bootstrap}", file=sys.stderr)
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    import duckdb

    from horizons_platform.output import write_result
    from horizons_platform.store.base import STORE_ERRORS
    from horizons_platform.store.client import Store
    from horizons_platform.store.sql import statements, write_kinds

    try:
        found = statements(args.sql)
        writes = write_kinds(found)
    except duckdb.Error as exc:  # a ParserException: say so before touching the store
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not found:
        print("error: no SQL statement to run", file=sys.stderr)
        return 2
    if writes and not args.write:
        print(
            f"refused: the query holds {', '.join(sorted(set(writes)))}, which changes the "
            "store; run it again with --write if that is what you mean",
            file=sys.stderr,
        )
        if writes == ["CREATE"] and "PIVOT" in args.sql.upper():
            print(
                "  (a PIVOT without IN (…) first creates a type of the column's values: "
                "name them, e.g. PIVOT jobs ON status IN ('completed', 'failed'))",
                file=sys.stderr,
            )
        return 2
    if len(found) > 1 and not args.write:
        print(
            f"refused: {len(found)} statements; a read prints one result, so run them one "
            "at a time (--write runs several in one transaction)",
            file=sys.stderr,
        )
        return 2
    if args.limit is not None and args.limit < 0:
        print("error: --limit must be 0 (every row) or more", file=sys.stderr)
        return 2
    store = Store(_settings())
    # Reads run in a READ ONLY transaction too: the owner refuses writes the parser
    # check above could miss (a side-effecting function, say).
    session = store.transaction() if args.write else store.snapshot()
    try:
        with session as con:
            shown = write_result(con.execute(args.sql), args.format, args.limit, sys.stdout)
    except duckdb.Error as exc:
        if isinstance(exc, STORE_ERRORS):
            raise
        print(f"error: {exc}", file=sys.stderr)  # the SQL's own error, as DuckDB words it
        return 2
    if args.format == "table":
        more = f" (stopped at --limit {shown.limit})" if shown.truncated else ""
        print(f"({shown.rows} row{'s' if shown.rows != 1 else ''}{more})")
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    from horizons_platform.store.base import StoreUnavailable
    from horizons_platform.store.client import Store

    settings = _settings()
    store = Store(settings)
    if args.action == "disconnect":
        if not args.connection:
            print(
                "error: which session? `horizons store disconnect CONNECTION` "
                "(`horizons store status` lists them)",
                file=sys.stderr,
            )
            return 2
        try:
            ended = store.disconnect(args.connection)
        except (LookupError, StoreUnavailable) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(f"ended session {ended}: its query stopped, its open transaction rolled back")
        return 0
    status = store.status()
    for key, value in status.items():
        if key not in ("clients", "problem"):
            print(f"{key.ljust(12)}  {value}")
    if status["owner_pid"] is None:
        print("the store has no owner: start `horizons consume` (or `horizons up`)")
        return 1
    if status.get("problem"):
        print(f"problem       {status['problem']}")
        return 1
    clients = status["clients"]
    print(f"clients       {len(clients)} connected besides this command")
    if clients:
        print()
        print_table(
            ["connection", "client", "state", "since (UTC)", "query"],
            [
                [
                    str(c.get("connection_id", ""))[:8],
                    c["client"][:40],
                    c.get("state", ""),
                    f"{c['query_started_at']:%Y-%m-%d %H:%M:%S}"
                    if c.get("query_started_at")
                    else "",
                    " ".join(str(c.get("query") or "").split())[:80],
                ]
                for c in clients
            ],
        )
    return 0


def cmd_verify_audit(args: argparse.Namespace) -> int:
    from horizons_platform.progress import progress
    from horizons_platform.services.audit_check import check_trail
    from horizons_platform.store.client import Store

    settings = _settings()
    # Read beside the consumers from one snapshot; never inside a write transaction.
    with progress("verifying the audit trail") as update:
        result = check_trail(
            Store(settings),
            settings,
            full=not args.incremental,
            witness=not args.no_witness,
            on_rows=update,
        )
    print(result.summary())
    for note in result.notes:
        print(f"  {note}")
    if result.ok and result.unsigned_tail:
        n = result.unsigned_tail
        print(
            f"  the newest {n} record{'s are' if n != 1 else ' is'} not under a signed head yet "
            "(the auditor signs every few seconds while events flow)"
        )
    return 0 if result.ok else 1


def cmd_config(args: argparse.Namespace) -> int:
    import json

    from horizons_platform.settings import effective

    values = effective(_settings())
    if args.format == "json":
        print(json.dumps(values, indent=2))
    else:
        width = max(len(k) for k in values)
        for key, value in values.items():
            print(f"{key.ljust(width)}  {value}")
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from horizons_platform import event_schemas
    from horizons_platform.events import SCHEMA_VERSION

    if args.action == "export":
        broken, _ = event_schemas.check()
        if broken and not args.force:
            print(
                "refused: these changes break producers that follow the published schemas; "
                f"raise SCHEMA_VERSION (now {SCHEMA_VERSION}) in events.py instead:",
                file=sys.stderr,
            )
            for line in broken:
                print(f"  {line}", file=sys.stderr)
            return 1
        for path in event_schemas.export():
            print(path)
        return 0
    broken, stale = event_schemas.check()
    for line in broken:
        print(f"incompatible: {line}")
    for event_type in stale:
        print(f"out of date: {event_type} (run `horizons schemas export`)")
    if not broken and not stale:
        print(f"schemas/v{SCHEMA_VERSION}: every event model matches its published schema")
    return 1 if broken or stale else 0


def cmd_report(args: argparse.Namespace) -> int:
    from horizons_platform.services.compliance import latest_report
    from horizons_platform.store.client import Store

    store = Store(_settings())
    if not args.generate and store.owner() is None and not store.path.exists():
        print(
            f"error: no DuckDB file at {store.path}: start the consumers (`horizons consume`) "
            "or set HORIZONS_DUCKDB_PATH",
            file=sys.stderr,
        )
        return 1
    report = latest_report(store, generate=args.generate)
    if report is None:
        print(
            "no compliance report yet: run `horizons report --generate` or the "
            "compliance_report_job in Dagster"
        )
        return 1
    per_table = report.pop("tables", {}) or {}
    pem = report.pop("public_key", None)
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key.ljust(width)}  {value}")
    if pem:
        print(
            f"{'public_key'.ljust(width)}  " + pem.strip().replace("\n", "\n" + " " * (width + 2))
        )
    if per_table:
        print("\nretention per table (by the platform's clock):")
        print_table(
            ["table", "oldest row", "kept (days)", "expired rows", "within policy"],
            [
                [t, p["oldest"], p["retention_days"], p["expired_rows"], p["within_policy"]]
                for t, p in per_table.items()
            ],
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="horizons",
        description="Horizons Platform: Kafka job-lifecycle events → four consumer services → "
        "DuckDB, orchestrated by Dagster. Settings come from HORIZONS_* variables.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "broker",
        help="start/stop/inspect the embedded Kafka broker",
        description="The embedded Apache Kafka (KRaft) broker on 127.0.0.1:$HORIZONS_BROKER_PORT: "
        "one node by default, or a cluster (--brokers 3, HORIZONS_BROKER_COUNT) whose node n "
        "listens on HORIZONS_BROKER_PORT + 2(n-1); jars are cached in ~/.cache/horizons. "
        "status exits 1 when a node is down or a partition is under-replicated.",
        epilog="fault drills: `horizons broker kill 2` (SIGKILL node 2), "
        "`horizons broker restart 2` (start it again and wait until it answers).",
    )
    p.add_argument("action", choices=["start", "stop", "status", "kill", "restart"])
    p.add_argument("node", nargs="?", type=int, help="node number (kill, restart)")
    p.add_argument(
        "--brokers",
        type=int,
        default=None,
        metavar="N",
        help="nodes in the embedded cluster (default HORIZONS_BROKER_COUNT or 1; "
        "3 gives topics 3 replicas with min.insync.replicas=2)",
    )
    p.set_defaults(func=cmd_broker)

    p = sub.add_parser(
        "consume",
        help="run the consumer services (all four by default)",
        description="Run consumer services in one process until Ctrl-C/SIGTERM. "
        "Exit 3 when the broker stayed unreachable past HORIZONS_BROKER_GRACE_S.",
    )
    p.add_argument(
        "--service",
        action="append",
        choices=SERVICE_GROUPS,
        metavar="NAME",
        help=f"consumer group to run (repeatable): {', '.join(SERVICE_GROUPS)}",
    )
    p.set_defaults(func=cmd_consume)

    p = sub.add_parser(
        "simulate",
        help="drive realistic jobs through the orchestrator",
        description="Publish realistic job lifecycles (some failing, some "
        "cancelled) and their metrics.",
    )
    p.add_argument("--jobs", type=int, default=100, help="number of jobs (default 100)")
    p.add_argument(
        "--rate",
        type=float,
        default=200.0,
        help="events per second, 0 = as fast as possible (default 200)",
    )
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--fail-rate", type=float, default=0.1)
    p.add_argument("--cancel-rate", type=float, default=0.05)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser(
        "query",
        help="run SQL against the store (read-only unless --write)",
        description="Run SQL on the store: through the consumer host when it runs (the "
        "query runs beside the consumers and never stalls them), on the DuckDB file "
        'otherwise. Results stream. Quote the keywords "partition" and "offset" '
        "when you use them as columns.",
    )
    p.add_argument("sql")
    p.add_argument(
        "--format",
        choices=["table", "csv", "json"],
        default="table",
        help="table (default), csv with a header, or a JSON array of objects",
    )
    p.add_argument(
        "--limit",
        type=int,
        default=None,
        help="stop after N rows (default: 200 for table, all for csv/json; 0 = all)",
    )
    p.add_argument(
        "--write",
        action="store_true",
        help="allow statements that change the store (INSERT, UPDATE, DELETE, DDL …), "
        "run in one transaction",
    )
    p.set_defaults(func=cmd_query)

    p = sub.add_parser(
        "store",
        help="inspect the store and its owner",
        description="status: the DuckDB store's owner (pid, Quack port), its connected "
        "clients (which process, what each last ran), the file size and how near the next "
        "checkpoint is (its WAL; every writer waits while DuckDB checkpoints); exit 1 when "
        "no owner serves the file. disconnect CONNECTION: end a client's session (an id "
        "or its first 8 characters from status), rolling back its open transaction — for "
        "a session of your own DuckDB left open; the owner ends those of horizons "
        "processes that died by itself.",
    )
    p.add_argument("action", choices=["status", "disconnect"])
    p.add_argument("connection", nargs="?", help="the session to end (disconnect)")
    p.set_defaults(func=cmd_store)

    p = sub.add_parser(
        "verify-audit",
        help="verify the audit trail against its signed heads",
        description="Recompute the hash chain, check it against the Ed25519-signed heads "
        "and retention checkpoints (key: var/keys/audit-signing.pub, or "
        "HORIZONS_AUDIT_SIGNING_KEY_FILE), and the newest head against the newest one "
        "published on audit-trail. Every record by default (~50,000 records/s); "
        "--incremental checks only what came since the last successful run. Exit 1 "
        "naming the first bad seq or head.",
    )
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "--incremental",
        action="store_true",
        help="only the records since the last successful run (an edit below that point "
        "is not recomputed; row counts and signed heads still are)",
    )
    scope.add_argument("--full", action="store_true", help="every record (the default)")
    p.add_argument(
        "--no-witness", action="store_true", help="do not ask Kafka for the newest published head"
    )
    p.set_defaults(func=cmd_verify_audit)

    p = sub.add_parser(
        "schemas",
        help="the event models as JSON Schema (schemas/v<version>/), and their compatibility",
        description="`export` writes one JSON Schema per event type to "
        "schemas/v<SCHEMA_VERSION>/ (refused when the change would break producers "
        "following the published files: removed field, newly required field, narrowed "
        "type — raise SCHEMA_VERSION instead). `check` exits 1 on such a change or when "
        "the published files are out of date.",
    )
    p.add_argument("action", choices=["export", "check"])
    p.add_argument("--force", action="store_true", help="export even an incompatible change")
    p.set_defaults(func=cmd_schemas)

    p = sub.add_parser(
        "config",
        help="show the effective settings (secrets masked)",
        description="Every setting as this process sees it (HORIZONS_* variables and "
        "defaults), the paths derived from them, and the librdkafka properties every client "
        "gets — including any HORIZONS_KAFKA__<PROPERTY> (dots as underscores). Passwords, "
        "secrets and tokens are masked.",
    )
    p.add_argument("action", choices=["show"])
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("report", help="show the latest compliance report")
    p.add_argument("--generate", action="store_true", help="generate a fresh report first")
    p.set_defaults(func=cmd_report)

    _add_later_commands(sub)
    return parser


def _add_later_commands(sub: argparse._SubParsersAction) -> None:
    """`up`, `bench` and the operator's commands live in their own modules to keep this
    one thin."""
    from horizons_platform.operations.cli import add_operations_commands

    add_operations_commands(sub)
    try:
        from horizons_platform.launcher import add_up_command
    except ImportError:
        pass
    else:
        add_up_command(sub)
    try:
        from horizons_bench.cli import add_bench_command
    except ImportError:
        pass
    else:
        add_bench_command(sub)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from horizons_platform.logs import configure

    fmt = "json" if os.environ.get("HORIZONS_LOG_FORMAT", "").lower() == "json" else "text"
    configure(logging.DEBUG if args.verbose else logging.INFO, fmt)
    logging.getLogger("dagster").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`horizons … | head`): nothing more to say, to anyone.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        if args.verbose:
            raise
        print(f"error: {_describe(exc)}", file=sys.stderr)
        return 1


def _describe(exc: Exception) -> str:
    """The one line a command's failure prints: a cluster that does not answer is named,
    with what to try, instead of librdkafka's error object."""
    from confluent_kafka import KafkaError, KafkaException

    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    unreachable = (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT)
    if isinstance(err, KafkaError) and err.code() in unreachable:
        with contextlib.suppress(Exception):  # settings that do not load: say what we know
            return (
                f"Kafka at {_settings().bootstrap} did not answer ({err.str()}); is it "
                "running? `horizons broker status` says (`horizons broker start` starts "
                "the embedded one)"
            )
    return f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":
    sys.exit(main())
