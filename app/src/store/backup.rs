//! Logical backup and restore: every table the app owns, streamed as JSON
//! Lines, loadable into an empty, migrated database of either backend.
//!
//! The file, one JSON value a line:
//! 1. a header object: `format` (`vm-webapp-backup`), `format_version`,
//!    `schema_version` (the source's newest applied migration),
//!    `source_backend`, `created_at_ms` (database clock, ms since the epoch),
//!    `app_version` and the `tables` that follow;
//! 2. per table, a `{"table": …, "columns": […]}` object, one JSON array per
//!    row (values in column order: text, integer or null), then
//!    `{"table_end": …, "rows": N}`;
//! 3. a trailer `{"end": true, "rows": {table: N, …}, "sha256": …}`, the hex
//!    SHA-256 of every byte before the trailer line: a truncated or edited
//!    file is refused before anything is committed.
//!
//! **Consistency**: the backup reads every table inside one transaction
//! (`REPEATABLE READ, READ ONLY` on PostgreSQL; one read transaction, hence
//! one WAL snapshot, on SQLite), so a snapshot taken while the app serves
//! writes is the state at one instant. **Memory** does not grow with the
//! data: rows are streamed from the database and written as they arrive;
//! a restore reads one line at a time and inserts in batches of at most
//! [`RESTORE_BATCH_ROWS`] rows (one JSON parameter unpacked in SQL, as every
//! batch in this store).
//!
//! A restore runs in **one transaction**: it commits only after the whole
//! file was read, its row counts and checksum verified, and the id sequences
//! moved past the loaded ids; any failure leaves the target as it was.
//!
//! Not in the snapshot: `worker_heartbeats` (liveness of processes that will
//! not exist on the restored side), `queue_stats` (a cache the maintenance
//! leader rebuilds within seconds) and `maintenance_leader` (a lease of a
//! process of the old side; the first process on the restored side takes it). Jobs that were leased at backup time are
//! restored leased with their old expiry, so the rescuer hands them out again
//! (delivery is at least once; the attempt fencing token keeps it safe).

use std::collections::BTreeMap;

use futures::TryStreamExt;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use sqlx::Row;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

use super::{Store, StoreError, recordset};
use crate::config::DbBackend;

/// The `format` field of every backup header.
pub const FORMAT: &str = "vm-webapp-backup";
/// Version of the file layout (not of the schema). A restore refuses any
/// other version.
pub const FORMAT_VERSION: i64 = 1;
/// Rows inserted per statement on restore.
pub const RESTORE_BATCH_ROWS: usize = 500;
/// Bytes of JSON buffered per insert batch on restore, at most (the batch is
/// flushed early when its rows are large).
pub const RESTORE_BATCH_BYTES: usize = 4 * 1024 * 1024;
/// Longest line a restore accepts, in bytes: bounds the memory a damaged or
/// hostile file can claim.
pub const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;

/// The SQL type of a column, as the schema declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ColType {
    Text,
    BigInt,
}

impl ColType {
    fn sql(self) -> &'static str {
        match self {
            ColType::Text => "TEXT",
            ColType::BigInt => "BIGINT",
        }
    }
}

/// One table of the snapshot.
struct TableSpec {
    name: &'static str,
    /// The primary key, the dump's order (byte order on both backends), so a
    /// restore inserts in key order and two dumps of equal data are equal.
    order_by: &'static [&'static str],
    columns: &'static [(&'static str, ColType)],
    /// The id column fed by a sequence (BIGSERIAL / AUTOINCREMENT), if any.
    serial: Option<&'static str>,
}

use ColType::{BigInt, Text};

