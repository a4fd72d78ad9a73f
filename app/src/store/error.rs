//! The store's errors, and which of them are the database's state
//! (unavailability: the API's 503, the worker's retries) rather than the
//! statement's.

/// Errors of the store boundary.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is shutting down, or (SQLite) its
    /// write lock stayed taken past the busy timeout, the disk is full or
    /// the file cannot be read or written; worth retrying.
    #[error("database unavailable")]
    Unavailable(#[source] sqlx::Error),
    /// The database refused a text value it cannot store (PostgreSQL rejects
    /// NUL bytes and invalid UTF-8, SQLSTATE 22021 / 22P05 / 54000): the
    /// client's input is at fault, so the HTTP layer answers 400.
    #[error("text the database cannot store (NUL byte or invalid encoding)")]
    InvalidText(#[source] sqlx::Error),
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
    /// The SQLite database file cannot be opened or created.
    #[error("cannot open the SQLite database file {path}: {reason}")]
    SqliteFile {
        /// The file path from the URL (not secret: SQLite URLs carry no password).
        path: String,
        /// What the operating system said.
        reason: String,
    },
    /// A tool that only reads was pointed at an SQLite database that does
    /// not exist (nothing was created).
    #[error(
        "the SQLite database {path} does not exist (check VM_DB_URL, or VM_WORKSPACE_ROOT for the embedded database); nothing was created"
    )]
    SqliteMissing {
        /// The file path from the URL (not secret: SQLite URLs carry no password).
        path: String,
    },
    /// The HTTP request a write was for ran out of time before the write
    /// could be committed ([`crate::deadline::Deadline::budget`]): nothing
    /// of it was written. Counts as [`StoreError::Unavailable`] does (the
    /// API's 503): the database held a lock, or was busy, that long.
    #[error("the request's time ran out before its write could be committed; nothing was written")]
    OutOfTime,
    /// A stored row could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// SQLite refused a batch of the run-creation writer thread
    /// (`store/sqlite_writer.rs`), which has its own connection outside the pool;
    /// `unavailable` when the cause is the database's state, not the
    /// batch, and retrying later may succeed: its write lock stayed taken
    /// past the busy timeout (10 s), the disk is full, or the file could
    /// not be read or written. Such an error counts as
    /// [`StoreError::Unavailable`] does (the API's 503). Shown with
    /// SQLite's words (a full disk, a lock held), which carry no secret.
    #[error("SQLite refused the write: {source}")]
    Sqlite {
        /// What SQLite said.
        #[source]
        source: rusqlite::Error,
        /// SQLITE_BUSY, SQLITE_LOCKED, SQLITE_FULL or SQLITE_IOERR.
        unavailable: bool,
    },
}

impl From<rusqlite::Error> for StoreError {
    fn from(source: rusqlite::Error) -> Self {
        let unavailable = source
            .sqlite_error()
            .is_some_and(|e| sqlite_state_error(e.extended_code));
        StoreError::Sqlite {
            source,
            unavailable,
        }
    }
}

impl StoreError {
    /// True when retrying later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_)
                | StoreError::OutOfTime
                | StoreError::Sqlite {
                    unavailable: true,
                    ..
                }
        )
    }

    /// True when SQLite refused a write for the state of its storage: the
    /// disk is full (`SQLITE_FULL`) or the file could not be written
    /// (`SQLITE_IOERR*`), through the pool or the writer thread. Such a
    /// refusal is unavailability, and also makes readiness check that
    /// writes commit again ([`super::Store::takes_writes`]).
    pub(crate) fn is_storage_refusal(&self) -> bool {
        use rusqlite::ffi::{SQLITE_FULL, SQLITE_IOERR};
        let code = match self {
            StoreError::Unavailable(sqlx::Error::Database(db))
                if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() =>
            {
                db.code().and_then(|c| c.parse::<i32>().ok())
            }
            StoreError::Sqlite { source, .. } => source.sqlite_error().map(|e| e.extended_code),
            _ => None,
        };
        code.is_some_and(|c| matches!(c & 0xff, SQLITE_FULL | SQLITE_IOERR))
    }

    /// True for a deadlock or serialization failure: the transaction may be
    /// retried as is.
    pub(crate) fn is_retryable_conflict(&self) -> bool {
        match self {
            StoreError::Unavailable(sqlx::Error::Database(db)) => {
                matches!(db.code().as_deref(), Some("40P01" | "40001"))
            }
            _ => false,
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        if let sqlx::Error::Database(db) = &e {
            let code = db.code().unwrap_or_default();
            // Character-encoding refusals: 22021 (invalid byte sequence, NUL),
            // 22P05 (untranslatable character), 54000 (program limit, an over-long
            // text in an index).
            if matches!(code.as_ref(), "22021" | "22P05" | "54000") {
                return StoreError::InvalidText(e);
            }
        }
        let unavailable = match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => true,
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                if db.try_downcast_ref::<sqlx::sqlite::SqliteError>().is_some() {
                    // SQLite's extended result code: the database's state,
                    // as the writer thread's errors are classified.
                    code.parse().is_ok_and(sqlite_state_error)
                } else {
                    postgres_state_error(&code)
                }
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

/// Whether a PostgreSQL SQLSTATE comes from the server's state rather than
/// the statement, so that another try may succeed (PostgreSQL's "Error
/// Codes" appendix): connection exceptions (class 08), insufficient
/// resources (class 53: disk full 53100, out of memory 53200, too many
/// connections 53300), an administrator's or crash shutdown (57P01–57P03),
/// deadlocks and serialization failures (40P01, 40001: retrying the
/// transaction succeeds), a lock not granted in time (55P03
/// `lock_not_available`: `lock_timeout`) and a statement cancelled
/// (57014 `query_canceled`: `statement_timeout`, which bounds a write done
/// for an HTTP request by the request's time left, or an administrator's
/// `pg_cancel_backend`). A lock held by a migration's `ALTER TABLE` or a
/// `VACUUM FULL` is the database's state: the API answers 503 and the
/// worker retries.
fn postgres_state_error(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P0")
        || matches!(code, "40P01" | "40001" | "55P03" | "57014")
}

/// Whether an SQLite result code (extended or primary) comes from the
/// database's state rather than the statement, so that another try may
/// succeed: its write lock stayed taken past the busy timeout (BUSY,
/// LOCKED, with their extended codes such as `SQLITE_BUSY_SNAPSHOT`), the
/// disk is full (FULL) or the file could not be read or written (IOERR, the
/// extended code of a failed `write` being `SQLITE_IOERR_WRITE`).
pub(crate) fn sqlite_state_error(code: i32) -> bool {
    use rusqlite::ffi::{SQLITE_BUSY, SQLITE_FULL, SQLITE_IOERR, SQLITE_LOCKED};
    matches!(
        code & 0xff,
        SQLITE_BUSY | SQLITE_LOCKED | SQLITE_FULL | SQLITE_IOERR
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full disk, an exhausted server or a lock held past the request's
    /// time answers 503 and is retried by the worker; a statement's own
    /// mistake (a constraint, a syntax error, an over-long text) does not.
    #[test]
    fn postgres_errors_of_the_servers_state_are_unavailability() {
        for code in [
            "08006", "53100", "53200", "53300", "57P01", "57P03", "40P01", "40001", "55P03",
            "57014",
        ] {
            assert!(postgres_state_error(code), "{code}");
        }
        for code in [
            "23505", "42601", "22001", "54000", "XX000", "25P02", "55000", "",
        ] {
            assert!(!postgres_state_error(code), "{code}");
        }
    }
}
