//! Approval steps: a run that reaches an `approval` step waits, without a
//! worker slot or a lease, for a person's decision or the step's deadline.
//!
//! - [`Store::await_approval`]: the worker that claimed the step renders its
//!   prompt and hands the job over: the job moves to the non-claimable state
//!   `awaiting_approval` (no lease), an `approvals` row records the prompt and
//!   the deadline (`expires_at`, on the database clock), the run becomes
//!   `waiting`, and `step.awaiting_approval` is recorded, in one transaction.
//! - [`Store::decide_approval`]: the only writer of a decision, whoever makes
//!   it (an approver's request, or the maintenance leader applying
//!   `on_timeout`). One transaction: a conditional delete of the awaiting job
//!   decides the race (two approvers, or an approver and the expiry: exactly
//!   one finds the job), then the decision, the step's result or the run's
//!   failure, the next step, the events and the audit row.
//! - [`Store::expire_due_approvals`]: the leader's sweep of passed deadlines.
//! - [`Store::list_approvals`]: the inbox, oldest first, keyset-paged.
//!
//! Lock order is the store's: jobs, then approvals, then the run, as
//! `cancel_run` takes them, so a cancel racing a decision never deadlocks for
//! long (a deadlock victim is retried).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde_json::json;
use sqlx::Row;
use sqlx::any::AnyRow;
use uuid::Uuid;

use super::events::NewEvent;
use super::usage::UsageRecord;
use super::{Result, Store, StoreError, json_text, parse_uuid};
pub use crate::model::ApprovalRecord;
use crate::model::{ClaimedJob, EventType, rfc3339};
use crate::plans::Meter;
use crate::steps::{OnReject, OnTimeout, StepSpec};

/// Who decides when a deadline passes (the audit actor and the output's `by`).
pub const SYSTEM_ACTOR: &str = "system";

/// What is asked of [`Store::decide_approval`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// A person approves.
    Approve,
    /// A person rejects.
    Reject,
    /// The deadline passed: the step's `on_timeout` applies. Refused
    /// ([`DecideOutcome::NotDue`]) before `expires_at` on the database clock.
    Expire,
}

/// The recorded decision, a bounded set (the `decision` metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionKind {
    /// Approved by a person.
    Approved,
    /// Rejected by a person.
    Rejected,
    /// Approved by its deadline (`on_timeout: approve`).
    ExpiredApproved,
    /// Rejected by its deadline (`on_timeout: reject`).
    ExpiredRejected,
}

impl DecisionKind {
    /// Every decision, for zero-valued metric series.
    pub const ALL: [DecisionKind; 4] = [
        DecisionKind::Approved,
        DecisionKind::Rejected,
        DecisionKind::ExpiredApproved,
        DecisionKind::ExpiredRejected,
    ];

    /// The stored name (`approvals.decision`) and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionKind::Approved => "approved",
            DecisionKind::Rejected => "rejected",
            DecisionKind::ExpiredApproved => "expired_approved",
            DecisionKind::ExpiredRejected => "expired_rejected",
        }
    }

    /// True for the two approvals.
    pub fn approved(self) -> bool {
        matches!(self, DecisionKind::Approved | DecisionKind::ExpiredApproved)
    }
}

/// The `decision` of an approval its run's cancellation closed.
pub const CANCELLED: &str = "cancelled";

/// A decision that was recorded.
#[derive(Debug, Clone)]
pub struct Decided {
    /// What was decided.
    pub kind: DecisionKind,
    /// How long the step waited, ms on the database clock.
    pub waited_ms: i64,
    /// The approval as recorded.
    pub approval: ApprovalRecord,
}

/// What [`Store::decide_approval`] found.
#[derive(Debug, Clone)]
pub enum DecideOutcome {
    /// This call decided.
    Decided(Box<Decided>),
    /// No such run.
    RunNotFound,
    /// The run has no step with that index.
    StepNotFound,
    /// The step was already decided (by a person or by its deadline).
    AlreadyDecided,
    /// The step is not waiting for a decision: not an approval step, not
    /// reached yet, or its run was cancelled or failed while it waited.
    NotAwaiting,
    /// [`Decision::Expire`] before the deadline: nothing changed.
    NotDue,
}

/// Which approvals [`Store::list_approvals`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalStatus {
    /// Waiting for a decision.
    Pending,
    /// Decided (including expired and cancelled).
    Decided,
    /// Both.
    All,
}