/// Every table in the snapshot, parents before children (the restore's
/// insert order; deletes under `--force` go in reverse).
const TABLES: &[TableSpec] = &[
    TableSpec {
        name: "runs",
        order_by: &["id"],
        columns: &[
            ("id", Text),
            ("status", Text),
            ("input", Text),
            ("steps", Text),
            ("step_count", BigInt),
            ("idempotency_key", Text),
            ("request_hash", Text),
            ("correlation_id", Text),
            ("output", Text),
            ("error", Text),
            ("created_at", BigInt),
            ("updated_at", BigInt),
            ("started_at", BigInt),
            ("finished_at", BigInt),
            ("tenant", Text),
        ],
        serial: None,
    },
    TableSpec {
        name: "jobs",
        order_by: &["id"],
        columns: &[
            ("id", BigInt),
            ("run_id", Text),
            ("correlation_id", Text),
            ("step_index", BigInt),
            ("step_count", BigInt),
            ("payload", Text),
            ("state", Text),
            ("attempt", BigInt),
            ("max_attempts", BigInt),
            ("run_at", BigInt),
            ("lease_expires_at", BigInt),
            ("locked_by", Text),
            ("last_error", Text),
            ("created_at", BigInt),
        ],
        serial: Some("id"),
    },
    TableSpec {
        name: "step_results",
        order_by: &["run_id", "step_index"],
        columns: &[
            ("run_id", Text),
            ("step_index", BigInt),
            ("output", Text),
            ("attempt", BigInt),
            ("job_id", BigInt),
            ("finished_at", BigInt),
        ],
        serial: None,
    },
    TableSpec {
        name: "approvals",
        order_by: &["run_id", "step_index"],
        columns: &[
            ("run_id", Text),
            ("step_index", BigInt),
            ("prompt", Text),
            ("on_timeout", Text),
            ("on_reject", Text),
            ("requested_at", BigInt),
            ("expires_at", BigInt),
            ("decision", Text),
            ("decided_by", Text),
            ("comment", Text),
            ("decided_at", BigInt),
        ],
        serial: None,
    },
    TableSpec {
        name: "dead_jobs",
        order_by: &["id"],
        columns: &[
            ("id", BigInt),
            ("run_id", Text),
            ("step_index", BigInt),
            ("payload", Text),
            ("attempts", BigInt),
            ("last_error", Text),
            ("created_at", BigInt),
            ("failed_at", BigInt),
        ],
        serial: None,
    },
    TableSpec {
        name: "run_events",
        order_by: &["id"],
        columns: &[
            ("id", BigInt),
            ("run_id", Text),
            ("event_type", Text),
            ("step_index", BigInt),
            ("attempt", BigInt),
            ("message", Text),
            ("data", Text),
            ("created_at", BigInt),
        ],
        serial: Some("id"),
    },
    // Billing data: the ledger is the record of what each tenant used.
    TableSpec {
        name: "usage_ledger",
        order_by: &["id"],
        columns: &[
            ("id", BigInt),
            ("tenant", Text),
            ("meter", Text),
            ("quantity", BigInt),
            ("period", Text),
            ("run_id", Text),
            ("step_index", BigInt),
            ("source", Text),
            ("at", BigInt),
        ],
        serial: Some("id"),
    },
    TableSpec {
        name: "usage_counters",
        order_by: &["tenant", "period", "meter", "shard"],
        columns: &[
            ("tenant", Text),
            ("period", Text),
            ("meter", Text),
            ("shard", BigInt),
            ("used", BigInt),
            ("updated_at", BigInt),
        ],
        serial: None,
    },
    TableSpec {
        name: "tenant_plan_changes",
        order_by: &["id"],
        columns: &[
            ("id", BigInt),
            ("tenant", Text),
            ("plan", Text),
            ("changed_at", BigInt),
            ("changed_by", Text),
        ],
        serial: Some("id"),
    },
    TableSpec {
        name: "usage_thresholds",
        order_by: &["tenant", "period", "meter", "threshold"],
        columns: &[
            ("tenant", Text),
            ("period", Text),
            ("meter", Text),
            ("threshold", Text),
            ("used", BigInt),
            ("allowance", BigInt),
            ("run_id", Text),
            ("crossed_at", BigInt),
        ],
        serial: None,
    },
    TableSpec {
        name: "usage_warnings",
        order_by: &["tenant", "period", "meter", "allowance", "threshold"],
        columns: &[
            ("tenant", Text),
            ("period", Text),
            ("meter", Text),
            ("allowance", BigInt),
            ("threshold", Text),
            ("used", BigInt),
            ("run_id", Text),
            ("crossed_at", BigInt),
        ],
        serial: None,
    },
    TableSpec {
        name: "audit_log",
        order_by: &["id"],
        columns: &[
            ("id", BigInt),
            ("at", BigInt),
            ("actor", Text),
            ("action", Text),
            ("target", Text),
            ("outcome", Text),
            ("request_id", Text),
            ("detail", Text),
            ("tenant", Text),
        ],
        serial: Some("id"),
    },
    TableSpec {
        name: "webhook_deliveries",
        order_by: &["id"],
        columns: &[
            ("id", BigInt),
            ("source", Text),
            ("nonce", Text),
            ("received_at", BigInt),
            ("body_sha256", Text),
            ("run_id", Text),
        ],
        serial: Some("id"),
    },
    TableSpec {
        name: "webhook_nonces",
        order_by: &["source", "nonce"],
        columns: &[("source", Text), ("nonce", Text), ("expires_at", BigInt)],
        serial: None,
    },
];

/// Tables the app owns that a snapshot leaves out on purpose (see the module
/// docs), plus the migrator's own table.
pub const NOT_BACKED_UP: [&str; 4] = [
    "worker_heartbeats",
    "queue_stats",
    "maintenance_leader",
    "_sqlx_migrations",
];

/// Names of the tables a snapshot carries, in restore order.
pub fn backed_up_tables() -> Vec<&'static str> {
    TABLES.iter().map(|t| t.name).collect()
}

/// Columns of `table` the snapshot carries, in file order (`None` for a
/// table the snapshot does not carry).
pub fn backed_up_columns(table: &str) -> Option<Vec<&'static str>> {
    spec(table).map(|t| t.columns.iter().map(|(c, _)| *c).collect())
}

