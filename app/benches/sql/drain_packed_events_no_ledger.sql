-- One pgbench transaction: claim :batch jobs and complete them, in two
-- transactions, as in drain_everything.sql, but in a run model the project
-- does not have: each statement records its lifecycle events as one packed
-- row (not one row per event), and usage only in the counters (no
-- per-step ledger row). What such a redesign could gain, at most.
WITH claimable AS (
  SELECT id FROM jobs WHERE state = 'queued' AND run_at <= (extract(epoch from now())*1000)::bigint
  ORDER BY run_at, id LIMIT :batch FOR UPDATE SKIP LOCKED
), claimed AS (
  UPDATE jobs SET state = 'running', attempt = jobs.attempt + 1, lease_expires_at = 1 + 30000, locked_by = 'w'
  FROM claimable WHERE jobs.id = claimable.id
  RETURNING jobs.id, jobs.run_id, jobs.step_index, jobs.payload, jobs.attempt
), started AS (
  UPDATE runs SET status = 'running', started_at = 1, updated_at = 1
  FROM claimed WHERE runs.id = claimed.run_id AND runs.status = 'queued' RETURNING runs.id
), recorded AS (
  INSERT INTO run_events (run_id, event_type, step_index, attempt, message, data, created_at)
  SELECT 'batch', 'packed', NULL, NULL, NULL, (SELECT json_agg(json_build_array(run_id, step_index, attempt))::text FROM claimed), 1
), unflushed AS (SELECT set_config('synchronous_commit', 'off', true) AS unflushed)
SELECT coalesce(array_to_string(array_agg(claimed.id), ','), '') AS ids FROM claimed, unflushed \gset
WITH done AS (
  DELETE FROM jobs WHERE id = ANY (string_to_array(':ids', ',')::bigint[]) AND state = 'running'
  RETURNING jobs.id, jobs.run_id, jobs.step_index, jobs.step_count, jobs.attempt, '{}'::text AS output, 0::bigint AS tokens
), owner AS (
  SELECT done.*, COALESCE(runs.tenant, 'anonymous') AS tenant FROM done LEFT JOIN runs ON runs.id = done.run_id
), used AS (
  SELECT tenant, 'steps' AS meter, 1::BIGINT AS quantity, run_id, step_index FROM owner
), counted AS (
  INSERT INTO usage_counters (tenant, period, meter, shard, used, updated_at)
  SELECT tenant, '2026-12', meter, :client_id % 4, SUM(quantity), 1 FROM used GROUP BY tenant, meter
  ON CONFLICT (tenant, period, meter, shard) DO UPDATE SET used = usage_counters.used + excluded.used, updated_at = excluded.updated_at
), results AS (
  INSERT INTO step_results (run_id, step_index, output, attempt, job_id, finished_at)
  SELECT run_id, step_index, output, attempt, id, 1 FROM done ON CONFLICT (run_id, step_index) DO NOTHING
), finished AS (
  UPDATE runs SET status = 'succeeded', output = done.output, finished_at = 1, updated_at = 1
  FROM done WHERE runs.id = done.run_id AND done.step_index + 1 = done.step_count AND runs.status = 'running'
  RETURNING runs.id
), recorded AS (
  INSERT INTO run_events (run_id, event_type, step_index, attempt, message, data, created_at)
  SELECT 'batch', 'packed', NULL, NULL, NULL, (SELECT json_agg(json_build_array(run_id, step_index, attempt))::text FROM done), 1
) SELECT count(*) FROM done;
