"""Keeps the alerts, SLOs and runbooks honest: every alert has a runbook, every
link resolves, and every app metric (and label) they query exists in the real
`vm-webapp serve` output. Operator metrics are checked against the operator's
registry by a Rust test (`operator/src/metrics.rs`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, binary

RULES = ROOT / "deploy" / "prometheus-rules.yaml"
RUNBOOKS = ROOT / "docs" / "runbooks"
RUNBOOK_BASE = "https://github.com/vmwebapp/vmwebapp/blob/main/docs/runbooks/"
SECTIONS = ["## Symptom", "## Impact", "## Diagnosis", "## Mitigation", "## Verify recovery"]
# Labels Prometheus adds (target labels from the chart's PodMonitor) or histograms have.
SCRAPE_LABELS = {"namespace", "vmwebapp", "pod", "job", "instance", "component", "le"}


def alerts() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def documents() -> list[Path]:
    """Where alerts, SLOs and runbooks query metrics."""
    return [RULES, ROOT / "docs" / "slo.md", ROOT / "docs" / "operations.md", *sorted(RUNBOOKS.glob("*.md"))]


# --- alerts and runbooks -------------------------------------------------------------


def test_required_alerts_are_defined() -> None:
    names = {a["alert"] for a in alerts()}
    assert {
        "VmWebappApiNotReady", "VmWebappHighErrorRate", "VmWebappHighLatency",
        "VmWebappQueueBacklogGrowing", "VmWebappOldestJobTooOld", "VmWebappWorkerStalled",
        "VmWebappDeadLettersGrowing", "VmWebappDatabaseUnavailable", "VmWebappRedisDegraded",
        "VmWebappMigrationFailed", "VmOperatorReconcileErrors",
    } <= names


@pytest.mark.parametrize("alert", alerts(), ids=lambda a: a["alert"])
def test_alert_has_severity_summary_and_a_runbook_with_every_section(alert: dict) -> None:
    name = alert["alert"]
    assert alert["labels"]["severity"] in {"warning", "critical"}
    assert alert["annotations"]["summary"] and alert["annotations"]["description"]
    assert re.fullmatch(r"\d+[smh]", alert["for"])
    assert alert["annotations"]["runbook_url"] == f"{RUNBOOK_BASE}{name}.md"
    runbook = RUNBOOKS / f"{name}.md"
    assert runbook.is_file(), f"{name} has no runbook at {runbook.relative_to(ROOT)}"
    text = runbook.read_text()
    assert text.startswith(f"# {name}\n")
    positions = [text.find(s) for s in SECTIONS]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), f"{name}: sections {SECTIONS} in order"
    assert "kubectl" in text, f"{name}: diagnosis without commands"


def test_every_runbook_belongs_to_an_alert_and_is_listed_in_the_index() -> None:
    names = {a["alert"] for a in alerts()}
    files = {p.stem for p in RUNBOOKS.glob("*.md")} - {"README"}
    assert files == names
    index = (RUNBOOKS / "README.md").read_text()
    for name in names:
        assert f"[{name}]({name}.md)" in index


def markdown_files() -> list[Path]:
    return sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "charts" / "vm-operator" / "README.md"]


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path) -> None:
    text = re.sub(r"```.*?```", "", doc.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{doc.relative_to(ROOT)} links to missing {target}"


def test_every_runbook_url_resolves_to_a_file() -> None:
    for alert in alerts():
        url = alert["annotations"]["runbook_url"]
        assert url.startswith(RUNBOOK_BASE)
        assert (RUNBOOKS / url[len(RUNBOOK_BASE):]).is_file(), url


# --- metric names against the real binary ----------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


@pytest.fixture(scope="module")
def app_metrics() -> Iterator[str]:
    """`GET /metrics` of a real `vm-webapp serve` after a run that exercises the
    worker, the LLM client (an unreachable endpoint on loopback) and Redis (a
    closed loopback port), so every family has samples."""
    port, dead_port = free_port(), free_port()
    workspace = Path(tempfile.mkdtemp(prefix="vm-docs-"))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "APP_ENV": "local",
        "VM_WORKSPACE_ROOT": str(workspace),
        "VM_REDIS_URL": f"redis://127.0.0.1:{dead_port}/0",
        "KIMI_API_KEY": "test-key-not-a-secret",
        "KIMI_BASE_URL": f"http://127.0.0.1:{dead_port}/v1",
        "VM_LLM_TIMEOUT_MS": "1000",
        "LOG_LEVEL": "warn",
    }
    process = subprocess.Popen(
        [binary("vm-webapp"), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                get(f"{base}/api/v2/health/live")
                break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"vm-webapp serve did not start: {process.stderr.read() if process.stderr else ''}")
                time.sleep(0.1)
        body = json.dumps({"input": {"name": "Ada"}, "steps": [
            {"kind": "template", "template": "Hello, {{input.name}}!"},
            {"kind": "transform", "op": "uppercase"},
            {"kind": "llm", "prompt": "One line about {{prev}}"},
        ]}).encode()
        request = urllib.request.Request(f"{base}/api/v2/runs", data=body, method="POST",
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 202
        get(f"{base}/api/v2/health/ready")
        try:  # a 404, counted under route="unmatched"
            get(f"{base}/api/v2/no/such/route")
        except urllib.error.HTTPError as e:
            assert e.code == 404
        deadline = time.monotonic() + 30
        text = get(f"{base}/metrics")
        while time.monotonic() < deadline and not all(
            f"# TYPE {family} " in text
            for family in ["vm_llm_request_duration_seconds", "vm_dependency_failures", "vm_jobs_finished"]
        ):
            time.sleep(0.25)
            text = get(f"{base}/metrics")
        yield text
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(workspace, ignore_errors=True)


def families(text: str) -> dict[str, str]:
    """Family name to type, from the `# TYPE` lines."""
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


def sample_names(family: str, kind: str) -> set[str]:
    if kind == "counter":
        return {f"{family}_total", f"{family}_created"}
    if kind == "histogram":
        return {f"{family}_bucket", f"{family}_count", f"{family}_sum", f"{family}_created"}
    return {family}


def samples(text: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        match = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? ", line)
        assert match, line
        labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        out.append((match.group(1), labels))
    return out


def queried(doc: Path) -> list[tuple[str, str]]:
    """(metric, selector) pairs of the app's `vm_` metrics a document queries."""
    text = doc.read_text()
    return [
        (name, selector or "")
        for name, selector in re.findall(r"\b(vm_(?!operator_)[a-z0-9_]+)(\{[^}]*\})?", text)
    ]


