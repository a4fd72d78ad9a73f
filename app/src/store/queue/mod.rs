//! The job queue's state machine: [`claim`] (queued → running, with a lease),
//! [`complete`] (running → result recorded, in batches; or back to queued for a
//! retry, or to the dead letters), [`lease`] (renewal, one statement per worker
//! per tick) and [`rescue`] (expired leases, leader-only maintenance and the
//! queue-gauge snapshot).
//!
//! # Finding the jobs a worker holds (PostgreSQL)
//! The statements that finish or renew jobs by id (the batch completion and
//! the lease renewal) select them with `id = ANY (ARRAY(SELECT id FROM …))`
//! and compare their `running` state through a materialized input, never as
//! the constant `state = 'running'`. That constant matches the predicate of
//! the partial index `jobs_leased` (`lease_expires_at WHERE state =
//! 'running'`), so the planner may read that whole index, visit every heap
//! page it points to and then join the batch's ids. The index keeps an entry
//! for every claim since the last vacuum, live or dead (a claim writes a new
//! tuple version, a finished job leaves a dead one), and bitmap scans never
//! mark dead entries. Measured in the steady-state bench (`make bench`), ten
//! seconds into the window (autovacuum wakes once a minute): 41,179 entries
//! and 2,418 heap pages read, 7 ms, to complete one job; by primary key, a
//! dozen pages. Written this way, the primary key is the only index the
//! planner can use, whatever its statistics say about a table whose churn
//! they lag far behind.

pub mod claim;
pub mod complete;
pub mod lease;
pub mod rescue;

use serde_json::Value;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::Result;
use crate::model::ClaimedJob;

pub use rescue::QueueStat;

/// Result of finishing a claimed job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The transition was recorded.
    Recorded,
    /// The claim was no longer valid (lease lost, run cancelled); nothing changed.
    Stale,
}

/// A step's result, ready to be recorded with others in one transaction.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The claimed job (its id and attempt are the fencing token).
    pub job: ClaimedJob,
    /// The step's output.
    pub output: Value,
}

/// Jobs by state, for tests and benchmarks (a scan: scrapes read [`QueueStat`]s).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Waiting for an earlier step.
    pub waiting: i64,
    /// Claimable now or after a retry delay.
    pub queued: i64,
    /// Leased by a worker.
    pub running: i64,
    /// Approval steps waiting for a decision (no lease).
    pub awaiting_approval: i64,
    /// Dead-lettered.
    pub dead: i64,
}

/// What finishing a claimed job needs, even when its payload cannot be read.
pub(crate) struct JobRef {
    pub(crate) id: i64,
    pub(crate) attempt: i64,
    pub(crate) max_attempts: i64,
    pub(crate) run_id: String,
    pub(crate) step_index: i64,
    pub(crate) kind: String,
}

impl JobRef {
    pub(crate) fn of(job: &ClaimedJob) -> Self {
        Self {
            id: job.id,
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            run_id: job.run_id.to_string(),
            step_index: job.step_index,
            kind: job.step.kind().to_string(),
        }
    }

    pub(crate) fn from_row(row: &AnyRow) -> Result<Self> {
        let payload: String = row.try_get("payload")?;
        let kind = serde_json::from_str::<Value>(&payload)
            .ok()
            .and_then(|v| v.get("kind").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_else(|| "unknown".to_string());
        Ok(Self {
            id: row.try_get("id")?,
            attempt: row.try_get("attempt")?,
            max_attempts: row.try_get("max_attempts")?,
            run_id: row.try_get("run_id")?,
            step_index: row.try_get("step_index")?,
            kind,
        })
    }
}
