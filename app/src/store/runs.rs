//! Runs: creation (through the group-commit writer), reads, listing and
//! cancellation. A run's creation and cancellation write their audit rows in
//! the same transaction as the change they record.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::Row;
use sqlx::any::AnyRow;
use uuid::Uuid;

use super::events::NewEvent;
use super::{Result, Store, StoreError, parse_json, parse_uuid};
use crate::deadline::Deadline;
use crate::model::{
    EventType, JobState, NewRun, Run, RunDetail, RunFilter, RunStatus, StepState, StepStatus,
};

/// Result of creating a run.
#[derive(Debug)]
pub enum CreateOutcome {
    /// A new run was stored.
    Created(Run),
    /// The idempotency key was seen before with the same request.
    Existing(Box<RunDetail>),
    /// The idempotency key was seen before with a different request.
    Conflict,
    /// The tenant's `block` allowance is used up: nothing was stored or
    /// counted (the refusal is audited as `quota.blocked`).
    QuotaExceeded(super::QuotaRefusal),
}

/// Result of cancelling a run.
#[derive(Debug)]
pub enum CancelOutcome {
    /// Cancelled now.
    Cancelled(Box<RunDetail>),
    /// No such run.
    NotFound,
    /// Already in a terminal status.
    NotCancellable(RunStatus),
}

pub(crate) const RUN_COLUMNS: &str = "id, status, correlation_id, input, steps, output, error, \
     created_at, updated_at, started_at, finished_at";

impl Store {
    /// Stores a new run, queues its first step and writes its `run.queued`
    /// event and `run.created` audit row, honouring the idempotency key.
    /// Concurrent calls share one transaction (group commit, see
    /// [`super::group_commit`]); the outcome of each is its own.
    ///
    /// Called for an HTTP request ([`crate::deadline::Deadline::current`]),
    /// nothing is committed once the request was answered 408, and on
    /// PostgreSQL the statements take at most the request's time left, lock
    /// waits included ([`crate::deadline::Deadline::budget`]).
    ///
    /// Errors: [`StoreError::Unavailable`] when the database cannot be
    /// reached or a lock stayed held past the request's time (nothing was
    /// created); [`StoreError::OutOfTime`] when the request's time ran out
    /// before the run could be written (nothing was created);
    /// [`StoreError::InvalidText`] when PostgreSQL refuses a text value.
    pub async fn create_run(&self, new: &NewRun) -> Result<CreateOutcome> {
        self.noted(self.creates.submit(self, new).await)
    }

    pub(crate) async fn existing_for_key(&self, new: &NewRun) -> Result<CreateOutcome> {
        let row = sqlx::query("SELECT id, request_hash FROM runs WHERE idempotency_key = $1")
            .bind(new.idempotency_key.as_deref())
            .fetch_optional(self.pool())
            .await?;
        let Some(row) = row else {
            // Only a key can make the insert a no-op; a vanished row means the
            // run was deleted between the two statements.
            return Err(StoreError::Corrupt("idempotent run vanished".into()));
        };
        if row.try_get::<String, _>("request_hash")? != new.request_hash {
            return Ok(CreateOutcome::Conflict);
        }
        let id = parse_uuid(&row.try_get::<String, _>("id")?)?;
        match self.get_run(id).await? {
            Some(detail) => Ok(CreateOutcome::Existing(Box::new(detail))),
            None => Err(StoreError::Corrupt("idempotent run vanished".into())),
        }
    }

