-- Live streams (GET /api/v2/events/stream) follow every run's events in id
-- order: one poll per replica every few hundred milliseconds reads
-- `id > $1 ORDER BY id LIMIT n`. Events are keyed by (run_id, id) since
-- version 5, so without this index each poll would scan the table. The ids
-- come from a sequence, so inserts land on the index's rightmost page.
CREATE INDEX run_events_id ON run_events (id);
