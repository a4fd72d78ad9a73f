-- Leadership of queue maintenance (rescue of expired leases, the queue-gauge
-- snapshot) is a lease on the database clock: the holder renews it every
-- tick, and a holder that stops renewing (dead, or hung with its connection
-- still open, which kept a session advisory lock forever) loses it after
-- `expires_at`.
CREATE TABLE maintenance_leader (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
