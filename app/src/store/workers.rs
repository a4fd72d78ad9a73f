//! Worker heartbeats, stamped with the database clock: readiness and
//! `/metrics` read their age to tell whether anything drains the queue.

use std::time::Duration;

use sqlx::Row;

use super::{Result, Store, StoreError, ms};

impl Store {
    /// Records that `worker` is alive with `in_flight` jobs.
    pub async fn heartbeat(&self, worker: &str, in_flight: i64) -> Result<()> {
        let beat = sqlx::query(&self.sql(
            "INSERT INTO worker_heartbeats (worker_id, started_at, last_beat_at, in_flight) \
             VALUES ($1, {now}, {now}, $2) \
             ON CONFLICT (worker_id) DO UPDATE SET last_beat_at = excluded.last_beat_at, \
             in_flight = excluded.in_flight",
        ))
        .bind(worker)
        .bind(in_flight)
        .execute(self.pool())
        .await;
        self.noted(beat.map_err(StoreError::from))?;
        Ok(())
    }

    /// Removes `worker`'s heartbeat (clean stop) and any not renewed within
    /// `stale_after`. A cleanup write: it waits at most
    /// [`super::CLEANUP_WAIT`] for a connection and for locks (another
    /// process holding SQLite's write lock), since a heartbeat left behind
    /// only ages and is removed by the next clean stop.
    ///
    /// Errors: [`StoreError::Unavailable`] when the database is unreachable
    /// or busy past that wait.
    pub async fn forget_worker(&self, worker: &str, stale_after: Duration) -> Result<()> {
        let sql = self
            .sql("DELETE FROM worker_heartbeats WHERE worker_id = $1 OR last_beat_at < {now} - $2");
        self.cleanup_write(sqlx::query(&sql).bind(worker).bind(ms(stale_after)))
            .await
    }

    /// Age (ms, database clock) of the freshest worker heartbeat, `None` when
    /// no worker ever beat.
    pub async fn heartbeat_age_ms(&self) -> Result<Option<i64>> {
        Ok(
            sqlx::query(
                &self.sql("SELECT {now} - MAX(last_beat_at) AS age FROM worker_heartbeats"),
            )
            .fetch_one(self.pool())
            .await?
            .try_get::<Option<i64>, _>("age")?
            .map(|a| a.max(0)),
        )
    }
}
