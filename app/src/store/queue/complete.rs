//! Finishing claimed jobs. Successes are recorded in batches
//! ([`Store::complete_batch`]: River's batch completer, graphile-worker's
//! `completeJobBatchDelay`): one transaction, set-based statements, whatever
//! the number of jobs. Retries, releases and dead letters are rare and go one
//! by one. Every path presents the claim's attempt (the fencing token) and
//! changes nothing when the claim is no longer valid.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::Row;

use super::{Completion, Finish, JobRef};
use crate::config::DbBackend;
use crate::model::{ClaimedJob, EventType};
use crate::store::events::NewEvent;
use crate::store::{Result, Store, json_text, ms, recordset};

impl Store {
    /// Records one step's output; see [`Store::complete_batch`].
    pub async fn complete(&self, job: &ClaimedJob, output: &Value) -> Result<Finish> {
        let done = [Completion {
            job: job.clone(),
            output: output.clone(),
        }];
        Ok(self
            .complete_batch(&done)
            .await?
            .pop()
            .unwrap_or(Finish::Stale))
    }

    /// Records the outputs of `done` in one transaction: each job whose claim
    /// is still valid leaves the queue, its result is stored once, the next
    /// step of its run is queued or, after the last step, the run succeeds, and
    /// `step.succeeded` / `run.succeeded` are recorded. Returns one [`Finish`]
    /// per completion, in order; a stale claim changes nothing.
    pub async fn complete_batch(&self, done: &[Completion]) -> Result<Vec<Finish>> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
        // Each output is serialised once, for the batch parameter and (on
        // SQLite) for the rows written after the fenced delete.
        let outputs: HashMap<i64, String> = done
            .iter()
            .map(|c| (c.job.id, json_text(&c.output)))
            .collect();
        let input = Value::Array(
            done.iter()
                .map(|c| json!({"id": c.job.id, "attempt": c.job.attempt, "output": outputs[&c.job.id]}))
                .collect(),
        )
        .to_string();
        let recorded: Vec<(i64, i64)> = match self.backend() {
            DbBackend::Postgres => self.complete_postgres(input).await?,
            DbBackend::Sqlite => self.complete_sqlite(input, &outputs).await?,
        };
        let recorded: std::collections::HashSet<(i64, i64)> = recorded.into_iter().collect();
        Ok(done
            .iter()
            .map(|c| {
                if recorded.contains(&(c.job.id, c.job.attempt)) {
                    Finish::Recorded
                } else {
                    Finish::Stale
                }
            })
            .collect())
    }

    /// One statement (a data-modifying CTE): every part sees the same
    /// snapshot and commits together.
    async fn complete_postgres(&self, input: String) -> Result<Vec<(i64, i64)>> {
        let sql = self.sql(&format!(
            "WITH input AS ({input}), done AS ( \
               DELETE FROM jobs USING input \
               WHERE jobs.id = input.id AND jobs.attempt = input.attempt AND jobs.state = 'running' \
               RETURNING jobs.id, jobs.run_id, jobs.step_index, jobs.step_count, jobs.attempt, input.output \
             ), results AS ( \
               INSERT INTO step_results (run_id, step_index, output, attempt, job_id, finished_at) \
               SELECT run_id, step_index, output, attempt, id, {{now}} FROM done \
               ON CONFLICT (run_id, step_index) DO NOTHING \
             ), next AS ( \
               UPDATE jobs SET state = 'queued', run_at = {{now}} FROM done \
               WHERE jobs.run_id = done.run_id AND jobs.step_index = done.step_index + 1 \
                 AND jobs.state = 'waiting' \
             ), finished AS ( \
               UPDATE runs SET status = 'succeeded', output = done.output, finished_at = {{now}}, \
                 updated_at = {{now}} \
               FROM done WHERE runs.id = done.run_id AND done.step_index + 1 = done.step_count \
                 AND runs.status = 'running' \
               RETURNING runs.id \
             ), recorded AS ( \
               INSERT INTO run_events (run_id, event_type, step_index, attempt, message, data, created_at) \
               SELECT run_id, '{step_succeeded}', step_index, attempt, NULL, NULL, {{now}} FROM done \
               UNION ALL \
               SELECT id, '{run_succeeded}', NULL::BIGINT, NULL::BIGINT, NULL, NULL, {{now}} FROM finished \
             ) SELECT id, attempt FROM done",
            input = recordset(
                DbBackend::Postgres,
                &[("id", "bigint"), ("attempt", "bigint"), ("output", "text")]
            ),
            step_succeeded = EventType::StepSucceeded.as_str(),
            run_succeeded = EventType::RunSucceeded.as_str(),
        ));
        let mut attempt = 0;
        loop {
            attempt += 1;
            match sqlx::query(&sql)
                .bind(&input)
                .fetch_all(self.pool())
                .await
                .map_err(crate::store::StoreError::from)
            {
                Ok(rows) => {
                    if !rows.is_empty() {
                        self.events.raise();
                    }
                    return rows
                        .iter()
                        .map(|r| Ok((r.try_get("id")?, r.try_get("attempt")?)))
                        .collect();
                }
                // A deadlock victim (a cancel of the same run at the same
                // moment) is retried; the fencing makes the retry safe.
                Err(e) if attempt < 4 && e.is_retryable_conflict() => {
                    tokio::time::sleep(Duration::from_millis(5 * attempt)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The same transitions as statements in one SQLite transaction.
    async fn complete_sqlite(
        &self,
        input: String,
        outputs: &HashMap<i64, String>,
    ) -> Result<Vec<(i64, i64)>> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query(
            "DELETE FROM jobs WHERE state = 'running' AND (id, attempt) IN \
             (SELECT json_extract(value, '$.id'), json_extract(value, '$.attempt') FROM json_each($1)) \
             RETURNING id, run_id, step_index, step_count, attempt",
        )
        .bind(&input)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let mut done = Vec::with_capacity(rows.len());
        let mut recorded = Vec::with_capacity(rows.len());
        let mut events_of: Vec<(String, i64, i64, bool)> = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row.try_get("id")?;
            let run_id: String = row.try_get("run_id")?;
            let step_index: i64 = row.try_get("step_index")?;
            let step_count: i64 = row.try_get("step_count")?;
            let attempt: i64 = row.try_get("attempt")?;
            let last = step_index + 1 == step_count;
            done.push(json!({
                "id": id, "run_id": run_id, "step_index": step_index, "attempt": attempt,
                "last": last, "output": outputs.get(&id),
            }));
            recorded.push((id, attempt));
            events_of.push((run_id, step_index, attempt, last));
        }
        let done = Value::Array(done).to_string();
        let source = recordset(
            DbBackend::Sqlite,
            &[
                ("id", ""),
                ("run_id", ""),
                ("step_index", ""),
                ("attempt", ""),
                ("last", ""),
                ("output", ""),
            ],
        );
        sqlx::query(&self.sql(&format!(
            "INSERT INTO step_results (run_id, step_index, output, attempt, job_id, finished_at) \
             SELECT run_id, step_index, output, attempt, id, {{now}} FROM ({source}) WHERE true \
             ON CONFLICT (run_id, step_index) DO NOTHING"
        )))
        .bind(&done)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&self.sql(&format!(
            "UPDATE jobs SET state = 'queued', run_at = {{now}} WHERE state = 'waiting' AND \
             (run_id, step_index) IN (SELECT run_id, step_index + 1 FROM ({source}) WHERE NOT last)"
        )))
        .bind(&done)
        .execute(&mut *tx)
        .await?;
        let finished = sqlx::query(&self.sql(&format!(
            "UPDATE runs SET status = 'succeeded', finished_at = {{now}}, updated_at = {{now}}, \
             output = (SELECT d.output FROM ({source}) d WHERE d.run_id = runs.id) \
             WHERE status = 'running' AND id IN (SELECT run_id FROM ({source}) WHERE last) RETURNING id"
        )))
        .bind(&done)
        .fetch_all(&mut *tx)
        .await?;
        let finished: std::collections::HashSet<String> = finished
            .iter()
            .map(|r| r.try_get::<String, _>("id"))
            .collect::<Result<_, _>>()?;
        let mut events = Vec::with_capacity(events_of.len() * 2);
        for (run_id, step_index, attempt, _) in &events_of {
            events.push(NewEvent::step(
                run_id,
                EventType::StepSucceeded,
                *step_index,
                *attempt,
            ));
            if finished.contains(run_id) {
                events.push(NewEvent::run(run_id, EventType::RunSucceeded));
            }
        }
        self.insert_events(&mut tx, &events).await?;
        tx.commit().await?;
        self.events.raise();
        Ok(recorded)
    }

    /// Puts a failed delivery back in the queue, claimable `delay` after the
    /// database's now, and records `step.retry_scheduled` with `error`.
    pub async fn retry(&self, job: &ClaimedJob, error: &str, delay: Duration) -> Result<Finish> {
        let job = JobRef::of(job);
        let error = &storable(error);
        let event = NewEvent::step(
            &job.run_id,
            EventType::StepRetryScheduled,
            job.step_index,
            job.attempt,
        )
        .message(error)
        .data(json!({"delay_ms": ms(delay)}));
        self.requeue(&job, delay, 0, Some(error), event).await
    }

    /// Puts a claimed job back to `queued` if the claim is still valid, taking
    /// `refund` off its attempt count, and records `event` with it.
    pub(crate) async fn requeue(
        &self,
        job: &JobRef,
        delay: Duration,
        refund: i64,
        error: Option<&str>,
        event: NewEvent<'_>,
    ) -> Result<Finish> {
        let mut tx = self.begin().await?;
        let n = sqlx::query(&self.sql(
            "UPDATE jobs SET state = 'queued', attempt = attempt - $5, run_at = {now} + $3, \
             last_error = COALESCE($4, last_error), lease_expires_at = NULL, locked_by = NULL \
             WHERE id = $1 AND attempt = $2 AND state = 'running'",
        ))
        .bind(job.id)
        .bind(job.attempt)
        .bind(ms(delay))
        .bind(error)
        .bind(refund)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            tx.rollback().await?;
            return Ok(Finish::Stale);
        }
        self.insert_events(&mut tx, &[event]).await?;
        tx.commit().await?;
        self.events.raise();
        Ok(Finish::Recorded)
    }

    /// Moves a job that cannot succeed to the dead-letter table and fails its run.
    pub async fn dead_letter(&self, job: &ClaimedJob, error: &str) -> Result<Finish> {
        self.dead_letter_ref(&JobRef::of(job), error).await
    }

    pub(crate) async fn dead_letter_ref(&self, job: &JobRef, error: &str) -> Result<Finish> {
        let error = &storable(error);
        let run_id = job.run_id.clone();
        let mut tx = self.begin().await?;
        let taken = sqlx::query(
            "DELETE FROM jobs WHERE id = $1 AND attempt = $2 AND state = 'running' RETURNING payload, created_at",
        )
        .bind(job.id)
        .bind(job.attempt)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(taken) = taken else {
            tx.rollback().await?;
            return Ok(Finish::Stale);
        };
        sqlx::query(&self.sql(
            "INSERT INTO dead_jobs (id, run_id, step_index, payload, attempts, last_error, created_at, failed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, {now})",
        ))
        .bind(job.id)
        .bind(&run_id)
        .bind(job.step_index)
        .bind(taken.try_get::<String, _>("payload")?)
        .bind(job.attempt)
        .bind(error)
        .bind(taken.try_get::<i64, _>("created_at")?)
        .execute(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM jobs WHERE run_id = $1")
            .bind(&run_id)
            .execute(&mut *tx)
            .await?;
        let reason = format!(
            "step {} ({}) failed after {} attempt(s): {error}",
            job.step_index, job.kind, job.attempt
        );
        sqlx::query(&self.sql(
            "UPDATE runs SET status = 'failed', error = $2, finished_at = {now}, updated_at = {now} \
             WHERE id = $1 AND status IN ('queued', 'running')",
        ))
        .bind(&run_id)
        .bind(&reason)
        .execute(&mut *tx)
        .await?;
        self.insert_events(
            &mut tx,
            &[
                NewEvent::step(
                    &run_id,
                    EventType::StepDeadLettered,
                    job.step_index,
                    job.attempt,
                )
                .message(error),
                NewEvent::run(&run_id, EventType::RunFailed).message(reason.clone()),
            ],
        )
        .await?;
        tx.commit().await?;
        self.events.raise();
        Ok(Finish::Recorded)
    }

    /// Gives an unfinished job back at shutdown without spending an attempt.
    pub async fn release(&self, job: &ClaimedJob) -> Result<Finish> {
        let job = JobRef::of(job);
        let event = NewEvent::step(
            &job.run_id,
            EventType::StepReleased,
            job.step_index,
            job.attempt,
        )
        .message("worker shutting down; job returned to the queue");
        self.requeue(&job, Duration::ZERO, 1, None, event).await
    }
}

/// An error message as text every backend stores: a step's error can quote
/// what a remote endpoint sent, and PostgreSQL refuses NUL bytes in text, which
/// would make the outcome unrecordable and the job loop on redelivery.
fn storable(message: &str) -> String {
    message.replace('\0', "\u{FFFD}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_texts_lose_their_nul_bytes_and_nothing_else() {
        assert_eq!(super::storable("a\0b é"), "a\u{FFFD}b é");
    }
}
