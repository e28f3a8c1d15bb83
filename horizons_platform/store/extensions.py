"""DuckDB's own quack and httpfs extensions, loaded from their PyPI wheels.

The wheels (``duckdb-extension-quack``, ``duckdb-extension-httpfs``) carry binaries
signed by DuckDB; loading them by path keeps signature checking on, and nothing is
downloaded at run time. Unsigned extensions are never allowed.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import duckdb

# The client side of Quack needs httpfs; the server needs quack alone, but loading both
# everywhere keeps one recipe.
EXTENSIONS = ("httpfs", "quack")


class ExtensionMissing(RuntimeError):
    """An extension wheel for this DuckDB version is not installed."""


@cache
def extension_path(name: str) -> Path:
    spec = importlib.util.find_spec(f"duckdb_extension_{name}")
    if spec is None or spec.origin is None:
        raise ExtensionMissing(
            f"duckdb-extension-{name}=={duckdb.__version__} is not installed "
            "(pip install -e . installs it)"
        )
    path = (
        Path(spec.origin).parent
        / "extensions"
        / f"v{duckdb.__version__}"
        / f"{name}.duckdb_extension"
    )
    if not path.exists():
        raise ExtensionMissing(
            f"{path} is missing: the installed duckdb-extension-{name} does not match "
            f"duckdb {duckdb.__version__}"
        )
    return path


def load_extensions(con: duckdb.DuckDBPyConnection) -> None:
    for name in EXTENSIONS:
        con.execute(f"LOAD '{extension_path(name)}'")