fn spec(table: &str) -> Option<&'static TableSpec> {
    TABLES.iter().find(|t| t.name == table)
}

/// Errors of backup and restore. Messages never carry the database URL.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A database error outside loading rows (connecting, reading, counting).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The output or input file could not be written or read.
    #[error("cannot {action} the backup file: {source}")]
    Io {
        /// `write` or `read`.
        action: &'static str,
        /// What the operating system said.
        #[source]
        source: std::io::Error,
    },
    /// The input is not a backup this build can read; `line` is 1-based.
    #[error("the backup file is not valid at line {line}: {reason}")]
    Invalid {
        /// 1-based line number.
        line: u64,
        /// What is wrong there.
        reason: String,
    },
    /// The input ended before its trailer: a backup that did not finish, or a
    /// truncated copy.
    #[error(
        "the backup file ends at line {line} without its trailer: it is incomplete (an interrupted backup or a truncated copy)"
    )]
    Truncated {
        /// Last line read.
        line: u64,
    },
    /// The checksum in the trailer does not match the content.
    #[error("the backup file's checksum does not match its content: it was altered or damaged")]
    Checksum,
    /// The snapshot comes from a newer schema than the target has.
    #[error(
        "the snapshot has schema version {snapshot}, the target database has {target}: restore with a build at least as new as the one that took the backup, after `vm-webapp migrate`"
    )]
    SchemaNewer {
        /// Schema version of the snapshot.
        snapshot: i64,
        /// Schema version of the target.
        target: i64,
    },
    /// The source or target database has no schema.
    #[error("the database is not migrated (schema version 0): run `vm-webapp migrate` first")]
    NotMigrated,
    /// The target already holds data and the restore was not forced.
    #[error(
        "the target database is not empty (table {table} has rows): restore into an empty, migrated database, or pass --force to replace its content"
    )]
    NotEmpty {
        /// The first non-empty table found.
        table: &'static str,
    },
    /// The database refused a statement of the backup or restore (a missing
    /// privilege, a lock timeout), with its own message.
    #[error("the database refused to {action}: {message}")]
    Refused {
        /// What was being done, e.g. `read table runs`.
        action: String,
        /// The database's own message (never the URL).
        message: String,
    },
    /// The database refused rows of the snapshot.
    #[error("the database refused rows of table {table} (file lines up to {line}): {message}")]
    Load {
        /// Table being loaded.
        table: String,
        /// Last line of the refused batch.
        line: u64,
        /// The database's own message (never the URL).
        message: String,
    },
}

/// What a backup wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSummary {
    /// Schema version of the source database.
    pub schema_version: i64,
    /// Rows per table, in file order.
    pub rows: Vec<(String, u64)>,
    /// Bytes written.
    pub bytes: u64,
}

impl BackupSummary {
    /// Rows over all tables.
    pub fn total_rows(&self) -> u64 {
        self.rows.iter().map(|(_, n)| n).sum()
    }
}

/// How a restore treats a target that already holds data.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreOptions {
    /// Delete the target's rows in the snapshot's tables first (in the same
    /// transaction as the load) instead of refusing.
    pub replace_existing: bool,
}

/// What a restore loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreSummary {
    /// Schema version recorded in the snapshot.
    pub schema_version: i64,
    /// Backend the snapshot was taken from (`sqlite` or `postgres`).
    pub source_backend: String,
    /// Database time of the snapshot, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Rows per table, in file order.
    pub rows: Vec<(String, u64)>,
}

impl RestoreSummary {
    /// Rows over all tables.
    pub fn total_rows(&self) -> u64 {
        self.rows.iter().map(|(_, n)| n).sum()
    }
}

/// The database's own message of an error (never the URL or connection
/// detail), for errors worth showing as they are.
fn db_message(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_string(),
        _ => "database error".to_string(),
    }
}

/// Maps a failed statement to [`BackupError::Refused`] with the database's
/// message when the database answered, else to [`BackupError::Store`]
/// (unreachable, …).
fn refused(action: impl Into<String>) -> impl FnOnce(sqlx::Error) -> BackupError {
    move |e| match StoreError::from(e) {
        StoreError::Database(e) | StoreError::InvalidText(e) => BackupError::Refused {
            action: action.into(),
            message: db_message(&e),
        },
        other => BackupError::Store(other),
    }
}

/// A writer that hashes what it writes and counts the bytes.
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: AsyncWrite + Unpin> HashingWriter<W> {
    async fn line(&mut self, value: &Value) -> Result<(), BackupError> {
        let mut buf = serde_json::to_vec(value).map_err(|e| BackupError::Io {
            action: "write",
            source: std::io::Error::other(e),
        })?;
        buf.push(b'\n');
        self.hasher.update(&buf);
        self.raw(&buf).await
    }

    async fn raw(&mut self, buf: &[u8]) -> Result<(), BackupError> {
        self.inner
            .write_all(buf)
            .await
            .map_err(|source| BackupError::Io {
                action: "write",
                source,
            })?;
        self.bytes += buf.len() as u64;
        Ok(())
    }
}

