"""The FastAPI anchor of `make bench`: the Python service vm-webapp replaces,
reduced to run creation. POST /api/v2/runs validates {"input", "steps"},
then stores the run, its jobs and its `run.queued` event in one SQLite
transaction (WAL, synchronous=NORMAL, as vm-webapp's embedded database),
and answers 202 with the run. Run with uvicorn and 2 workers; the database
file is named by ANCHOR_DB."""
import json
import os
import sqlite3
import time
import uuid

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

DB = os.environ["ANCHOR_DB"]
app = FastAPI()
conn = sqlite3.connect(DB, isolation_level=None, check_same_thread=False, timeout=10)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("PRAGMA synchronous=NORMAL")
conn.execute("PRAGMA busy_timeout=10000")
conn.executescript(
    "CREATE TABLE IF NOT EXISTS runs (id TEXT PRIMARY KEY, status TEXT, input TEXT, steps TEXT, created_at INTEGER);"
    "CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, step_index INTEGER, payload TEXT, state TEXT, run_at INTEGER);"
    "CREATE TABLE IF NOT EXISTS run_events (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT, event_type TEXT, created_at INTEGER);"
)


@app.post("/api/v2/runs", status_code=202)
async def create_run(request: Request):
    body = await request.json()
    steps = body.get("steps")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, dict) and "kind" in s for s in steps):
        raise HTTPException(status_code=422, detail="steps must be a non-empty list of steps")
    run_id, now = str(uuid.uuid4()), int(time.time() * 1000)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO runs VALUES (?, 'queued', ?, ?, ?)", (run_id, json.dumps(body.get("input", {})), json.dumps(steps), now))
    conn.executemany(
        "INSERT INTO jobs (run_id, step_index, payload, state, run_at) VALUES (?, ?, ?, ?, ?)",
        [(run_id, i, json.dumps(s), "queued" if i == 0 else "waiting", now) for i, s in enumerate(steps)],
    )
    conn.execute("INSERT INTO run_events (run_id, event_type, created_at) VALUES (?, 'run.queued', ?)", (run_id, now))
    conn.execute("COMMIT")
    return JSONResponse({"id": run_id, "status": "queued", "steps": steps}, status_code=202)


@app.get("/api/v2/health/live")
async def live():
    return {"status": "live"}
