-- Queue gauges kept fresh by the maintenance leader (one process per database,
-- elected with an advisory lock), so a `/metrics` scrape reads four rows
-- instead of scanning the queue. `oldest_age_ms` is the age of the oldest job
-- in that state when `updated_at` was stamped (database clock, ms).
CREATE TABLE queue_stats (
    state         TEXT PRIMARY KEY,
    jobs          BIGINT NOT NULL,
    oldest_age_ms BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);

-- Runs are updated twice per life (started, finished): leave room on each page
-- so those updates stay on the page.
ALTER TABLE runs SET (fillfactor = 85);
