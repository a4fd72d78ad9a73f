-- Events are read per run, in order: key them by (run_id, id) and drop the
-- separate (run_id, id) index, so each event costs one index entry, not two.
-- A run writes five events in its life; this is the queue's hottest index.
ALTER TABLE run_events DROP CONSTRAINT run_events_pkey;
ALTER TABLE run_events ADD PRIMARY KEY (run_id, id);
DROP INDEX run_events_run;