impl Store {
    /// Writes a consistent snapshot of every table the app owns to `out`
    /// (see the module docs for the format), streaming: memory stays flat
    /// whatever the size of the data. Flushes `out` but does not sync it.
    ///
    /// Errors: [`BackupError::NotMigrated`] on an empty schema,
    /// [`BackupError::Store`] when the database fails, [`BackupError::Io`]
    /// when writing fails.
    pub async fn backup_to<W: AsyncWrite + Unpin>(
        &self,
        out: W,
    ) -> Result<BackupSummary, BackupError> {
        let schema_version = self.schema_version().await?;
        if schema_version == 0 {
            return Err(BackupError::NotMigrated);
        }
        let mut tx = self.begin_snapshot().await?;
        // The first read fixes the snapshot (and, on SQLite, the WAL mark).
        let created_at_ms: i64 = sqlx::query(&format!("SELECT {} AS t", self.now_sql()))
            .fetch_one(&mut *tx)
            .await
            .map_err(StoreError::from)?
            .try_get("t")
            .map_err(StoreError::from)?;
        let mut w = HashingWriter {
            inner: out,
            hasher: Sha256::new(),
            bytes: 0,
        };
        w.line(&json!({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "schema_version": schema_version,
            "source_backend": self.backend.as_str(),
            "created_at_ms": created_at_ms,
            "app_version": env!("CARGO_PKG_VERSION"),
            "tables": backed_up_tables(),
        }))
        .await?;
        let mut rows = Vec::with_capacity(TABLES.len());
        for table in TABLES {
            let names: Vec<&str> = table.columns.iter().map(|(c, _)| *c).collect();
            w.line(&json!({"table": table.name, "columns": names}))
                .await?;
            let order: Vec<String> = table
                .order_by
                .iter()
                .map(|c| {
                    let text = table.columns.iter().any(|(n, t)| n == c && *t == Text);
                    if text && self.backend == DbBackend::Postgres {
                        // Byte order, as SQLite sorts, whatever the database's collation.
                        format!("{c} COLLATE \"C\"")
                    } else {
                        (*c).to_string()
                    }
                })
                .collect();
            let sql = format!(
                "SELECT {} FROM {} ORDER BY {}",
                names.join(", "),
                table.name,
                order.join(", ")
            );
            let mut n: u64 = 0;
            {
                let mut stream = sqlx::query(&sql).fetch(&mut *tx);
                while let Some(row) = stream
                    .try_next()
                    .await
                    .map_err(refused(format!("read table {}", table.name)))?
                {
                    let mut values = Vec::with_capacity(table.columns.len());
                    for (i, (_, ty)) in table.columns.iter().enumerate() {
                        let v = match ty {
                            Text => row
                                .try_get::<Option<String>, _>(i)
                                .map_err(StoreError::from)?
                                .map_or(Value::Null, Value::String),
                            BigInt => row
                                .try_get::<Option<i64>, _>(i)
                                .map_err(StoreError::from)?
                                .map_or(Value::Null, Value::from),
                        };
                        values.push(v);
                    }
                    w.line(&Value::Array(values)).await?;
                    n += 1;
                }
            }
            w.line(&json!({"table_end": table.name, "rows": n})).await?;
            rows.push((table.name.to_string(), n));
        }
        // Reads only: ending it either way is the same.
        tx.rollback().await.map_err(StoreError::from)?;
        let digest = hex::encode(w.hasher.clone().finalize());
        let counts: Map<String, Value> = rows
            .iter()
            .map(|(t, n)| (t.clone(), Value::from(*n)))
            .collect();
        let mut trailer = serde_json::to_vec(
            &json!({"end": true, "rows": counts, "sha256": digest}),
        )
        .map_err(|e| BackupError::Io {
            action: "write",
            source: std::io::Error::other(e),
        })?;
        trailer.push(b'\n');
        w.raw(&trailer).await?;
        w.inner.flush().await.map_err(|source| BackupError::Io {
            action: "write",
            source,
        })?;
        Ok(BackupSummary {
            schema_version,
            rows,
            bytes: w.bytes,
        })
    }