/// The keyset position of an approval in the inbox order
/// (`requested_at`, `run_id`, `step_index`); text form `ms.run.index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApprovalKey {
    /// When the step began waiting, ms.
    pub requested_at: i64,
    /// The run.
    pub run_id: Uuid,
    /// The step.
    pub step_index: i64,
}

impl fmt::Display for ApprovalKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}.{}",
            self.requested_at, self.run_id, self.step_index
        )
    }
}

impl FromStr for ApprovalKey {
    type Err = ();

    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        let mut parts = s.splitn(3, '.');
        let requested_at = parts.next().ok_or(())?.parse().map_err(|_| ())?;
        let run_id = parts.next().ok_or(())?.parse().map_err(|_| ())?;
        let step_index = parts.next().ok_or(())?.parse().map_err(|_| ())?;
        Ok(Self {
            requested_at,
            run_id,
            step_index,
        })
    }
}

/// Filter and page of [`Store::list_approvals`].
#[derive(Debug, Clone)]
pub struct ApprovalFilter {
    /// Which approvals.
    pub status: ApprovalStatus,
    /// Only approvals after this key (the cursor).
    pub after: Option<ApprovalKey>,
    /// Page size.
    pub limit: i64,
    /// Whose runs' approvals: [`super::Scope::All`] or one tenant's.
    pub scope: super::Scope,
}

/// The columns of an [`ApprovalRecord`]; the tenant is the run's (an
/// approval has no tenant of its own, so it cannot disagree with the run).
const APPROVAL_COLUMNS: &str = "run_id, step_index, prompt, requested_at, expires_at, on_timeout, \
     on_reject, decision, decided_by, comment, decided_at, \
     (SELECT r.tenant FROM runs r WHERE r.id = approvals.run_id) AS tenant";

fn approval_from_row(row: &AnyRow) -> Result<ApprovalRecord> {
    Ok(ApprovalRecord {
        run_id: parse_uuid(&row.try_get::<String, _>("run_id")?)?,
        step_index: row.try_get("step_index")?,
        // A run outlives its approvals (they are deleted with it), so this
        // is only empty if the row is read in the middle of a restore.
        tenant: row
            .try_get::<Option<String>, _>("tenant")?
            .unwrap_or_default(),
        prompt: row.try_get("prompt")?,
        requested_at: row.try_get("requested_at")?,
        expires_at: row.try_get("expires_at")?,
        on_timeout: row.try_get("on_timeout")?,
        on_reject: row.try_get("on_reject")?,
        decision: row.try_get("decision")?,
        decided_by: row.try_get("decided_by")?,
        comment: row.try_get("comment")?,
        decided_at: row.try_get("decided_at")?,
    })
}

fn policy_names(step: &StepSpec) -> Option<(u64, &'static str, &'static str)> {
    match step {
        StepSpec::Approval {
            timeout_s,
            on_timeout,
            on_reject,
            ..
        } => Some((
            *timeout_s,
            match on_timeout {
                OnTimeout::Reject => "reject",
                OnTimeout::Approve => "approve",
            },
            match on_reject {
                OnReject::Fail => "fail",
                OnReject::Continue => "continue",
            },
        )),
        _ => None,
    }
}

