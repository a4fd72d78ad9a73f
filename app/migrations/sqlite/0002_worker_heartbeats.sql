-- One row per live worker process, refreshed while it runs and removed when it
-- stops cleanly. Readiness and metrics read the freshest heartbeat to tell
-- whether anything is draining the queue.
CREATE TABLE worker_heartbeats (
    worker_id    TEXT PRIMARY KEY,
    started_at   BIGINT NOT NULL,
    last_beat_at BIGINT NOT NULL,
    in_flight    BIGINT NOT NULL DEFAULT 0
);
