//! The schema: migrations of each backend, embedded in the binary, applied by
//! `vm-webapp migrate` (and by `serve` in local mode), and the check that a
//! process which only reads and writes data finds the schema it was built for.

use std::borrow::Cow;

use sqlx::Row;
use sqlx::migrate::{Migration, MigrationType, Migrator};

use super::{Result, Store, StoreError};
use crate::config::DbBackend;

/// The migrations of one backend, in order: (version, description, SQL).
fn migration_sources(backend: DbBackend) -> [(i64, &'static str, &'static str); 12] {
    match backend {
        DbBackend::Postgres => [
            (
                1,
                "runs and queue",
                include_str!("../../migrations/postgres/0001_runs_and_queue.sql"),
            ),
            (
                2,
                "worker heartbeats",
                include_str!("../../migrations/postgres/0002_worker_heartbeats.sql"),
            ),
            (
                3,
                "audit and webhooks",
                include_str!("../../migrations/postgres/0003_audit_and_webhooks.sql"),
            ),
            (
                4,
                "queue maintenance",
                include_str!("../../migrations/postgres/0004_queue_maintenance.sql"),
            ),
            (
                5,
                "events keyed by run",
                include_str!("../../migrations/postgres/0005_events_keyed_by_run.sql"),
            ),
            (
                6,
                "no foreign keys on hot tables",
                include_str!("../../migrations/postgres/0006_no_foreign_keys_on_hot_tables.sql"),
            ),
            (
                7,
                "maintenance leader lease",
                include_str!("../../migrations/postgres/0007_maintenance_leader_lease.sql"),
            ),
            (
                8,
                "approvals",
                include_str!("../../migrations/postgres/0008_approvals.sql"),
            ),
            (
                9,
                "tenants and usage",
                include_str!("../../migrations/postgres/0009_tenants_and_usage.sql"),
            ),
            (
                10,
                "events by id",
                include_str!("../../migrations/postgres/0010_events_by_id.sql"),
            ),
            (
                11,
                "usage warnings by allowance",
                include_str!("../../migrations/postgres/0011_usage_warnings_by_allowance.sql"),
            ),
            (
                12,
                "run updates on the page",
                include_str!("../../migrations/postgres/0012_run_updates_on_the_page.sql"),
            ),
        ],
        DbBackend::Sqlite => [
            (
                1,
                "runs and queue",
                include_str!("../../migrations/sqlite/0001_runs_and_queue.sql"),
            ),
            (
                2,
                "worker heartbeats",
                include_str!("../../migrations/sqlite/0002_worker_heartbeats.sql"),
            ),
            (
                3,
                "audit and webhooks",
                include_str!("../../migrations/sqlite/0003_audit_and_webhooks.sql"),
            ),
            (
                4,
                "queue maintenance",
                include_str!("../../migrations/sqlite/0004_queue_maintenance.sql"),
            ),
            (
                5,
                "events keyed by run",
                include_str!("../../migrations/sqlite/0005_events_keyed_by_run.sql"),
            ),
            (
                6,
                "no foreign keys on hot tables",
                include_str!("../../migrations/sqlite/0006_no_foreign_keys_on_hot_tables.sql"),
            ),
            (
                7,
                "maintenance leader lease",
                include_str!("../../migrations/sqlite/0007_maintenance_leader_lease.sql"),
            ),
            (
                8,
                "approvals",
                include_str!("../../migrations/sqlite/0008_approvals.sql"),
            ),
            (
                9,
                "tenants and usage",
                include_str!("../../migrations/sqlite/0009_tenants_and_usage.sql"),
            ),
            (
                10,
                "events by id",
                include_str!("../../migrations/sqlite/0010_events_by_id.sql"),
            ),
            (
                11,
                "usage warnings by allowance",
                include_str!("../../migrations/sqlite/0011_usage_warnings_by_allowance.sql"),
            ),
            (
                12,
                "run updates on the page",
                include_str!("../../migrations/sqlite/0012_run_updates_on_the_page.sql"),
            ),
        ],
    }
}

