"""docs/alertmanager.yml under amtool: a valid configuration that pages on
critical alerts, sends warnings to chat and holds warnings back while a
critical alert of the same VmWebapp fires. The drills deliver through the same
routing tree (stack.drill_alertmanager_config), which is checked here too."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

from .stack import ALERTMANAGER_EXAMPLE, drill_alertmanager_config, free_port, http, start_alertmanager, wait_until

RULES = ROOT / "deploy" / "prometheus-rules.yaml"


def amtool(*args: str) -> subprocess.CompletedProcess:
    path = shutil.which("amtool")
    if path is None:
        pytest.fail("amtool is missing: scripts/install-test-deps.sh installs it (make deps)")
    return subprocess.run([path, *args], capture_output=True, text=True)


def test_amtool_accepts_the_example() -> None:
    out = amtool("check-config", str(ALERTMANAGER_EXAMPLE))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_amtool_accepts_the_drills_configuration(tmp_path: Path) -> None:
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(drill_alertmanager_config(9)))
    out = amtool("check-config", str(path))
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    "alert", [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]], ids=lambda a: a["alert"]
)
def test_critical_alerts_page_and_warnings_go_to_chat(alert: dict) -> None:
    labels = [f"alertname={alert['alert']}", f"severity={alert['labels']['severity']}", "namespace=shop", "vmwebapp=web"]
    out = amtool("config", "routes", "test", f"--config.file={ALERTMANAGER_EXAMPLE}", *labels)
    assert out.returncode == 0, out.stdout + out.stderr
    expected = {"critical": "pager", "warning": "chat"}[alert["labels"]["severity"]]
    assert out.stdout.split() == [expected]


def test_a_critical_alert_inhibits_the_warnings_of_the_same_vmwebapp(tmp_path: Path) -> None:
    """A real Alertmanager with the example's inhibition, fed three alerts
    through its API: only the warning of the VmWebapp with a critical alert is
    held back."""
    config = tmp_path / "alertmanager.yml"
    config.write_text(yaml.safe_dump(drill_alertmanager_config(free_port())))
    port = free_port()
    with open(tmp_path / "alertmanager.log", "wb") as log:
        process = start_alertmanager(config, tmp_path / "data", port, log)
    try:
        def alert(name: str, severity: str, vmwebapp: str) -> dict:
            return {"labels": {"alertname": name, "severity": severity, "namespace": "shop", "vmwebapp": vmwebapp}}
        sent = [
            alert("VmWebappWorkerStalled", "critical", "web"),
            alert("VmWebappQueueBacklogGrowing", "warning", "web"),
            alert("VmWebappQueueBacklogGrowing", "warning", "other"),
        ]
        status, body = http(f"http://127.0.0.1:{port}/api/v2/alerts", json.dumps(sent).encode())
        assert status == 200, body

        def states() -> dict | None:
            got = json.loads(http(f"http://127.0.0.1:{port}/api/v2/alerts")[1])
            by_key = {(a["labels"]["alertname"], a["labels"]["vmwebapp"]): a["status"]["state"] for a in got}
            return by_key if len(by_key) == 3 and "unprocessed" not in by_key.values() else None
        assert wait_until("alerts processed", states, 10) == {
            ("VmWebappWorkerStalled", "web"): "active",
            ("VmWebappQueueBacklogGrowing", "web"): "suppressed",
            ("VmWebappQueueBacklogGrowing", "other"): "active",
        }
    finally:
        process.terminate()
        process.wait(timeout=10)
