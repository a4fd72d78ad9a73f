"""A real monitoring stack around the real app, on loopback, for the incident
drills and the dashboard queries: PostgreSQL, `vm-webapp serve` (API only,
APP_ENV=staging) and `vm-webapp worker`, a Prometheus that scrapes both and
evaluates deploy/prometheus-rules.yaml unchanged, an Alertmanager running
docs/alertmanager.yml's routing tree with its receivers swapped for a webhook
this process serves, and a load generator posting runs.

Every process is started here and stopped by `close()`; each also dies with
the test process (PR_SET_PDEATHSIG, and a watchdog for PostgreSQL, which runs
under `runuser` when the tests run as root)."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

import yaml

from conftest import ROOT, binary

RULES = ROOT / "deploy" / "prometheus-rules.yaml"
ALERTMANAGER_EXAMPLE = ROOT / "docs" / "alertmanager.yml"
# Scrapes every 5 s (the timeout leaves room for the app's 2 s refresh budget
# when the database hangs); rules are evaluated every second.
SCRAPE_INTERVAL = "5s"
SCRAPE_TIMEOUT = "4s"
EVALUATION_INTERVAL = "1s"
# Only change to the example's timings: a group's next notification (which
# carries a resolution) may leave after 5 s instead of minutes, so a drill
# sees the resolution quickly. group_wait (time to the first page) is kept.
DRILL_GROUP_INTERVAL = "5s"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def http(url: str, body: bytes | None = None, timeout: float = 5) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_until(what: str, check: Callable[[], Any], timeout: float, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (OSError, urllib.error.URLError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


class Postgres:
    """A throw-away PostgreSQL 15 server on a free loopback port."""

    def __init__(self, base: Path) -> None:
        """`base`: an empty directory of its own (see `scratch`)."""
        dirs = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
        if os.environ.get("VM_TEST_PG_BINDIR"):
            self.bindir = Path(os.environ["VM_TEST_PG_BINDIR"])
        elif dirs:
            self.bindir = dirs[-1].parent
        else:
            raise AssertionError("PostgreSQL server binaries not found: scripts/install-test-deps.sh installs them")
        self.as_root = os.geteuid() == 0
        self.base = base
        if self.as_root:
            # PostgreSQL refuses to run as root: its directory goes to `postgres`.
            subprocess.run(["chown", "-R", "postgres:postgres", str(base)], check=True)
        self.port = free_port()
        self._command("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
                      "--no-sync", "--no-instructions", stdout=subprocess.DEVNULL)
        self.start()
        watchdog = (
            f"while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; "
            f"kill -QUIT $(head -1 '{self.data}/postmaster.pid' 2>/dev/null) 2>/dev/null"
        )
        subprocess.Popen(["sh", "-c", watchdog], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)

    @property
    def data(self) -> Path:
        return self.base / "data"

    def _argv(self, program: str, *args: str) -> list[str]:
        path = str(self.bindir / program)
        return ["runuser", "-u", "postgres", "--", path, *args] if self.as_root else [path, *args]

    def _command(self, program: str, *args: str, **kwargs: Any) -> None:
        subprocess.run(self._argv(program, *args), check=True, **kwargs)

    def start(self) -> None:
        log = open(self.base / "server.log", "ab")
        subprocess.Popen(
            self._argv("postgres", "-D", str(self.data), "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
                       "-c", f"unix_socket_directories={self.base}", "-c", "fsync=off",
                       "-c", "full_page_writes=off", "-c", "max_connections=200"),
            stdin=subprocess.DEVNULL, stdout=log, stderr=log,
        )
        wait_until("postgres to accept connections", lambda: subprocess.run(
            self._argv("pg_isready", "-h", "127.0.0.1", "-p", str(self.port), "-q")).returncode == 0, 30)

    def stop(self) -> None:
        """An immediate stop: an outage, as far as clients can tell."""
        subprocess.run(self._argv("pg_ctl", "-D", str(self.data), "stop", "-m", "immediate", "-w"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def create_database(self, name: str) -> str:
        self._command("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return f"postgres://postgres@127.0.0.1:{self.port}/{name}"


class Webhook:
    """An Alertmanager webhook receiver: records every notification with the
    monotonic time it arrived and the receiver (the URL path) it was sent to."""

    def __init__(self) -> None:
        self.notifications: list[tuple[float, str, dict]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with outer.lock:
                    outer.notifications.append((time.monotonic(), self.path.strip("/"), body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def alerts(self) -> list[tuple[float, str, dict]]:
        """(arrival, receiver, alert) for every alert of every notification."""
        with self.lock:
            return [(t, receiver, a) for t, receiver, n in self.notifications for a in n["alerts"]]

    def wait_for(self, alertname: str, status: str, after: float, timeout: float) -> tuple[float, str, dict]:
        def found() -> tuple[float, str, dict] | None:
            for t, receiver, alert in self.alerts():
                if t >= after and alert["labels"].get("alertname") == alertname and alert["status"] == status:
                    return t, receiver, alert
            return None
        return wait_until(f"{alertname} {status} at the webhook", found, timeout, every=0.5)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def drill_alertmanager_config(webhook_port: int) -> dict:
    """docs/alertmanager.yml with every receiver delivering to the webhook
    (`/<receiver name>`) and the groups' interval shortened; the routing tree,
    group_wait and inhibition are the example's own."""
    config = yaml.safe_load(ALERTMANAGER_EXAMPLE.read_text())
    config["receivers"] = [
        {"name": r["name"], "webhook_configs": [
            {"url": f"http://127.0.0.1:{webhook_port}/{r['name']}", "send_resolved": True}]}
        for r in config["receivers"]
    ]

    def shorten(route: dict) -> None:
        route["group_interval"] = DRILL_GROUP_INTERVAL
        for child in route.get("routes", []):
            shorten(child)

    shorten(config["route"])
    return config


