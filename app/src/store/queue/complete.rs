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
use crate::model::{ClaimedJob, EventType, JobState};
use crate::plans::Meter;
use crate::steps::StepSpec;
use crate::store::events::NewEvent;
use crate::store::usage::{UsageRow, touched_of};
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
        self.complete_batch_in_lane(done, 0).await
    }

    /// [`Store::complete_batch`] for one of several concurrent callers (the
    /// completer's flushers, numbered from 0): each lane adds its steps to
    /// its own usage-counter shard, so their transactions do not queue on one
    /// counter row for each other's commit (on PostgreSQL a row's updater
    /// waits until the previous one commits, WAL flush included).
    pub async fn complete_batch_in_lane(
        &self,
        done: &[Completion],
        lane: u64,
    ) -> Result<Vec<Finish>> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
        // Each output is serialised once, for the batch parameter and (on
        // SQLite) for the rows written after the fenced delete.
        let outputs: HashMap<i64, String> = done
            .iter()
            .map(|c| (c.job.id, json_text(&c.output)))
            .collect();
        let tokens: HashMap<i64, i64> = done
            .iter()
            .map(|c| (c.job.id, llm_tokens(&c.job.step, &c.output)))
            .collect();
        // In job-id order, as the lease renewal sends its jobs: both lock the
        // rows in the order of their input, and two statements locking shared
        // rows in different orders deadlock (PostgreSQL then stalls one for
        // `deadlock_timeout`, a second, before it aborts the other).
        let mut ordered: Vec<&Completion> = done.iter().collect();
        ordered.sort_by_key(|c| c.job.id);
        let input = Value::Array(
            ordered
                .iter()
                .map(|c| json!({"id": c.job.id, "attempt": c.job.attempt, "output": outputs[&c.job.id], "tokens": tokens[&c.job.id]}))
                .collect(),
        )
        .to_string();
        let recorded: Vec<Metered> = match self.backend() {
            // Lane 0 shares `counter_shard(0)` with this store's one-off
            // writers (single completions, recorded usage); further lanes
            // take shards past those of the run-creation writers.
            DbBackend::Postgres => {
                let shard = match lane {
                    0 => self.usage.counter_shard(0),
                    n => self
                        .usage
                        .counter_shard(u64::from(crate::store::group_commit::MAX_WRITERS) + n),
                };
                self.complete_postgres(input, shard).await?
            }
            DbBackend::Sqlite => {
                self.noted(self.complete_sqlite(input, &outputs, &tokens).await)?
            }
        };
        self.thresholds_after_completion(&recorded, &tokens).await;
        let recorded: std::collections::HashSet<(i64, i64)> =
            recorded.iter().map(|m| (m.id, m.attempt)).collect();
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

    /// Records the warning thresholds the usage of `recorded` reached, in a
    /// transaction of its own after the completion's. A failure is logged
    /// and skipped: thresholds are level-based, so the next usage of the
    /// same meter in the period records what was missed.
    async fn thresholds_after_completion(&self, recorded: &[Metered], tokens: &HashMap<i64, i64>) {
        if recorded.is_empty() || self.plans().is_none() {
            return;
        }
        let Some(period) = recorded.first().map(|m| m.period.clone()) else {
            return;
        };
        let rows = recorded.iter().flat_map(|m| {
            let t = tokens.get(&m.id).copied().unwrap_or(0);
            let steps = (m.tenant.as_str(), Meter::Steps, Some(m.run_id.as_str()));
            let llm =
                (t > 0).then_some((m.tenant.as_str(), Meter::LlmTokens, Some(m.run_id.as_str())));
            std::iter::once(steps).chain(llm)
        });
        let touched = touched_of(rows, &period);
        let result = async {
            let mut tx = self.begin_write().await?;
            let crossed = self.note_thresholds(&mut tx, &touched, None).await?;
            tx.commit().await?;
            if !crossed.is_empty() {
                // Threshold events were written: live updates poll at once.
                self.events.raise();
            }
            Ok::<_, crate::store::StoreError>(crossed)
        }
        .await;
        match result {
            Ok(crossed) => self.count_crossings(&crossed),
            Err(e) => {
                tracing::warn!(error = %e, "could not record usage thresholds; the next usage of the meter records them")
            }
        }
    }

    /// One statement (a data-modifying CTE): every part sees the same
    /// snapshot and commits together, the usage ledger rows and counters
    /// of the recorded steps included.
    ///
    /// The jobs are found by primary key and their `running` state is compared
    /// through the materialized input, never as a constant (see "Finding the
    /// jobs a worker holds" in the module documentation of `store::queue`).
    async fn complete_postgres(&self, input: String, shard: i64) -> Result<Vec<Metered>> {
        let sql = self.sql(&format!(
            "WITH input AS MATERIALIZED (SELECT i.*, '{running}'::text AS state FROM ({input}) i), done AS ( \
               DELETE FROM jobs USING input \
               WHERE jobs.id = ANY (ARRAY(SELECT id FROM input)) \
                 AND jobs.id = input.id AND jobs.attempt = input.attempt AND jobs.state = input.state \
               RETURNING jobs.id, jobs.run_id, jobs.step_index, jobs.step_count, jobs.attempt, input.output, input.tokens \
             ), owner AS ( \
               SELECT done.id, done.attempt, done.run_id, done.step_index, done.tokens, \
                 COALESCE(runs.tenant, 'anonymous') AS tenant \
               FROM done LEFT JOIN runs ON runs.id = done.run_id \
             ), used AS ( \
               SELECT tenant, 'steps' AS meter, 1::BIGINT AS quantity, run_id, step_index FROM owner \
               UNION ALL \
               SELECT tenant, 'llm_tokens', tokens, run_id, step_index FROM owner WHERE tokens > 0 \
             ), ledger AS ( \
               INSERT INTO usage_ledger (tenant, meter, quantity, period, run_id, step_index, source, at) \
               SELECT tenant, meter, quantity, {{period}}, run_id, step_index, 'step.succeeded', {{now}} FROM used \
             ), counted AS ( \
               INSERT INTO usage_counters (tenant, period, meter, shard, used, updated_at) \
               SELECT tenant, {{period}}, meter, {shard}, SUM(quantity), {{now}} FROM used \
               GROUP BY tenant, meter ORDER BY tenant, meter \
               ON CONFLICT (tenant, period, meter, shard) DO UPDATE \
               SET used = usage_counters.used + excluded.used, updated_at = excluded.updated_at \
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
             ) SELECT id, attempt, run_id, tenant, {{period}} AS period FROM owner",
            input = recordset(
                DbBackend::Postgres,
                &[("id", "bigint"), ("attempt", "bigint"), ("output", "text"), ("tokens", "bigint")]
            ),
            running = JobState::Running.as_str(),
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
                        .map(|r| {
                            Ok(Metered {
                                id: r.try_get("id")?,
                                attempt: r.try_get("attempt")?,
                                run_id: r.try_get("run_id")?,
                                tenant: r.try_get("tenant")?,
                                period: r.try_get("period")?,
                            })
                        })
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
        tokens: &HashMap<i64, i64>,
    ) -> Result<Vec<Metered>> {
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
        // Usage of the recorded steps, charged to their runs' tenants.
        let run_ids = Value::Array(
            events_of
                .iter()
                .map(|(run_id, ..)| json!({"id": run_id}))
                .collect(),
        )
        .to_string();
        let mut tenant_of: HashMap<String, String> = HashMap::new();
        for row in sqlx::query(
            "SELECT id, tenant FROM runs WHERE id IN (SELECT json_extract(value, '$.id') FROM json_each($1))",
        )
        .bind(&run_ids)
        .fetch_all(&mut *tx)
        .await?
        {
            tenant_of.insert(row.try_get("id")?, row.try_get("tenant")?);
        }
        let mut usage = Vec::with_capacity(recorded.len() * 2);
        let mut owners = Vec::with_capacity(recorded.len());
        for ((id, attempt), (run_id, step_index, _, _)) in recorded.iter().zip(&events_of) {
            let tenant = tenant_of
                .get(run_id)
                .cloned()
                .unwrap_or_else(|| "anonymous".to_string());
            let t = tokens.get(id).copied().unwrap_or(0);
            for (meter, quantity) in [(Meter::Steps, 1), (Meter::LlmTokens, t)] {
                if quantity > 0 {
                    usage.push(UsageRow {
                        tenant: tenant.clone(),
                        meter,
                        quantity,
                        run_id: Some(run_id.clone()),
                        step_index: Some(*step_index),
                        source: "step.succeeded",
                    });
                }
            }
            owners.push((*id, *attempt, run_id.clone(), tenant));
        }
        let touched = self
            .add_usage(&mut tx, &usage, None, self.usage.counter_shard(0), None)
            .await?;
        tx.commit().await?;
        self.events.raise();
        let period = touched
            .first()
            .map(|t| t.period.clone())
            .unwrap_or_default();
        Ok(owners
            .into_iter()
            .map(|(id, attempt, run_id, tenant)| Metered {
                id,
                attempt,
                run_id,
                tenant,
                period: period.clone(),
            })
            .collect())
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

/// A recorded completion with what its usage was charged to.
struct Metered {
    id: i64,
    attempt: i64,
    run_id: String,
    tenant: String,
    period: String,
}

/// The tokens an `llm` step's output reports in its `usage`: prompt plus
/// completion tokens, else `total_tokens`; 0 for other step kinds or when
/// the endpoint reported nothing usable.
pub(crate) fn llm_tokens(step: &StepSpec, output: &Value) -> i64 {
    if !matches!(step, StepSpec::Llm { .. }) {
        return 0;
    }
    let usage = &output["usage"];
    let count = |key: &str| usage.get(key).and_then(Value::as_i64).filter(|n| *n >= 0);
    let tokens = match (count("prompt_tokens"), count("completion_tokens")) {
        (Some(p), Some(c)) => p.saturating_add(c),
        _ => count("total_tokens").unwrap_or(0),
    };
    // An endpoint reporting absurd usage must not overflow the counters (a
    // failed completion on PostgreSQL, a float on SQLite): no real call uses
    // more than this.
    tokens.min(MAX_TOKENS_PER_STEP)
}

/// The most LLM tokens one step is charged: far above any model's context
/// window, far below what would overflow a month's counter.
pub(crate) const MAX_TOKENS_PER_STEP: i64 = 100_000_000;

/// An error message as text every backend stores: a step's error can quote
/// what a remote endpoint sent, and PostgreSQL refuses NUL bytes in text, which
/// would make the outcome unrecordable and the job loop on redelivery.
fn storable(message: &str) -> String {
    message.replace('\0', "\u{FFFD}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn absurd_token_usage_is_charged_at_the_per_step_cap() {
        let step: crate::steps::StepSpec =
            serde_json::from_value(serde_json::json!({"kind": "llm", "prompt": "hi"}))
                .expect("llm step");
        let output = |usage| serde_json::json!({"text": "x", "usage": usage});
        let huge = output(serde_json::json!({"prompt_tokens": i64::MAX, "completion_tokens": 5}));
        assert_eq!(super::llm_tokens(&step, &huge), super::MAX_TOKENS_PER_STEP);
        let normal = output(serde_json::json!({"prompt_tokens": 12, "completion_tokens": 30}));
        assert_eq!(super::llm_tokens(&step, &normal), 42);
    }

    #[test]
    fn error_texts_lose_their_nul_bytes_and_nothing_else() {
        assert_eq!(super::storable("a\0b é"), "a\u{FFFD}b é");
    }
}
