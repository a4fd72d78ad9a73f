//! The durable store: runs, step results, events and the job queue, on SQLite or
//! PostgreSQL behind one type.
//!
//! Both backends run the same SQL through sqlx's `Any` driver (JSON as text,
//! times as epoch milliseconds, `$N` placeholders, which SQLite accepts too).
//! Batches travel as one JSON text parameter, unpacked in SQL
//! (`jsonb_to_recordset` on PostgreSQL, `json_each` on SQLite), so a statement's
//! text never depends on the batch size and stays a cached prepared statement;
//! docs/architecture.md says why this beat moving to the native drivers.
//! Dialect branches are few: the claim (`FOR UPDATE SKIP LOCKED` and one
//! data-modifying CTE on PostgreSQL), the batched completion (one CTE on
//! PostgreSQL, a few statements in one transaction on SQLite), and the clock.
//!
//! **Time that decides ownership comes from the database.** Lease expiry,
//! `run_at`, rescue, heartbeats and nonce windows are stamped and compared with
//! the database's clock ([`Store::now_sql`]: `now()` on PostgreSQL,
//! `unixepoch('subsec')` on SQLite), never the process's, so a worker whose
//! clock runs ahead cannot take over a healthy worker's job.
//!
//! Queue invariants:
//! - a job is `waiting` (an earlier step has not finished), `queued` (claimable
//!   from `run_at`), `running` (leased until `lease_expires_at`) or
//!   `awaiting_approval` (an approval step waiting, since `run_at`, for a
//!   decision: never claimed, no lease); finished jobs
//!   leave the table, which keeps the claim index free of dead rows;
//! - every claim bumps `attempt`, and every completion, retry, release or
//!   dead-letter requires the attempt it claimed (a fencing token), so a worker
//!   whose lease expired cannot touch a newer delivery;
//! - a step's result is inserted under the `(run_id, step_index)` primary key
//!   in the same transaction that deletes the job, so it is recorded once;
//! - every path that touches both locks jobs before the run, so a cancel and a
//!   completion never wait on each other in a cycle;
//! - on SQLite every write transaction starts with a write statement, so it
//!   takes the write lock up front and never fails on a lock upgrade.
//!
//! Files: [`migrate`] (schema), [`events`] (the event log), [`runs`] (create,
//! read, cancel), [`group_commit`] (batched run creation), [`queue`] (claim,
//! complete, retry, rescue, leases, maintenance), [`workers`] (heartbeats),
//! [`feed`] (the event log read by live streams),
//! [`security`] (audit trail, webhook nonces, grants), [`backup`] (logical
//! snapshot and restore, either backend), [`approvals`] (approval steps:
//! waiting without a lease, decisions, expiry, the inbox), [`writes`]
//! (whether the database takes writes, for readiness), [`error`] (the
//! store's errors and which of them are unavailability), [`transactions`]
//! (the ways to begin a transaction, and cleanup writes that give up
//! quickly on a held lock).

use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Row};
use uuid::Uuid;

use crate::config::{DatabaseSettings, DbBackend};

pub mod approvals;
pub mod backup;
mod error;
pub mod events;
pub mod feed;
pub mod group_commit;
pub mod migrate;
pub mod queue;
pub mod runs;
pub mod security;
mod sqlite_writer;
pub mod tenancy;
pub mod transactions;
pub mod usage;
pub mod usage_report;
pub mod usage_verify;
pub mod workers;
mod writes;

pub use error::StoreError;
#[cfg(test)]
use error::sqlite_state_error;
pub use queue::{Completion, Finish, QueueCounts, QueueStat};
pub use runs::{CancelOutcome, CreateOutcome};
pub use tenancy::Scope;
pub use transactions::CLEANUP_WAIT;
use transactions::{SQLITE_BUSY_TIMEOUT, busy_timeout};
pub use usage::{QuotaRefusal, UsageRecord};

pub(crate) type Result<T, E = StoreError> = std::result::Result<T, E>;

pub(crate) fn json_text(v: &serde_json::Value) -> String {
    v.to_string()
}

pub(crate) fn parse_json(s: &str, what: &str) -> Result<serde_json::Value> {
    serde_json::from_str(s).map_err(|_| StoreError::Corrupt(format!("{what} is not JSON")))
}

