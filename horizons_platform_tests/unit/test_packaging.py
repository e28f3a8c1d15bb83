"""The lock file is what the README's commands install: it must hold every pin of
pyproject.toml at the same version (`./dev lock` refreshes it)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _name(spec: str) -> str:
    return re.sub(r"[-_.]+", "-", spec).lower()


def test_every_pinned_dependency_is_in_the_lock_at_its_version() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        pins += extra
    locked = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            locked[_name(name)] = version
    for pin in pins:
        name, version = pin.split("==")
        assert locked.get(_name(name)) == version, f"{pin}: lock has {locked.get(_name(name))}"
    assert not any("@" in v or "file:" in v for v in locked.values())


def test_demo_only_dependencies_are_not_installed_by_the_package_itself() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(p.startswith("aiosmtpd") for p in project["dependencies"])
    assert any(p.startswith("aiosmtpd") for p in project["optional-dependencies"]["demo"])