def start_alertmanager(config: Path, storage: Path, port: int, log: Any) -> subprocess.Popen:
    """A single Alertmanager (no cluster) on loopback, ready when this returns."""
    process = subprocess.Popen([
        shutil.which("prometheus-alertmanager") or "alertmanager", f"--config.file={config}",
        f"--storage.path={storage}", f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address=",
    ], env={"PATH": os.environ.get("PATH", "")}, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent)
    try:
        wait_until("alertmanager ready", lambda: http(f"http://127.0.0.1:{port}/-/ready")[0] == 200, 30)
    except AssertionError:
        process.kill()
        raise
    return process



class Stack:
    """The app, scraped by Prometheus, alerting through Alertmanager to a webhook."""

    def __init__(self, name: str, db_url: str, base: Path) -> None:
        self.name = name
        self.base = base
        self.base.mkdir(parents=True, exist_ok=True)
        self.processes: dict[str, subprocess.Popen] = {}
        self.api_port, self.worker_port = free_port(), free_port()
        self.prometheus_port, self.alertmanager_port = free_port(), free_port()
        self.api = f"http://127.0.0.1:{self.api_port}"
        self.prometheus = f"http://127.0.0.1:{self.prometheus_port}"
        self.webhook = Webhook()
        self.load_stop = threading.Event()
        self.load_results: list[int] = []
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "APP_ENV": "staging",
            "VM_DB_URL": db_url,
            "VM_WORKSPACE_ROOT": str(base / "workspace"),
            "LOG_LEVEL": "warn",
            "LOG_FORMAT": "json",
        }
        subprocess.run([binary("vm-webapp"), "migrate"], env=self.env, check=True, capture_output=True)
        # serve first: on PostgreSQL it wins the queue-maintenance leadership,
        # so the queue gauges stay fresh while the drill stops the worker.
        self._spawn("serve", [binary("vm-webapp"), "serve", "--host", "127.0.0.1", "--port", str(self.api_port)])
        wait_until(f"{name}: serve ready", lambda: http(f"{self.api}/api/v2/health/ready")[0] == 200, 30)
        self._spawn("worker", [binary("vm-webapp"), "worker", "--poll-interval-ms", "200",
                               "--health-host", "127.0.0.1", "--health-port", str(self.worker_port)])
        self._start_alertmanager()
        self._start_prometheus()
        wait_until(f"{name}: a worker heartbeat", lambda: json.loads(
            http(f"{self.api}/api/v2/health/ready")[1])["dependencies"]["worker"]["status"] == "ok", 30)
        wait_until(f"{name}: Prometheus scraping both targets", lambda: sum(
            1 for r in self.query("up == 1")) == 2, 30)

    def _spawn(self, key: str, argv: list, env: dict | None = None) -> None:
        log = open(self.base / f"{key}.log", "wb")
        self.processes[key] = subprocess.Popen(
            [str(a) for a in argv], env=env if env is not None else self.env, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
        )

    def _start_alertmanager(self) -> None:
        config = self.base / "alertmanager.yml"
        config.write_text(yaml.safe_dump(drill_alertmanager_config(self.webhook.port)))
        log = open(self.base / "alertmanager.log", "wb")
        self.processes["alertmanager"] = start_alertmanager(config, self.base / "alertmanager",
                                                            self.alertmanager_port, log)


    def _start_prometheus(self) -> None:
        labels = {"namespace": "drill", "vmwebapp": self.name}
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_TIMEOUT,
                       "evaluation_interval": EVALUATION_INTERVAL},
            "rule_files": [str(RULES)],
            "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{self.alertmanager_port}"]}]}]},
            "scrape_configs": [{
                "job_name": "vm-webapp",
                "metrics_path": "/metrics",
                "static_configs": [
                    {"targets": [f"127.0.0.1:{self.api_port}"], "labels": {**labels, "component": "api"}},
                    {"targets": [f"127.0.0.1:{self.worker_port}"], "labels": {**labels, "component": "worker"}},
                ],
            }],
        }
        path = self.base / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self._spawn("prometheus", [
            "prometheus", f"--config.file={path}", f"--storage.tsdb.path={self.base / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.prometheus_port}",
        ], env={"PATH": os.environ.get("PATH", "")})
        wait_until(f"{self.name}: prometheus ready", lambda: http(f"{self.prometheus}/-/ready")[0] == 200, 30)

    def query(self, promql: str) -> list[dict]:
        """An instant query; raises on a PromQL error."""
        status, body = http(f"{self.prometheus}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise QueryError(f"{promql}: {answer.get('error', body)}")
        return answer["data"]["result"]

    def alerts(self) -> list[dict]:
        """Pending and firing alerts, as Prometheus sees them."""
        return json.loads(http(f"{self.prometheus}/api/v1/alerts")[1])["data"]["alerts"]

    def start_load(self, per_second: float) -> None:
        """Posts one-step-pair runs at a steady rate until `stop_load`."""
        body = json.dumps({"input": {"name": "Ada"}, "steps": [
            {"kind": "template", "template": "Hello, {{input.name}}!"},
            {"kind": "transform", "op": "uppercase"},
        ]}).encode()

        def load() -> None:
            next_at = time.monotonic()
            while not self.load_stop.is_set():
                try:
                    status, _ = http(f"{self.api}/api/v2/runs", body, timeout=3)
                except (OSError, urllib.error.URLError):
                    status = 0
                self.load_results.append(status)
                # Also read a run list now and then, like a client would.
                if len(self.load_results) % 5 == 0:
                    try:
                        http(f"{self.api}/api/v2/runs?limit=5", timeout=3)
                    except (OSError, urllib.error.URLError):
                        pass
                next_at += 1 / per_second
                self.load_stop.wait(max(0.0, next_at - time.monotonic()))

        threading.Thread(target=load, daemon=True).start()

    def stop_load(self) -> None:
        self.load_stop.set()

    def signal_worker(self, sig: signal.Signals) -> None:
        self.processes["worker"].send_signal(sig)

    def close(self) -> None:
        self.stop_load()
        worker = self.processes.get("worker")
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGCONT)
        for process in self.processes.values():
            if process.poll() is None:
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.webhook.close()


class QueryError(Exception):
    """Prometheus refused or failed to evaluate a query."""


def scratch(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))
