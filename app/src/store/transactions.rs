//! Transactions and one-off writes with a setting of their own: the
//! store's ways to begin a transaction (plain, bounded by a request's time
//! left, taking SQLite's write lock at once, reading one snapshot) and the
//! cleanup writes of a clean stop, which give up quickly on a held lock.

use std::time::Duration;

use sqlx::{Any, Transaction};

use super::{Result, Store, StoreError, ms};
use crate::config::DbBackend;

/// SQLite's busy timeout on the pool's connections: how long a statement
/// waits for the write lock another connection or process holds.
pub(crate) const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a write that may be given up waits for a connection and for
/// the database's locks: the cleanup writes of a clean stop
/// ([`Store::resign_maintenance`], [`Store::forget_worker`]), whose rows
/// expire by themselves anyway. Each waited out SQLite's busy timeout
/// (10 s) while another process held the write lock, about 20 s per stop.
pub const CLEANUP_WAIT: Duration = Duration::from_millis(500);

impl Store {
    /// A plain transaction on the pool. Errors: the database's.
    pub(crate) async fn begin(&self) -> Result<Transaction<'static, Any>> {
        Ok(self.pool.begin().await?)
    }

    /// A transaction whose statements take at most `budget` each on
    /// PostgreSQL (`SET LOCAL statement_timeout`, lock waits included, in
    /// the one round trip of its `BEGIN`): a write done for an HTTP request
    /// is bounded by the request's time left
    /// ([`crate::deadline::Deadline::budget`]), so that a lock held past it
    /// (a migration's `ALTER TABLE`, a `VACUUM FULL`) fails the statement
    /// with SQLSTATE 57014, [`StoreError::Unavailable`], instead of letting
    /// it wait and commit after the client was answered 408. The setting
    /// ends with the transaction; the connection goes back to the pool
    /// without it. `None`, and on SQLite (whose lock waits its busy timeout
    /// bounds), a plain [`Store::begin`]. Errors: the database's.
    pub(crate) async fn begin_within(
        &self,
        budget: Option<Duration>,
    ) -> Result<Transaction<'static, Any>> {
        match (self.backend, budget) {
            (DbBackend::Postgres, Some(budget)) => Ok(self
                .pool
                .begin_with(format!(
                    "BEGIN; SET LOCAL statement_timeout = {}",
                    ms(budget).max(1)
                ))
                .await?),
            _ => self.begin().await,
        }
    }

    /// Runs `query`, one statement, as a write that may be given up: it
    /// waits at most [`CLEANUP_WAIT`] for a connection and as long for the
    /// database's locks (SQLite's busy timeout, PostgreSQL's
    /// `statement_timeout`, set on the connection for it and set back
    /// after; a connection that cannot be set back, or whose write is
    /// abandoned midway, is closed rather than returned to the pool).
    ///
    /// Errors: [`StoreError::Unavailable`] when no connection came, or a
    /// lock stayed held, within the wait; otherwise the database's.
    pub(crate) async fn cleanup_write<'q>(
        &self,
        query: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments<'q>>,
    ) -> Result<()> {
        let conn = tokio::time::timeout(CLEANUP_WAIT, self.pool.acquire())
            .await
            .map_err(|_| StoreError::Unavailable(sqlx::Error::PoolTimedOut))??;
        let mut conn = Closing(Some(conn));
        let (bound, restore) = match self.backend {
            DbBackend::Sqlite => (
                busy_timeout(CLEANUP_WAIT),
                busy_timeout(SQLITE_BUSY_TIMEOUT),
            ),
            DbBackend::Postgres => (
                format!("SET statement_timeout = {}", ms(CLEANUP_WAIT)),
                "RESET statement_timeout".to_string(),
            ),
        };
        let written = async {
            sqlx::query(&bound).execute(conn.get()?).await?;
            query.execute(conn.get()?).await?;
            Ok::<_, StoreError>(())
        }
        .await;
        let reset = sqlx::query(&restore).execute(conn.get()?).await;
        if reset.is_ok() {
            // Back to the pool with the pool's setting.
            drop(conn.0.take());
        }
        written
    }

    /// A transaction that reads and then writes: on SQLite it takes the
    /// write lock at its start (`BEGIN IMMEDIATE`, waiting up to the busy
    /// timeout), since a deferred transaction that read first cannot take it
    /// once another connection has committed (`SQLITE_BUSY_SNAPSHOT`, at
    /// once, whatever the busy timeout): under load most such transactions
    /// failed. On PostgreSQL a plain `BEGIN`. Errors: the database's.
    pub(crate) async fn begin_write(&self) -> Result<Transaction<'static, Any>> {
        match self.backend {
            DbBackend::Sqlite => Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?),
            DbBackend::Postgres => self.begin().await,
        }
    }

    /// A read-only transaction whose reads all see one snapshot of the
    /// database, however the app writes meanwhile: `REPEATABLE READ, READ
    /// ONLY` on PostgreSQL (set as the transaction's first statement); on
    /// SQLite a deferred transaction, whose first read fixes its WAL mark.
    /// For readers that compare tables with each other (backup, `usage
    /// verify`). Errors: the database's, when it cannot be reached.
    pub(crate) async fn begin_snapshot(&self) -> Result<Transaction<'static, Any>> {
        let mut tx = self.begin().await?;
        if self.backend == DbBackend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
        }
        Ok(tx)
    }
}