pub(crate) fn parse_uuid(s: &str) -> Result<Uuid> {
    Uuid::parse_str(s).map_err(|_| StoreError::Corrupt("run id is not a uuid".into()))
}

/// The database clock in ms since the Unix epoch, as an SQL expression.
const PG_NOW: &str = "(EXTRACT(EPOCH FROM now()) * 1000)::BIGINT";
/// SQLite ≥ 3.42 (the bundled library is newer) has sub-second `unixepoch`:
/// its integer milliseconds divided by 1000.0, which times 1000 gives back
/// exactly (a test holds it to SQLite's own printed milliseconds).
const SQLITE_NOW: &str = "CAST(unixepoch('subsec') * 1000 AS INTEGER)";

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: DbBackend,
    creates: group_commit::Handle,
    usage: std::sync::Arc<usage::Shared>,
    /// Raised after a transaction that wrote events commits.
    events: feed::CommitSignal,
    /// Whether a write was refused for a full disk since the last probe.
    writes: std::sync::Arc<writes::WriteHealth>,
}

impl Store {
    /// Opens a pool of at most `max_connections` to the configured database.
    /// For SQLite, creates the file and its directory when missing (the URL
    /// asked for that file) and switches it to WAL. Starts the group-commit
    /// writer that batches concurrent [`Store::create_run`] calls.
    ///
    /// Errors: [`StoreError::SqliteFile`] naming the path when the file or its
    /// directory cannot be created; [`StoreError::Unavailable`] when the
    /// server cannot be reached.
    pub async fn connect(db: &DatabaseSettings, max_connections: u32) -> Result<Self> {
        let mut url = db.url.expose().to_string();
        if db.backend == DbBackend::Sqlite
            && let Some(path) = sqlite_path(&url)
        {
            prepare_sqlite_file(&path)?;
            ensure_sqlite_file(&path)?;
            // sqlx opens an existing file by default; the user named this file,
            // so create it (`mode=rwc`) unless the URL chose a mode itself.
            if !url.contains("mode=") {
                url.push(if url.contains('?') { '&' } else { '?' });
                url.push_str("mode=rwc");
            }
        }
        Self::open(db.backend, &url, max_connections).await
    }

    /// Like [`Store::connect`], but never creates anything: an SQLite
    /// database must already exist as a file, and is opened without the
    /// create flag whatever the URL's `mode=` says. For tools that only
    /// inspect a database (`usage verify`): pointed at a wrong path they
    /// must fail, not create an empty database and report that all agrees.
    ///
    /// Errors: [`StoreError::SqliteMissing`] naming the path when the file
    /// does not exist (or is not a file); otherwise as [`Store::connect`].
    pub async fn connect_existing(db: &DatabaseSettings, max_connections: u32) -> Result<Self> {
        let mut url = db.url.expose().to_string();
        if db.backend == DbBackend::Sqlite {
            let Some(path) = sqlite_path(&url) else {
                return Err(StoreError::SqliteMissing {
                    path: "(in memory)".into(),
                });
            };
            if !std::path::Path::new(&path).is_file() {
                return Err(StoreError::SqliteMissing { path });
            }
            ensure_sqlite_file(&path)?;
            url = without_create_mode(&url);
        }
        Self::open(db.backend, &url, max_connections).await
    }

    async fn open(backend: DbBackend, url: &str, max_connections: u32) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == DbBackend::Sqlite {
                        sqlx::query(&busy_timeout(SQLITE_BUSY_TIMEOUT))
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query("PRAGMA synchronous = NORMAL")
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .before_acquire(|conn, _| Box::pin(async move { Ok(reusable(conn)) }))
            .connect(url)
            .await?;
        if backend == DbBackend::Sqlite {
            sqlx::query("PRAGMA journal_mode = WAL")
                .execute(&pool)
                .await?;
        }
        let usage = std::sync::Arc::new(usage::Shared::default());
        let events = feed::CommitSignal::default();
        let sqlite_file = match backend {
            DbBackend::Sqlite => writer_file(&pool, url).await?,
            DbBackend::Postgres => None,
        };
        let writes = std::sync::Arc::new(writes::WriteHealth::default());
        let creates = group_commit::Handle::start(
            pool.clone(),
            backend,
            max_connections,
            usage.clone(),
            events.clone(),
            writes.clone(),
            sqlite_file.as_deref(),
        );
        Ok(Self {
            pool,
            backend,
            creates,
            usage,
            events,
            writes,
        })
    }

