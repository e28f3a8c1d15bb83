"""The event models as JSON Schema files for producer teams, and the rule that guards them.

``schemas/v<schema_version>/<event_type>.json`` holds what this version of the platform
accepts (written by `horizons schemas export`). A model change that would break a
producer who follows the published schema — a removed field, a newly required one, a
narrowed type or a removed enum value — is an incompatible change: it needs a new
``SCHEMA_VERSION`` (and so a new folder), never an edit of the published one. The
`event_schemas_compatible` asset check, `horizons schemas check` and a test all run
:func:`incompatibilities` between the published files and the models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from horizons_platform.events import EVENT_TYPES, SCHEMA_VERSION

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"


def current() -> dict[str, dict[str, Any]]:
    """event_type → JSON Schema of its model, as the code defines it now."""
    return {
        event_type: model.model_json_schema(mode="validation")
        for event_type, model in sorted(EVENT_TYPES.items())
    }


def version_dir(root: Path = SCHEMAS_DIR, version: int | None = None) -> Path:
    return root / f"v{SCHEMA_VERSION if version is None else version}"


def published(root: Path = SCHEMAS_DIR, version: int | None = None) -> dict[str, Any]:
    folder = version_dir(root, version)
    if not folder.is_dir():
        return {}
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def export(root: Path = SCHEMAS_DIR) -> list[Path]:
    folder = version_dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for event_type, schema in current().items():
        path = folder / f"{event_type}.json"
        path.write_text(json.dumps(schema, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


# --- compatibility ------------------------------------------------------------------------


def _resolve(node: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        return root.get("$defs", {}).get(ref.split("/")[-1], {})
    return node


def _types(node: dict[str, Any], root: dict[str, Any]) -> set[str]:
    """What values a schema admits, coarsely: JSON types, consts and enum members."""
    node = _resolve(node, root)
    if "anyOf" in node:
        return set().union(*(_types(n, root) for n in node["anyOf"]))
    if "const" in node:
        return {f"={json.dumps(node['const'])}"}
    if "enum" in node:
        return {f"={json.dumps(v)}" for v in node["enum"]}
    kind = node.get("type")
    if isinstance(kind, list):
        return set(kind)
    return {kind} if kind else {"any"}


def _narrowed(old: set[str], new: set[str]) -> set[str]:
    if "any" in new:
        return set()
    lost = set()
    for t in old:
        if t in new:
            continue
        if t.startswith("=") and ("string" in new or "integer" in new or "number" in new):
            continue  # an enum member still admitted by a wider type
        if t == "integer" and "number" in new:
            continue
        lost.add(t)
    return lost


def _compare(
    old: dict[str, Any],
    new: dict[str, Any],
    old_root: dict[str, Any],
    new_root: dict[str, Any],
    path: str,
    out: list[str],
) -> None:
    old, new = _resolve(old, old_root), _resolve(new, new_root)
    lost = _narrowed(_types(old, old_root), _types(new, new_root))
    if lost:
        out.append(f"{path or '(event)'}: no longer accepts {', '.join(sorted(lost))}")
    old_props, new_props = old.get("properties", {}), new.get("properties", {})
    for name in old_props:
        if name not in new_props:
            out.append(f"{path}{name}: removed")
    for name in set(new.get("required", [])) - set(old.get("required", [])):
        out.append(f"{path}{name}: newly required")
    for name, sub in old_props.items():
        if name in new_props:
            _compare(sub, new_props[name], old_root, new_root, f"{path}{name}.", out)


def incompatibilities(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What ``new`` (event_type → schema) refuses that ``old`` accepted."""
    out: list[str] = []
    for event_type, schema in old.items():
        if event_type not in new:
            out.append(f"{event_type}: event type removed")
            continue
        found: list[str] = []
        _compare(schema, new[event_type], schema, new[event_type], "", found)
        out += [f"{event_type}: {f}" for f in found]
    return out


def check(root: Path = SCHEMAS_DIR) -> tuple[list[str], list[str]]:
    """(incompatible changes since the published schemas, event types whose file is stale
    or missing) for the current SCHEMA_VERSION."""
    before = published(root)
    now = current()
    broken = incompatibilities(before, now)
    stale = [t for t, s in now.items() if before.get(t) != json.loads(json.dumps(s))]
    return broken, stale