    pub(crate) fn run_from_row(row: &AnyRow) -> Result<Run> {
        let status: String = row.try_get("status")?;
        let steps: String = row.try_get("steps")?;
        Ok(Run {
            id: parse_uuid(&row.try_get::<String, _>("id")?)?,
            status: RunStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("unknown run status {status}")))?,
            correlation_id: row.try_get("correlation_id")?,
            input: parse_json(&row.try_get::<String, _>("input")?, "run input")?,
            steps: serde_json::from_str(&steps)
                .map_err(|_| StoreError::Corrupt("run steps do not parse".into()))?,
            output: row
                .try_get::<Option<String>, _>("output")?
                .map(|o: String| parse_json(&o, "run output"))
                .transpose()?,
            error: row.try_get("error")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            started_at: row.try_get("started_at")?,
            finished_at: row.try_get("finished_at")?,
        })
    }

    /// A run with the state of each step, or `None`.
    pub async fn get_run(&self, id: Uuid) -> Result<Option<RunDetail>> {
        let id_text = id.to_string();
        let Some(row) = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"))
            .bind(&id_text)
            .fetch_optional(self.pool())
            .await?
        else {
            return Ok(None);
        };
        let run = Self::run_from_row(&row)?;
        // Jobs are read before results: a completion moves a step from the
        // first to the second in one transaction, so this order never shows a
        // finished step as missing.
        let jobs = sqlx::query(
            "SELECT step_index, state, attempt, last_error FROM jobs WHERE run_id = $1",
        )
        .bind(&id_text)
        .fetch_all(self.pool())
        .await?;
        let results =
            sqlx::query("SELECT step_index, output, attempt FROM step_results WHERE run_id = $1")
                .bind(&id_text)
                .fetch_all(self.pool())
                .await?;
        let dead =
            sqlx::query("SELECT step_index, attempts, last_error FROM dead_jobs WHERE run_id = $1")
                .bind(&id_text)
                .fetch_all(self.pool())
                .await?;
        // A step that was claimed when the run was cancelled: the cancel
        // recorded `step.cancelled` with the attempt, so the view and the
        // events agree.
        let cancelled = if run.status == RunStatus::Cancelled {
            sqlx::query(
                "SELECT step_index, MAX(attempt) AS attempt FROM run_events \
                 WHERE run_id = $1 AND event_type = $2 GROUP BY step_index",
            )
            .bind(&id_text)
            .bind(EventType::StepCancelled.as_str())
            .fetch_all(self.pool())
            .await?
        } else {
            Vec::new()
        };

        let mut steps = StepState::all(&run.steps, |_| StepStatus::Skipped);
        let slot = |steps: &mut Vec<StepState>, index: i64| -> Option<usize> {
            usize::try_from(index).ok().filter(|i| *i < steps.len())
        };
        for row in &jobs {
            let Some(i) = slot(&mut steps, row.try_get("step_index")?) else {
                continue;
            };
            let state: String = row.try_get("state")?;
            steps[i].status = match JobState::parse(&state) {
                Some(JobState::Waiting) => StepStatus::Pending,
                Some(JobState::Queued) => StepStatus::Queued,
                Some(JobState::Running) => StepStatus::Running,
                Some(JobState::AwaitingApproval) => StepStatus::AwaitingApproval,
                None => return Err(StoreError::Corrupt(format!("unknown job state {state}"))),
            };
            steps[i].attempts = row.try_get("attempt")?;
            steps[i].error = row.try_get("last_error")?;
        }
        for row in &cancelled {
            let Some(i) = slot(&mut steps, row.try_get("step_index")?) else {
                continue;
            };
            steps[i].status = StepStatus::Cancelled;
            steps[i].attempts = row.try_get::<Option<i64>, _>("attempt")?.unwrap_or(0);
        }
        for row in &results {
            let Some(i) = slot(&mut steps, row.try_get("step_index")?) else {
                continue;
            };
            steps[i].status = StepStatus::Succeeded;
            steps[i].attempts = row.try_get("attempt")?;
            steps[i].output = Some(parse_json(
                &row.try_get::<String, _>("output")?,
                "step output",
            )?);
            steps[i].error = None;
        }
        for row in &dead {
            let Some(i) = slot(&mut steps, row.try_get("step_index")?) else {
                continue;
            };
            steps[i].status = StepStatus::Failed;
            steps[i].attempts = row.try_get("attempts")?;
            steps[i].error = Some(row.try_get("last_error")?);
        }
        // An approval step carries its approval row; one rejected with
        // `on_reject: fail` leaves no job, no result and no dead letter, so
        // that row is what says it was rejected.
        if run
            .steps
            .iter()
            .any(|s| matches!(s, crate::steps::StepSpec::Approval { .. }))
        {
            for approval in self.approvals_of_run(&id_text).await? {
                let Some(i) = slot(&mut steps, approval.step_index) else {
                    continue;
                };
                let rejected = matches!(
                    approval.decision.as_deref(),
                    Some("rejected" | "expired_rejected")
                );
                if rejected && run.status == RunStatus::Failed && steps[i].output.is_none() {
                    steps[i].status = StepStatus::Rejected;
                    steps[i].attempts = steps[i].attempts.max(1);
                    steps[i].error = Some("rejected".into());
                }
                steps[i].approval = Some(approval);
            }
        }
        Ok(Some(RunDetail { run, steps }))
    }

    /// Runs, newest first, filtered and paged by id.
    pub async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>> {
        let mut sql = format!("SELECT {RUN_COLUMNS} FROM runs");
        let mut clauses = Vec::new();
        let mut n = 0;
        if filter.scope.tenant().is_some() {
            n += 1;
            clauses.push(format!("tenant = ${n}"));
        }
        if filter.status.is_some() {
            n += 1;
            clauses.push(format!("status = ${n}"));
        }
        if filter.before.is_some() {
            n += 1;
            clauses.push(format!("id < ${n}"));
        }
        if !clauses.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&clauses.join(" AND "));
        }
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", n + 1));
        let mut q = sqlx::query(&sql);
        if let Some(tenant) = filter.scope.tenant() {
            q = q.bind(tenant);
        }
        if let Some(status) = filter.status {
            q = q.bind(status.as_str());
        }
        if let Some(before) = filter.before {
            q = q.bind(before.to_string());
        }
        q.bind(filter.limit)
            .fetch_all(self.pool())
            .await?
            .iter()
            .map(Self::run_from_row)
            .collect()
    }

    /// Whether a run exists.
    pub async fn run_exists(&self, id: Uuid) -> Result<bool> {
        Ok(sqlx::query("SELECT 1 FROM runs WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(self.pool())
            .await?
            .is_some())
    }

    /// Cancels a queued, running or waiting run: drops its pending jobs,
    /// closes a pending approval (decision `cancelled`, so a later decision
    /// answers 409), records `step.cancelled` (with its attempt) for a step a
    /// worker holds or that awaits approval (a worker holding a step learns
    /// of it at its next lease renewal, about a second, and stops), and
    /// writes the `run.cancelled` audit row by `actor` in the same
    /// transaction. A deadlock victim is retried: it only means a worker
    /// touched the same run at the same moment.
    ///
    /// Called for an HTTP request ([`Deadline::current`]), its statements
    /// take at most the request's time left on PostgreSQL (lock waits
    /// included: a `LOCK TABLE jobs` held past it fails the cancellation
    /// instead of letting it commit after a 408), and it commits only if
    /// the request was not answered 408 meanwhile.
    ///
    /// Errors: [`StoreError::Unavailable`] when the database cannot be
    /// reached or a lock stayed held past the request's time;
    /// [`StoreError::OutOfTime`] when the request's time ran out (nothing
    /// was changed).
    pub async fn cancel_run(
        &self,
        id: Uuid,
        actor: &str,
        request_id: Option<&str>,
    ) -> Result<CancelOutcome> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_cancel_run(id, actor, request_id).await {
                Err(e) if attempt < 4 && e.is_retryable_conflict() => {
                    tokio::time::sleep(Duration::from_millis(10 * attempt)).await;
                }
                other => return other,
            }
        }
    }

    async fn try_cancel_run(
        &self,
        id: Uuid,
        actor: &str,
        request_id: Option<&str>,
    ) -> Result<CancelOutcome> {
        let id_text = id.to_string();
        // For an HTTP request: its statements bounded by the time it has
        // left, and committed only if it was not answered 408 meanwhile.
        let deadline = Deadline::current();
        let budget = super::transactions::budget_of(deadline.as_deref())?;
        let mut tx = self.begin_within(budget).await?;
        // Jobs before the run, the order every worker path locks them in.
        let dropped =
            sqlx::query("DELETE FROM jobs WHERE run_id = $1 RETURNING step_index, state, attempt")
                .bind(&id_text)
                .fetch_all(&mut *tx)
                .await?;
        sqlx::query(&self.sql(
            "UPDATE approvals SET decision = 'cancelled', decided_by = $2, decided_at = {now} \
             WHERE run_id = $1 AND decision IS NULL",
        ))
        .bind(&id_text)
        .bind(actor)
        .execute(&mut *tx)
        .await?;
        let updated = sqlx::query(&self.sql(
            "UPDATE runs SET status = 'cancelled', finished_at = {now}, updated_at = {now} \
             WHERE id = $1 AND status IN ('queued', 'running', 'waiting') RETURNING id",
        ))
        .bind(&id_text)
        .fetch_optional(&mut *tx)
        .await?;
        if updated.is_none() {
            // Nothing to cancel: the rollback also restores any job deleted above.
            tx.rollback().await?;
            let status = sqlx::query("SELECT status FROM runs WHERE id = $1")
                .bind(&id_text)
                .fetch_optional(self.pool())
                .await?;
            return Ok(match status {
                None => CancelOutcome::NotFound,
                Some(row) => {
                    let s: String = row.try_get("status")?;
                    CancelOutcome::NotCancellable(
                        RunStatus::parse(&s).ok_or_else(|| StoreError::Corrupt(s.clone()))?,
                    )
                }
            });
        }
        let mut events = Vec::new();
        for row in &dropped {
            let state: String = row.try_get("state")?;
            let message = match JobState::parse(&state) {
                Some(JobState::Running) => "run cancelled while this step was running",
                Some(JobState::AwaitingApproval) => {
                    "run cancelled while this step awaited approval"
                }
                _ => continue,
            };
            events.push(
                NewEvent::step(
                    &id_text,
                    EventType::StepCancelled,
                    row.try_get("step_index")?,
                    row.try_get("attempt")?,
                )
                .message(message),
            );
        }
        events.push(
            NewEvent::run(&id_text, EventType::RunCancelled)
                .message("cancelled on request")
                .data(json!({"dropped_jobs": dropped.len()})),
        );
        self.insert_events(&mut tx, &events).await?;
        sqlx::query(&self.sql(
            "INSERT INTO audit_log (at, actor, action, target, outcome, request_id, detail, tenant) \
             VALUES ({now}, $1, 'run.cancelled', $2, 'success', $3, NULL, \
             (SELECT tenant FROM runs WHERE id = $2))",
        ))
        .bind(actor)
        .bind(&id_text)
        .bind(request_id)
        .execute(&mut *tx)
        .await?;
        if !deadline.as_deref().is_none_or(Deadline::claim) {
            tx.rollback().await?;
            return Err(StoreError::OutOfTime);
        }
        tx.commit().await?;
        self.events.raise();
        match self.get_run(id).await? {
            Some(detail) => Ok(CancelOutcome::Cancelled(Box::new(detail))),
            None => Ok(CancelOutcome::NotFound),
        }
    }

    /// The run's input and the outputs recorded so far, for templates.
    pub async fn run_context(&self, run_id: Uuid) -> Result<(Value, Vec<(usize, Value)>)> {
        let id = run_id.to_string();
        let row = sqlx::query("SELECT input FROM runs WHERE id = $1")
            .bind(&id)
            .fetch_one(self.pool())
            .await?;
        let input = parse_json(&row.try_get::<String, _>("input")?, "run input")?;
        let outputs = sqlx::query(
            "SELECT step_index, output FROM step_results WHERE run_id = $1 ORDER BY step_index",
        )
        .bind(&id)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(|r| {
            let i: i64 = r.try_get("step_index")?;
            Ok((
                i as usize,
                parse_json(&r.try_get::<String, _>("output")?, "step output")?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
        Ok((input, outputs))
    }

    /// Runs by status (a scan: for tests and benchmarks, not for scrapes).
    pub async fn run_counts(&self) -> Result<HashMap<RunStatus, i64>> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM runs GROUP BY status")
            .fetch_all(self.pool())
            .await?;
        rows.iter()
            .map(|r| {
                let s: String = r.try_get("status")?;
                let status = RunStatus::parse(&s).ok_or_else(|| StoreError::Corrupt(s.clone()))?;
                Ok((status, r.try_get::<i64, _>("n")?))
            })
            .collect()
    }

    /// How many results are recorded for one step (the exactly-once check).
    pub async fn result_count(&self, run_id: Uuid, step_index: i64) -> Result<i64> {
        Ok(sqlx::query(
            "SELECT COUNT(*) AS n FROM step_results WHERE run_id = $1 AND step_index = $2",
        )
        .bind(run_id.to_string())
        .bind(step_index)
        .fetch_one(self.pool())
        .await?
        .try_get("n")?)
    }
}
