//! Maintenance that runs once per database, not once per pod: returning jobs
//! whose lease expired to the queue (or to the dead letters on their last
//! attempt) and keeping the queue-gauge snapshot fresh. One process leads
//! (River's leader-only rescuer and queue statistics), holding a lease row
//! stamped with the database clock and renewed every tick. A leader that
//! stops renewing loses it when it expires, whether it died or hangs with its
//! connection open (a session advisory lock, tried first, stayed held by a
//! stopped process forever). The statements are fenced and idempotent, so a
//! former leader waking up late does no harm.

use std::time::Duration;

use sqlx::Row;

use super::{JobRef, QueueCounts};
use crate::config::DbBackend;
use crate::model::{EventType, JobState};
use crate::store::events::NewEvent;
use crate::store::{Result, Store, StoreError, ms};

/// One row of the queue-gauge snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStat {
    /// `waiting`, `queued`, `running`, `awaiting_approval` or `dead`.
    pub state: String,
    /// Jobs in that state.
    pub jobs: i64,
    /// Age of the oldest (ms, database clock): for `queued` since it became
    /// claimable, for `awaiting_approval` since it began waiting, for `dead`
    /// since it failed, otherwise since creation.
    pub oldest_age_ms: i64,
}

impl Store {
    /// Takes or renews the queue-maintenance lease for `holder` until `ttl`
    /// after the database's now; true when `holder` leads. The lease passes to
    /// another holder only once it has expired (or was given up).
    pub async fn lead_maintenance(&self, holder: &str, ttl: Duration) -> Result<bool> {
        let led = sqlx::query(&self.sql(
            "INSERT INTO maintenance_leader (name, holder, expires_at) VALUES ('queue', $1, {now} + $2) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE maintenance_leader.holder = excluded.holder OR maintenance_leader.expires_at < {now} \
             RETURNING holder",
        ))
        .bind(holder)
        .bind(ms(ttl))
        .fetch_optional(self.pool())
        .await
        .map_err(StoreError::from);
        // The holder writes every tick: while the disk is full it keeps
        // telling readiness so.
        Ok(self.noted(led)?.is_some())
    }

    /// Gives the lease up (clean shutdown), so another process leads at its
    /// next tick instead of after the expiry. A cleanup write: it waits at
    /// most [`crate::store::CLEANUP_WAIT`] for a connection and for locks
    /// (another process holding SQLite's write lock), since the lease
    /// expires by itself a few ticks later.
    ///
    /// Errors: [`StoreError::Unavailable`] when the database is unreachable
    /// or busy past that wait.
    pub async fn resign_maintenance(&self, holder: &str) -> Result<()> {
        self.cleanup_write(
            sqlx::query(
                "UPDATE maintenance_leader SET expires_at = 0 WHERE name = 'queue' AND holder = $1",
            )
            .bind(holder),
        )
        .await
    }

    /// Returns jobs whose lease expired (their worker died or hung) to the
    /// queue, and dead-letters those that have used all their attempts.
    /// Returns how many jobs were rescued or dead-lettered.
    pub async fn rescue_expired(&self) -> Result<u64> {
        let mut tx = self.begin().await?;
        if self.backend() == DbBackend::Postgres {
            // Walk `jobs_leased` in order, never as a bitmap: entries of jobs
            // finished since the last vacuum stay in that index, and only a
            // plain index scan marks them dead as it passes, so each is read
            // once instead of twice a second (a pass a second, two reads
            // each) until autovacuum comes, once a minute at most. 40,000
            // such entries cost each bitmap read 3–5 ms; marked, none.
            for setting in [
                "SET LOCAL enable_bitmapscan = off",
                "SET LOCAL enable_seqscan = off",
            ] {
                sqlx::query(setting).execute(&mut *tx).await?;
            }
        }
        let rows = sqlx::query(&self.sql(
            "UPDATE jobs SET state = 'queued', run_at = {now}, lease_expires_at = NULL, locked_by = NULL, \
             last_error = 'lease expired before the step finished (worker lost)' \
             WHERE state = 'running' AND lease_expires_at < {now} AND attempt < max_attempts \
             RETURNING run_id, step_index, attempt",
        ))
        .fetch_all(&mut *tx)
        .await?;
        let mut count = rows.len() as u64;
        if !rows.is_empty() {
            let run_ids: Vec<String> = rows
                .iter()
                .map(|r| r.try_get::<String, _>("run_id"))
                .collect::<Result<_, _>>()?;
            let mut events = Vec::new();
            for (row, run_id) in rows.iter().zip(&run_ids) {
                events.push(
                    NewEvent::step(
                        run_id,
                        EventType::StepLeaseExpired,
                        row.try_get("step_index")?,
                        row.try_get("attempt")?,
                    )
                    .message("lease expired; the step will be delivered again"),
                );
            }
            self.insert_events(&mut tx, &events).await?;
        }
        let exhausted = sqlx::query(&self.sql(
            "SELECT id, run_id, step_index, payload, attempt, max_attempts FROM jobs \
             WHERE state = 'running' AND lease_expires_at < {now} AND attempt >= max_attempts",
        ))
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        if count > 0 {
            self.events.raise();
        }

        for row in &exhausted {
            let job = JobRef::from_row(row)?;
            if self
                .dead_letter_ref(&job, "lease expired on the last attempt (worker lost)")
                .await?
                == super::Finish::Recorded
            {
                count += 1;
            }
        }
        Ok(count)
    }