def test_the_documents_query_app_metrics_at_all() -> None:
    assert len(queried(RULES)) >= 10
    assert len(queried(ROOT / "docs" / "slo.md")) >= 10


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_app_metric_and_label_queried_exists_in_the_real_output(doc: Path, app_metrics: str) -> None:
    kinds = families(app_metrics)
    exported = {name: family for family, kind in kinds.items() for name in sample_names(family, kind)}
    label_keys: dict[str, set[str]] = {}
    label_values: dict[tuple[str, str], set[str]] = {}
    for name, labels in samples(app_metrics):
        family = exported.get(name, name)
        label_keys.setdefault(family, set()).update(labels)
        for key, value in labels.items():
            label_values.setdefault((family, key), set()).add(value)
    for name, selector in queried(doc):
        assert name in exported or name in kinds, f"{doc.name}: {name} is not exported by vm-webapp"
        family = exported.get(name, name)
        for key, op, value in re.findall(r'([a-zA-Z_]+)\s*(=~|!~|!=|=)\s*"([^"]*)"', selector):
            assert key in label_keys.get(family, set()) | SCRAPE_LABELS, f"{doc.name}: {name} has no label {key}"
            if key == "status_class":
                assert all(re.fullmatch(r"[1-5]xx", v) for v in value.split("|")), f"{doc.name}: status_class {value}"
            elif key in {"state", "route", "le"} and op == "=":
                assert value in label_values.get((family, key), set()), (
                    f"{doc.name}: {name}{{{key}=\"{value}\"}} never appears in the output"
                )


def test_families_with_fixed_label_values_are_exported_before_anything_happened(app_metrics: str) -> None:
    """Families the alerts and dashboards read exist at 0 before their first
    event (they used to be absent until then, so `rate()` showed no data)."""
    for line in [
        'vm_dependency_failures_total{dependency="database"} 0',
        'vm_rate_limited_total{reason="address"} 0',
        'vm_auth_failures_total{reason="missing"} 0',
        'vm_webhook_deliveries_total{reason="accepted"} 0',
        'vm_llm_request_duration_seconds_count{outcome="status_429"} 0',
    ]:
        assert re.search(rf"^{re.escape(line)}$", app_metrics, re.M), line
    assert re.search(r'^vm_http_requests_total\{method="GET",route="unmatched",status_class="4xx"\} 1$', app_metrics, re.M)
    assert "no/such/route" not in app_metrics


