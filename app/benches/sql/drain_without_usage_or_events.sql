-- One pgbench transaction: claim :batch jobs and complete them, in two
-- transactions, as the store does (see drain.sh). A hand-written copy of the
-- store's claim and completion statements as of 2026-12-01, for measuring
-- what each part costs; `make bench` (its `raw drain` line) measures the
-- store's own statements.
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
), unflushed AS (SELECT set_config('synchronous_commit', 'off', true) AS unflushed)
SELECT coalesce(array_to_string(array_agg(claimed.id), ','), '') AS ids FROM claimed, unflushed \gset
WITH done AS (
  DELETE FROM jobs WHERE id = ANY (string_to_array(':ids', ',')::bigint[]) AND state = 'running'
  RETURNING jobs.id, jobs.run_id, jobs.step_index, jobs.step_count, jobs.attempt, '{}'::text AS output, 0::bigint AS tokens
), results AS (
  INSERT INTO step_results (run_id, step_index, output, attempt, job_id, finished_at)
  SELECT run_id, step_index, output, attempt, id, 1 FROM done ON CONFLICT (run_id, step_index) DO NOTHING
), finished AS (
  UPDATE runs SET status = 'succeeded', output = done.output, finished_at = 1, updated_at = 1
  FROM done WHERE runs.id = done.run_id AND done.step_index + 1 = done.step_count AND runs.status = 'running'
  RETURNING runs.id
) SELECT count(*) FROM done;
