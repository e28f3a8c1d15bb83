"""The published JSON Schemas and the rule that guards them (event_schemas.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest

from horizons_platform import event_schemas, events


def test_the_published_schemas_are_the_models() -> None:
    broken, stale = event_schemas.check()
    assert broken == [] and stale == []
    folder = event_schemas.version_dir()
    assert {p.stem for p in folder.glob("*.json")} == set(events.EVENT_TYPES)
    submitted = json.loads((folder / "job.submitted.json").read_text())
    assert "owner" in json.dumps(submitted["$defs"]["JobSubmittedPayload"]["required"])


class _NarrowerPayload(events._Open):
    owner: str
    job_type: str
    site: str  # newly required
    # priority and params removed


class _Submitted(events.JobSubmitted):
    payload: _NarrowerPayload  # type: ignore[assignment]


class _MetricsPayload(events.JobMetricsPayload):
    outcome: Literal["completed", "failed"]  # type: ignore[assignment]  # "cancelled" gone


class _Metrics(events.JobMetrics):
    payload: _MetricsPayload  # type: ignore[assignment]


def test_an_incompatible_model_change_without_a_new_version_fails_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    event_schemas.export(tmp_path)  # what producers were given
    changed = {**events.EVENT_TYPES, "job.submitted": _Submitted, "job.metrics": _Metrics}
    monkeypatch.setattr(event_schemas, "EVENT_TYPES", changed)
    broken, stale = event_schemas.check(tmp_path)
    assert "job.submitted: payload.site: newly required" in broken
    assert "job.submitted: payload.priority: removed" in broken
    assert any(b.startswith("job.metrics: payload.outcome.: no longer accepts") for b in broken)
    assert set(stale) == {"job.submitted", "job.metrics"}
    # With a new schema_version the old folder is history: nothing is broken, the new
    # folder is simply not written yet.
    monkeypatch.setattr(event_schemas, "SCHEMA_VERSION", events.SCHEMA_VERSION + 1)
    broken, stale = event_schemas.check(tmp_path)
    assert broken == [] and set(stale) == set(events.EVENT_TYPES)


def test_a_compatible_change_only_makes_the_files_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class _Wider(events.JobSubmittedPayload):
        site: str = "vla"  # optional: old producers still valid

    class _Submitted2(events.JobSubmitted):
        payload: _Wider  # type: ignore[assignment]

    event_schemas.export(tmp_path)
    monkeypatch.setattr(
        event_schemas, "EVENT_TYPES", {**events.EVENT_TYPES, "job.submitted": _Submitted2}
    )
    broken, stale = event_schemas.check(tmp_path)
    assert broken == [] and stale == ["job.submitted"]