def test_label_values_the_alerts_rely_on_are_produced(app_metrics: str) -> None:
    """The counters by outcome and dependency only appear once something happened:
    the run's unreachable LLM and Redis made them appear, with these values."""
    assert re.search(r'^vm_llm_request_duration_seconds_count\{outcome="unreachable"\}', app_metrics, re.M), app_metrics
    assert re.search(r'^vm_dependency_failures_total\{dependency="(llm|redis)"\} [1-9]', app_metrics, re.M), app_metrics
    assert re.search(r'^vm_queue_oldest_job_age_seconds\{state="queued"\}', app_metrics, re.M)
    assert re.search(r'^vm_worker_heartbeat_age_seconds ', app_metrics, re.M)
    assert re.search(r'^vm_build_info\{version="[^"]+"\} 1$', app_metrics, re.M)


# --- Argo CD health check ----------------------------------------------------------------


def lua_literal(value: object) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(v) for v in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{json.dumps(k)}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(value)


def health_check() -> str:
    blocks = re.findall(r"```lua\n(.*?)```", (ROOT / "docs" / "gitops.md").read_text(), re.S)
    assert len(blocks) == 1, "docs/gitops.md must hold exactly one lua block: the health check"
    return blocks[0]


def argo_health(obj: dict) -> tuple[str, str]:
    lua = shutil.which("lua5.4")
    if lua is None:
        pytest.fail("lua5.4 is missing: scripts/install-chart-test-deps.sh installs it")
    script = (
        f"local obj = {lua_literal(obj)}\n"
        f"local function check(obj)\n{health_check()}\nend\n"
        "local hs = check(obj)\nio.write(hs.status, '\\n', hs.message or '')\n"
    )
    out = subprocess.run([lua, "-"], input=script, capture_output=True, text=True, check=True).stdout
    status, _, message = out.partition("\n")
    return status, message


def vmwebapp(generation: int, status: dict | None, suspend: bool = False) -> dict:
    obj: dict = {"metadata": {"name": "vm", "generation": generation}, "spec": {"suspend": suspend}}
    if status is not None:
        obj["status"] = status
    return obj


def cond(type_: str, status: str, reason: str, message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message}


@pytest.mark.parametrize(
    "obj, expected, message_part",
    [
        (vmwebapp(1, None), "Progressing", "Waiting for the operator"),
        (vmwebapp(3, {"observedGeneration": 2, "conditions": [cond("Ready", "True", "Available")]}), "Progressing", "generation 3"),
        (vmwebapp(2, {"observedGeneration": 2, "conditions": [
            cond("Ready", "True", "Available", "serving image x with 2 API and 2 worker pods ready"),
            cond("Progressing", "False", "Reconciled"), cond("Degraded", "False", "AsExpected")]}), "Healthy", "serving image x"),
        (vmwebapp(2, {"observedGeneration": 2, "conditions": [
            cond("Ready", "False", "MigrationFailed", "migration Job vm-migrate-abc failed"),
            cond("Degraded", "True", "MigrationFailed", "migration Job vm-migrate-abc failed")]}), "Degraded", "MigrationFailed: migration Job"),
        (vmwebapp(2, {"observedGeneration": 2, "conditions": [
            cond("Ready", "False", "RollingOut", "Deployments are rolling out"),
            cond("Progressing", "True", "RollingOut")]}), "Progressing", "rolling out"),
        (vmwebapp(2, {"observedGeneration": 2, "conditions": [cond("Ready", "False", "Suspended")]}, suspend=True), "Suspended", "suspend"),
        (vmwebapp(2, {"observedGeneration": 2, "conditions": []}), "Progressing", "Waiting for the Ready condition"),
    ],
)
def test_argo_cd_health_check_reads_ready_degraded_and_observed_generation(obj: dict, expected: str, message_part: str) -> None:
    status, message = argo_health(obj)
    assert (status, message_part in message) == (expected, True), message
