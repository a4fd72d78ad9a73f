"""The console in a real browser: Debian's headless Chromium driven by
playwright-core (`console.mjs`) against a real `vm-webapp serve` on a free
port with a temporary SQLite database. The scenario signs in with the
keyboard, creates runs through the API and watches them change live in the
page without reloading: a run of plain steps succeeds, a second page of runs
stays shown through live updates, and a run with an approval step appears as
waiting, is approved in the inbox (whose card names the run's tenant) with a
comment (with the keyboard; the focus is kept), and succeeds. It also checks that a prompt is shown as text, that
each decision button says which run it decides, that a run finishing before
the all-runs stream opens still shows, that the inbox shows more than one
API page, and that without script the sign-in form does not put the key in
the URL. The screenshot is kept under `var/test-artifacts/`
(`VM_UPDATE_CONSOLE_PNG=1` also rewrites `docs/console.png`)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, binary

HERE = Path(__file__).resolve().parent
ARTIFACTS = ROOT / "var" / "test-artifacts"
KEY = "console-test-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_console_follows_runs_live_and_decides_approvals_in_headless_chromium() -> None:
    node = shutil.which("node")
    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    if node is None or not Path(chromium).exists() or not (HERE / "node_modules" / "playwright-core").is_dir():
        pytest.fail("node, chromium or playwright-core is missing: run ./scripts/install-test-deps.sh (make deps)")
    port = free_port()
    workspace = Path(tempfile.mkdtemp(prefix="vm-console-"))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "APP_ENV": "local",
        "VM_WORKSPACE_ROOT": str(workspace),
        "VM_API_KEYS": f"ui:{KEY}:admin",
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
                with urllib.request.urlopen(f"{base}/api/v2/health/live", timeout=5):
                    pass
                break
            except (urllib.error.URLError, ConnectionError):
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"vm-webapp serve did not start: {process.stderr.read() if process.stderr else ''}")
                time.sleep(0.1)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        args = [node, str(HERE / "console.mjs"), base, KEY, str(ARTIFACTS / "console.png"), "--approval"]
        if os.environ.get("VM_UPDATE_CONSOLE_PNG"):
            args += ["--docs", str(ROOT / "docs" / "console.png")]
        result = subprocess.run(args, cwd=HERE, capture_output=True, text=True, timeout=120,
                                env={**os.environ, "CHROMIUM": chromium})
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        assert "console scenario passed (with an approval)" in result.stdout
        assert (ARTIFACTS / "console.png").stat().st_size > 0
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(workspace, ignore_errors=True)
