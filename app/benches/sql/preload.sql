-- 60,000 queued one-step runs and their jobs, on a database migrated by
-- `vm-webapp migrate`. Replaces whatever runs and jobs were there.
TRUNCATE runs, jobs, run_events, step_results, usage_ledger, usage_counters;
INSERT INTO runs (id, status, input, steps, step_count, request_hash, correlation_id, created_at, updated_at)
SELECT '00000000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'), 'queued', '{}', '[{"kind":"template","template":"x"}]', 1, 'h', 'c' || g, 0, 0 FROM generate_series(1, 60000) g;
INSERT INTO jobs (run_id, correlation_id, step_index, step_count, payload, state, max_attempts, run_at, created_at)
SELECT '00000000-0000-7000-8000-' || lpad(to_hex(g), 12, '0'), 'c' || g, 0, 1, '{"kind":"template","template":"x"}', 'queued', 3, 0, 0 FROM generate_series(1, 60000) g;
VACUUM ANALYZE;
CHECKPOINT;