impl Store {
    /// Hands a claimed approval step over to the approvers: the job leaves
    /// the worker (state `awaiting_approval`, no lease), the approval row
    /// records `prompt` (already rendered) and its deadline `timeout_s` after
    /// the database's now, the run becomes `waiting`, and
    /// `step.awaiting_approval` is recorded. Returns the deadline (ms since
    /// the epoch), or `None` when the claim was no longer valid (nothing changed).
    ///
    /// Errors: [`StoreError::Corrupt`] when the job is not an approval step.
    pub async fn await_approval(&self, job: &ClaimedJob, prompt: &str) -> Result<Option<i64>> {
        let (timeout_s, on_timeout, on_reject) = policy_names(&job.step)
            .ok_or_else(|| StoreError::Corrupt("not an approval step".into()))?;
        let timeout_ms = i64::try_from(timeout_s.saturating_mul(1000)).unwrap_or(i64::MAX);
        let prompt = prompt.replace('\0', "\u{FFFD}");
        let run_id = job.run_id.to_string();
        let mut tx = self.begin().await?;
        let moved = sqlx::query(&self.sql(
            "UPDATE jobs SET state = 'awaiting_approval', run_at = {now}, lease_expires_at = NULL, \
             locked_by = NULL WHERE id = $1 AND attempt = $2 AND state = 'running'",
        ))
        .bind(job.id)
        .bind(job.attempt)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if moved == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        let row = sqlx::query(&self.sql(
            "INSERT INTO approvals (run_id, step_index, prompt, on_timeout, on_reject, requested_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, {now}, {now} + $6) \
             ON CONFLICT (run_id, step_index) DO UPDATE SET prompt = excluded.prompt, \
               on_timeout = excluded.on_timeout, on_reject = excluded.on_reject, \
               requested_at = excluded.requested_at, expires_at = excluded.expires_at, \
               decision = NULL, decided_by = NULL, comment = NULL, decided_at = NULL \
             RETURNING expires_at",
        ))
        .bind(&run_id)
        .bind(job.step_index)
        .bind(&prompt)
        .bind(on_timeout)
        .bind(on_reject)
        .bind(timeout_ms)
        .fetch_one(&mut *tx)
        .await?;
        let expires_at: i64 = row.try_get("expires_at")?;
        sqlx::query(&self.sql(
            "UPDATE runs SET status = 'waiting', updated_at = {now} WHERE id = $1 AND status = 'running'",
        ))
        .bind(&run_id)
        .execute(&mut *tx)
        .await?;
        let event = NewEvent::step(
            &run_id,
            EventType::StepAwaitingApproval,
            job.step_index,
            job.attempt,
        )
        .message("waiting for an approver's decision")
        .data(json!({
            "prompt": prompt,
            "expires_at": rfc3339(expires_at),
            "timeout_s": timeout_s,
            "on_timeout": on_timeout,
            "on_reject": on_reject,
        }));
        self.insert_events(&mut tx, &[event]).await?;
        tx.commit().await?;
        // Live updates poll at once (see `stream`).
        self.events.raise();
        Ok(Some(expires_at))
    }