    /// Which backend this store uses.
    pub fn backend(&self) -> DbBackend {
        self.backend
    }

    /// Closes every connection: the pool's first, then the creation
    /// writer's own (SQLite's writer thread, or PostgreSQL's creation
    /// writer). SQLite's writer thread first checkpoints the whole WAL into
    /// the database file, so a stopped app leaves one self-contained file.
    /// (SQLite does that itself only when the connection that closes finds
    /// itself the last open; the pool closes connections that were in use
    /// as they come back, together, and about one stop in five of `serve`
    /// left 1.2 MB of WAL beside the file.) Creations after this fail.
    pub async fn close(&self) {
        self.pool.close().await;
        self.creates.close().await;
    }

    /// A cheap round trip, for readiness.
    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// The database's clock, ms since the Unix epoch: the clock every lease,
    /// `run_at`, heartbeat and nonce window is measured by.
    pub async fn db_now(&self) -> Result<i64> {
        let row = sqlx::query(&format!("SELECT {} AS t", self.now_sql()))
            .fetch_one(&self.pool)
            .await?;
        Ok(row.try_get("t")?)
    }

    /// The SQL expression of the database clock in ms since the epoch.
    pub(crate) fn now_sql(&self) -> &'static str {
        now_sql(self.backend)
    }

    /// `template` with every `{period}` replaced by the UTC month (`YYYY-MM`)
    /// of the database clock and every `{now}` by the database clock.
    pub(crate) fn sql(&self, template: &str) -> String {
        self.stamped(template, self.now_sql())
    }

    /// Like [`Store::sql`], but `{now}` is the instant bound as parameter
    /// `$n` (ms since the epoch; the database clock when it is NULL) and
    /// `{period}` its month. On SQLite every statement reads the clock
    /// anew, so a transaction that must stamp one instant everywhere (run
    /// creation: admission, `created_at`, ledger month, warnings) reads it
    /// once and binds it into the statements that follow.
    pub(crate) fn sql_at(&self, template: &str, n: usize) -> String {
        let at = format!("COALESCE(CAST(${n} AS BIGINT), {})", self.now_sql());
        self.stamped(template, &at)
    }

    /// `template` with `{now}` replaced by the instant expression `now` (ms
    /// since the epoch) and `{period}` by its UTC month.
    fn stamped(&self, template: &str, now: &str) -> String {
        template
            .replace("{period}", &usage::period_sql(self.backend, now))
            .replace("{now}", now)
    }

    pub(crate) fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

/// Whether a pooled connection may be handed out again: not while sqlx
/// still counts a transaction open on it. sqlx runs this as a connection
/// leaves the idle pool, after its ping, so a transaction dropped without a
/// commit has had its queued `ROLLBACK` run by then; a count above zero
/// means that `ROLLBACK` failed.
///
/// On SQLite that is what a full disk leaves behind: a `COMMIT` that fails
/// with `SQLITE_FULL` or `SQLITE_IOERR` (or a statement that fails so
/// without a statement journal) makes SQLite roll the whole transaction
/// back itself, sqlx keeps counting it, and its `ROLLBACK` on drop fails
/// ("no transaction is active") and is ignored. Reused, such a connection
/// opened its next "transaction" as `SAVEPOINT`, a rollback of that left
/// SQLite's transaction open with the write lock held, and every later
/// write of the process waited for that lock (busy timeout, then 408 or
/// 503) until restart. Closed instead, the pool opens a fresh connection;
/// closing also rolls back anything SQLite might still hold.
fn reusable(conn: &sqlx::AnyConnection) -> bool {
    use sqlx::Connection as _;
    let clean = !conn.is_in_transaction();
    if !clean {
        // At debug: under load on a full disk this is one line per refused
        // request (thousands a minute); the refusal itself is logged once
        // and shown by readiness (`store::writes`).
        tracing::debug!(
            "closing a database connection whose failed transaction could not be rolled back (on SQLite: a commit refused for a full disk or an I/O error)"
        );
    }
    clean
}