fn migrator(backend: DbBackend) -> Migrator {
    migrator_upto(backend, i64::MAX)
}

/// The migrations up to `version`. `ignore_missing`: a build older than the
/// schema (a rollback of the app) migrates as a no-op instead of failing,
/// since every migration keeps older builds working.
fn migrator_upto(backend: DbBackend, version: i64) -> Migrator {
    let migrations = migration_sources(backend)
        .into_iter()
        .filter(|(v, _, _)| *v <= version)
        .map(|(version, description, sql)| {
            Migration::new(
                version,
                Cow::Borrowed(description),
                MigrationType::Simple,
                Cow::Borrowed(sql),
                // sqlx's convention: a file that starts with this line runs
                // outside a transaction (`CREATE`/`DROP INDEX CONCURRENTLY`).
                sql.starts_with("-- no-transaction"),
            )
        })
        .collect::<Vec<_>>();
    Migrator {
        migrations: Cow::Owned(migrations),
        ignore_missing: true,
        locking: true,
        no_tx: false,
    }
}

impl Store {
    /// Applies pending migrations and returns their versions. Idempotent;
    /// concurrent runs serialise on the migrator's lock.
    pub async fn migrate(&self) -> Result<Vec<i64>> {
        let migrator = migrator(self.backend);
        let before = self.schema_version().await.unwrap_or(0);
        migrator.run(self.pool()).await?;
        Ok(migrator
            .iter()
            .map(|m| m.version)
            .filter(|v| *v > before)
            .collect())
    }

    /// The newest migration this build knows.
    pub fn expected_schema_version(&self) -> i64 {
        migrator(self.backend)
            .iter()
            .map(|m| m.version)
            .max()
            .unwrap_or(0)
    }

    /// The newest applied migration (0 when none).
    pub async fn schema_version(&self) -> Result<i64> {
        let row =
            sqlx::query("SELECT MAX(version) AS v FROM _sqlx_migrations WHERE success = TRUE")
                .fetch_one(self.pool())
                .await;
        match row {
            Ok(row) => Ok(row.try_get::<Option<i64>, _>("v")?.unwrap_or(0)),
            Err(sqlx::Error::Database(_)) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Fails with [`StoreError::SchemaBehind`] unless the schema is fully
    /// migrated: processes that only read and write data never apply DDL
    /// themselves outside local mode.
    pub async fn ensure_schema(&self) -> Result<()> {
        let found = self.schema_version().await?;
        let expected = self.expected_schema_version();
        if found < expected {
            return Err(StoreError::SchemaBehind { found, expected });
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Without `ignore_missing`, rolling the app back to an older image would
    /// fail its migration Job and keep the bad release serving.
    #[tokio::test]
    async fn an_older_build_migrates_a_newer_schema_as_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::test_sqlite_store(dir.path(), "m.db").await;
        store.migrate().await.unwrap();
        migrator_upto(DbBackend::Sqlite, 1)
            .run(store.pool())
            .await
            .unwrap();
        assert_eq!(
            store.schema_version().await.unwrap(),
            store.expected_schema_version()
        );
    }

    /// Without the copy, every threshold reached this month before the
    /// upgrade to migration 11 would be warned about a second time.
    #[tokio::test]
    async fn migration_11_keeps_the_thresholds_already_reached() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::test_sqlite_store(dir.path(), "m.db").await;
        migrator_upto(DbBackend::Sqlite, 10)
            .run(store.pool())
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO usage_thresholds (tenant, period, meter, threshold, used, allowance, run_id, crossed_at) \
             VALUES ('acme', '2026-11', 'runs', '0.8', 80, 100, NULL, 1)",
        )
        .execute(store.pool())
        .await
        .unwrap();
        store.migrate().await.unwrap();
        let row = sqlx::query("SELECT allowance, threshold, used FROM usage_warnings")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(row.get::<i64, _>("allowance"), 100);
        assert_eq!(row.get::<String, _>("threshold"), "0.8");
        assert_eq!(row.get::<i64, _>("used"), 80);
    }
}