    /// Recounts the queue and stores the snapshot that scrapes read. Run by
    /// the maintenance leader; the only GROUP BY over the queue.
    pub async fn refresh_queue_stats(&self) -> Result<()> {
        let mut tx = self.begin().await?;
        let upsert = self.sql(
            "INSERT INTO queue_stats (state, jobs, oldest_age_ms, updated_at) \
             SELECT s.state, s.n, s.age, {now} FROM ( \
               SELECT state, COUNT(*) AS n, \
                 COALESCE({now} - MIN(CASE WHEN state IN ('queued', 'awaiting_approval') THEN run_at ELSE created_at END), 0) AS age \
               FROM jobs GROUP BY state \
               UNION ALL \
               SELECT 'dead', COUNT(*), COALESCE({now} - MIN(failed_at), 0) FROM dead_jobs \
             ) s WHERE true \
             ON CONFLICT (state) DO UPDATE SET jobs = excluded.jobs, \
               oldest_age_ms = excluded.oldest_age_ms, updated_at = excluded.updated_at",
        );
        // States with no job left keep no stale count.
        sqlx::query(
            &self.sql("UPDATE queue_stats SET jobs = 0, oldest_age_ms = 0, updated_at = {now}"),
        )
        .execute(&mut *tx)
        .await?;
        sqlx::query(&upsert).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The queue-gauge snapshot (five rows, no scan): every state, with the
    /// oldest job's age advanced by the snapshot's own age. Also returns the
    /// snapshot's age in ms (`None` before the first snapshot).
    pub async fn queue_stats(&self) -> Result<(Vec<QueueStat>, Option<i64>)> {
        let rows = sqlx::query(&self.sql(
            "SELECT state, jobs, oldest_age_ms, {now} - updated_at AS stale_ms FROM queue_stats",
        ))
        .fetch_all(self.pool())
        .await?;
        let mut stale = None;
        let mut stats = Vec::new();
        for row in &rows {
            let stale_ms: i64 = row.try_get::<i64, _>("stale_ms")?.max(0);
            stale = Some(stale.map_or(stale_ms, |s: i64| s.max(stale_ms)));
            let jobs: i64 = row.try_get("jobs")?;
            let oldest: i64 = row.try_get("oldest_age_ms")?;
            stats.push(QueueStat {
                state: row.try_get("state")?,
                jobs,
                oldest_age_ms: if jobs > 0 { oldest + stale_ms } else { 0 },
            });
        }
        for state in JobState::ALL
            .iter()
            .map(|s| s.as_str())
            .chain(std::iter::once("dead"))
        {
            if !stats.iter().any(|s| s.state == state) {
                stats.push(QueueStat {
                    state: state.to_string(),
                    jobs: 0,
                    oldest_age_ms: 0,
                });
            }
        }
        Ok((stats, stale))
    }

    /// Whether any job is waiting, queued or running (cheap: stops at the
    /// first row; for tests and benchmarks that wait for a drain).
    pub async fn has_unfinished_jobs(&self) -> Result<bool> {
        Ok(sqlx::query("SELECT 1 AS one FROM jobs LIMIT 1")
            .fetch_optional(self.pool())
            .await?
            .is_some())
    }

    /// Jobs by state, counted now (a scan: for tests and benchmarks).
    pub async fn queue_counts(&self) -> Result<QueueCounts> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
            .fetch_all(self.pool())
            .await?;
        let mut counts = QueueCounts::default();
        for r in &rows {
            let state: String = r.try_get("state")?;
            let n: i64 = r.try_get("n")?;
            match JobState::parse(&state) {
                Some(JobState::Waiting) => counts.waiting = n,
                Some(JobState::Queued) => counts.queued = n,
                Some(JobState::Running) => counts.running = n,
                Some(JobState::AwaitingApproval) => counts.awaiting_approval = n,
                None => {
                    return Err(crate::store::StoreError::Corrupt(format!(
                        "unknown job state {state}"
                    )));
                }
            }
        }
        counts.dead = sqlx::query("SELECT COUNT(*) AS n FROM dead_jobs")
            .fetch_one(self.pool())
            .await?
            .try_get("n")?;
        Ok(counts)
    }
}

/// How often the leader rescues and refreshes the snapshot: often enough that
/// a lost job waits little beyond its lease and the gauges are seconds fresh.
pub const MAINTENANCE_EVERY: Duration = Duration::from_secs(1);