/// PostgreSQL: the body of a CTE that turns `synchronous_commit` off for the
/// statement's own implicit transaction (`set_config(…, true)` lasts until
/// its end), so that the statement commits without waiting for its WAL
/// flush, in one round trip instead of four (`BEGIN`, `SET LOCAL`, the
/// statement, `COMMIT`). The statement must read the CTE (`FROM …,
/// unflushed`): PostgreSQL skips a CTE nobody reads. Only for writes that a
/// server crash may lose safely: a lost claim or lease renewal is a
/// redelivery, which the fencing token makes safe.
pub(crate) const UNFLUSHED: &str =
    "SELECT set_config('synchronous_commit', 'off', true) AS unflushed";

/// Whether the file at `path` is empty (SQLite makes a database of it) or
/// starts with the SQLite header, `SQLite format 3\0`.
fn has_sqlite_header(path: &str) -> bool {
    use std::io::Read;
    let mut head = [0u8; 16];
    match std::fs::File::open(path) {
        Ok(mut f) => match f.read(&mut head) {
            Ok(0) => true,
            Ok(n) => n == 16 && &head == b"SQLite format 3\0",
            Err(_) => true,
        },
        // Let the driver say why it cannot be opened.
        Err(_) => true,
    }
}

/// Refuses a file at `path` that is neither empty nor an SQLite database:
/// every connection to it would fail, and the pool would report only an
/// unreachable database ("check network and credentials").
fn ensure_sqlite_file(path: &str) -> Result<()> {
    if has_sqlite_header(path) {
        Ok(())
    } else {
        Err(StoreError::SqliteFile {
            path: path.to_string(),
            reason: "it is not an SQLite database (check VM_DB_URL)".into(),
        })
    }
}

/// The database clock expression of `backend`.
pub(crate) fn now_sql(backend: DbBackend) -> &'static str {
    match backend {
        DbBackend::Postgres => PG_NOW,
        DbBackend::Sqlite => SQLITE_NOW,
    }
}

/// A JSON array parameter unpacked as rows: `jsonb_to_recordset` on
/// PostgreSQL, `json_each` + `json_extract` on SQLite, in array order.
pub(crate) fn recordset(backend: DbBackend, columns: &[(&str, &str)]) -> String {
    match backend {
        DbBackend::Postgres => {
            let cols: Vec<String> = columns.iter().map(|(n, t)| format!("{n} {t}")).collect();
            let names: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
            format!(
                "SELECT {} FROM jsonb_to_recordset($1::jsonb) AS r({})",
                names.join(", "),
                cols.join(", ")
            )
        }
        DbBackend::Sqlite => {
            let cols: Vec<String> = columns
                .iter()
                .map(|(n, _)| format!("json_extract(value, '$.{n}') AS {n}"))
                .collect();
            format!("SELECT {} FROM json_each($1) ORDER BY key", cols.join(", "))
        }
    }
}

/// Milliseconds of a duration, as the `BIGINT` the schema stores.
pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Creates the directory of an SQLite file and checks the file can be opened
/// for writing, so that a wrong path is reported with the OS's reason instead
/// of the driver's "database error".
fn prepare_sqlite_file(path: &str) -> Result<()> {
    let file = std::path::Path::new(path);
    let fail = |e: std::io::Error| StoreError::SqliteFile {
        path: path.to_string(),
        reason: e.to_string(),
    };
    if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .map_err(fail)?;
    Ok(())
}

/// `url` (an SQLite URL) opening read-write without creating: its `mode=`
/// parameter, if any, replaced by `mode=rw`.
fn without_create_mode(url: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut params: Vec<&str> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("mode="))
        .collect();
    params.push("mode=rw");
    format!("{base}?{}", params.join("&"))
}

/// The file path of a `sqlite:` URL, if it names a file: percent-decoded,
/// as sqlx decodes it to open the file (`a%20b/vm.db` is `a b/vm.db`), so the
/// directory and file made here are the ones the pool opens.
fn sqlite_path(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next()?;
    let path = percent_encoding::percent_decode_str(path)
        .decode_utf8()
        .ok()?
        .into_owned();
    (!path.is_empty() && path != ":memory:").then_some(path)
}

