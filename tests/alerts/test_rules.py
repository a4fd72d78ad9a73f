"""The alert rules under promtool: the rule file is valid, and every alert has a
unit test in rules.test.yaml that makes it fire (with its severity, its
grouping labels and its runbook URL) and a look-alike situation that keeps it
quiet. Without this, an alert could be syntactically fine and never fire."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import CHART, ROOT

RULES = ROOT / "deploy" / "prometheus-rules.yaml"
UNIT_TESTS = Path(__file__).resolve().parent / "rules.test.yaml"
RUNBOOK_BASE = "https://github.com/vmwebapp/vmwebapp/blob/main/docs/runbooks/"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: scripts/install-test-deps.sh installs it (make deps)")
    return path


def alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def checks() -> list[dict]:
    return [c for t in yaml.safe_load(UNIT_TESTS.read_text())["tests"] for c in t["alert_rule_test"]]


@pytest.mark.parametrize("path", [RULES, CHART / "files" / "prometheus-rules.yaml"], ids=["deploy", "chart"])
def test_promtool_accepts_the_rule_file(path: Path) -> None:
    out = subprocess.run([tool("promtool"), "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in out.stdout


def test_promtool_unit_tests_pass() -> None:
    out = subprocess.run(
        [tool("promtool"), "test", "rules", UNIT_TESTS.name], cwd=UNIT_TESTS.parent, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_every_alert_is_tested_firing_and_quiet(alert: dict) -> None:
    name = alert["alert"]
    mine = [c for c in checks() if c["alertname"] == name]
    firing = [a for c in mine for a in c["exp_alerts"]]
    assert firing, f"{name}: no unit test makes it fire"
    assert any(not c["exp_alerts"] for c in mine), f"{name}: no unit test keeps it quiet"
    for expected in firing:
        assert expected["exp_labels"]["severity"] == alert["labels"]["severity"]
        assert expected["exp_annotations"]["runbook_url"] == f"{RUNBOOK_BASE}{name}.md"
        assert set(expected["exp_annotations"]) == set(alert["annotations"]), f"{name}: every annotation is checked"
