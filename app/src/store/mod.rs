//! The durable store: runs, step results, events and the job queue, on SQLite or
//! PostgreSQL behind one type.
//!
//! Both backends run the same SQL through sqlx's `Any` driver (JSON as text,
//! times as epoch milliseconds, `$N` placeholders, which SQLite accepts too);
//! the only dialect difference is the claim, which takes `FOR UPDATE SKIP
//! LOCKED` on PostgreSQL so that workers never queue behind each other.
//!
//! Queue invariants:
//! - a job is `waiting` (an earlier step has not finished), `queued` (claimable
//!   from `run_at`) or `running` (leased until `lease_expires_at`); finished jobs
//!   leave the table, which keeps the claim index free of dead rows;
//! - every claim bumps `attempt`, and every completion, retry, release or
//!   dead-letter requires the attempt it claimed (a fencing token), so a worker
//!   whose lease expired cannot touch a newer delivery;
//! - a step's result is inserted under the `(run_id, step_index)` primary key
//!   in the same transaction that deletes the job, so it is recorded once;
//! - on SQLite every write transaction starts with a write statement, so it
//!   takes the write lock up front and never fails on a lock upgrade.

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{Any, AnyPool, Row, Transaction};
use uuid::Uuid;

use crate::config::{DatabaseSettings, DbBackend};
use crate::model::{
    ClaimedJob, NewRun, Run, RunDetail, RunEvent, RunFilter, RunStatus, StepState, StepStatus,
};
use crate::steps::StepSpec;

pub mod security;

/// Errors of the store boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is shutting down; worth retrying.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// Any other database error.
    #[error("database error")]
    Database(#[source] sqlx::Error),
    /// Migrations failed.
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The schema is older than this build expects.
    #[error(
        "database schema is at version {found}, this build needs {expected}: run `vm-webapp migrate`"
    )]
    SchemaBehind {
        /// Applied version.
        found: i64,
        /// Version this build was made for.
        expected: i64,
    },
    /// A stored row could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// True when retrying later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        let unavailable = match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => true,
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                // PostgreSQL connection (08…) and shutdown (57P0…) classes;
                // SQLite BUSY (5) and LOCKED (6).
                // Deadlock and serialization failures (40P01, 40001) are
                // transient too: retrying the transaction succeeds.
                code.starts_with("08")
                    || code.starts_with("57P0")
                    || code == "40P01"
                    || code == "40001"
                    || code == "5"
                    || code == "6"
            }
            _ => false,
        };
        if unavailable {
            StoreError::Unavailable(e)
        } else {
            StoreError::Database(e)
        }
    }
}

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Result of creating a run.
#[derive(Debug)]
pub enum CreateOutcome {
    /// A new run was stored.
    Created(Run),
    /// The idempotency key was seen before with the same request.
    Existing(Box<RunDetail>),
    /// The idempotency key was seen before with a different request.
    Conflict,
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

/// Result of finishing a claimed job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The transition was recorded.
    Recorded,
    /// The claim was no longer valid (lease lost, run cancelled); nothing changed.
    Stale,
}

/// Jobs by state, for tests, benchmarks and (later) metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Waiting for an earlier step.
    pub waiting: i64,
    /// Claimable now or after a retry delay.
    pub queued: i64,
    /// Leased by a worker.
    pub running: i64,
    /// Dead-lettered.
    pub dead: i64,
}

/// An event about to be inserted.
struct NewEvent<'a> {
    run_id: &'a str,
    event_type: &'static str,
    step_index: Option<i64>,
    attempt: Option<i64>,
    message: Option<String>,
    data: Option<Value>,
}

impl<'a> NewEvent<'a> {
    fn run(run_id: &'a str, event_type: &'static str) -> Self {
        Self {
            run_id,
            event_type,
            step_index: None,
            attempt: None,
            message: None,
            data: None,
        }
    }

    fn step(run_id: &'a str, event_type: &'static str, step_index: i64, attempt: i64) -> Self {
        Self {
            step_index: Some(step_index),
            attempt: Some(attempt),
            ..Self::run(run_id, event_type)
        }
    }

    fn message(mut self, message: impl Into<String>) -> Self {
        self.message = Some(message.into());
        self
    }

    fn data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }
}

/// What finishing a claimed job needs, even when its payload cannot be read.
struct JobRef {
    id: i64,
    attempt: i64,
    max_attempts: i64,
    run_id: String,
    step_index: i64,
    kind: String,
}