/// The file the SQLite run-creation writer thread opens: the main database
/// file the pool opened, as SQLite names it (`PRAGMA database_list`: the
/// path sqlx decoded from the URL, made absolute), so both open one file.
/// `None`, creation staying on the pool, for a database in memory and for a
/// URL with any parameter besides `mode=rw` / `mode=rwc`: another mode
/// (read-only, memory), another VFS (its own locking: the two connections
/// would not exclude each other and would corrupt the file), `immutable`,
/// a shared cache, … apply to the pool's connections only.
async fn writer_file(pool: &AnyPool, url: &str) -> Result<Option<String>> {
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let plain = query
        .split('&')
        .filter(|p| !p.is_empty())
        .all(|p| p == "mode=rw" || p == "mode=rwc");
    if !plain {
        return Ok(None);
    }
    let file: String = sqlx::query("SELECT file FROM pragma_database_list WHERE name = 'main'")
        .fetch_one(pool)
        .await?
        .try_get("file")?;
    Ok((!file.is_empty()).then_some(file))
}

/// A run of `steps` template steps for tenant `acme`, with `key` as its
/// idempotency key, for unit tests.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) fn test_new_run(key: Option<&str>, steps: usize) -> crate::model::NewRun {
    let step = serde_json::json!({"kind": "template", "template": "hi"});
    crate::model::NewRun {
        input: serde_json::json!({"n": 1}),
        steps: vec![serde_json::from_value(step).unwrap(); steps],
        idempotency_key: key.map(str::to_string),
        request_hash: "h".into(),
        correlation_id: "c".into(),
        max_attempts: 3,
        actor: "key:a".into(),
        request_id: Some("r".into()),
        tenant: "acme".into(),
    }
}

/// Makes `store`'s SQLite database full for its pool connection (a
/// connection may grow the file by no page: `max_page_count`, which stands
/// in for a full disk) or gives the room back, for unit tests. Per
/// connection: the pool must have one.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) async fn test_disk_full(store: &Store, full: bool) {
    let pages: i64 = sqlx::query("PRAGMA page_count")
        .fetch_one(store.pool())
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
    let max = if full { pages } else { 1_073_741_823 };
    sqlx::query(&format!("PRAGMA max_page_count = {max}"))
        .execute(store.pool())
        .await
        .unwrap();
}

/// A migrated store on a fresh SQLite file `name` in `dir` with a plans
/// file that limits nothing, for unit tests: with plans loaded, run
/// creation takes the general path through the pool, not the writer thread.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) async fn test_sqlite_store_on_the_pool(dir: &std::path::Path, name: &str) -> Store {
    let plans = crate::plans::Plans::parse(
        "default_plan: open\nplans:\n  open:\n    meters:\n      runs: {allowance: 1000, overage: allow, unit_price: 0}\n",
    )
    .unwrap();
    let store = test_sqlite_store(dir, name)
        .await
        .with_plans(Some(std::sync::Arc::new(plans)));
    store.migrate().await.unwrap();
    store
}

