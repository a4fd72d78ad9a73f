//! Lease renewal: one statement per worker per tick renews every job the
//! worker still holds, and tells it which it lost (rescued after an expiry,
//! or deleted by a cancel), so a cancelled step stops within a tick.

use std::collections::HashSet;
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::Row;

use crate::config::DbBackend;
use crate::model::JobState;
use crate::store::{Result, Store, UNFLUSHED, ms, recordset};

impl Store {
    /// Pushes the leases of `held` (job id, attempt) claimed by `worker` out
    /// to `lease` after the database's now. Returns the ids still held; a job
    /// missing from the answer was lost (its lease expired and it was rescued,
    /// or its run was cancelled) and its step should stop.
    pub async fn extend_leases(
        &self,
        worker: &str,
        held: &[(i64, i64)],
        lease: Duration,
    ) -> Result<HashSet<i64>> {
        if held.is_empty() {
            return Ok(HashSet::new());
        }
        // In job-id order, as completions send theirs (see `complete_batch`):
        // rows locked in one order by both cannot deadlock.
        let mut held = held.to_vec();
        held.sort_unstable();
        let batch = Value::Array(
            held.iter()
                .map(|(id, attempt)| json!({"id": id, "attempt": attempt}))
                .collect(),
        )
        .to_string();
        let held_sql = recordset(self.backend(), &[("id", "bigint"), ("attempt", "bigint")]);
        let sql = match self.backend() {
            // By primary key, the state through the input: see "Finding the
            // jobs a worker holds" in `store::queue`.
            DbBackend::Postgres => self.sql(&format!(
                "WITH held AS MATERIALIZED (SELECT h.*, '{running}'::text AS state FROM ({held_sql}) h), \
                   unflushed AS ({UNFLUSHED}) \
                 UPDATE jobs SET lease_expires_at = {{now}} + $2 FROM held, unflushed \
                 WHERE jobs.id = ANY (ARRAY(SELECT id FROM held)) \
                   AND jobs.id = held.id AND jobs.attempt = held.attempt AND jobs.state = held.state \
                   AND jobs.locked_by = $3 RETURNING jobs.id",
                running = JobState::Running.as_str(),
            )),
            DbBackend::Sqlite => self.sql(&format!(
                "UPDATE jobs SET lease_expires_at = {{now}} + $2 \
                 WHERE locked_by = $3 AND state = 'running' \
                   AND (id, attempt) IN (SELECT id, attempt FROM ({held_sql}) h) RETURNING id"
            )),
        };
        // A renewal lost in a server crash only shortens the lease: the job
        // may be delivered again, which the fencing token makes safe.
        let kept = sqlx::query(&sql)
            .bind(batch)
            .bind(ms(lease))
            .bind(worker)
            .fetch_all(self.pool())
            .await?
            .iter()
            .map(|r| Ok(r.try_get::<i64, _>("id")?))
            .collect::<Result<HashSet<i64>>>()?;
        Ok(kept)
    }
}
