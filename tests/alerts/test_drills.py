"""Incident drills: the real app under load, scraped by a real Prometheus that
evaluates deploy/prometheus-rules.yaml unchanged (no shortened `for:`), and a
real Alertmanager with docs/alertmanager.yml's routing (receivers swapped for a
webhook this test serves, group_interval shortened to see resolutions). A
fault must be paged within 2 minutes, with the runbook in the payload; a quiet
run under normal load must not produce even a pending alert. Without these,
the rules could be valid, unit-tested and still never page in practice (wrong
scrape labels, a gauge nobody refreshes, an Alertmanager route that drops
them)."""

from __future__ import annotations

from typing import Any

from .conftest import PAGE_WITHIN_S

RUNBOOKS = "https://github.com/vmwebapp/vmwebapp/blob/main/docs/runbooks/"


def test_a_stopped_worker_pages_within_two_minutes_and_resolves_when_it_resumes(drills: dict[str, Any]) -> None:
    result = drills["scenarios"]["stall"].result()
    assert result["paged_after"] < PAGE_WITHIN_S, result
    assert result["receiver"] == "pager"
    alert = result["alert"]
    assert alert["labels"]["severity"] == "critical"
    assert (alert["labels"]["namespace"], alert["labels"]["vmwebapp"]) == ("drill", "stall")
    assert alert["annotations"]["runbook_url"] == f"{RUNBOOKS}VmWebappWorkerStalled.md"
    # Runs kept arriving while the worker was stopped: the queue grew.
    assert result["queued_while_stalled"] > 0
    assert result["resolved_receiver"] == "pager"
    # Nothing else paged: the stall is not mistaken for a database outage.
    assert result["delivered"] == {"VmWebappWorkerStalled"}, result["delivered"]


def test_a_database_outage_pages_within_two_minutes(drills: dict[str, Any]) -> None:
    result = drills["scenarios"]["outage"].result()
    assert result["paged_after"] < PAGE_WITHIN_S, result
    assert result["receiver"] == "pager"
    alert = result["alert"]
    assert alert["labels"]["severity"] == "critical"
    assert (alert["labels"]["namespace"], alert["labels"]["vmwebapp"]) == ("drill", "outage")
    assert alert["annotations"]["runbook_url"] == f"{RUNBOOKS}VmWebappDatabaseUnavailable.md"
    # Once PostgreSQL is back, the app serves again without a restart.
    assert result["recovered_after"] < 60


def test_normal_load_fires_nothing(drills: dict[str, Any]) -> None:
    result = drills["scenarios"]["quiet"].result()
    accepted = [s for s in result["posted"] if s == 202]
    assert len(accepted) > 100 and len(accepted) == len(result["posted"]), set(result["posted"])
    assert result["alerts"] == [], result["alerts"]
    assert result["notifications"] == []
