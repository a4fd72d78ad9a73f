//! Claiming: queued jobs become running under a lease, the run becomes
//! running, and `run.started` / `step.started` are recorded, in one
//! transaction. On PostgreSQL that is one statement (`FOR UPDATE SKIP LOCKED`
//! in a data-modifying CTE), so workers never queue behind each other and a
//! claim costs one round trip whatever its size.
//!
//! On PostgreSQL a claim commits with `synchronous_commit = off`: it does not
//! wait for its WAL flush. Nothing is lost by that: if the server crashed
//! before the flush, the claim never happened, the job is `queued` again with
//! its old attempt, and the worker's completion is refused by the fencing
//! token (a stale claim), so the step runs again: at least once, and its
//! result recorded once. Results and new runs still commit synchronously.
//! Under a moderate load this turns one disk flush per small claim into none.
//! The setting rides in the statement itself ([`UNFLUSHED`]), so the claim
//! stays one round trip, not four (`BEGIN`, `SET LOCAL`, claim, `COMMIT`).

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::Row;

use super::JobRef;
use crate::config::DbBackend;
use crate::model::{ClaimedJob, EventType};
use crate::steps::StepSpec;
use crate::store::events::NewEvent;
use crate::store::{Result, Store, UNFLUSHED, ms, parse_uuid};

const RETURNING: &str = "id, run_id, correlation_id, step_index, step_count, payload, attempt, \
                         max_attempts, waited_ms";

