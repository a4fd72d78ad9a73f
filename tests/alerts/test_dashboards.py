"""The Grafana dashboards (deploy/grafana/, copied into the chart) against the
real Prometheus of the quiet run, which scrapes the real app under load: every
panel's PromQL evaluates without error, and every overview panel returns data.
Without this a dashboard can show "No data" for a renamed metric or label, or
an error for a typo, and nobody notices until an incident."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from conftest import CHART, ROOT

from .stack import QueryError, Stack

DASHBOARDS = ROOT / "deploy" / "grafana"
OVERVIEW = DASHBOARDS / "vmwebapp-overview.json"
OPERATOR = DASHBOARDS / "vmwebapp-operator.json"
# Grafana's variables, as the quiet run's stack is labelled and scraped (5 s).
VARIABLES = {"$namespace": "drill", "$vmwebapp": "quiet", "$__rate_interval": "1m", "$__range": "5m"}


def panels(path: Path) -> list[dict]:
    return [p for p in json.loads(path.read_text())["panels"] if p["type"] != "row"]


def queries(path: Path) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels(path) for t in p["targets"]]


def substitute(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    assert "$" not in expr, f"unknown variable in {expr}"
    return expr


def test_the_chart_carries_the_same_dashboards() -> None:
    ours = {p.name: p.read_bytes() for p in DASHBOARDS.glob("*.json")}
    chart = {p.name: p.read_bytes() for p in (CHART / "files" / "dashboards").glob("*.json")}
    assert ours == chart, "deploy/grafana/ and charts/vm-operator/files/dashboards/ must hold the same files"
    assert set(ours) == {OVERVIEW.name, OPERATOR.name}


@pytest.mark.parametrize("path", [OVERVIEW, OPERATOR], ids=lambda p: p.name)
def test_every_panel_queries_prometheus_through_the_datasource_variable(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"] and dashboard["title"]
    assert dashboard["templating"]["list"][0] == {
        "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0}
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(path):
        assert panel["title"] and panel["description"] and panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            assert target["expr"] and target["datasource"] == panel["datasource"]


def test_the_overview_has_the_slo_queue_worker_and_live_update_panels() -> None:
    exprs = " ".join(e for _, e in queries(OVERVIEW))
    for needle in ["[30d]", "0.995", "histogram_quantile(0.95", "route", "vm_queue_jobs", "vm_queue_oldest_job_age_seconds",
                   'outcome="dead_lettered"', "vm_worker_heartbeat_age_seconds",
                   # Live updates: open streams, streams ended or refused, streams that fell
                   # behind and continued from the database, gaps given up.
                   "vm_stream_subscribers", "vm_stream_drops_total", "vm_stream_lagged_total",
                   "vm_stream_gap_ids_given_up_total"]:
        assert needle in exprs, needle


def test_operator_panels_query_metrics_the_operator_registers() -> None:
    """The operator needs a cluster to run, so its panels are checked against its
    registry (operator/src/metrics.rs) here and for syntax below."""
    source = (ROOT / "operator" / "src" / "metrics.rs").read_text()
    families = re.findall(r'registry\.register\(\s*"([a-z_]+)"', source)
    assert "reconciles" in families and "vmwebapp_conditions" in families
    exported = {f"vm_operator_{f}{s}" for f in families for s in ["", "_total", "_bucket", "_count", "_sum"]}
    used = {m for _, e in queries(OPERATOR) for m in re.findall(r"\bvm_operator_[a-z_]+", e)}
    assert used and used <= exported, used - exported


@pytest.mark.parametrize("path", [OVERVIEW, OPERATOR], ids=lambda p: p.name)
def test_every_query_evaluates_against_the_real_prometheus(path: Path, drills: dict[str, Any]) -> None:
    drills["scenarios"]["quiet"].result()
    stack: Stack = drills["quiet_stack"]
    errors = []
    for title, expr in queries(path):
        try:
            stack.query(substitute(expr))
        except QueryError as e:
            errors.append(f"{title}: {e}")
    assert errors == []


def test_every_overview_panel_returns_data_from_the_real_app(drills: dict[str, Any]) -> None:
    drills["scenarios"]["quiet"].result()
    stack: Stack = drills["quiet_stack"]
    empty = []
    for title, expr in queries(OVERVIEW):
        result = stack.query(substitute(expr))
        values = [float(r["value"][1]) for r in result]
        if not values or any(math.isnan(v) for v in values):
            empty.append(f"{title}: {expr} -> {result}")
        if "vmwebapp" in expr and not any(r["metric"].get("vmwebapp") == "quiet" for r in result) and "sum(" not in expr:
            empty.append(f"{title}: no series of the scraped app in {result}")
    assert empty == []
