-- Runs, their step results and events, and the job queue.
-- Times are milliseconds since the Unix epoch; JSON is stored as text so that
-- the same queries serve SQLite and PostgreSQL.

-- Run ids are UUIDv7 text: the "C" collation keeps their order (time order)
-- byte-wise whatever the database default, for keyset pagination.
CREATE TABLE runs (
    id              TEXT COLLATE "C" PRIMARY KEY,
    status          TEXT NOT NULL,
    input           TEXT NOT NULL,
    steps           TEXT NOT NULL,
    step_count      BIGINT NOT NULL,
    idempotency_key TEXT UNIQUE,
    request_hash    TEXT NOT NULL,
    correlation_id  TEXT NOT NULL,
    output          TEXT,
    error           TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    started_at      BIGINT,
    finished_at     BIGINT
);
CREATE INDEX runs_status_id ON runs (status, id);

-- The hot table: only work that is waiting, queued or running lives here.
-- Finished jobs leave it (their results go to step_results, failures to
-- dead_jobs), so dead tuples do not pile up at the head of the claim index.
CREATE TABLE jobs (
    id               BIGSERIAL PRIMARY KEY,
    run_id           TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    correlation_id   TEXT NOT NULL,
    step_index       BIGINT NOT NULL,
    step_count       BIGINT NOT NULL,
    payload          TEXT NOT NULL,
    state            TEXT NOT NULL,
    attempt          BIGINT NOT NULL DEFAULT 0,
    max_attempts     BIGINT NOT NULL,
    run_at           BIGINT NOT NULL,
    lease_expires_at BIGINT,
    locked_by        TEXT,
    last_error       TEXT,
    created_at       BIGINT NOT NULL,
    UNIQUE (run_id, step_index)
);
CREATE INDEX jobs_claimable ON jobs (run_at, id) WHERE state = 'queued';
CREATE INDEX jobs_leased ON jobs (lease_expires_at) WHERE state = 'running';
ALTER TABLE jobs SET (
    fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);

CREATE TABLE step_results (
    run_id      TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step_index  BIGINT NOT NULL,
    output      TEXT NOT NULL,
    attempt     BIGINT NOT NULL,
    job_id      BIGINT NOT NULL,
    finished_at BIGINT NOT NULL,
    PRIMARY KEY (run_id, step_index)
);

CREATE TABLE dead_jobs (
    id          BIGINT PRIMARY KEY,
    run_id      TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    step_index  BIGINT NOT NULL,
    payload     TEXT NOT NULL,
    attempts    BIGINT NOT NULL,
    last_error  TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    failed_at   BIGINT NOT NULL
);
CREATE INDEX dead_jobs_run ON dead_jobs (run_id);

CREATE TABLE run_events (
    id          BIGSERIAL PRIMARY KEY,
    run_id      TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    event_type  TEXT NOT NULL,
    step_index  BIGINT,
    attempt     BIGINT,
    message     TEXT,
    data        TEXT,
    created_at  BIGINT NOT NULL
);
CREATE INDEX run_events_run ON run_events (run_id, id);
