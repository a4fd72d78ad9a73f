-- Queue gauges kept fresh by the maintenance leader, so a `/metrics` scrape
-- reads four rows instead of scanning the queue. `oldest_age_ms` is the age of
-- the oldest job in that state when `updated_at` was stamped (database clock, ms).
CREATE TABLE queue_stats (
    state         TEXT PRIMARY KEY,
    jobs          BIGINT NOT NULL,
    oldest_age_ms BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL
);
