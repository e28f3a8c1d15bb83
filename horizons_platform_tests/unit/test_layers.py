"""Imports run one way (docs/decisions.md): a module imports from its own layer or the
layers below it, never above. Imports inside ``if TYPE_CHECKING:`` are annotations only
and do not count."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "horizons_platform"
# Bottom to top: pure domain and configuration → the store → Kafka clients and the one
# consumer loop → the services' pure handlers and their logic → the services' I/O → the
# host and the operator's actions → Dagster → the command line. (The benchmarks are a
# sibling package, horizons_bench, that may use all of it.)
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "settings",
        "events",
        "ids",
        "tracing",
        "logs",
        "progress",
        "waiting",
        "threads",
        "event_schemas",
        "output",
    ),
    ("store",),
    ("kafka",),
    ("services",),
    ("runtime",),
    ("host", "operations", "simulate", "launcher"),
    ("defs", "definitions"),
    ("cli",),
)


def layer_of(module: str) -> int:
    top = module.split(".")[1]
    for n, names in enumerate(LAYERS):
        if top in names:
            return n
    raise AssertionError(f"{module}: in no layer; add it to LAYERS")


def imported(source: str) -> list[tuple[str, int]]:
    """horizons_platform modules imported by ``source`` (outside TYPE_CHECKING blocks)."""
    found: list[tuple[str, int]] = []

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" in ast.unparse(node.test):
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module == "horizons_platform":
                found.extend((f"horizons_platform.{a.name}", node.lineno) for a in node.names)
            elif node.module and node.module.startswith("horizons_platform."):
                found.append((node.module, node.lineno))

        def visit_Import(self, node: ast.Import) -> None:
            found.extend(
                (a.name, node.lineno) for a in node.names if a.name.startswith("horizons_platform.")
            )

    Visitor().visit(ast.parse(source))
    return found


def crossings(module: str, source: str) -> list[str]:
    mine = layer_of(module)
    return [
        f"{module}:{line} imports {target} (layer {layer_of(target)} > {mine})"
        for target, line in imported(source)
        if layer_of(target) > mine
    ]


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        module = ".".join(("horizons_platform", *parts))
        problems += crossings(module, path.read_text())
    assert problems == []


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("horizons_platform.kafka.consumer", "from horizons_platform.services import audit\n"),
        ("horizons_platform.services.audit", "from horizons_platform.runtime.keys import x\n"),
        ("horizons_platform.store.tables", "def f():\n    import horizons_platform.kafka.admin\n"),
    ],
)
def test_the_rule_catches_a_forbidden_import(module: str, source: str) -> None:
    assert len(crossings(module, source)) == 1


def test_annotation_only_imports_do_not_count() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from horizons_platform.runtime.prometheus import HostMetrics\n"
    )
    assert crossings("horizons_platform.kafka.consumer", source) == []


def test_the_ingest_process_does_not_import_the_dagster_definitions() -> None:
    import subprocess
    import sys

    code = (
        "import sys, horizons_platform.host, horizons_platform.runtime.materializations\n"
        "print(sorted(m for m in sys.modules if m.startswith('horizons_platform.defs')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_starting_consumer_host_does_not_import_dagster() -> None:
    """Importing Dagster takes ~0.8 s: a host restarted after a crash would get its
    partitions back that much later (it reports to Dagster only after its first interval)."""
    import subprocess
    import sys

    code = (
        "import sys, horizons_platform.cli, horizons_platform.host\n"
        "from horizons_platform.runtime.materializations import materialization_reporter\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'dagster'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_host_with_no_dagster_instance_never_imports_dagster(tmp_path: Path) -> None:
    """The import holds the GIL for a second or two, taken from the consumer loops; with
    no dagster.yaml to report to, the reporter finds no instance without paying it."""
    import os
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from horizons_platform.settings import Settings\n"
        "from horizons_platform.runtime.materializations import _default_instance\n"
        f"assert _default_instance(Settings(dagster_dir={str(tmp_path)!r})) is None\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'dagster'))"
    )
    env = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "[]"
