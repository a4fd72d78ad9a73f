"""The incident drills and the quiet run, started once and run in parallel
(each on its own stack: see stack.py), so that all of them together take about
as long as the slowest one. Tests wait for the scenario they assert on; the
measured times are printed at the end of the pytest run."""

from __future__ import annotations

import shutil
import signal
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

from .stack import Postgres, Stack, http, scratch, wait_until

# Every drill must page within this time of its fault (the go-live criterion).
PAGE_WITHIN_S = 120
# How long the quiet run keeps normal load on an untouched stack.
QUIET_SECONDS = 110
# Normal load: runs posted per second (each two steps, so two jobs).
RUNS_PER_SECOND = 4
# Traffic with jobs flowing before a fault, so the fault hits a working system.
WARM_UP_SECONDS = 10

MEASURED: list[str] = []


@dataclass
class Scenario:
    """One drill running in its own thread; `result()` waits for it."""

    name: str
    run: Callable[[], dict]
    data: dict = field(default_factory=dict)
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        def body() -> None:
            try:
                self.data.update(self.run())
            except BaseException:  # reported by the test that asks for it
                self.error = traceback.format_exc()
            finally:
                self.done.set()
        threading.Thread(target=body, name=self.name, daemon=True).start()

    def result(self, timeout: float = 400) -> dict:
        assert self.done.wait(timeout), f"{self.name} did not finish within {timeout} s"
        if self.error:
            pytest.fail(f"{self.name} failed:\n{self.error}")
        return self.data


def worker_stall(stack: Stack) -> dict:
    """SIGSTOP the only worker while runs keep arriving; SIGCONT once paged."""
    stack.start_load(RUNS_PER_SECOND)
    time.sleep(WARM_UP_SECONDS)
    fault = time.monotonic()
    stack.signal_worker(signal.SIGSTOP)
    at, receiver, alert = stack.webhook.wait_for("VmWebappWorkerStalled", "firing", fault, PAGE_WITHIN_S + 60)
    queued = stack.query('max(vm_queue_jobs{state="queued"})')
    resumed = time.monotonic()
    stack.signal_worker(signal.SIGCONT)
    resolved_at, resolved_receiver, _ = stack.webhook.wait_for("VmWebappWorkerStalled", "resolved", resumed, 120)
    stack.stop_load()
    paged = at - fault
    MEASURED.append(f"worker stall (SIGSTOP): VmWebappWorkerStalled delivered to {receiver} {paged:.0f} s after the "
                    f"fault; resolution delivered {resolved_at - resumed:.0f} s after SIGCONT")
    return {
        "paged_after": paged, "receiver": receiver, "alert": alert,
        "queued_while_stalled": float(queued[0]["value"][1]) if queued else 0.0,
        "resolved_after": resolved_at - resumed, "resolved_receiver": resolved_receiver,
        "delivered": {a["labels"]["alertname"] for _, _, a in stack.webhook.alerts()},
    }


def database_outage(stack: Stack, pg: Postgres) -> dict:
    """Stop PostgreSQL (immediate shutdown) under load; start it again once paged."""
    stack.start_load(RUNS_PER_SECOND)
    time.sleep(WARM_UP_SECONDS)
    fault = time.monotonic()
    pg.stop()
    at, receiver, alert = stack.webhook.wait_for("VmWebappDatabaseUnavailable", "firing", fault, PAGE_WITHIN_S + 60)
    restarted = time.monotonic()
    pg.start()
    # The app recovers by itself: ready again, and accepting runs.
    wait_until("serve ready after the database is back", lambda: http(f"{stack.api}/api/v2/health/ready")[0] == 200, 60)
    accepted = len(stack.load_results)
    wait_until("runs accepted after the database is back", lambda: 202 in stack.load_results[accepted:], 60)
    recovered = time.monotonic() - restarted
    stack.stop_load()
    paged = at - fault
    MEASURED.append(f"database outage (PostgreSQL stopped): VmWebappDatabaseUnavailable delivered to {receiver} "
                    f"{paged:.0f} s after the fault; the app ready and accepting runs {recovered:.0f} s after the restart")
    return {"paged_after": paged, "receiver": receiver, "alert": alert, "recovered_after": recovered}


def quiet_run(stack: Stack) -> dict:
    """Normal load on a healthy stack: Prometheus must not even have a pending alert.
    The load keeps going afterwards for the dashboard queries."""
    stack.start_load(RUNS_PER_SECOND)
    seen: list[dict] = []
    end = time.monotonic() + QUIET_SECONDS
    samples = 0
    while time.monotonic() < end:
        seen += stack.alerts()
        samples += 1
        time.sleep(2)
    posted = list(stack.load_results)
    MEASURED.append(f"quiet run: {QUIET_SECONDS} s at {RUNS_PER_SECOND} runs/s ({len(posted)} runs posted), "
                    f"{len(seen)} pending or firing alerts seen in {samples} looks, "
                    f"{len(stack.webhook.alerts())} notifications")
    return {"alerts": seen, "notifications": stack.webhook.alerts(), "posted": posted}


@pytest.fixture(scope="session")
def drills() -> Iterator[dict[str, Any]]:
    started = time.monotonic()
    base = scratch("vm-alerts-")
    base.chmod(0o755)
    pg_shared = Postgres(scratch("vm-alerts-pg-"))
    pg_outage = Postgres(scratch("vm-alerts-pg-"))
    stacks: list[Stack] = []
    try:
        quiet = Stack("quiet", pg_shared.create_database("quiet"), base / "quiet")
        stacks.append(quiet)
        stall = Stack("stall", pg_shared.create_database("stall"), base / "stall")
        stacks.append(stall)
        outage = Stack("outage", pg_outage.create_database("outage"), base / "outage")
        stacks.append(outage)
        scenarios = {
            "quiet": Scenario("quiet run", lambda: quiet_run(quiet)),
            "stall": Scenario("worker stall drill", lambda: worker_stall(stall)),
            "outage": Scenario("database outage drill", lambda: database_outage(outage, pg_outage)),
        }
        for scenario in scenarios.values():
            scenario.start()
        yield {"scenarios": scenarios, "quiet_stack": quiet}
        for scenario in scenarios.values():
            scenario.done.wait(400)
        MEASURED.append(f"all drills: {time.monotonic() - started:.0f} s wall time, in parallel")
    finally:
        for stack in stacks:
            stack.close()
        for pg in (pg_shared, pg_outage):
            pg.stop()
            shutil.rmtree(pg.base, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if MEASURED:
        terminalreporter.section("incident drills (measured)")
        for line in MEASURED:
            terminalreporter.write_line(line)
