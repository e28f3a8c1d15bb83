"""Every validation_* job, launched on `horizons up --demo` the way the UI launches it
(the webserver's GraphQL LaunchRun mutation), succeeds — and keeps succeeding.

Before the store had one owner, each poll of a validation run took the DuckDB file from
the consumers and validation_lifecycle failed three times out of three from the UI.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest

from horizons_platform_tests.dagster.test_browser import Up, horizons_up  # noqa: F401

pytestmark = pytest.mark.slow

LOCATION = "horizons_platform"
LAUNCH = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""
STATUS = """
query Status($runId: ID!) {
  runOrError(runId: $runId) {
    __typename
    ... on Run { status }
  }
}
"""
FAILURE_EVENTS = """
query Events($runId: ID!) {
  logsForRun(runId: $runId) {
    ... on EventConnection {
      events {
        __typename
        ... on MessageEvent { message }
        ... on ExecutionStepFailureEvent { error { message } }
      }
    }
  }
}
"""
# validation_lifecycle first and last: it is the one that starved before.
JOBS = (
    "validation_lifecycle",
    "validation_parallel_groups",
    "validation_throughput",
    "validation_latency",
    "validation_memory_bounded",
    "validation_lifecycle",
    "validation_lifecycle",
)


def _graphql(url: str, query: str, variables: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        body = json.loads(response.read())
    assert "errors" not in body, body
    return body["data"]


def _launch(url: str, job: str) -> str:
    params = {
        "selector": {
            "repositoryLocationName": LOCATION,
            "repositoryName": "__repository__",
            "jobName": job,
        },
        "runConfigData": {},
        "mode": "default",
    }
    result = _graphql(url, LAUNCH, {"params": params})["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return result["run"]["runId"]


def _finish(url: str, run_id: str, timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _graphql(url, STATUS, {"runId": run_id})["runOrError"]["status"]
        if status in ("SUCCESS", "FAILURE", "CANCELED"):
            return status
        time.sleep(1)
    raise AssertionError(f"run {run_id} still running after {timeout:.0f}s")


def test_every_validation_job_launched_as_the_ui_does_succeeds_repeatedly(
    horizons_up: Up,  # noqa: F811
) -> None:
    outcomes = []
    for job in JOBS:
        run_id = _launch(horizons_up.url, job)
        status = _finish(horizons_up.url, run_id)
        outcomes.append((job, status))
        if status != "SUCCESS":
            events = _graphql(horizons_up.url, FAILURE_EVENTS, {"runId": run_id})
            messages = [
                (e.get("error") or {}).get("message") or e.get("message", "")
                for e in events["logsForRun"]["events"]
                if "Failure" in e["__typename"]
            ]
            raise AssertionError(f"{job} run {run_id} ended {status}: {messages[-3:]}")
    print("\n" + "\n".join(f"{job}: {status}" for job, status in outcomes))
    assert [s for _, s in outcomes] == ["SUCCESS"] * len(JOBS)