impl JobRef {
    fn of(job: &ClaimedJob) -> Self {
        Self {
            id: job.id,
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            run_id: job.run_id.to_string(),
            step_index: job.step_index,
            kind: job.step.kind().to_string(),
        }
    }

    fn from_row(row: &AnyRow) -> Result<Self> {
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

/// The migrations of one backend, embedded in the binary, in order.
fn migration_sources(backend: DbBackend) -> [(i64, &'static str, &'static str); 3] {
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
                false,
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

/// Placeholders `$from, $from+1, …` for `n` values.
fn placeholders(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn json_text(v: &Value) -> String {
    v.to_string()
}

fn parse_json(s: &str, what: &str) -> Result<Value> {
    serde_json::from_str(s).map_err(|_| StoreError::Corrupt(format!("{what} is not JSON")))
}

fn parse_uuid(s: &str) -> Result<Uuid> {
    Uuid::parse_str(s).map_err(|_| StoreError::Corrupt("run id is not a uuid".into()))
}

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: DbBackend,
}

impl Store {
    /// Opens a pool to the configured database. For SQLite, creates the file
    /// (and its directory) if needed and switches it to WAL.
    pub async fn connect(db: &DatabaseSettings, max_connections: u32) -> Result<Self> {
        sqlx::any::install_default_drivers();
        if db.backend == DbBackend::Sqlite
            && let Some(path) = sqlite_path(db.url.expose())
            && let Some(dir) = std::path::Path::new(&path).parent()
        {
            std::fs::create_dir_all(dir).map_err(|e| StoreError::Unavailable(e.into()))?;
        }
        let backend = db.backend;
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == DbBackend::Sqlite {
                        sqlx::query("PRAGMA busy_timeout = 10000")
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect(db.url.expose())
            .await?;
        if backend == DbBackend::Sqlite {
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
        }
        Ok(Self { pool, backend })
    }

    /// Which backend this store uses.
    pub fn backend(&self) -> DbBackend {
        self.backend
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    /// Applies pending migrations. Idempotent; concurrent runs serialise on a lock.
    pub async fn migrate(&self) -> Result<Vec<i64>> {
        let migrator = migrator(self.backend);
        let before = self.schema_version().await.unwrap_or(0);
        migrator.run(&self.pool).await?;
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
                .fetch_one(&self.pool)
                .await;
        match row {
            Ok(row) => Ok(row.try_get::<Option<i64>, _>("v")?.unwrap_or(0)),
            Err(sqlx::Error::Database(_)) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Fails unless the schema is fully migrated: processes that only read and
    /// write data never apply DDL themselves outside local mode.
    pub async fn ensure_schema(&self) -> Result<()> {
        let found = self.schema_version().await?;
        let expected = self.expected_schema_version();
        if found < expected {
            return Err(StoreError::SchemaBehind { found, expected });
        }
        Ok(())
    }

    /// A cheap round trip, for readiness.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn begin(&self) -> Result<Transaction<'static, Any>> {
        Ok(self.pool.begin().await?)
    }

    async fn insert_events(
        tx: &mut Transaction<'static, Any>,
        events: &[NewEvent<'_>],
        now: i64,
    ) -> Result<()> {
        for chunk in events.chunks(100) {
            let values: Vec<String> = (0..chunk.len())
                .map(|i| format!("({})", placeholders(i * 7 + 1, 7)))
                .collect();
            let sql = format!(
                "INSERT INTO run_events (run_id, event_type, step_index, attempt, message, data, created_at) VALUES {}",
                values.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for e in chunk {
                q = q
                    .bind(e.run_id)
                    .bind(e.event_type)
                    .bind(e.step_index)
                    .bind(e.attempt)
                    .bind(e.message.clone())
                    .bind(e.data.as_ref().map(json_text))
                    .bind(now);
            }
            q.execute(&mut **tx).await?;
        }
        Ok(())
    }

    /// Stores a new run and queues its first step, honouring the idempotency key.
    pub async fn create_run(&self, new: &NewRun, now: i64) -> Result<CreateOutcome> {
        let id = Uuid::now_v7();
        let id_text = id.to_string();
        let steps_text = serde_json::to_string(&new.steps)
            .map_err(|_| StoreError::Corrupt("steps do not serialise".into()))?;
        let mut tx = self.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO runs (id, status, input, steps, step_count, idempotency_key, request_hash, \
             correlation_id, created_at, updated_at) VALUES ($1, 'queued', $2, $3, $4, $5, $6, $7, $8, $8) \
             ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
        )
        .bind(&id_text)
        .bind(json_text(&new.input))
        .bind(&steps_text)
        .bind(new.steps.len() as i64)
        .bind(new.idempotency_key.as_deref())
        .bind(&new.request_hash)
        .bind(&new.correlation_id)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        if inserted.is_none() {
            tx.rollback().await?;
            return self.existing_for_key(new).await;
        }

        let values: Vec<String> = (0..new.steps.len())
            .map(|i| format!("({})", placeholders(i * 9 + 1, 9)))
            .collect();
        let sql = format!(
            "INSERT INTO jobs (run_id, correlation_id, step_index, step_count, payload, state, \
             max_attempts, run_at, created_at) VALUES {}",
            values.join(", ")
        );
        let payloads: Vec<String> = new
            .steps
            .iter()
            .map(|s| serde_json::to_string(s).unwrap_or_default())
            .collect();
        let mut q = sqlx::query(&sql);
        for (i, payload) in payloads.iter().enumerate() {
            q = q
                .bind(&id_text)
                .bind(&new.correlation_id)
                .bind(i as i64)
                .bind(new.steps.len() as i64)
                .bind(payload)
                .bind(if i == 0 { "queued" } else { "waiting" })
                .bind(new.max_attempts)
                .bind(now)
                .bind(now);
        }
        q.execute(&mut *tx).await?;
        Self::insert_events(
            &mut tx,
            &[NewEvent::run(&id_text, "run.queued")
                .data(serde_json::json!({"steps": new.steps.len()}))],
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(CreateOutcome::Created(Run {
            id,
            status: RunStatus::Queued,
            correlation_id: new.correlation_id.clone(),
            input: new.input.clone(),
            steps: new.steps.clone(),
            output: None,
            error: None,
            created_at: now,
            updated_at: now,
            started_at: None,
            finished_at: None,
        }))
    }

    async fn existing_for_key(&self, new: &NewRun) -> Result<CreateOutcome> {
        let row = sqlx::query("SELECT id, request_hash FROM runs WHERE idempotency_key = $1")
            .bind(new.idempotency_key.as_deref())
            .fetch_optional(&self.pool)
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

    fn run_from_row(row: &AnyRow) -> Result<Run> {
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

    const RUN_COLUMNS: &'static str = "id, status, correlation_id, input, steps, output, error, \
         created_at, updated_at, started_at, finished_at";

    /// A run with the state of each step, or `None`.
    pub async fn get_run(&self, id: Uuid) -> Result<Option<RunDetail>> {
        let id_text = id.to_string();
        let Some(row) = sqlx::query(&format!(
            "SELECT {} FROM runs WHERE id = $1",
            Self::RUN_COLUMNS
        ))
        .bind(&id_text)
        .fetch_optional(&self.pool)
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
        .fetch_all(&self.pool)
        .await?;
        let results =
            sqlx::query("SELECT step_index, output, attempt FROM step_results WHERE run_id = $1")
                .bind(&id_text)
                .fetch_all(&self.pool)
                .await?;
        let dead =
            sqlx::query("SELECT step_index, attempts, last_error FROM dead_jobs WHERE run_id = $1")
                .bind(&id_text)
                .fetch_all(&self.pool)
                .await?;

        let mut steps = StepState::all(&run.steps, |_| StepStatus::Skipped);
        let slot = |steps: &mut Vec<StepState>, index: i64| -> Option<usize> {
            usize::try_from(index).ok().filter(|i| *i < steps.len())
        };
        for row in &jobs {
            let Some(i) = slot(&mut steps, row.try_get("step_index")?) else {
                continue;
            };
            let state: String = row.try_get("state")?;
            steps[i].status = match state.as_str() {
                "waiting" => StepStatus::Pending,
                "queued" => StepStatus::Queued,
                _ => StepStatus::Running,
            };
            steps[i].attempts = row.try_get("attempt")?;
            steps[i].error = row.try_get("last_error")?;
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
        Ok(Some(RunDetail { run, steps }))
    }

    /// Runs, newest first, filtered and paged by id.
    pub async fn list_runs(&self, filter: &RunFilter) -> Result<Vec<Run>> {
        let mut sql = format!("SELECT {} FROM runs", Self::RUN_COLUMNS);
        let mut clauses = Vec::new();
        let mut n = 0;
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
        if let Some(status) = filter.status {
            q = q.bind(status.as_str());
        }
        if let Some(before) = filter.before {
            q = q.bind(before.to_string());
        }
        q.bind(filter.limit)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(Self::run_from_row)
            .collect()
    }

    /// Events of a run in order, after event id `after`.
    pub async fn list_events(&self, run_id: Uuid, after: i64, limit: i64) -> Result<Vec<RunEvent>> {
        let rows = sqlx::query(
            "SELECT id, event_type, step_index, attempt, message, data, created_at FROM run_events \
             WHERE run_id = $1 AND id > $2 ORDER BY id LIMIT $3",
        )
        .bind(run_id.to_string())
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(RunEvent {
                    id: row.try_get("id")?,
                    run_id,
                    event_type: row.try_get("event_type")?,
                    step_index: row.try_get("step_index")?,
                    attempt: row.try_get("attempt")?,
                    message: row.try_get("message")?,
                    data: row
                        .try_get::<Option<String>, _>("data")?
                        .map(|d: String| parse_json(&d, "event data"))
                        .transpose()?,
                    created_at: row.try_get("created_at")?,
                })
            })
            .collect()
    }

    /// Whether a run exists.
    pub async fn run_exists(&self, id: Uuid) -> Result<bool> {
        Ok(sqlx::query("SELECT 1 FROM runs WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    /// Cancels a queued or running run and drops its pending jobs. A step in
    /// flight finishes on its worker but its result is discarded (its job is gone).
    pub async fn cancel_run(&self, id: Uuid, now: i64) -> Result<CancelOutcome> {
        // A deadlock victim is retried: it only means a worker touched the
        // same run at the same moment.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.try_cancel_run(id, now).await {
                Err(StoreError::Unavailable(sqlx::Error::Database(db)))
                    if attempt < 4 && matches!(db.code().as_deref(), Some("40P01" | "40001")) =>
                {
                    tokio::time::sleep(Duration::from_millis(10 * attempt)).await;
                }
                other => return other,
            }
        }
    }

    async fn try_cancel_run(&self, id: Uuid, now: i64) -> Result<CancelOutcome> {
        let id_text = id.to_string();
        let mut tx = self.begin().await?;
        // Jobs before the run, the order every worker path locks them in, so
        // a cancel and a completion never wait on each other in a cycle.
        let dropped = sqlx::query("DELETE FROM jobs WHERE run_id = $1")
            .bind(&id_text)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        let updated = sqlx::query(
            "UPDATE runs SET status = 'cancelled', finished_at = $2, updated_at = $2 \
             WHERE id = $1 AND status IN ('queued', 'running') RETURNING id",
        )
        .bind(&id_text)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        if updated.is_none() {
            // Nothing to cancel: the rollback also restores any job deleted above.
            tx.rollback().await?;
            let status = sqlx::query("SELECT status FROM runs WHERE id = $1")
                .bind(&id_text)
                .fetch_optional(&self.pool)
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
        Self::insert_events(
            &mut tx,
            &[NewEvent::run(&id_text, "run.cancelled")
                .message("cancelled on request")
                .data(serde_json::json!({"dropped_jobs": dropped}))],
            now,
        )
        .await?;
        tx.commit().await?;
        match self.get_run(id).await? {
            Some(detail) => Ok(CancelOutcome::Cancelled(Box::new(detail))),
            None => Ok(CancelOutcome::NotFound),
        }
    }

    /// Claims up to `limit` claimable jobs for `worker`, leasing them until
    /// `now + lease`, and records the transitions.
    pub async fn claim(
        &self,
        worker: &str,
        limit: i64,
        now: i64,
        lease: Duration,
    ) -> Result<Vec<ClaimedJob>> {
        let lease_until = now + lease.as_millis() as i64;
        let returning = "RETURNING jobs.id, jobs.run_id, jobs.correlation_id, jobs.step_index, \
                         jobs.step_count, jobs.payload, jobs.attempt, jobs.max_attempts, jobs.run_at";
        let sql = match self.backend {
            DbBackend::Postgres => format!(
                "UPDATE jobs SET state = 'running', attempt = jobs.attempt + 1, lease_expires_at = $2, locked_by = $3 \
                 FROM (SELECT id FROM jobs WHERE state = 'queued' AND run_at <= $1 ORDER BY run_at, id \
                 LIMIT $4 FOR UPDATE SKIP LOCKED) claimable WHERE jobs.id = claimable.id {returning}"
            ),
            DbBackend::Sqlite => format!(
                "UPDATE jobs SET state = 'running', attempt = attempt + 1, lease_expires_at = $2, locked_by = $3 \
                 WHERE id IN (SELECT id FROM jobs WHERE state = 'queued' AND run_at <= $1 ORDER BY run_at, id \
                 LIMIT $4) {returning}"
            ),
        };
        let mut tx = self.begin().await?;
        let rows = sqlx::query(&sql)
            .bind(now)
            .bind(lease_until)
            .bind(worker)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        if rows.is_empty() {
            tx.commit().await?;
            return Ok(Vec::new());
        }
        let mut jobs = Vec::with_capacity(rows.len());
        let mut unreadable = Vec::new();
        for row in &rows {
            let payload: String = row.try_get("payload")?;
            // One step this build cannot read (written by a newer version
            // during a rolling upgrade, or damaged) must not block the rest.
            let Ok(step) = serde_json::from_str::<StepSpec>(&payload) else {
                unreadable.push(JobRef::from_row(row)?);
                continue;
            };
            jobs.push(ClaimedJob {
                id: row.try_get("id")?,
                run_id: parse_uuid(&row.try_get::<String, _>("run_id")?)?,
                correlation_id: row.try_get("correlation_id")?,
                step_index: row.try_get("step_index")?,
                step_count: row.try_get("step_count")?,
                step,
                attempt: row.try_get("attempt")?,
                max_attempts: row.try_get("max_attempts")?,
                available_at: row.try_get("run_at")?,
            });
        }
        jobs.sort_by_key(|j| j.id);
        if jobs.is_empty() {
            tx.commit().await?;
            self.set_aside_unreadable(&unreadable, now).await?;
            return Ok(jobs);
        }
        let run_ids: Vec<String> = jobs.iter().map(|j| j.run_id.to_string()).collect();
        let start_sql = format!(
            "UPDATE runs SET status = 'running', started_at = $1, updated_at = $1 \
             WHERE status = 'queued' AND id IN ({}) RETURNING id",
            placeholders(2, run_ids.len())
        );
        let started = sqlx::query(&start_sql);
        let started = run_ids
            .iter()
            .fold(started.bind(now), |q, id| q.bind(id))
            .fetch_all(&mut *tx)
            .await?;
        let started_ids: Vec<String> = started
            .iter()
            .map(|r| r.try_get::<String, _>("id"))
            .collect::<Result<_, _>>()?;
        let mut events: Vec<NewEvent<'_>> = started_ids
            .iter()
            .map(|id| NewEvent::run(id, "run.started"))
            .collect();
        for (job, run_id) in jobs.iter().zip(&run_ids) {
            events.push(
                NewEvent::step(run_id, "step.started", job.step_index, job.attempt)
                    .data(serde_json::json!({"kind": job.step.kind()})),
            );
        }
        Self::insert_events(&mut tx, &events, now).await?;
        tx.commit().await?;
        self.set_aside_unreadable(&unreadable, now).await?;
        Ok(jobs)
    }

    /// Puts claimed jobs whose step this build cannot read back in the queue
    /// for a while (a newer worker may read them), spending an attempt each
    /// time, and dead-letters them once the attempts are used up.
    async fn set_aside_unreadable(&self, jobs: &[JobRef], now: i64) -> Result<()> {
        const LATER_MS: i64 = 30_000;
        for job in jobs {
            let message = format!(
                "this worker cannot read the `{}` step (written by a newer version, or damaged)",
                job.kind
            );
            if job.attempt < job.max_attempts {
                let event = NewEvent::step(
                    &job.run_id,
                    "step.retry_scheduled",
                    job.step_index,
                    job.attempt,
                )
                .message(message.clone())
                .data(serde_json::json!({"delay_ms": LATER_MS}));
                self.requeue(job, now + LATER_MS, 0, Some(&message), event, now)
                    .await?;
            } else {
                self.dead_letter_ref(job, &message, now).await?;
            }
        }
        Ok(())
    }

    /// Records a step's output and moves the run on: queues the next step, or
    /// marks the run succeeded after the last one.
    pub async fn complete(&self, job: &ClaimedJob, output: &Value, now: i64) -> Result<Finish> {
        let run_id = job.run_id.to_string();
        let mut tx = self.begin().await?;
        if !Self::take_job(&mut tx, job).await? {
            tx.rollback().await?;
            return Ok(Finish::Stale);
        }
        sqlx::query(
            "INSERT INTO step_results (run_id, step_index, output, attempt, job_id, finished_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (run_id, step_index) DO NOTHING",
        )
        .bind(&run_id)
        .bind(job.step_index)
        .bind(json_text(output))
        .bind(job.attempt)
        .bind(job.id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let mut events = vec![NewEvent::step(
            &run_id,
            "step.succeeded",
            job.step_index,
            job.attempt,
        )];
        if job.step_index + 1 < job.step_count {
            sqlx::query(
                "UPDATE jobs SET state = 'queued', run_at = $3 \
                 WHERE run_id = $1 AND step_index = $2 AND state = 'waiting'",
            )
            .bind(&run_id)
            .bind(job.step_index + 1)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query(
                "UPDATE runs SET status = 'succeeded', output = $2, finished_at = $3, updated_at = $3 \
                 WHERE id = $1 AND status = 'running'",
            )
            .bind(&run_id)
            .bind(json_text(output))
            .bind(now)
            .execute(&mut *tx)
            .await?;
            events.push(NewEvent::run(&run_id, "run.succeeded"));
        }
        Self::insert_events(&mut tx, &events, now).await?;
        tx.commit().await?;
        Ok(Finish::Recorded)
    }

    /// Deletes the claimed job if the claim is still valid.
    async fn take_job(tx: &mut Transaction<'static, Any>, job: &ClaimedJob) -> Result<bool> {
        Ok(sqlx::query(
            "DELETE FROM jobs WHERE id = $1 AND attempt = $2 AND state = 'running' RETURNING id",
        )
        .bind(job.id)
        .bind(job.attempt)
        .fetch_optional(&mut **tx)
        .await?
        .is_some())
    }

    /// Puts a failed delivery back in the queue, claimable from `run_at`.
    pub async fn retry(
        &self,
        job: &ClaimedJob,
        error: &str,
        run_at: i64,
        now: i64,
    ) -> Result<Finish> {
        let job = JobRef::of(job);
        let event = NewEvent::step(
            &job.run_id,
            "step.retry_scheduled",
            job.step_index,
            job.attempt,
        )
        .message(error)
        .data(serde_json::json!({"delay_ms": (run_at - now).max(0)}));
        self.requeue(&job, run_at, 0, Some(error), event, now).await
    }

    /// Puts a claimed job back to `queued` if the claim is still valid, taking
    /// `refund` off its attempt count, and records `event` with it.
    async fn requeue(
        &self,
        job: &JobRef,
        run_at: i64,
        refund: i64,
        error: Option<&str>,
        event: NewEvent<'_>,
        now: i64,
    ) -> Result<Finish> {
        let mut tx = self.begin().await?;
        let n = sqlx::query(
            "UPDATE jobs SET state = 'queued', attempt = attempt - $5, run_at = $3, \
             last_error = COALESCE($4, last_error), lease_expires_at = NULL, locked_by = NULL \
             WHERE id = $1 AND attempt = $2 AND state = 'running'",
        )
        .bind(job.id)
        .bind(job.attempt)
        .bind(run_at)
        .bind(error)
        .bind(refund)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n == 0 {
            tx.rollback().await?;
            return Ok(Finish::Stale);
        }
        Self::insert_events(&mut tx, &[event], now).await?;
        tx.commit().await?;
        Ok(Finish::Recorded)
    }

    /// Moves a job that cannot succeed to the dead-letter table and fails its run.
    pub async fn dead_letter(&self, job: &ClaimedJob, error: &str, now: i64) -> Result<Finish> {
        self.dead_letter_ref(&JobRef::of(job), error, now).await
    }

    async fn dead_letter_ref(&self, job: &JobRef, error: &str, now: i64) -> Result<Finish> {
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
        sqlx::query(
            "INSERT INTO dead_jobs (id, run_id, step_index, payload, attempts, last_error, created_at, failed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(job.id)
        .bind(&run_id)
        .bind(job.step_index)
        .bind(taken.try_get::<String, _>("payload")?)
        .bind(job.attempt)
        .bind(error)
        .bind(taken.try_get::<i64, _>("created_at")?)
        .bind(now)
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
        sqlx::query(
            "UPDATE runs SET status = 'failed', error = $2, finished_at = $3, updated_at = $3 \
             WHERE id = $1 AND status IN ('queued', 'running')",
        )
        .bind(&run_id)
        .bind(&reason)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        Self::insert_events(
            &mut tx,
            &[
                NewEvent::step(&run_id, "step.dead_lettered", job.step_index, job.attempt)
                    .message(error),
                NewEvent::run(&run_id, "run.failed").message(reason.clone()),
            ],
            now,
        )
        .await?;
        tx.commit().await?;
        Ok(Finish::Recorded)
    }

    /// Pushes a running job's lease out to `until`; false when the claim is lost.
    pub async fn extend_lease(&self, job: &ClaimedJob, until: i64) -> Result<bool> {
        Ok(sqlx::query(
            "UPDATE jobs SET lease_expires_at = $3 WHERE id = $1 AND attempt = $2 AND state = 'running'",
        )
        .bind(job.id)
        .bind(job.attempt)
        .bind(until)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1)
    }

    /// Gives an unfinished job back at shutdown without spending an attempt.
    pub async fn release(&self, job: &ClaimedJob, now: i64) -> Result<Finish> {
        let job = JobRef::of(job);
        let event = NewEvent::step(&job.run_id, "step.released", job.step_index, job.attempt)
            .message("worker shutting down; job returned to the queue");
        self.requeue(&job, now, 1, None, event, now).await
    }

    /// Returns jobs whose lease expired (their worker died or hung) to the
    /// queue, and dead-letters those that have used all their attempts.
    /// Returns how many jobs were rescued or dead-lettered.
    pub async fn rescue_expired(&self, now: i64) -> Result<u64> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query(
            "UPDATE jobs SET state = 'queued', run_at = $1, lease_expires_at = NULL, locked_by = NULL, \
             last_error = 'lease expired before the step finished (worker lost)' \
             WHERE state = 'running' AND lease_expires_at < $1 AND attempt < max_attempts \
             RETURNING run_id, step_index, attempt",
        )
        .bind(now)
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
                        "step.lease_expired",
                        row.try_get("step_index")?,
                        row.try_get("attempt")?,
                    )
                    .message("lease expired; the step will be delivered again"),
                );
            }
            Self::insert_events(&mut tx, &events, now).await?;
        }
        tx.commit().await?;

        let exhausted = sqlx::query(
            "SELECT id, run_id, correlation_id, step_index, step_count, payload, attempt, max_attempts, run_at FROM jobs \
             WHERE state = 'running' AND lease_expires_at < $1 AND attempt >= max_attempts",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        for row in &exhausted {
            let job = JobRef::from_row(row)?;
            if self
                .dead_letter_ref(&job, "lease expired on the last attempt (worker lost)", now)
                .await?
                == Finish::Recorded
            {
                count += 1;
            }
        }
        Ok(count)
    }

    /// The run's input and the outputs recorded so far, for templates.
    pub async fn run_context(&self, run_id: Uuid) -> Result<(Value, Vec<(usize, Value)>)> {
        let id = run_id.to_string();
        let row = sqlx::query("SELECT input FROM runs WHERE id = $1")
            .bind(&id)
            .fetch_one(&self.pool)
            .await?;
        let input = parse_json(&row.try_get::<String, _>("input")?, "run input")?;
        let outputs = sqlx::query(
            "SELECT step_index, output FROM step_results WHERE run_id = $1 ORDER BY step_index",
        )
        .bind(&id)
        .fetch_all(&self.pool)
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

    /// Jobs by state.
    pub async fn queue_counts(&self) -> Result<QueueCounts> {
        let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
            .fetch_all(&self.pool)
            .await?;
        let by_state: HashMap<String, i64> = rows
            .iter()
            .map(|r| Ok((r.try_get::<String, _>("state")?, r.try_get::<i64, _>("n")?)))
            .collect::<Result<_>>()?;
        let dead: i64 = sqlx::query("SELECT COUNT(*) AS n FROM dead_jobs")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        Ok(QueueCounts {
            waiting: by_state.get("waiting").copied().unwrap_or(0),
            queued: by_state.get("queued").copied().unwrap_or(0),
            running: by_state.get("running").copied().unwrap_or(0),
            dead,
        })
    }

    /// Runs by status.
    pub async fn run_counts(&self) -> Result<HashMap<RunStatus, i64>> {
        let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM runs GROUP BY status")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|r| {
                let s: String = r.try_get("status")?;
                let status = RunStatus::parse(&s).ok_or_else(|| StoreError::Corrupt(s.clone()))?;
                Ok((status, r.try_get::<i64, _>("n")?))
            })
            .collect()
    }

    /// Jobs by state with the age of the oldest (ms): for `queued` since it
    /// became claimable, for `dead` since it failed, otherwise since creation.
    pub async fn queue_stats(&self, now: i64) -> Result<Vec<(String, i64, i64)>> {
        let mut rows = sqlx::query(
            "SELECT state, COUNT(*) AS n, MIN(CASE WHEN state = 'queued' THEN run_at ELSE created_at END) AS oldest \
             FROM jobs GROUP BY state",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            let oldest: Option<i64> = r.try_get("oldest")?;
            Ok((r.try_get::<String, _>("state")?, r.try_get::<i64, _>("n")?, oldest.map_or(0, |o| (now - o).max(0))))
        })
        .collect::<Result<Vec<_>>>()?;
        let dead = sqlx::query("SELECT COUNT(*) AS n, MIN(failed_at) AS oldest FROM dead_jobs")
            .fetch_one(&self.pool)
            .await?;
        let oldest: Option<i64> = dead.try_get("oldest")?;
        rows.push((
            "dead".to_string(),
            dead.try_get("n")?,
            oldest.map_or(0, |o| (now - o).max(0)),
        ));
        for state in ["waiting", "queued", "running"] {
            if !rows.iter().any(|(s, _, _)| s == state) {
                rows.push((state.to_string(), 0, 0));
            }
        }
        Ok(rows)
    }

    /// Records that `worker` is alive with `in_flight` jobs.
    pub async fn heartbeat(&self, worker: &str, in_flight: i64, now: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO worker_heartbeats (worker_id, started_at, last_beat_at, in_flight) VALUES ($1, $2, $2, $3) \
             ON CONFLICT (worker_id) DO UPDATE SET last_beat_at = $2, in_flight = $3",
        )
        .bind(worker)
        .bind(now)
        .bind(in_flight)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Removes `worker`'s heartbeat (clean stop) and any older than `stale_before`.
    pub async fn forget_worker(&self, worker: &str, stale_before: i64) -> Result<()> {
        sqlx::query("DELETE FROM worker_heartbeats WHERE worker_id = $1 OR last_beat_at < $2")
            .bind(worker)
            .bind(stale_before)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Time (ms) of the freshest worker heartbeat, if any worker ever beat.
    pub async fn last_heartbeat(&self) -> Result<Option<i64>> {
        Ok(
            sqlx::query("SELECT MAX(last_beat_at) AS t FROM worker_heartbeats")
                .fetch_one(&self.pool)
                .await?
                .try_get("t")?,
        )
    }

    /// How many results are recorded for one step (the exactly-once check).
    pub async fn result_count(&self, run_id: Uuid, step_index: i64) -> Result<i64> {
        Ok(sqlx::query(
            "SELECT COUNT(*) AS n FROM step_results WHERE run_id = $1 AND step_index = $2",
        )
        .bind(run_id.to_string())
        .bind(step_index)
        .fetch_one(&self.pool)
        .await?
        .try_get("n")?)
    }
}

/// The file path of a `sqlite:` URL, if it names a file.
fn sqlite_path(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    (!path.is_empty() && path != ":memory:").then(|| path.to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_paths_are_extracted_from_urls() {
        assert_eq!(
            sqlite_path("sqlite://var/vm/x.db?mode=rwc").as_deref(),
            Some("var/vm/x.db")
        );
        assert_eq!(
            sqlite_path("sqlite:///abs/x.db").as_deref(),
            Some("/abs/x.db")
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
    }

    /// Without `ignore_missing`, rolling the app back to an older image would
    /// fail its migration Job and keep the bad release serving.
    #[tokio::test]
    async fn an_older_build_migrates_a_newer_schema_as_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::config::DatabaseSettings {
            url: crate::config::Secret::new(format!(
                "sqlite://{}/m.db?mode=rwc",
                dir.path().display()
            )),
            backend: DbBackend::Sqlite,
            embedded: false,
        };
        let store = Store::connect(&db, 1).await.unwrap();
        store.migrate().await.unwrap();
        migrator_upto(DbBackend::Sqlite, 1)
            .run(&store.pool)
            .await
            .unwrap();
        assert_eq!(
            store.schema_version().await.unwrap(),
            store.expected_schema_version()
        );
    }

    #[test]
    fn placeholders_are_numbered_from_the_given_start() {
        assert_eq!(placeholders(3, 3), "$3, $4, $5");
    }
}