    /// Records a decision on the approval step `step_index` of `run_id`, by
    /// `actor` (an API key id, or [`SYSTEM_ACTOR`] for an expiry), with an
    /// optional `comment`, in one transaction: the awaiting job leaves the
    /// queue (the conditional delete that makes exactly one decision win),
    /// the approval row is decided, then either the step succeeds with
    /// `{"approved", "by", "comment"}` and the run goes on (next step queued,
    /// or the run succeeds after its last step), or, for a rejection with
    /// `on_reject: fail`, the run fails with reason `rejected`. Events
    /// (`step.approval_expired`, `step.approved` / `step.rejected`, then
    /// `step.succeeded` / `run.succeeded` / `run.failed`) and the audit row
    /// `approval.<decision>` are written in the same transaction, and so is
    /// the usage: one `approval_decisions` unit for a decision by a person
    /// (not for an expiry) and one `steps` unit when the step's result is
    /// recorded, charged to the run's tenant ([`Store::record_usage`]).
    ///
    /// Errors: [`StoreError::Unavailable`] when the database cannot be
    /// reached; [`StoreError::InvalidText`] for a comment PostgreSQL refuses.
    pub async fn decide_approval(
        &self,
        run_id: Uuid,
        step_index: i64,
        decision: Decision,
        actor: &str,
        comment: Option<&str>,
        request_id: Option<&str>,
    ) -> Result<DecideOutcome> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self
                .try_decide(run_id, step_index, decision, actor, comment, request_id)
                .await
            {
                // A deadlock victim (a cancel of the same run at the same
                // moment) is retried; the conditional delete makes it safe.
                Err(e) if attempt < 4 && e.is_retryable_conflict() => {
                    tokio::time::sleep(Duration::from_millis(10 * attempt)).await;
                }
                other => return other,
            }
        }
    }

    async fn try_decide(
        &self,
        run_id: Uuid,
        step_index: i64,
        decision: Decision,
        actor: &str,
        comment: Option<&str>,
        request_id: Option<&str>,
    ) -> Result<DecideOutcome> {
        let run = run_id.to_string();
        let due_only = i64::from(decision == Decision::Expire);
        let mut tx = self.begin().await?;
        // The job row is the mutex: whoever deletes it decides.
        let taken = sqlx::query(&self.sql(
            "DELETE FROM jobs WHERE run_id = $1 AND step_index = $2 AND state = 'awaiting_approval' \
             AND EXISTS (SELECT 1 FROM approvals a WHERE a.run_id = jobs.run_id \
               AND a.step_index = jobs.step_index AND a.decision IS NULL \
               AND ($3 = 0 OR a.expires_at <= {now})) \
             RETURNING id, attempt, step_count",
        ))
        .bind(&run)
        .bind(step_index)
        .bind(due_only)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(taken) = taken else {
            tx.rollback().await?;
            return self.why_undecidable(&run, step_index, decision).await;
        };
        let job_id: i64 = taken.try_get("id")?;
        let attempt: i64 = taken.try_get("attempt")?;
        let step_count: i64 = taken.try_get("step_count")?;
        let pending = sqlx::query(&self.sql(
            "SELECT on_timeout, on_reject, {now} - requested_at AS waited_ms FROM approvals \
             WHERE run_id = $1 AND step_index = $2",
        ))
        .bind(&run)
        .bind(step_index)
        .fetch_one(&mut *tx)
        .await?;
        let on_timeout: String = pending.try_get("on_timeout")?;
        let on_reject: String = pending.try_get("on_reject")?;
        let waited_ms: i64 = pending.try_get::<i64, _>("waited_ms")?.max(0);
        let kind = match decision {
            Decision::Approve => DecisionKind::Approved,
            Decision::Reject => DecisionKind::Rejected,
            Decision::Expire if on_timeout == "approve" => DecisionKind::ExpiredApproved,
            Decision::Expire => DecisionKind::ExpiredRejected,
        };
        sqlx::query(&self.sql(
            "UPDATE approvals SET decision = $3, decided_by = $4, comment = $5, decided_at = {now} \
             WHERE run_id = $1 AND step_index = $2 AND decision IS NULL",
        ))
        .bind(&run)
        .bind(step_index)
        .bind(kind.as_str())
        .bind(actor)
        .bind(comment)
        .execute(&mut *tx)
        .await?;

        let approved = kind.approved();
        let goes_on = approved || on_reject == "continue";
        let decided_data = json!({"decision": kind.as_str(), "by": actor, "comment": comment});
        let mut events = Vec::new();
        if decision == Decision::Expire {
            events.push(
                NewEvent::step(&run, EventType::StepApprovalExpired, step_index, attempt)
                    .message(format!(
                        "deadline passed; on_timeout `{on_timeout}` applied"
                    ))
                    .data(json!({"on_timeout": on_timeout})),
            );
        }
        events.push(
            NewEvent::step(
                &run,
                if approved {
                    EventType::StepApproved
                } else {
                    EventType::StepRejected
                },
                step_index,
                attempt,
            )
            .data(decided_data),
        );
        if goes_on {
            let output = json!({"approved": approved, "by": actor, "comment": comment});
            let output_text = json_text(&output);
            sqlx::query(&self.sql(
                "INSERT INTO step_results (run_id, step_index, output, attempt, job_id, finished_at) \
                 VALUES ($1, $2, $3, $4, $5, {now}) ON CONFLICT (run_id, step_index) DO NOTHING",
            ))
            .bind(&run)
            .bind(step_index)
            .bind(&output_text)
            .bind(attempt)
            .bind(job_id)
            .execute(&mut *tx)
            .await?;
            events.push(NewEvent::step(
                &run,
                EventType::StepSucceeded,
                step_index,
                attempt,
            ));
            if step_index + 1 >= step_count {
                let finished = sqlx::query(&self.sql(
                    "UPDATE runs SET status = 'succeeded', output = $2, finished_at = {now}, \
                     updated_at = {now} WHERE id = $1 AND status IN ('waiting', 'running') RETURNING id",
                ))
                .bind(&run)
                .bind(&output_text)
                .fetch_optional(&mut *tx)
                .await?;
                if finished.is_some() {
                    events.push(NewEvent::run(&run, EventType::RunSucceeded));
                }
            } else {
                sqlx::query(&self.sql(
                    "UPDATE jobs SET state = 'queued', run_at = {now} \
                     WHERE run_id = $1 AND step_index = $2 AND state = 'waiting'",
                ))
                .bind(&run)
                .bind(step_index + 1)
                .execute(&mut *tx)
                .await?;
                sqlx::query(&self.sql(
                    "UPDATE runs SET status = 'running', updated_at = {now} \
                     WHERE id = $1 AND status = 'waiting'",
                ))
                .bind(&run)
                .execute(&mut *tx)
                .await?;
            }
        } else {
            sqlx::query("DELETE FROM jobs WHERE run_id = $1")
                .bind(&run)
                .execute(&mut *tx)
                .await?;
            let failed = sqlx::query(&self.sql(
                "UPDATE runs SET status = 'failed', error = 'rejected', finished_at = {now}, \
                 updated_at = {now} WHERE id = $1 AND status IN ('waiting', 'running') RETURNING id",
            ))
            .bind(&run)
            .fetch_optional(&mut *tx)
            .await?;
            if failed.is_some() {
                events.push(
                    NewEvent::run(&run, EventType::RunFailed)
                        .message("rejected")
                        .data(json!({"reason": "rejected", "step_index": step_index})),
                );
            }
        }
        self.insert_events(&mut tx, &events).await?;
        sqlx::query(&self.sql(
            "INSERT INTO audit_log (at, actor, action, target, outcome, request_id, detail, tenant) \
             VALUES ({now}, $1, $2, $3, 'success', $4, $5, (SELECT tenant FROM runs WHERE id = $3))",
        ))
        .bind(actor)
        .bind(format!("approval.{}", kind.as_str()))
        .bind(&run)
        .bind(request_id)
        .bind(
            json!({"step_index": step_index, "comment": comment.is_some(), "waited_ms": waited_ms})
                .to_string(),
        )
        .execute(&mut *tx)
        .await?;
        let approval = sqlx::query(&format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE run_id = $1 AND step_index = $2"
        ))
        .bind(&run)
        .bind(step_index)
        .fetch_one(&mut *tx)
        .await?;
        let approval = approval_from_row(&approval)?;
        // Usage, charged to the run's tenant in this transaction: a decision
        // by a person is an `approval_decisions` unit (an expiry is not), and
        // a step whose result is recorded is a `steps` unit like any step.
        let mut usage = Vec::with_capacity(2);
        if decision != Decision::Expire {
            usage.push(UsageRecord {
                run_id: &run,
                step_index: Some(step_index),
                meter: Meter::ApprovalDecisions,
                quantity: 1,
                source: "approval.decided",
            });
        }
        if goes_on {
            usage.push(UsageRecord {
                run_id: &run,
                step_index: Some(step_index),
                meter: Meter::Steps,
                quantity: 1,
                source: "step.succeeded",
            });
        }
        let crossed = self.record_usage(&mut tx, &usage).await?;
        tx.commit().await?;
        self.count_crossings(&crossed);
        // Live updates poll at once (see `stream`).
        self.events.raise();
        Ok(DecideOutcome::Decided(Box::new(Decided {
            kind,
            waited_ms,
            approval,
        })))
    }

    /// Why nothing was decided: read after the conditional delete found no job.
    async fn why_undecidable(
        &self,
        run: &str,
        step_index: i64,
        decision: Decision,
    ) -> Result<DecideOutcome> {
        let row =
            sqlx::query("SELECT decision FROM approvals WHERE run_id = $1 AND step_index = $2")
                .bind(run)
                .bind(step_index)
                .fetch_optional(self.pool())
                .await?;
        if let Some(row) = row {
            return Ok(match row.try_get::<Option<String>, _>("decision")? {
                Some(d) if d == CANCELLED => DecideOutcome::NotAwaiting,
                Some(_) => DecideOutcome::AlreadyDecided,
                None if decision == Decision::Expire => DecideOutcome::NotDue,
                // Pending, but its job is gone: its run failed or was
                // cancelled by a path that does not close approvals.
                None => DecideOutcome::NotAwaiting,
            });
        }
        let run_row = sqlx::query("SELECT step_count FROM runs WHERE id = $1")
            .bind(run)
            .fetch_optional(self.pool())
            .await?;
        Ok(match run_row {
            None => DecideOutcome::RunNotFound,
            Some(r) if step_index < 0 || step_index >= r.try_get::<i64, _>("step_count")? => {
                DecideOutcome::StepNotFound
            }
            Some(_) => DecideOutcome::NotAwaiting,
        })
    }

    /// Applies `on_timeout` to up to `limit` approvals whose deadline passed
    /// (database clock), oldest deadline first, each in its own transaction
    /// through [`Store::decide_approval`] by [`SYSTEM_ACTOR`]. Run by the
    /// maintenance leader; safe to run anywhere at once, since a decision
    /// that lost its race changes nothing. Only approvals whose job still
    /// awaits are swept, so a row left pending by some other path cannot make
    /// every tick retry it. Returns the decisions made.
    pub async fn expire_due_approvals(&self, limit: i64) -> Result<Vec<Decided>> {
        let due = sqlx::query(&self.sql(
            "SELECT run_id, step_index FROM approvals WHERE decision IS NULL AND expires_at <= {now} \
             AND EXISTS (SELECT 1 FROM jobs j WHERE j.run_id = approvals.run_id \
               AND j.step_index = approvals.step_index AND j.state = 'awaiting_approval') \
             ORDER BY expires_at LIMIT $1",
        ))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        let mut decided = Vec::new();
        for row in &due {
            let run_id = parse_uuid(&row.try_get::<String, _>("run_id")?)?;
            let step_index: i64 = row.try_get("step_index")?;
            if let DecideOutcome::Decided(d) = self
                .decide_approval(
                    run_id,
                    step_index,
                    Decision::Expire,
                    SYSTEM_ACTOR,
                    None,
                    None,
                )
                .await?
            {
                decided.push(*d);
            }
        }
        Ok(decided)
    }

    /// Approvals in inbox order (oldest request first), after the cursor.
    pub async fn list_approvals(&self, filter: &ApprovalFilter) -> Result<Vec<ApprovalRecord>> {
        let mut clauses = vec![
            match filter.status {
                ApprovalStatus::Pending => "decision IS NULL",
                ApprovalStatus::Decided => "decision IS NOT NULL",
                ApprovalStatus::All => "TRUE",
            }
            .to_string(),
        ];
        if filter.after.is_some() {
            clauses.push("(requested_at, run_id, step_index) > ($2, $3, $4)".into());
        }
        if filter.scope.tenant().is_some() {
            let n = if filter.after.is_some() { 5 } else { 2 };
            clauses.push(format!(
                "run_id IN (SELECT id FROM runs WHERE tenant = ${n})"
            ));
        }
        let sql = format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE {} \
             ORDER BY requested_at, run_id, step_index LIMIT $1",
            clauses.join(" AND ")
        );
        let mut q = sqlx::query(&sql).bind(filter.limit);
        if let Some(after) = filter.after {
            q = q
                .bind(after.requested_at)
                .bind(after.run_id.to_string())
                .bind(after.step_index);
        }
        if let Some(tenant) = filter.scope.tenant() {
            q = q.bind(tenant);
        }
        q.fetch_all(self.pool())
            .await?
            .iter()
            .map(approval_from_row)
            .collect()
    }

    /// One approval, or `None`.
    pub async fn get_approval(
        &self,
        run_id: Uuid,
        step_index: i64,
    ) -> Result<Option<ApprovalRecord>> {
        sqlx::query(&format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE run_id = $1 AND step_index = $2"
        ))
        .bind(run_id.to_string())
        .bind(step_index)
        .fetch_optional(self.pool())
        .await?
        .as_ref()
        .map(approval_from_row)
        .transpose()
    }

    /// Every approval of a run (pending or decided), by step index.
    pub(crate) async fn approvals_of_run(&self, run: &str) -> Result<Vec<ApprovalRecord>> {
        sqlx::query(&format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE run_id = $1 ORDER BY step_index"
        ))
        .bind(run)
        .fetch_all(self.pool())
        .await?
        .iter()
        .map(approval_from_row)
        .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn approval_keys_round_trip_through_their_text_form() {
        let key = ApprovalKey {
            requested_at: 1_700_000_000_123,
            run_id: Uuid::now_v7(),
            step_index: 3,
        };
        assert_eq!(key.to_string().parse::<ApprovalKey>(), Ok(key));
        assert!("1.not-a-uuid.2".parse::<ApprovalKey>().is_err());
        assert!("x".parse::<ApprovalKey>().is_err());
    }

    #[test]
    fn only_the_two_approvals_count_as_approved() {
        let approved: Vec<&str> = DecisionKind::ALL
            .into_iter()
            .filter(|k| k.approved())
            .map(DecisionKind::as_str)
            .collect();
        assert_eq!(approved, ["approved", "expired_approved"]);
    }
}