    /// Loads a snapshot written by [`Store::backup_to`] (from either backend)
    /// into this database, which must be migrated to at least the snapshot's
    /// schema version and, unless `options.replace_existing`, empty. Runs in
    /// one transaction, in batches; moves the id sequences past the loaded
    /// ids before committing.
    ///
    /// Errors: [`BackupError::NotEmpty`], [`BackupError::SchemaNewer`],
    /// [`BackupError::NotMigrated`], [`BackupError::Invalid`],
    /// [`BackupError::Truncated`], [`BackupError::Checksum`],
    /// [`BackupError::Load`] (the database refused rows, with its message),
    /// [`BackupError::Io`]. On any error nothing is committed.
    pub async fn restore_from<R: AsyncBufRead + Unpin>(
        &self,
        input: R,
        options: RestoreOptions,
    ) -> Result<RestoreSummary, BackupError> {
        let target_version = self.schema_version().await?;
        if target_version == 0 {
            return Err(BackupError::NotMigrated);
        }
        let mut reader = LineReader::new(input);
        let header = match reader.next_value().await? {
            Some(v) => v,
            None => {
                return Err(BackupError::Invalid {
                    line: 1,
                    reason: "the file is empty".into(),
                });
            }
        };
        let (schema_version, source_backend, created_at_ms) = parse_header(&header)?;
        if schema_version > target_version {
            return Err(BackupError::SchemaNewer {
                snapshot: schema_version,
                target: target_version,
            });
        }

        let mut tx = self.begin().await?;
        // A write first, so SQLite takes its write lock up front; the queue
        // gauges describe the old content anyway and are rebuilt within seconds.
        sqlx::query("DELETE FROM queue_stats")
            .execute(&mut *tx)
            .await
            .map_err(refused("clear table queue_stats"))?;
        for table in TABLES {
            let any = sqlx::query(&format!("SELECT 1 AS x FROM {} LIMIT 1", table.name))
                .fetch_optional(&mut *tx)
                .await
                .map_err(refused(format!("read table {}", table.name)))?
                .is_some();
            if any && !options.replace_existing {
                return Err(BackupError::NotEmpty { table: table.name });
            }
        }
        if options.replace_existing {
            for table in TABLES.iter().rev() {
                sqlx::query(&format!("DELETE FROM {}", table.name))
                    .execute(&mut *tx)
                    .await
                    .map_err(refused(format!("empty table {} (--force)", table.name)))?;
            }
        }

        let mut loaded: Vec<(String, u64)> = Vec::new();
        let mut seen: Vec<&'static str> = Vec::new();
        loop {
            let before = reader.hasher.clone();
            let line_no = reader.line + 1;
            let Some(value) = reader.next_value().await? else {
                return Err(BackupError::Truncated { line: reader.line });
            };
            let obj = value.as_object().ok_or_else(|| BackupError::Invalid {
                line: line_no,
                reason: "expected a table start or the trailer, found a row".into(),
            })?;
            if obj.get("end") == Some(&Value::Bool(true)) {
                check_trailer(obj, &loaded, before, line_no)?;
                if reader.next_raw().await?.is_some() {
                    return Err(BackupError::Invalid {
                        line: line_no + 1,
                        reason: "content after the trailer".into(),
                    });
                }
                break;
            }
            let table = table_start(obj, line_no, &seen)?;
            seen.push(table.spec.name);
            let n = self.load_table(&mut tx, &mut reader, &table).await?;
            loaded.push((table.spec.name.to_string(), n));
        }
        self.fix_sequences(&mut tx).await?;
        tx.commit().await.map_err(refused("commit the restore"))?;
        Ok(RestoreSummary {
            schema_version,
            source_backend,
            created_at_ms,
            rows: loaded,
        })
    }

    /// Loads the rows of one table up to its `table_end` line.
    async fn load_table<R: AsyncBufRead + Unpin>(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        reader: &mut LineReader<R>,
        table: &TableStart,
    ) -> Result<u64, BackupError> {
        let typed: Vec<(&str, &str)> = table.columns.iter().map(|(c, t)| (*c, t.sql())).collect();
        let names: Vec<&str> = table.columns.iter().map(|(c, _)| *c).collect();
        let sql = format!(
            "INSERT INTO {} ({}) {}",
            table.spec.name,
            names.join(", "),
            recordset(self.backend, &typed)
        );
        let mut batch: Vec<Value> = Vec::with_capacity(RESTORE_BATCH_ROWS);
        let mut batch_bytes = 0usize;
        let mut n: u64 = 0;
        loop {
            let line_no = reader.line + 1;
            let Some(value) = reader.next_value().await? else {
                return Err(BackupError::Truncated { line: reader.line });
            };
            match value {
                Value::Array(values) => {
                    let row = typed_row(&table.columns, values, line_no)?;
                    batch_bytes += reader.last_len;
                    batch.push(Value::Object(row));
                    n += 1;
                    if batch.len() >= RESTORE_BATCH_ROWS || batch_bytes >= RESTORE_BATCH_BYTES {
                        self.insert_batch(tx, &sql, &mut batch, table.spec.name, line_no)
                            .await?;
                        batch_bytes = 0;
                    }
                }
                Value::Object(obj) => {
                    let end = obj.get("table_end").and_then(Value::as_str);
                    if end != Some(table.spec.name) {
                        return Err(BackupError::Invalid {
                            line: line_no,
                            reason: format!("expected the end of table {}", table.spec.name),
                        });
                    }
                    let declared = obj.get("rows").and_then(Value::as_u64);
                    if declared != Some(n) {
                        return Err(BackupError::Invalid {
                            line: line_no,
                            reason: format!(
                                "table {} declares {} rows, the file holds {n}",
                                table.spec.name,
                                declared.map_or("no count of".to_string(), |d| d.to_string())
                            ),
                        });
                    }
                    self.insert_batch(tx, &sql, &mut batch, table.spec.name, line_no)
                        .await?;
                    return Ok(n);
                }
                _ => {
                    return Err(BackupError::Invalid {
                        line: line_no,
                        reason: "expected a row (a JSON array) or the table's end".into(),
                    });
                }
            }
        }
    }

