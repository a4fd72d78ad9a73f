//! Whether the database takes writes: what readiness reports beyond a
//! round trip.
//!
//! A full disk (or failing storage) leaves an SQLite database readable, so
//! `SELECT 1` still answers and readiness said ready while every write was
//! refused. The store therefore remembers when a write was last refused for
//! the state of its storage (`SQLITE_FULL`, `SQLITE_IOERR`;
//! [`StoreError::is_storage_refusal`]) by run creation, a claim, a
//! completion, a heartbeat or the maintenance lease (renewed every second
//! by its holder), and readiness ([`Store::takes_writes`]) says no until
//! such refusals have stopped for [`QUIET`] and a write of its own commits.
//!
//! Both conditions matter on a disk that is nearly full: a probe's one page
//! can still fit where a run's ten do not, so the probe alone let readiness
//! flap to ready while creations were refused. A write of the app that
//! succeeds proves nothing either (a claim that finds no job commits without
//! touching the disk), so only the probe ends the state.
//!
//! PostgreSQL refusals are not tracked here: the server reports its own
//! storage, and an unreachable server already fails the round trip.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::Row;

use super::{Result, Store, StoreError};
use crate::config::DbBackend;

/// How long writes must have gone without a refusal for a full disk before
/// readiness tries its probe: longer than the maintenance lease's renewal
/// (every second), which keeps failing while the disk is full.
pub(crate) const QUIET: Duration = Duration::from_secs(5);

/// When a write was last refused for the state of storage, shared by a
/// store's clones (and its run-creation writers); `None` once a probe
/// write committed after it.
#[derive(Debug, Default)]
pub(crate) struct WriteHealth {
    refused_at: Mutex<Option<Instant>>,
}

impl WriteHealth {
    fn last(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.refused_at.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Store {
    /// `result`, after noting a refusal for the state of storage in it.
    pub(crate) fn noted<T>(&self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            self.note_refusal(e);
        }
        result
    }

    /// Notes `e` when it is a refusal for the state of storage (a full disk,
    /// an I/O error).
    pub(crate) fn note_refusal(&self, e: &StoreError) {
        if !e.is_storage_refusal() {
            return;
        }
        if self.writes.last().replace(Instant::now()).is_none() {
            tracing::warn!(
                "the database refused a write (disk full or I/O error): not ready until writes succeed again"
            );
        }
    }

    /// For readiness: whether the database takes writes. True unless a
    /// write was refused for the state of storage and either one was
    /// refused within [`QUIET`] or a probe write still fails. The probe
    /// rewrites SQLite's `user_version` header field with its own value (a
    /// real commit, one WAL frame; the app does not otherwise use the
    /// field); once it commits, the refusals are forgotten.
    pub async fn takes_writes(&self) -> bool {
        let Some(refused_at) = *self.writes.last() else {
            return true;
        };
        if self.backend() != DbBackend::Sqlite || refused_at.elapsed() < QUIET {
            return false;
        }
        let probe = async {
            let mut conn = self.pool().acquire().await?;
            let version: i64 = sqlx::query("PRAGMA user_version")
                .fetch_one(&mut *conn)
                .await?
                .try_get(0)?;
            sqlx::query(&format!("PRAGMA user_version = {version}"))
                .execute(&mut *conn)
                .await?;
            Ok::<_, StoreError>(())
        };
        if let Err(e) = probe.await {
            self.note_refusal(&e);
            return false;
        }
        let mut last = self.writes.last();
        // A refusal noted while the probe ran is not forgotten.
        if *last == Some(refused_at) {
            *last = None;
            tracing::info!("the database takes writes again");
        }
        last.is_none()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Backdates the last refusal past [`QUIET`].
    fn quiet_since(store: &Store) {
        if let Some(at) = store.writes.last().as_mut() {
            *at -= QUIET;
        }
    }

    /// A run creation refused on a full disk makes the database refuse
    /// writes for readiness (which answered ready while every `POST /runs`
    /// failed); that lasts while refusals go on and while the probe write
    /// fails, and ends once the probe commits after a quiet spell.
    #[tokio::test]
    async fn a_write_refused_on_a_full_disk_is_not_ready_until_refusals_stop_and_a_probe_commits() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::test_sqlite_store_on_the_pool(dir.path(), "w.db").await;
        assert!(store.takes_writes().await);

        // `max_page_count` stands in for the full disk: a run whose input
        // needs new pages is refused, while the probe's rewrite of page 1
        // would still fit.
        let mut big = crate::store::test_new_run(None, 1);
        big.input = serde_json::json!({"text": "x".repeat(64 * 1024)});
        crate::store::test_disk_full(&store, true).await;
        let refused = store.create_run(&big).await.unwrap_err();
        assert!(refused.is_storage_refusal(), "{refused:?}");
        assert!(refused.is_unavailable());
        assert!(!store.takes_writes().await, "refused just now");
        crate::store::test_disk_full(&store, false).await;

        // Quiet, but the probe cannot commit (a held write lock stands in).
        quiet_since(&store);
        let holder = rusqlite::Connection::open(dir.path().join("w.db")).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        sqlx::query("PRAGMA busy_timeout = 0")
            .execute(store.pool())
            .await
            .unwrap();
        assert!(!store.takes_writes().await);
        assert!(!store.takes_writes().await, "still marked");
        holder.execute_batch("ROLLBACK").unwrap();
        assert!(store.takes_writes().await);
        assert!(store.writes.last().is_none());
        assert!(store.takes_writes().await);
    }

    /// A worker process creates no runs: its probes must turn not ready on
    /// the claims and completions a full disk refuses, or a worker whose
    /// every write fails keeps answering ready. Nothing is lost meanwhile:
    /// the refused claim leaves its jobs queued, and the refused completion
    /// leaves its jobs held under their lease.
    #[tokio::test]
    async fn claims_and_completions_refused_on_a_full_disk_make_a_worker_not_ready() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::test_sqlite_store_on_the_pool(dir.path(), "w.db").await;
        for _ in 0..300 {
            store
                .create_run(&crate::store::test_new_run(None, 1))
                .await
                .unwrap();
        }
        let lease = Duration::from_secs(60);

        // A claim's `step.started` events need pages the full disk lacks.
        crate::store::test_disk_full(&store, true).await;
        let refused = store.claim("w1", 300, lease).await.unwrap_err();
        assert!(refused.is_storage_refusal(), "{refused:?}");
        assert!(!store.takes_writes().await, "a refused claim");
        crate::store::test_disk_full(&store, false).await;
        quiet_since(&store);
        assert!(store.takes_writes().await);

        // With room the jobs are all still there; then their results
        // (step results, events, usage rows) meet the full disk.
        let claimed = store.claim("w1", 300, lease).await.unwrap();
        assert_eq!(claimed.len(), 300, "the refused claim took nothing");
        let done: Vec<crate::store::Completion> = claimed
            .into_iter()
            .map(|job| crate::store::Completion {
                job,
                output: serde_json::json!({"text": "x".repeat(200)}),
            })
            .collect();
        crate::store::test_disk_full(&store, true).await;
        let refused = store.complete_batch(&done).await.unwrap_err();
        assert!(refused.is_storage_refusal(), "{refused:?}");
        assert!(!store.takes_writes().await, "a refused completion");
        crate::store::test_disk_full(&store, false).await;
        quiet_since(&store);
        assert!(store.takes_writes().await);
        let finished = store.complete_batch(&done).await.unwrap();
        assert!(
            finished
                .iter()
                .all(|f| *f == crate::store::Finish::Recorded),
            "the refused completion recorded nothing: the retry records all"
        );
    }
}