impl Store {
    /// Claims up to `limit` jobs claimable now (database clock) for `worker`,
    /// leased for `lease` from the database's now, oldest `run_at` first.
    /// A job whose step this build cannot read is set aside (retried later by
    /// a newer worker, or dead-lettered on its last attempt) instead of
    /// blocking the queue.
    pub async fn claim(
        &self,
        worker: &str,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<ClaimedJob>> {
        let rows = match self.backend() {
            DbBackend::Postgres => self.claim_postgres(worker, limit, lease).await,
            DbBackend::Sqlite => self.noted(self.claim_sqlite(worker, limit, lease).await),
        }?;
        let mut jobs = Vec::with_capacity(rows.len());
        let mut unreadable = Vec::new();
        for row in &rows {
            let payload: String = row.try_get("payload")?;
            // One step this build cannot read (written by a newer version
            // during a rolling upgrade, or damaged) must not block the rest.
            let Ok(step) = serde_json::from_str::<StepSpec>(&payload) else {
                unreadable.push(JobRef::from_row(row)?);
                continue;
            };
            jobs.push(ClaimedJob {
                id: row.try_get("id")?,
                run_id: parse_uuid(&row.try_get::<String, _>("run_id")?)?,
                correlation_id: row.try_get("correlation_id")?,
                step_index: row.try_get("step_index")?,
                step_count: row.try_get("step_count")?,
                step,
                attempt: row.try_get("attempt")?,
                max_attempts: row.try_get("max_attempts")?,
                waited_ms: row.try_get::<i64, _>("waited_ms")?.max(0),
            });
        }
        jobs.sort_by_key(|j| j.id);
        self.set_aside_unreadable(&unreadable).await?;
        Ok(jobs)
    }

    /// One statement: lock, lease, start the runs, record the events.
    async fn claim_postgres(
        &self,
        worker: &str,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<sqlx::any::AnyRow>> {
        // The step kind for `step.started` is read from the payload's text, so
        // that a payload this build (or PostgreSQL's JSON parser) cannot read
        // still claims and is then set aside.
        let sql = self.sql(&format!(
            "WITH claimable AS ( \
               SELECT id FROM jobs WHERE state = 'queued' AND run_at <= {{now}} \
               ORDER BY run_at, id LIMIT $1 FOR UPDATE SKIP LOCKED \
             ), claimed AS ( \
               UPDATE jobs SET state = 'running', attempt = jobs.attempt + 1, \
                 lease_expires_at = {{now}} + $2, locked_by = $3 \
               FROM claimable WHERE jobs.id = claimable.id \
               RETURNING jobs.id, jobs.run_id, jobs.correlation_id, jobs.step_index, jobs.step_count, \
                 jobs.payload, jobs.attempt, jobs.max_attempts, {{now}} - jobs.run_at AS waited_ms \
             ), started AS ( \
               UPDATE runs SET status = 'running', started_at = {{now}}, updated_at = {{now}} \
               FROM claimed WHERE runs.id = claimed.run_id AND runs.status = 'queued' \
               RETURNING runs.id \
             ), recorded AS ( \
               INSERT INTO run_events (run_id, event_type, step_index, attempt, message, data, created_at) \
               SELECT id, '{run_started}', NULL::BIGINT, NULL::BIGINT, NULL, NULL, {{now}} FROM started \
               UNION ALL \
               SELECT run_id, '{step_started}', step_index, attempt, NULL, \
                 '{{\"kind\":\"' || COALESCE(substring(payload from '\"kind\":\"([a-z_]+)\"'), 'unknown') || '\"}}', \
                 {{now}} FROM claimed \
             ), unflushed AS ({UNFLUSHED}) \
             SELECT {RETURNING} FROM claimed, unflushed",
            run_started = EventType::RunStarted.as_str(),
            step_started = EventType::StepStarted.as_str(),
        ));
        let rows = sqlx::query(&sql)
            .bind(limit)
            .bind(ms(lease))
            .bind(worker)
            .fetch_all(self.pool())
            .await?;
        if !rows.is_empty() {
            self.events.raise();
        }
        Ok(rows)
    }

    /// SQLite has one writer: the statements share one transaction.
    async fn claim_sqlite(
        &self,
        worker: &str,
        limit: i64,
        lease: Duration,
    ) -> Result<Vec<sqlx::any::AnyRow>> {
        let sql = self.sql(
            "UPDATE jobs SET state = 'running', attempt = attempt + 1, \
               lease_expires_at = {now} + $2, locked_by = $3 \
             WHERE id IN (SELECT id FROM jobs WHERE state = 'queued' AND run_at <= {now} \
               ORDER BY run_at, id LIMIT $1) \
             RETURNING id, run_id, correlation_id, step_index, step_count, payload, attempt, \
               max_attempts, {now} - run_at AS waited_ms, \
               CASE WHEN json_valid(payload) THEN \
                 CASE WHEN json_type(payload, '$.kind') = 'text' THEN json_extract(payload, '$.kind') END \
               END AS kind",
        );
        let mut tx = self.begin().await?;
        let mut rows = sqlx::query(&sql)
            .bind(limit)
            .bind(ms(lease))
            .bind(worker)
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(rows);
        }
        rows.sort_by_key(|r| r.try_get::<i64, _>("id").unwrap_or_default());
        let run_ids: Vec<String> = rows
            .iter()
            .map(|r| r.try_get::<String, _>("run_id"))
            .collect::<Result<_, _>>()?;
        let started = sqlx::query(&self.sql(
            "UPDATE runs SET status = 'running', started_at = {now}, updated_at = {now} \
             WHERE status = 'queued' AND id IN (SELECT value FROM json_each($1)) RETURNING id",
        ))
        .bind(Value::from(run_ids.clone()).to_string())
        .fetch_all(&mut *tx)
        .await?;
        let started_ids: Vec<String> = started
            .iter()
            .map(|r| r.try_get::<String, _>("id"))
            .collect::<Result<_, _>>()?;
        let mut events: Vec<NewEvent<'_>> = started_ids
            .iter()
            .map(|id| NewEvent::run(id, EventType::RunStarted))
            .collect();
        // The kind comes from SQLite's JSON functions (`unknown` for a damaged
        // payload, which is then set aside), not from a parse here that
        // `claim` repeats for the step itself.
        for (row, run_id) in rows.iter().zip(&run_ids) {
            let kind: Option<String> = row.try_get("kind")?;
            events.push(
                NewEvent::step(
                    run_id,
                    EventType::StepStarted,
                    row.try_get("step_index")?,
                    row.try_get("attempt")?,
                )
                .data(json!({"kind": kind.as_deref().unwrap_or("unknown")})),
            );
        }
        self.insert_events(&mut tx, &events).await?;
        tx.commit().await?;
        self.events.raise();
        Ok(rows)
    }

    async fn set_aside_unreadable(&self, jobs: &[JobRef]) -> Result<()> {
        const LATER: Duration = Duration::from_secs(30);
        for job in jobs {
            let message = format!(
                "this worker cannot read the `{}` step (written by a newer version, or damaged)",
                job.kind
            );
            if job.attempt < job.max_attempts {
                let event = NewEvent::step(
                    &job.run_id,
                    EventType::StepRetryScheduled,
                    job.step_index,
                    job.attempt,
                )
                .message(message.clone())
                .data(json!({"delay_ms": ms(LATER)}));
                self.requeue(job, LATER, 0, Some(&message), event).await?;
            } else {
                self.dead_letter_ref(job, &message).await?;
            }
        }
        Ok(())
    }
}