    async fn insert_batch(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
        sql: &str,
        batch: &mut Vec<Value>,
        table: &str,
        line: u64,
    ) -> Result<(), BackupError> {
        if batch.is_empty() {
            return Ok(());
        }
        let param = Value::Array(std::mem::take(batch)).to_string();
        sqlx::query(sql)
            .bind(param)
            .execute(&mut **tx)
            .await
            .map_err(|e| match StoreError::from(e) {
                StoreError::Database(e) | StoreError::InvalidText(e) => BackupError::Load {
                    table: table.to_string(),
                    line,
                    message: db_message(&e),
                },
                other => BackupError::Store(other),
            })?;
        Ok(())
    }

    /// Moves every id sequence past the ids just loaded. Job ids also live
    /// on in `dead_jobs.id` and `step_results.job_id`, so the jobs sequence
    /// goes past those too: a new job must never reuse a dead job's id.
    async fn fix_sequences(
        &self,
        tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    ) -> Result<(), BackupError> {
        for table in TABLES {
            let Some(col) = table.serial else { continue };
            let mut max_sql = format!("SELECT COALESCE(MAX({col}), 0) AS m FROM {}", table.name);
            if table.name == "jobs" {
                max_sql = "SELECT MAX(m) AS m FROM (\
                     SELECT COALESCE(MAX(id), 0) AS m FROM jobs \
                     UNION ALL SELECT COALESCE(MAX(id), 0) FROM dead_jobs \
                     UNION ALL SELECT COALESCE(MAX(job_id), 0) FROM step_results) AS ids"
                    .to_string();
            }
            let action = format!("move the id sequence of table {}", table.name);
            let max: i64 = sqlx::query(&max_sql)
                .fetch_one(&mut **tx)
                .await
                .map_err(refused(action.clone()))?
                .try_get("m")
                .map_err(StoreError::from)?;
            match self.backend {
                DbBackend::Postgres => {
                    // `is_called = false` on an empty table: the next id is 1.
                    sqlx::query(&format!(
                        "SELECT setval(pg_get_serial_sequence('{}', '{col}'), $1, $2) AS v",
                        table.name
                    ))
                    .bind(max.max(1))
                    .bind(max > 0)
                    .fetch_one(&mut **tx)
                    .await
                    .map_err(refused(action))?;
                }
                DbBackend::Sqlite => {
                    sqlx::query("DELETE FROM sqlite_sequence WHERE name = $1")
                        .bind(table.name)
                        .execute(&mut **tx)
                        .await
                        .map_err(refused(action.clone()))?;
                    sqlx::query("INSERT INTO sqlite_sequence (name, seq) VALUES ($1, $2)")
                        .bind(table.name)
                        .bind(max)
                        .execute(&mut **tx)
                        .await
                        .map_err(refused(action))?;
                }
            }
        }
        Ok(())
    }
}

/// A table start line, checked against this build's schema.
struct TableStart {
    spec: &'static TableSpec,
    /// The file's columns with this build's types, in file order.
    columns: Vec<(&'static str, ColType)>,
}

fn parse_header(header: &Value) -> Result<(i64, String, i64), BackupError> {
    let bad = |reason: String| BackupError::Invalid { line: 1, reason };
    let obj = header
        .as_object()
        .ok_or_else(|| bad("the first line is not a backup header".into()))?;
    if obj.get("format").and_then(Value::as_str) != Some(FORMAT) {
        return Err(bad(format!(
            "not a {FORMAT} file (the header has no format \"{FORMAT}\")"
        )));
    }
    let version = obj.get("format_version").and_then(Value::as_i64);
    if version != Some(FORMAT_VERSION) {
        return Err(bad(format!(
            "format version {} is not supported by this build (it reads version {FORMAT_VERSION})",
            version.map_or("(missing)".to_string(), |v| v.to_string())
        )));
    }
    let schema = obj
        .get("schema_version")
        .and_then(Value::as_i64)
        .filter(|v| *v > 0)
        .ok_or_else(|| bad("the header has no valid schema_version".into()))?;
    let backend = obj
        .get("source_backend")
        .and_then(Value::as_str)
        .unwrap_or("unknown")
        .to_string();
    let created = obj
        .get("created_at_ms")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    Ok((schema, backend, created))
}

fn table_start(
    obj: &Map<String, Value>,
    line: u64,
    seen: &[&str],
) -> Result<TableStart, BackupError> {
    let bad = |reason: String| BackupError::Invalid { line, reason };
    let name = obj
        .get("table")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("expected a table start or the trailer".into()))?;
    let spec = spec(name).ok_or_else(|| bad(format!("unknown table {name:?}")))?;
    if seen.contains(&spec.name) {
        return Err(bad(format!("table {name} appears twice")));
    }
    let cols = obj
        .get("columns")
        .and_then(Value::as_array)
        .ok_or_else(|| bad(format!("table {name} has no column list")))?;
    let mut columns = Vec::with_capacity(cols.len());
    for c in cols {
        let c = c
            .as_str()
            .ok_or_else(|| bad(format!("a column name of table {name} is not text")))?;
        let known = spec
            .columns
            .iter()
            .find(|(k, _)| *k == c)
            .ok_or_else(|| bad(format!("table {name} has no column {c:?} in this schema")))?;
        if columns.iter().any(|(k, _)| *k == known.0) {
            return Err(bad(format!("column {c} of table {name} appears twice")));
        }
        columns.push(*known);
    }
    Ok(TableStart { spec, columns })
}