/// How long the statements of a write for the HTTP request of `deadline`
/// may take ([`crate::deadline::Deadline::budget`], for
/// [`Store::begin_within`]); `None` without a deadline (no bound).
///
/// Errors: [`StoreError::OutOfTime`] when the request has no time left: the
/// write must not be tried.
pub(crate) fn budget_of(deadline: Option<&crate::deadline::Deadline>) -> Result<Option<Duration>> {
    deadline
        .map(|d| d.budget().ok_or(StoreError::OutOfTime))
        .transpose()
}

/// `PRAGMA busy_timeout` of `wait` (SQLite).
pub(crate) fn busy_timeout(wait: Duration) -> String {
    format!("PRAGMA busy_timeout = {}", ms(wait))
}

/// A pooled connection with a setting of its own ([`Store::cleanup_write`]):
/// dropped while it holds one, it leaves the pool and closes, so that the
/// setting never reaches another user of the pool.
struct Closing(Option<sqlx::pool::PoolConnection<Any>>);

impl Closing {
    fn get(&mut self) -> Result<&mut sqlx::AnyConnection> {
        self.0
            .as_deref_mut()
            .ok_or(StoreError::Unavailable(sqlx::Error::PoolClosed))
    }
}

impl Drop for Closing {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            drop(conn.detach());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use sqlx::Row;

    use super::*;
    use crate::store::test_sqlite_store;

    /// A cleanup write gives up after [`CLEANUP_WAIT`] while another
    /// process holds SQLite's write lock (it waited the 10 s busy timeout),
    /// and leaves the pool's connection with the pool's busy timeout.
    #[tokio::test]
    async fn a_cleanup_write_gives_up_quickly_on_a_held_write_lock() {
        let dir = tempfile::tempdir().unwrap();
        let store = test_sqlite_store(dir.path(), "c.db").await;
        store.migrate().await.unwrap();
        store.heartbeat("w", 0).await.unwrap();
        let holder = rusqlite::Connection::open(dir.path().join("c.db")).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let started = std::time::Instant::now();
        let given_up = store
            .forget_worker("w", Duration::from_secs(60))
            .await
            .unwrap_err();
        assert!(given_up.is_unavailable(), "{given_up:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        holder.execute_batch("ROLLBACK").unwrap();
        let busy: i64 = sqlx::query("PRAGMA busy_timeout")
            .fetch_one(store.pool())
            .await
            .unwrap()
            .get(0);
        assert_eq!(busy, ms(SQLITE_BUSY_TIMEOUT));
        store
            .forget_worker("w", Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(store.heartbeat_age_ms().await.unwrap(), None);
    }
}
