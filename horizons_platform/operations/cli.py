"""`horizons offsets …` and `horizons dlq …`: parse, confirm, call, print."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from horizons_platform.settings import SERVICE_GROUPS, Settings


def _confirm(question: str, yes: bool) -> bool:
    if yes:
        return True
    if not sys.stdin.isatty():
        print(
            f"refused: {question} — confirm with --yes (stdin is not a terminal)", file=sys.stderr
        )
        return False
    answer = input(f"{question} Type 'yes' to go on: ")
    return answer.strip().lower() == "yes"


def _table(columns: list[str], rows: list[list[Any]]) -> None:
    from horizons_platform.output import print_table

    print_table(columns, rows, limit=10_000)


# --- offsets ------------------------------------------------------------------------------


def cmd_offsets(args: argparse.Namespace) -> int:
    from horizons_platform.kafka.producer import Publisher
    from horizons_platform.operations import offsets as ops
    from horizons_platform.store.client import Store

    settings = Settings()
    store = Store(settings)
    if args.action == "show":
        found = ops.positions(settings, store, args.group)
        if args.format == "json":
            print(
                json.dumps([{**vars(p), "lag": p.lag, "state": p.state} for p in found], indent=2)
            )
        else:
            _table(
                ["group", "topic", "partition", "stored next", "low", "high", "lag", "state"],
                [
                    [p.group, p.topic, p.partition, p.stored, p.low, p.high, p.lag, p.state]
                    for p in found
                ],
            )
            if found:
                print(f"cluster {found[0].cluster}")
        bad = [p for p in found if p.state.isupper() or p.state.startswith("OTHER")]
        return 1 if bad else 0
    if not args.group or args.to is None:
        print("error: offsets reset needs --group and --to", file=sys.stderr)
        return 2
    try:
        plan = ops.plan_reset(settings, store, args.group, args.to, args.topic, args.partition)
    except ops.OffsetsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _table(
        ["topic", "partition", "stored next", "→ new", "low", "high"],
        [[p.topic, p.partition, p.stored, target, p.low, p.high] for p, target in plan.moves],
    )
    members = ops.live_members(settings, args.group, wait_s=args.wait)
    if members:
        print(
            f"refused: group {args.group} has {members} live member(s) in Kafka; stop the "
            "consumer host first (a stopped static member stays until its session times "
            "out: try again in a few seconds, or pass --wait SECONDS)",
            file=sys.stderr,
        )
        return 1
    question = f"Reset group {args.group} to {args.to} on {len(plan.moves)} partition(s)?"
    if not _confirm(question, args.yes):
        return 1
    ops.apply_reset(settings, store, plan, Publisher(settings))
    print(f"group {args.group}: offsets reset to {args.to} (recorded in the audit trail)")
    return 0


# --- dead letters ---------------------------------------------------------------------------


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    from horizons_platform.operations import dlq

    return {
        "refs": [dlq.Ref.parse(r) for r in getattr(args, "refs", []) or []] or None,
        "group": args.group,
        "error_class": args.error_class,
        "since": dlq.parse_since(args.since) if args.since else None,
    }


def cmd_dlq(args: argparse.Namespace) -> int:
    from horizons_platform.kafka.producer import Publisher
    from horizons_platform.operations import dlq
    from horizons_platform.progress import progress
    from horizons_platform.store.client import Store

    settings = Settings()
    store = Store(settings)
    try:
        if args.action == "show":
            letters = dlq.select(store, refs=[dlq.Ref.parse(args.ref)])
            if not letters:
                print(f"no dead letter {args.ref}", file=sys.stderr)
                return 1
            for letter in letters:
                _show(letter)
            return 0
        selection = _selection(args)
        if args.action == "list":
            letters = dlq.select(store, limit=args.limit, **selection)
            if args.format == "json":
                print(json.dumps([_as_json(x) for x in letters], indent=2, default=str))
            else:
                _table(
                    ["letter", "groups", "error class", "error", "received", "replayed as"],
                    [
                        [
                            str(x.ref),
                            ",".join(x.groups),
                            x.error_class,
                            x.error_message,
                            f"{x.received_at:%Y-%m-%d %H:%M:%S}",
                            x.replayed_as or "",
                        ]
                        for x in letters
                    ],
                )
            return 0
        # replay
        if not any(selection.values()):
            print(
                "error: name the letters to replay (topic/partition/offset …) or select them "
                "with --group, --error-class or --since",
                file=sys.stderr,
            )
            return 2
        letters = dlq.select(store, **selection)
        if not letters:
            print("no dead letters match", file=sys.stderr)
            return 1
        value = None
        if args.value_file:
            value = (
                sys.stdin.buffer.read()
                if args.value_file == "-"
                else Path(args.value_file).read_bytes()
            )
        question = f"Replay {len(letters)} dead letter(s) to their original topics?"
        if not _confirm(question, args.yes):
            return 1
        with progress("replaying dead letters", len(letters)) as update:
            results = dlq.replay(
                settings,
                store,
                Publisher(settings),
                letters,
                value=value,
                force=args.force,
                on_letter=lambda n: update(n, None),
            )
    except dlq.DlqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _table(["letter", "replayed as", "note"], [[str(r.ref), r.to or "-", r.note] for r in results])
    return 0


def _as_json(letter: Any) -> dict[str, Any]:
    out = {k: v for k, v in vars(letter).items() if k not in ("raw", "key")}
    out["ref"] = str(letter.ref)
    out["raw"] = letter.raw.decode("utf-8", "replace") if letter.raw is not None else None
    out["key"] = letter.key.decode("utf-8", "replace") if letter.key is not None else None
    return out


def _show(letter: Any) -> None:
    for name, value in _as_json(letter).items():
        if name != "raw":
            print(f"{name.ljust(14)}  {value}")
    raw = letter.raw
    print(f"{'raw'.ljust(14)}  ({'none' if raw is None else f'{len(raw)} bytes'})")
    if raw is not None:
        print(raw[:4000].decode("utf-8", "replace"))


# --- the parsers --------------------------------------------------------------------------


def add_operations_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "offsets",
        help="show or reset the offsets a group resumes from",
        description="The offsets stored in DuckDB (where each consumer group resumes), "
        "next to the cluster's low/high watermarks. `reset` moves a stopped group, asks "
        "for confirmation and records the reset in the audit trail. `show` exits 1 when "
        "a stored offset is above the high watermark or belongs to another cluster.",
    )
    p.add_argument("action", choices=["show", "reset"])
    p.add_argument("--group", choices=SERVICE_GROUPS, help="one consumer group (default: all)")
    p.add_argument(
        "--to", help="reset target: earliest, latest or an offset (every selected partition)"
    )
    p.add_argument("--topic", help="reset only this topic's partitions")
    p.add_argument("--partition", type=int, help="reset only this partition")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument(
        "--wait",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="wait this long for the group to have no live member (default 15)",
    )
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.set_defaults(func=cmd_offsets)

    p = sub.add_parser(
        "dlq",
        help="list, show and replay dead letters",
        description="Dead letters are in the dead_letters table (and the horizons-dlq "
        "topic). `replay` re-publishes each to its original topic with its original key and "
        "a replayed_from header; consumers key rows by event_id, so replaying twice changes "
        "nothing, and a letter already replayed is skipped unless --force. Letters are named "
        "topic/partition/offset.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, text in (("list", "list dead letters"), ("replay", "replay dead letters")):
        a = actions.add_parser(name, help=text)
        if name == "replay":
            a.add_argument("refs", nargs="*", metavar="LETTER", help="topic/partition/offset")
        a.add_argument("--group", help="letters of this consumer group")
        a.add_argument("--error-class", help="e.g. EventDecodeError.schema (* matches any)")
        a.add_argument("--since", help="received in the last 30m / 2h / 7d, or since an ISO time")
        if name == "list":
            a.add_argument("--limit", type=int, default=200)
            a.add_argument("--format", choices=["table", "json"], default="table")
        else:
            a.add_argument(
                "--value-file",
                help="send these bytes instead of the original (a corrected event; one "
                "letter only; - reads stdin)",
            )
            a.add_argument("--force", action="store_true", help="replay letters replayed before")
            a.add_argument("--yes", action="store_true", help="do not ask for confirmation")
        a.set_defaults(func=cmd_dlq)
    a = actions.add_parser("show", help="one dead letter, with its bytes")
    a.add_argument("ref", metavar="LETTER", help="topic/partition/offset")
    a.set_defaults(func=cmd_dlq)