/// A row array as a `{column: value}` object, each value checked against its
/// column's type.
fn typed_row(
    columns: &[(&'static str, ColType)],
    values: Vec<Value>,
    line: u64,
) -> Result<Map<String, Value>, BackupError> {
    if values.len() != columns.len() {
        return Err(BackupError::Invalid {
            line,
            reason: format!(
                "the row has {} values, the table has {} columns",
                values.len(),
                columns.len()
            ),
        });
    }
    let mut row = Map::with_capacity(columns.len());
    for ((name, ty), v) in columns.iter().zip(values) {
        let ok = match (&v, ty) {
            (Value::Null, _) => true,
            (Value::String(_), Text) => true,
            (Value::Number(n), BigInt) => n.is_i64(),
            _ => false,
        };
        if !ok {
            return Err(BackupError::Invalid {
                line,
                reason: format!(
                    "column {name} holds {v}, expected {} or null",
                    match ty {
                        Text => "text",
                        BigInt => "an integer",
                    }
                ),
            });
        }
        row.insert((*name).to_string(), v);
    }
    Ok(row)
}

fn check_trailer(
    obj: &Map<String, Value>,
    loaded: &[(String, u64)],
    hasher: Sha256,
    line: u64,
) -> Result<(), BackupError> {
    let declared =
        obj.get("rows")
            .and_then(Value::as_object)
            .ok_or_else(|| BackupError::Invalid {
                line,
                reason: "the trailer has no row counts".into(),
            })?;
    let counts: BTreeMap<&str, u64> = loaded.iter().map(|(t, n)| (t.as_str(), *n)).collect();
    let declared: BTreeMap<&str, Option<u64>> = declared
        .iter()
        .map(|(t, n)| (t.as_str(), n.as_u64()))
        .collect();
    if declared.len() != counts.len()
        || declared
            .iter()
            .any(|(t, n)| counts.get(t).copied() != *n || n.is_none())
    {
        return Err(BackupError::Invalid {
            line,
            reason: "the trailer's row counts do not match the tables in the file".into(),
        });
    }
    let sum = obj.get("sha256").and_then(Value::as_str);
    if sum != Some(hex::encode(hasher.finalize()).as_str()) {
        return Err(BackupError::Checksum);
    }
    Ok(())
}

/// Reads lines of at most [`MAX_LINE_BYTES`], hashing each one as read.
struct LineReader<R> {
    inner: R,
    buf: Vec<u8>,
    hasher: Sha256,
    /// Lines read so far.
    line: u64,
    /// Length of the last line, bytes.
    last_len: usize,
}

impl<R: AsyncBufRead + Unpin> LineReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            hasher: Sha256::new(),
            line: 0,
            last_len: 0,
        }
    }

    /// The next line's bytes (newline included), or `None` at the end.
    async fn next_raw(&mut self) -> Result<Option<&[u8]>, BackupError> {
        self.buf.clear();
        loop {
            let chunk = self
                .inner
                .fill_buf()
                .await
                .map_err(|source| BackupError::Io {
                    action: "read",
                    source,
                })?;
            if chunk.is_empty() {
                break;
            }
            let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
                Some(i) => (i + 1, true),
                None => (chunk.len(), false),
            };
            if self.buf.len() + take > MAX_LINE_BYTES {
                return Err(BackupError::Invalid {
                    line: self.line + 1,
                    reason: format!("a line longer than {MAX_LINE_BYTES} bytes"),
                });
            }
            self.buf.extend_from_slice(&chunk[..take]);
            self.inner.consume(take);
            if done {
                break;
            }
        }
        if self.buf.is_empty() {
            return Ok(None);
        }
        self.line += 1;
        self.last_len = self.buf.len();
        Ok(Some(&self.buf))
    }

    /// The next line as JSON, hashed; `None` at the end.
    async fn next_value(&mut self) -> Result<Option<Value>, BackupError> {
        let Some(raw) = self.next_raw().await? else {
            return Ok(None);
        };
        let value = serde_json::from_slice(raw);
        self.hasher.update(&self.buf);
        value.map(Some).map_err(|e| BackupError::Invalid {
            line: self.line,
            reason: format!("not JSON ({e})"),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{DatabaseSettings, Secret};

    async fn sqlite_store(dir: &tempfile::TempDir, name: &str) -> Store {
        let db = DatabaseSettings {
            url: Secret::new(format!("sqlite://{}/{name}?mode=rwc", dir.path().display())),
            backend: DbBackend::Sqlite,
            embedded: false,
        };
        let store = Store::connect(&db, 2).await.unwrap();
        store.migrate().await.unwrap();
        store
    }

    /// A column added by a migration but not listed here would be silently
    /// dropped from every backup: this compares the list with the schema.
    #[tokio::test]
    async fn every_column_of_every_app_table_is_in_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(&dir, "s.db").await;
        let tables: Vec<String> = sqlx::query(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name",
        )
        .fetch_all(store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<String, _>("name"))
        .collect();
        for table in &tables {
            if NOT_BACKED_UP.contains(&table.as_str()) {
                continue;
            }
            let spec = spec(table).unwrap_or_else(|| panic!("table {table} is not backed up"));
            let columns: Vec<String> = sqlx::query(&format!(
                "SELECT name FROM pragma_table_info('{table}') ORDER BY cid"
            ))
            .fetch_all(store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>("name"))
            .collect();
            let listed: Vec<&str> = spec.columns.iter().map(|(c, _)| *c).collect();
            assert_eq!(columns, listed, "columns of {table}");
        }
        assert_eq!(
            tables.len(),
            TABLES.len() + NOT_BACKED_UP.len(),
            "{tables:?}"
        );
    }

    #[tokio::test]
    async fn an_empty_database_round_trips_and_the_trailer_counts_every_table() {
        let dir = tempfile::tempdir().unwrap();
        let a = sqlite_store(&dir, "a.db").await;
        let mut out = Vec::new();
        let summary = a.backup_to(&mut out).await.unwrap();
        assert_eq!(summary.total_rows(), 0);
        assert_eq!(summary.bytes, out.len() as u64);
        let b = sqlite_store(&dir, "b.db").await;
        let restored = b
            .restore_from(&out[..], RestoreOptions::default())
            .await
            .unwrap();
        assert_eq!(restored.rows.len(), TABLES.len());
        assert_eq!(restored.schema_version, a.expected_schema_version());
    }

    #[tokio::test]
    async fn a_changed_byte_fails_the_checksum_and_commits_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = sqlite_store(&dir, "a.db").await;
        a.append_audit(&crate::store::security::NewAudit {
            actor: "system",
            action: "run.created",
            target: None,
            outcome: "success",
            request_id: None,
            detail: None,
            tenant: None,
        })
        .await
        .unwrap();
        let mut out = Vec::new();
        a.backup_to(&mut out).await.unwrap();
        let text = String::from_utf8(out)
            .unwrap()
            .replace("run.created", "run.deleted");
        let b = sqlite_store(&dir, "b.db").await;
        let err = b
            .restore_from(text.as_bytes(), RestoreOptions::default())
            .await
            .unwrap_err();
        assert!(matches!(err, BackupError::Checksum), "{err}");
        let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM audit_log")
            .fetch_one(b.pool())
            .await
            .unwrap()
            .get("n");
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn garbage_and_truncated_files_are_refused_with_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let a = sqlite_store(&dir, "a.db").await;
        let mut out = Vec::new();
        a.backup_to(&mut out).await.unwrap();
        let b = sqlite_store(&dir, "b.db").await;
        let opts = RestoreOptions::default();

        let err = b.restore_from(&b"hello\n"[..], opts).await.unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        let err = b.restore_from(&b""[..], opts).await.unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        let err = b
            .restore_from(
                &br#"{"format":"vm-webapp-backup","format_version":9}"#[..],
                opts,
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("format version 9"), "{err}");

        let text = String::from_utf8(out).unwrap();
        let cut: Vec<&str> = text.lines().collect();
        let truncated = cut[..cut.len() - 1].join("\n") + "\n";
        let err = b
            .restore_from(truncated.as_bytes(), opts)
            .await
            .unwrap_err();
        assert!(matches!(err, BackupError::Truncated { .. }), "{err}");

        let newer = text.replacen(
            &format!("\"schema_version\":{}", a.expected_schema_version()),
            "\"schema_version\":999",
            1,
        );
        let err = b.restore_from(newer.as_bytes(), opts).await.unwrap_err();
        assert!(
            matches!(err, BackupError::SchemaNewer { snapshot: 999, .. }),
            "{err}"
        );

        let bad_row = text.replacen(
            "{\"rows\":0,\"table_end\":\"runs\"}",
            "[1,2]\n{\"rows\":1,\"table_end\":\"runs\"}",
            1,
        );
        let err = b.restore_from(bad_row.as_bytes(), opts).await.unwrap_err();
        assert!(err.to_string().contains("the row has 2 values"), "{err}");
    }
}