/// A store on a fresh SQLite file `name` in `dir`, for unit tests.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) async fn test_sqlite_store(dir: &std::path::Path, name: &str) -> Store {
    let db = DatabaseSettings {
        url: crate::config::Secret::new(format!("sqlite://{}/{name}?mode=rwc", dir.display())),
        backend: DbBackend::Sqlite,
        embedded: false,
    };
    Store::connect(&db, 1).await.unwrap()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The SQLite clock expression is the millisecond SQLite itself prints
    /// for the same instant (`strftime('%s')` and `%f`), every time.
    #[tokio::test]
    async fn the_sqlite_clock_is_exact_to_the_millisecond() {
        let dir = tempfile::tempdir().unwrap();
        let store = test_sqlite_store(dir.path(), "clock.db").await;
        let sql = format!(
            "SELECT {SQLITE_NOW} AS ours, CAST(strftime('%s', 'now') AS INTEGER) * 1000 \
             + CAST(substr(strftime('%f', 'now'), 4) AS INTEGER) AS printed"
        );
        for _ in 0..2_000 {
            let row = sqlx::query(&sql).fetch_one(store.pool()).await.unwrap();
            let (ours, printed): (i64, i64) = (
                row.try_get("ours").unwrap(),
                row.try_get("printed").unwrap(),
            );
            assert_eq!(ours, printed);
        }
    }

    /// Run creation on an SQLite file goes to its own writer thread (the
    /// write path the benchmarks measure); a database opened read-only or in
    /// memory (a connection of its own would open another database) keeps
    /// to the pool.
    #[tokio::test]
    async fn run_creation_on_an_sqlite_file_has_a_writer_thread_unless_read_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = test_sqlite_store(dir.path(), "w.db").await;
        assert!(store.creates.has_sqlite_writer());
        let url = |mode: &str| format!("sqlite://{}/w.db?mode={mode}", dir.path().display());
        let read_only = Store::open(DbBackend::Sqlite, &url("ro"), 1).await.unwrap();
        assert!(!read_only.creates.has_sqlite_writer());
        let memory = Store::open(DbBackend::Sqlite, "sqlite::memory:", 1)
            .await
            .unwrap();
        assert!(!memory.creates.has_sqlite_writer());
        // Another VFS locks differently: two connections on two VFSes
        // would write the file at once.
        let vfs = format!("{}&vfs=unix-dotfile", url("rw"));
        assert_eq!(writer_file(store.pool(), &vfs).await.unwrap(), None);
        assert!(
            writer_file(store.pool(), &url("rw"))
                .await
                .unwrap()
                .is_some()
        );
    }

    /// The SQLite writer thread's errors that come from the database's
    /// state (lock held, disk full, I/O) are unavailability (503, retried),
    /// a refused row is not.
    #[test]
    fn sqlite_writer_errors_from_the_database_state_are_unavailability() {
        use rusqlite::ffi;
        let of =
            |code| StoreError::from(rusqlite::Error::SqliteFailure(ffi::Error::new(code), None));
        for code in [
            ffi::SQLITE_BUSY,
            ffi::SQLITE_LOCKED,
            ffi::SQLITE_FULL,
            ffi::SQLITE_IOERR,
        ] {
            assert!(of(code).is_unavailable(), "{code}");
        }
        for code in [
            ffi::SQLITE_CONSTRAINT,
            ffi::SQLITE_ERROR,
            ffi::SQLITE_CORRUPT,
        ] {
            assert!(!of(code).is_unavailable(), "{code}");
        }
    }

    /// Through the pool too, SQLite errors from the database's state are
    /// unavailability (the API's 503 `dependency_unavailable`, retried by the
    /// worker), extended codes included; a refused row is not. A full disk
    /// answered 500 `internal` to every `POST /runs` with plans loaded.
    #[tokio::test]
    async fn sqlite_errors_from_the_database_state_through_the_pool_are_unavailability() {
        let dir = tempfile::tempdir().unwrap();
        let store = test_sqlite_store(dir.path(), "e.db").await;
        store.migrate().await.unwrap();
        let insert =
            "INSERT INTO worker_heartbeats (worker_id, started_at, last_beat_at) VALUES ($1, 0, 0)";
        test_disk_full(&store, true).await;
        let full = sqlx::query(insert)
            .bind("w".repeat(64 * 1024))
            .execute(store.pool())
            .await
            .unwrap_err();
        assert!(StoreError::from(full).is_unavailable());
        sqlx::query(insert)
            .bind("w")
            .execute(store.pool())
            .await
            .unwrap();
        let taken = sqlx::query(insert)
            .bind("w")
            .execute(store.pool())
            .await
            .unwrap_err();
        assert!(!StoreError::from(taken).is_unavailable());

        let holder = rusqlite::Connection::open(dir.path().join("e.db")).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        sqlx::query("PRAGMA busy_timeout = 0")
            .execute(store.pool())
            .await
            .unwrap();
        let busy = sqlx::query(insert)
            .bind("v")
            .execute(store.pool())
            .await
            .unwrap_err();
        assert!(StoreError::from(busy).is_unavailable());
        holder.execute_batch("ROLLBACK").unwrap();

        use rusqlite::ffi;
        for code in [
            ffi::SQLITE_BUSY_SNAPSHOT,
            ffi::SQLITE_LOCKED_SHAREDCACHE,
            ffi::SQLITE_IOERR_WRITE,
            ffi::SQLITE_IOERR_FSYNC,
            ffi::SQLITE_FULL,
        ] {
            assert!(sqlite_state_error(code), "{code}");
        }
        for code in [
            ffi::SQLITE_CONSTRAINT_UNIQUE,
            ffi::SQLITE_ERROR,
            ffi::SQLITE_CORRUPT,
            ffi::SQLITE_READONLY,
        ] {
            assert!(!sqlite_state_error(code), "{code}");
        }
    }

    /// The writer thread opens the file the pool opened: a percent-encoded
    /// path in the URL (a space in a directory name) is the decoded path,
    /// not a new empty file named with `%20`.
    #[tokio::test]
    async fn the_writer_thread_opens_the_file_the_pool_opened() {
        let dir = tempfile::tempdir().unwrap();
        let spaced = dir.path().join("a b");
        std::fs::create_dir(&spaced).unwrap();
        let db = DatabaseSettings {
            url: crate::config::Secret::new(format!(
                "sqlite://{}/a%20b/e.db?mode=rwc",
                dir.path().display()
            )),
            backend: DbBackend::Sqlite,
            embedded: false,
        };
        let store = Store::connect(&db, 1).await.unwrap();
        store.migrate().await.unwrap();
        assert!(store.creates.has_sqlite_writer());
        let file = writer_file(store.pool(), db.url.expose())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(std::path::Path::new(&file), spaced.join("e.db"));
        let new = test_new_run(None, 1);
        let created = store.create_run(&new).await.unwrap();
        assert!(matches!(created, CreateOutcome::Created(_)), "{created:?}");
        assert!(!dir.path().join("a%20b").exists());
    }

    /// A full disk makes SQLite end a transaction by itself (a `COMMIT` or
    /// a journal-less statement failing with `SQLITE_FULL`), which sqlx
    /// does not notice: its `ROLLBACK` fails and it keeps counting the
    /// transaction. Without closing that connection, the next transaction on
    /// it was a `SAVEPOINT`, whose rollback kept SQLite's write lock: every
    /// later write waited for it, also once the disk had room again (the
    /// API answered 408 to every `POST /runs` until a restart).
    /// `max_page_count` stands in for the full disk (per connection; the pool
    /// here has one).
    #[tokio::test]
    async fn a_transaction_sqlite_ended_on_a_full_disk_leaves_no_write_lock_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = test_sqlite_store_on_the_pool(dir.path(), "full.db").await;
        test_disk_full(&store, true).await;

        // The disk is full: a one-row insert needing new pages fails, and
        // SQLite rolls the whole transaction back, as after a failed COMMIT.
        let mut tx = store.begin().await.unwrap();
        let full = sqlx::query(
            "INSERT INTO worker_heartbeats (worker_id, started_at, last_beat_at) VALUES ($1, 0, 0)",
        )
        .bind("w".repeat(64 * 1024))
        .execute(&mut *tx)
        .await
        .unwrap_err();
        let code = full.as_database_error().and_then(|e| e.code());
        assert_eq!(code.as_deref(), Some("13"), "{full:?}");
        drop(tx);

        // Room again; then a transaction that writes and is rolled back
        // (a batch failing for any reason).
        test_disk_full(&store, false).await;
        let mut tx = store.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO worker_heartbeats (worker_id, started_at, last_beat_at) VALUES ('w', 0, 0)",
        )
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.rollback().await.unwrap();

        let other = rusqlite::Connection::open(dir.path().join("full.db")).unwrap();
        other.busy_timeout(Duration::from_millis(500)).unwrap();
        other
            .execute_batch("BEGIN IMMEDIATE; ROLLBACK")
            .expect("the write lock is free");
        let created = store.create_run(&test_new_run(None, 1)).await.unwrap();
        let CreateOutcome::Created(run) = created else {
            panic!("{created:?}");
        };
        let stored: i64 = other
            .query_row(
                "SELECT COUNT(*) FROM runs WHERE id = ?1",
                [run.id.to_string()],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(
            stored, 1,
            "the run is committed, not held in an open transaction"
        );
    }

    /// A transaction that reads and then writes, while another connection
    /// commits in between: begun as `begin_write`, it holds SQLite's write
    /// lock from the start, the other waits, and its write succeeds. Begun
    /// deferred, its write failed at once with `SQLITE_BUSY_SNAPSHOT`: under
    /// load with plans, most usage-threshold checks were lost so.
    #[tokio::test]
    async fn a_transaction_that_reads_then_writes_is_not_refused_for_a_commit_in_between() {
        let dir = tempfile::tempdir().unwrap();
        let store = test_sqlite_store(dir.path(), "rw.db").await;
        store.migrate().await.unwrap();
        let mut tx = store.begin_write().await.unwrap();
        sqlx::query("SELECT COUNT(*) FROM worker_heartbeats")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        let path = dir.path().join("rw.db");
        let other = std::thread::spawn(move || {
            let conn = rusqlite::Connection::open(path).unwrap();
            conn.busy_timeout(Duration::from_secs(5)).unwrap();
            conn.execute(
                "INSERT INTO worker_heartbeats (worker_id, started_at, last_beat_at) VALUES ('other', 0, 0)",
                [],
            )
            .unwrap();
        });
        // Long enough for the other connection to commit if it can.
        tokio::time::sleep(Duration::from_millis(300)).await;
        sqlx::query(
            "INSERT INTO worker_heartbeats (worker_id, started_at, last_beat_at) VALUES ('mine', 0, 0)",
        )
        .execute(&mut *tx)
        .await
        .expect("the write after the read");
        tx.commit().await.unwrap();
        other.join().unwrap();
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM worker_heartbeats")
            .fetch_one(store.pool())
            .await
            .unwrap()
            .get("n");
        assert_eq!(n, 2);
    }

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
        assert_eq!(
            sqlite_path("sqlite:///a%20b/x.db?mode=rwc").as_deref(),
            Some("/a b/x.db")
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
    }

    #[test]
    fn opening_an_existing_sqlite_database_never_asks_sqlite_to_create_it() {
        assert_eq!(
            without_create_mode("sqlite:///v/vm.db?mode=rwc"),
            "sqlite:///v/vm.db?mode=rw"
        );
        assert_eq!(
            without_create_mode("sqlite:///v/vm.db"),
            "sqlite:///v/vm.db?mode=rw"
        );
        assert_eq!(
            without_create_mode("sqlite://v.db?cache=shared&mode=rwc"),
            "sqlite://v.db?cache=shared&mode=rw"
        );
    }

    fn sqlite_at(url: String) -> DatabaseSettings {
        DatabaseSettings {
            url: crate::config::Secret::new(url),
            backend: DbBackend::Sqlite,
            embedded: false,
        }
    }

    /// Kind: every start-up error names the cause. Without creating the file,
    /// a URL without `mode=rwc` failed with a bare "database error".
    #[tokio::test]
    async fn an_sqlite_url_for_a_file_that_does_not_exist_yet_creates_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("state").join("vm.db");
        let store = Store::connect(&sqlite_at(format!("sqlite://{}", file.display())), 1)
            .await
            .unwrap();
        store.ping().await.unwrap();
        assert!(file.exists());
    }

    #[tokio::test]
    async fn an_sqlite_file_that_cannot_be_created_is_named_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, b"x").unwrap();
        let url = format!("sqlite://{}/vm.db", blocker.display());
        let err = Store::connect(&sqlite_at(url), 1)
            .await
            .err()
            .expect("fails");
        let text = err.to_string();
        assert!(text.contains("not-a-dir/vm.db"), "{text}");
        assert!(matches!(err, StoreError::SqliteFile { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn the_database_clock_is_in_epoch_milliseconds() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::connect(
            &sqlite_at(format!("sqlite://{}/c.db", dir.path().display())),
            1,
        )
        .await
        .unwrap();
        let db = store.db_now().await.unwrap();
        let local = chrono::Utc::now().timestamp_millis();
        assert!((db - local).abs() < 5_000, "db {db} local {local}");
    }
}
