//! SQLite: the run-creation batches of the group commit written by one
//! dedicated thread that owns its own connection to the database file.
//!
//! Through sqlx every statement of a batch is a hand-off from the writer
//! task to sqlx's SQLite thread and back (a channel send, a thread wake-up,
//! then the task waiting its turn among the HTTP tasks), and each table's
//! rows travel as JSON that SQLite parses again. Here the thread takes the
//! waiting requests itself (natural batching, as [`crate::batch`] does) and
//! runs the whole batch with cached prepared statements and bound values:
//! one hand-off in, one reply out, whatever the batch's size. Measured with
//! `wrk -t1 -c32` posting one-step runs: 7.2-8.3k req/s through sqlx,
//! 15-18k here (docs/benchmarks.md).
//!
//! Only batches without plans come here: with plans, admission reads plan
//! assignments and counters and may refuse runs, which the general path of
//! [`super::group_commit`] does. The rows written are the same in both:
//! the run, its jobs, its `run.queued` event, its `run.created` audit row,
//! its usage-ledger row and the `runs` counter of the batch's shard, all
//! stamped with one instant read from the database clock.
//!
//! The connection has the pool's settings (WAL, `synchronous = NORMAL`,
//! `busy_timeout` 10 s, foreign keys on), except its checkpoint interval
//! ([`CHECKPOINT_PAGES`]). The thread ends, closing it, when the last
//! [`Handle`] is dropped (with the last clone of the store that started it).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, params};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::feed::CommitSignal;
use super::group_commit::MAX_BATCH;
use super::{Result, SQLITE_NOW, StoreError};
use crate::deadline::Deadline;
use crate::model::{EventType, NewRun};
use crate::plans::Meter;

/// How long a statement waits for SQLite's write lock (the pool's setting).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// WAL pages after which this connection's commit copies the WAL back into
/// the database file (a checkpoint, with its `fsync`), instead of SQLite's
/// 1,000. The copy takes each page once however often it changed since the
/// last checkpoint, and a batch rewrites the same right-hand index pages, so
/// fewer checkpoints copy fewer pages in all; the WAL file grows to about
/// 16 MB (4 KB pages) and is then reused from its start. Measured with
/// `wrk -t1 -c32` posting one-step runs, in two interleaved pairs: 16.8-17.0k
/// req/s against 15.0-16.0k at 1,000 pages. Checkpointing after the
/// batch's answers instead of inside its commit (automatic checkpoint off,
/// a passive one every 100 batches) made no difference in five pairs. The
/// pool's connections keep 1,000 and checkpoint when they commit past it.
const CHECKPOINT_PAGES: i64 = 4_000;

/// One run to store, owned so it can cross to the writer thread. Its id is
/// drawn by the thread as it writes it, so ids (UUIDv7, time-ordered) follow
/// the order runs are stored in, as `GET /api/v2/runs` lists them.
pub(crate) struct Row {
    /// The input object as JSON text.
    pub input: String,
    /// The steps as a JSON array's text.
    pub steps: String,
    /// Each step as JSON text: the payload of its job.
    pub payloads: Vec<String>,
    /// `Idempotency-Key`, when sent.
    pub idempotency_key: Option<String>,
    /// Hash of the request carrying the key.
    pub request_hash: String,
    /// Correlation id.
    pub correlation_id: String,
    /// The tenant charged.
    pub tenant: String,
    /// Who asked, for the audit row.
    pub actor: String,
    /// The request id, for the audit row.
    pub request_id: Option<String>,
    /// Attempts each step gets.
    pub max_attempts: i64,
}

impl Row {
    /// The row of `new`.
    ///
    /// Errors: [`StoreError::Corrupt`] when its steps do not serialise.
    pub(crate) fn of(new: &NewRun) -> Result<Self> {
        let payloads: Vec<String> = new
            .steps
            .iter()
            .map(serde_json::to_string)
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| StoreError::Corrupt("steps do not serialise".into()))?;
        Ok(Self {
            input: new.input.to_string(),
            // serde_json's compact array: its items joined by commas, so
            // each step is serialised once, not once more for the array.
            steps: format!("[{}]", payloads.join(",")),
            payloads,
            idempotency_key: new.idempotency_key.clone(),
            request_hash: new.request_hash.clone(),
            correlation_id: new.correlation_id.clone(),
            tenant: new.tenant.clone(),
            actor: new.actor.clone(),
            request_id: new.request_id.clone(),
            max_attempts: new.max_attempts,
        })
    }
}

struct Request {
    row: Row,
    /// The deadline of the HTTP request it came with, if any.
    deadline: Option<Arc<Deadline>>,
    reply: oneshot::Sender<Result<Option<Stored>>>,
}

impl Request {
    /// Takes the request for a commit ([`Deadline::claim`]): false when its
    /// caller stopped waiting (answered 408, or gone), and nothing of it may
    /// be written any more.
    fn claim(&self) -> bool {
        !self.reply.is_closed() && self.deadline.as_deref().is_none_or(Deadline::claim)
    }
}

/// What the thread takes from its channel.
// Nearly every message is a `Write`: boxing it would allocate once per run.
#[allow(clippy::large_enum_variant)]
enum Message {
    /// A run to write.
    Write(Request),
    /// Close the connection and end, then answer (see [`Handle::close`]).
    Close(oneshot::Sender<()>),
}

/// Requests waiting for the thread before callers wait to send.
const QUEUE_DEPTH: usize = 4 * MAX_BATCH;

/// The callers' side of the writer thread; cheap to clone.
#[derive(Clone)]
pub(crate) struct Handle {
    tx: mpsc::Sender<Message>,
}

impl Handle {
    /// Opens a connection to the SQLite file at `path` (which must exist:
    /// the pool created it) and starts the thread, which adds the usage of
    /// its runs to counter shard `shard` and raises `events` after each
    /// commit. `None` when the file cannot be opened for writing or no
    /// thread can be started; run creation then stays on the pool.
    pub(crate) fn start(path: &str, shard: i64, events: CommitSignal) -> Option<Self> {
        Self::start_with(path, shard, events, BUSY_TIMEOUT)
    }

    /// [`Handle::start`] waiting `busy_timeout` for SQLite's write lock.
    fn start_with(
        path: &str,
        shard: i64,
        events: CommitSignal,
        busy_timeout: Duration,
    ) -> Option<Self> {
        let conn = match open(path, busy_timeout) {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "run creation on SQLite stays on the pool: its own connection did not open");
                return None;
            }
        };
        let (tx, rx) = mpsc::channel::<Message>(QUEUE_DEPTH);
        let spawned = std::thread::Builder::new()
            .name("vm-sqlite-writer".into())
            .spawn(move || run(conn, rx, shard, &events));
        match spawned {
            Ok(_) => Some(Self { tx }),
            Err(e) => {
                tracing::warn!(error = %e, "run creation on SQLite stays on the pool: no thread for its writer");
                None
            }
        }
    }

    /// Stores `row` with whatever other requests are waiting, in one
    /// transaction. Returns the run's id and `created_at`, or `None` when
    /// its idempotency key was already taken (nothing of it was written: the
    /// caller looks the original up).
    ///
    /// Errors: [`StoreError::Sqlite`] when SQLite refused it (nothing of it
    /// was written); unavailable (the API's 503) when its write lock stayed
    /// taken for 10 s, the disk is full or the file cannot be written.
    pub(crate) async fn write(&self, row: Row) -> Result<Option<Stored>> {
        let (reply, answer) = oneshot::channel();
        let gone = || StoreError::Corrupt("the SQLite writer thread is gone".into());
        self.tx
            .send(Message::Write(Request {
                row,
                deadline: Deadline::current(),
                reply,
            }))
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }

    /// Writes what was sent before, closes the thread's connection and ends
    /// the thread; returns once the connection is closed. SQLite checkpoints
    /// the WAL into the database file and removes it when its last
    /// connection closes, so after a clean stop the file holds everything:
    /// without this the thread's connection stayed open until the process
    /// exited, and the file was left empty beside a WAL holding all of it.
    /// Later writes fail ("the SQLite writer thread is gone").
    pub(crate) async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.tx.send(Message::Close(done)).await.is_ok() {
            let _ = closed.await;
        }
    }
}

/// The thread: takes the first request waiting (blocking until one comes),
/// then every one already queued behind it up to [`MAX_BATCH`], and writes
/// them in one transaction; no timer, so a lone request is written at once
/// (the natural batching of [`crate::batch`]). A request whose caller has
/// stopped waiting is left out. If the transaction fails for a cause of the
/// database's (lock, disk), every request gets that error; otherwise each is
/// retried alone, so one bad request never fails its neighbours. Ends when
/// every sender is gone.
fn run(mut conn: Connection, mut rx: mpsc::Receiver<Message>, shard: i64, events: &CommitSignal) {
    let mut closing = None;
    while closing.is_none() {
        let mut batch = Vec::new();
        match rx.blocking_recv() {
            Some(Message::Write(request)) => batch.push(request),
            Some(Message::Close(done)) => closing = Some(done),
            None => break,
        }
        while closing.is_none() && batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Message::Write(request)) => batch.push(request),
                Ok(Message::Close(done)) => closing = Some(done),
                Err(_) => break,
            }
        }
        // A caller that stopped waiting (its request timed out and was
        // answered 408) must not find its run created afterwards.
        batch.retain(|r| !r.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        match write(&mut conn, &mut batch, shard) {
            Ok(created) => {
                if !created.is_empty() {
                    events.raise();
                }
                for (request, at) in batch.into_iter().zip(created) {
                    let _ = request.reply.send(Ok(at));
                }
            }
            // The write lock stayed taken for the whole busy timeout, or the
            // disk is full: alone, each request would meet it again (and
            // wait as long again for the lock), and so would the requests
            // that came while it waited. All are answered now; a lone
            // request gets the error itself.
            Err(e) if e.is_unavailable() => {
                let mut all = batch;
                while closing.is_none() {
                    match rx.try_recv() {
                        Ok(Message::Write(request)) => all.push(request),
                        Ok(Message::Close(done)) => closing = Some(done),
                        Err(_) => break,
                    }
                }
                let last = all.pop();
                for request in all {
                    let _ = request.reply.send(Err(same_cause(&e)));
                }
                if let Some(request) = last {
                    let _ = request.reply.send(Err(e));
                }
            }
            Err(e) if batch.len() == 1 => {
                if let Some(request) = batch.pop() {
                    let _ = request.reply.send(Err(e));
                }
            }
            Err(_) => {
                for request in batch {
                    let mut alone = vec![request];
                    let written = write(&mut conn, &mut alone, shard);
                    if let Some(request) = alone.pop() {
                        if written.is_ok() {
                            events.raise();
                        }
                        let _ = request.reply.send(written.map(|mut v| v.pop().flatten()));
                    }
                }
            }
        }
    }
    if closing.is_some() {
        checkpoint_at_close(&conn);
    }
    drop(conn);
    if let Some(done) = closing {
        let _ = done.send(());
    }
}

/// How long the checkpoint at close waits for a reader to finish.
const CLOSE_CHECKPOINT_WAIT: Duration = Duration::from_millis(500);

/// Folds the whole WAL into the database file and empties it, so that the
/// file alone holds everything once the store is closed. SQLite does this
/// by itself when the last connection closes, but only if the closing
/// connection sees no other open: the pool's connections close together
/// (those in use as they come back), may each see another, and may even
/// outlive [`sqlx::Pool::close`] (a connection returned to the pool as it
/// closes), so one stop in five left the WAL behind. The store closes the
/// pool first and this thread's connection last, so no write follows.
fn checkpoint_at_close(conn: &Connection) {
    let _ = conn.busy_timeout(CLOSE_CHECKPOINT_WAIT);
    let outcome = conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| {
        row.get::<_, i64>(0)
    });
    match outcome {
        Ok(0) => {}
        Ok(_) => tracing::warn!(
            "the SQLite WAL could not be folded into the database file at close (a reader held it); it is replayed at the next start"
        ),
        Err(e) => {
            tracing::warn!(error = %e, "the SQLite WAL could not be folded into the database file at close; it is replayed at the next start")
        }
    }
}

/// The error of each request of a batch that failed with `e` for a cause
/// not its own (an error is not `Clone`): SQLite's same result code.
fn same_cause(e: &StoreError) -> StoreError {
    let code = match e {
        StoreError::Sqlite { source, .. } => source.sqlite_error().copied(),
        _ => None,
    }
    .unwrap_or_else(|| rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY));
    StoreError::from(rusqlite::Error::SqliteFailure(code, None))
}

fn open(path: &str, busy_timeout: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "wal_autocheckpoint", CHECKPOINT_PAGES)?;
    Ok(conn)
}

/// A run the thread stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stored {
    /// Its id, drawn as it was written.
    pub id: Uuid,
    /// Its `created_at`: ms since the epoch, database clock (the batch's).
    pub created_at: i64,
}

/// One outcome per request of `batch` as [`write_tx`] leaves it, in order
/// (`None`: its key was taken).
fn write(
    conn: &mut Connection,
    batch: &mut Vec<Request>,
    shard: i64,
) -> Result<Vec<Option<Stored>>> {
    write_tx(conn, batch, shard).map_err(StoreError::from)
}

/// The batch in one `BEGIN IMMEDIATE` transaction: the write lock is taken
/// first, so no statement of the batch can fail on a lock upgrade. Once it
/// is taken, the requests whose caller stopped waiting meanwhile are left
/// out of `batch`: waiting for the lock can take the whole busy timeout, and
/// a request answered 408 during that wait was written afterwards. The
/// others are claimed ([`Deadline::claim`]): the HTTP layer answers them
/// with this batch's outcome, not with a 408 while it commits.
fn write_tx(
    conn: &mut Connection,
    batch: &mut Vec<Request>,
    shard: i64,
) -> rusqlite::Result<Vec<Option<Stored>>> {
    static CLOCK: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        format!(
            "SELECT t, {} FROM (SELECT {SQLITE_NOW} AS t)",
            super::usage::period_sql(crate::config::DbBackend::Sqlite, "t")
        )
    });
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    batch.retain(Request::claim);
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<&Row> = batch.iter().map(|r| &r.row).collect();
    // One instant for the whole batch, and its UTC month.
    let (at, period): (i64, String) = tx
        .prepare_cached(&CLOCK)?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let mut created = Vec::with_capacity(rows.len());
    let mut runs_of: BTreeMap<&str, i64> = BTreeMap::new();
    {
        let mut run = tx.prepare_cached(
            "INSERT INTO runs (id, status, input, steps, step_count, idempotency_key, request_hash, \
             correlation_id, tenant, created_at, updated_at) \
             VALUES (?1, 'queued', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9) \
             ON CONFLICT (idempotency_key) DO NOTHING",
        )?;
        let mut job = tx.prepare_cached(
            "INSERT INTO jobs (run_id, correlation_id, step_index, step_count, payload, state, \
             max_attempts, run_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
        )?;
        let mut event = tx.prepare_cached(
            "INSERT INTO run_events (run_id, event_type, step_index, attempt, message, data, created_at) \
             VALUES (?1, ?2, NULL, NULL, NULL, ?3, ?4)",
        )?;
        let mut audit = tx.prepare_cached(
            "INSERT INTO audit_log (at, actor, action, target, outcome, request_id, detail, tenant) \
             VALUES (?1, ?2, 'run.created', ?3, 'success', ?4, ?5, ?6)",
        )?;
        let mut ledger = tx.prepare_cached(
            "INSERT INTO usage_ledger (tenant, meter, quantity, period, run_id, step_index, source, at) \
             VALUES (?1, ?2, 1, ?3, ?4, NULL, 'run.created', ?5)",
        )?;
        for &row in &rows {
            let steps = row.payloads.len() as i64;
            let id = Uuid::now_v7();
            let id_text = id.to_string();
            let inserted = run.execute(params![
                id_text,
                row.input,
                row.steps,
                steps,
                row.idempotency_key,
                row.request_hash,
                row.correlation_id,
                row.tenant,
                at,
            ])?;
            if inserted == 0 {
                // The idempotency key is taken (earlier, or by a request
                // earlier in this batch): a replay, which writes nothing.
                created.push(None);
                continue;
            }
            for (i, payload) in row.payloads.iter().enumerate() {
                let state = if i == 0 { "queued" } else { "waiting" };
                job.execute(params![
                    id_text,
                    row.correlation_id,
                    i as i64,
                    steps,
                    payload,
                    state,
                    row.max_attempts,
                    at,
                ])?;
            }
            let detail = format!("{{\"steps\":{steps}}}");
            event.execute(params![id_text, EventType::RunQueued.as_str(), detail, at])?;
            audit.execute(params![
                at,
                row.actor,
                id_text,
                row.request_id,
                detail,
                row.tenant
            ])?;
            ledger.execute(params![
                row.tenant,
                Meter::Runs.as_str(),
                period,
                id_text,
                at
            ])?;
            created.push(Some(Stored { id, created_at: at }));
            *runs_of.entry(row.tenant.as_str()).or_insert(0) += 1;
        }
        // Counter rows in key order, as the general path adds them.
        let mut counter = tx.prepare_cached(
            "INSERT INTO usage_counters (tenant, period, meter, shard, used, updated_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
             ON CONFLICT (tenant, period, meter, shard) DO UPDATE \
             SET used = usage_counters.used + excluded.used, updated_at = excluded.updated_at",
        )?;
        for (tenant, n) in &runs_of {
            counter.execute(params![tenant, period, Meter::Runs.as_str(), shard, n, at])?;
        }
    }
    tx.commit()?;
    Ok(created)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use sqlx::Row as _;

    use super::*;
    use crate::store::Store;

    use crate::store::test_new_run as new_run;

    /// Writes one one-step run without a key.
    async fn write_one(handle: &Handle) -> Result<Option<Stored>> {
        handle.write(Row::of(&new_run(None, 1)).unwrap()).await
    }

    /// A writer on `w.db` in `dir` waiting `busy` for the write lock, and a
    /// connection holding that lock.
    fn locked(dir: &std::path::Path, busy: Duration) -> (Handle, Connection) {
        let path = dir.join("w.db");
        let handle =
            Handle::start_with(path.to_str().unwrap(), 3, CommitSignal::default(), busy).unwrap();
        let holder = Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        (handle, holder)
    }

    async fn migrated(dir: &std::path::Path) -> (Store, Handle) {
        let store = crate::store::test_sqlite_store(dir, "w.db").await;
        store.migrate().await.unwrap();
        let path = dir.join("w.db");
        let handle = Handle::start(path.to_str().unwrap(), 7, CommitSignal::default()).unwrap();
        (store, handle)
    }

    async fn count(store: &Store, sql: &str) -> i64 {
        sqlx::query(sql)
            .fetch_one(store.pool())
            .await
            .unwrap()
            .get::<i64, _>(0)
    }

    /// Concurrent writes come out as the general path writes a creation:
    /// the run, a job per step (the first queued), `run.queued`, the audit
    /// row, the ledger row and the tenant's counter on the writer's shard.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_runs_are_stored_with_everything_a_creation_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, handle) = migrated(dir.path()).await;
        let writes = (0..40).map(|i| {
            let handle = handle.clone();
            async move {
                let stored = handle
                    .write(Row::of(&new_run(None, 1 + i % 2)).unwrap())
                    .await
                    .unwrap()
                    .unwrap();
                (stored.id.to_string(), stored.created_at)
            }
        });
        let written = futures::future::join_all(writes).await;
        let now = store.db_now().await.unwrap();
        for (id, at) in &written {
            assert!(
                (now - 10_000..=now).contains(at),
                "created_at {at} is the database's now"
            );
            let row = sqlx::query(
                "SELECT status, created_at, tenant, step_count, steps FROM runs WHERE id = $1",
            )
            .bind(id)
            .fetch_one(store.pool())
            .await
            .unwrap();
            assert_eq!(row.get::<String, _>("status"), "queued");
            assert_eq!(row.get::<i64, _>("created_at"), *at);
            assert_eq!(row.get::<String, _>("tenant"), "acme");
            let steps = new_run(None, row.get::<i64, _>("step_count") as usize).steps;
            let text = serde_json::to_string(&steps).unwrap();
            assert_eq!(
                row.get::<String, _>("steps"),
                text,
                "the steps as the general path stores them"
            );
        }
        assert_eq!(count(&store, "SELECT COUNT(*) FROM runs").await, 40);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM jobs").await, 60);
        assert_eq!(
            count(
                &store,
                "SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND step_index = 0"
            )
            .await,
            40
        );
        assert_eq!(
            count(
                &store,
                "SELECT COUNT(*) FROM jobs WHERE state = 'waiting' AND step_index = 1"
            )
            .await,
            20
        );
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM run_events WHERE event_type = 'run.queued' AND data IN ('{\"steps\":1}', '{\"steps\":2}')").await,
            40
        );
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM audit_log WHERE action = 'run.created' AND outcome = 'success' AND actor = 'key:a' AND target IN (SELECT id FROM runs)").await,
            40
        );
        assert_eq!(
            count(&store, "SELECT COUNT(*) FROM usage_ledger l JOIN runs r ON r.id = l.run_id WHERE l.meter = 'runs' AND l.source = 'run.created' AND l.period = strftime('%Y-%m', r.created_at / 1000, 'unixepoch')").await,
            40
        );
        assert_eq!(
            count(&store, "SELECT SUM(used) FROM usage_counters WHERE tenant = 'acme' AND meter = 'runs' AND shard = 7").await,
            40
        );
    }

    /// The thread's connection checkpoints the WAL ([`CHECKPOINT_PAGES`]):
    /// the runs reach the database file and the WAL stays bounded instead
    /// of growing with every run written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_is_checkpointed_as_runs_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let (store, handle) = migrated(dir.path()).await;
        let db = dir.path().join("w.db");
        let wal = dir.path().join("w.db-wal");
        let before = std::fs::metadata(&db).unwrap().len();
        let mut largest_wal = 0;
        for _ in 0..1_500 {
            handle
                .write(Row::of(&new_run(None, 1)).unwrap())
                .await
                .unwrap();
            largest_wal = largest_wal.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
        }
        assert_eq!(count(&store, "SELECT COUNT(*) FROM runs").await, 1_500);
        let after = std::fs::metadata(&db).unwrap().len();
        assert!(
            after > before,
            "the database file stayed at {before} bytes: nothing was checkpointed"
        );
        // 1,500 one-run transactions dirty the pages of each table and index
        // they write: without checkpoints the WAL passes 48 MB.
        assert!(
            largest_wal < 32 << 20,
            "the WAL grew to {largest_wal} bytes"
        );
    }

    /// While another connection holds the write lock past the busy
    /// timeout, every waiting request fails as unavailable (the API's 503)
    /// after about one timeout, not one more timeout each, and writing
    /// resumes once the lock is released.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_lock_held_elsewhere_fails_the_batch_once_and_writing_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = migrated(dir.path()).await;
        let (handle, holder) = locked(dir.path(), Duration::from_millis(300));
        let started = std::time::Instant::now();
        let writes = (0..8).map(|_| handle.write(Row::of(&new_run(None, 1)).unwrap()));
        let results = futures::future::join_all(writes).await;
        let waited = started.elapsed();
        holder.execute_batch("ROLLBACK").unwrap();
        for r in &results {
            assert!(matches!(r, Err(e) if e.is_unavailable()), "{r:?}");
        }
        // Retried alone, the seven behind the first would wait 2.1 s more.
        assert!(waited < Duration::from_millis(1_800), "waited {waited:?}");
        assert!(write_one(&handle).await.unwrap().is_some());
        assert_eq!(count(&store, "SELECT COUNT(*) FROM runs").await, 1);
    }

    /// Requests that arrive while a batch waits out the busy timeout are
    /// answered with its failure at once, not after a wait of their own:
    /// five concurrent creations under a held lock took one wait for two of
    /// them and two waits for the other three.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_queued_behind_a_batch_that_found_the_lock_taken_fail_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let (_store, _) = migrated(dir.path()).await;
        let (handle, holder) = locked(dir.path(), Duration::from_millis(800));
        let started = std::time::Instant::now();
        let first = tokio::spawn({
            let handle = handle.clone();
            async move { write_one(&handle).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let behind = futures::future::join_all((0..4).map(|_| write_one(&handle))).await;
        let waited = started.elapsed();
        assert!(first.await.unwrap().is_err_and(|e| e.is_unavailable()));
        for r in &behind {
            assert!(matches!(r, Err(e) if e.is_unavailable()), "{r:?}");
        }
        // One busy timeout (0.8 s), not two.
        assert!(waited < Duration::from_millis(1_400), "waited {waited:?}");
        holder.execute_batch("ROLLBACK").unwrap();
        assert!(write_one(&handle).await.unwrap().is_some());
    }

    /// A request whose caller stopped waiting before its batch was written
    /// (the HTTP request timed out and was answered 408) writes nothing:
    /// the client was told it failed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_whose_caller_gave_up_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = migrated(dir.path()).await;
        let (handle, holder) = locked(dir.path(), Duration::from_secs(5));
        // The first request's batch waits for the lock; the second waits
        // behind it and is given up on.
        let first = tokio::spawn({
            let handle = handle.clone();
            async move { write_one(&handle).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let gave_up = tokio::time::timeout(
            Duration::from_millis(100),
            handle.write(Row::of(&new_run(Some("late"), 1)).unwrap()),
        )
        .await;
        assert!(
            gave_up.is_err(),
            "the second write was answered while the lock was held"
        );
        holder.execute_batch("ROLLBACK").unwrap();
        assert!(first.await.unwrap().unwrap().is_some());
        // The thread has taken the second request by the time a third is
        // answered.
        assert!(write_one(&handle).await.unwrap().is_some());
        assert_eq!(count(&store, "SELECT COUNT(*) FROM runs").await, 2);
        assert_eq!(
            count(
                &store,
                "SELECT COUNT(*) FROM runs WHERE idempotency_key = 'late'"
            )
            .await,
            0
        );
    }

    /// A request whose caller stops waiting while its own batch waits for
    /// the write lock (held by another process past the HTTP timeout, within
    /// the busy timeout) writes nothing either: the thread looks again once
    /// it holds the lock. Before, the run was created after its 408.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_given_up_while_its_batch_waits_for_the_lock_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = migrated(dir.path()).await;
        let (handle, holder) = locked(dir.path(), Duration::from_secs(5));
        let gave_up = tokio::time::timeout(Duration::from_millis(300), write_one(&handle)).await;
        assert!(gave_up.is_err(), "answered while the lock was held");
        holder.execute_batch("ROLLBACK").unwrap();
        // The thread has finished that batch by the time a later one is
        // answered.
        assert!(write_one(&handle).await.unwrap().is_some());
        assert_eq!(count(&store, "SELECT COUNT(*) FROM runs").await, 1);
        assert_eq!(count(&store, "SELECT COUNT(*) FROM jobs").await, 1);
    }

    /// Closing the store closes the thread's connection too, so SQLite
    /// checkpoints the WAL into the file and removes it: the file alone
    /// holds every run. Before, the thread's connection stayed open until
    /// the process exited, leaving an empty file beside the WAL.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_store_leaves_one_self_contained_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::test_sqlite_store(dir.path(), "c.db").await;
        store.migrate().await.unwrap();
        assert!(store.creates.has_sqlite_writer());
        for _ in 0..20 {
            store.create_run(&new_run(None, 1)).await.unwrap();
        }
        store.close().await;
        let wal = dir.path().join("c.db-wal");
        assert!(
            !wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0,
            "the WAL is left with {} bytes",
            std::fs::metadata(&wal).unwrap().len()
        );
        let copy = dir.path().join("copy.db");
        std::fs::copy(dir.path().join("c.db"), &copy).unwrap();
        let alone = Connection::open(&copy).unwrap();
        let runs: i64 = alone
            .query_row("SELECT COUNT(*) FROM runs", [], |r| r.get(0))
            .unwrap();
        assert_eq!(runs, 20);
        // Later creations fail instead of hanging.
        assert!(store.create_run(&new_run(None, 1)).await.is_err());
    }

    /// Connections in use when the store closes (a request's, a stream
    /// poller's) close as they come back, together, and some outlive the
    /// pool's close; SQLite removes the WAL only when a closing connection
    /// finds itself the last open: one stop of `serve` in five left 1.2 MB
    /// of WAL beside the file. The thread's connection now closes last and
    /// checkpoints the WAL into the file first, every time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_store_closed_while_its_connections_are_in_use_leaves_no_wal() {
        const HELD: usize = 4;
        for round in 0..12 {
            let dir = tempfile::tempdir().unwrap();
            let db = crate::config::DatabaseSettings {
                url: crate::config::Secret::new(format!(
                    "sqlite://{}/w.db?mode=rwc",
                    dir.path().display()
                )),
                backend: crate::config::DbBackend::Sqlite,
                embedded: false,
            };
            let store = Store::connect(&db, HELD as u32).await.unwrap();
            store.migrate().await.unwrap();
            assert!(store.creates.has_sqlite_writer());
            for _ in 0..20 {
                store.create_run(&new_run(None, 1)).await.unwrap();
            }
            let gate = std::sync::Arc::new(tokio::sync::Barrier::new(HELD + 1));
            let mut holders = Vec::new();
            for _ in 0..HELD {
                let pool = store.pool().clone();
                let gate = gate.clone();
                holders.push(tokio::spawn(async move {
                    let mut conn = pool.acquire().await.unwrap();
                    sqlx::query("SELECT COUNT(*) FROM runs")
                        .fetch_one(&mut *conn)
                        .await
                        .unwrap();
                    gate.wait().await;
                    drop(conn);
                }));
            }
            gate.wait().await;
            store.close().await;
            for holder in holders {
                holder.await.unwrap();
            }
            let wal = dir.path().join("w.db-wal");
            let left = std::fs::metadata(&wal).map_or(0, |m| m.len());
            assert_eq!(left, 0, "round {round}: {left} bytes left in the WAL");
        }
    }

    /// A taken idempotency key writes nothing; a row SQLite refuses (here
    /// by a trigger refusing one tenant) fails alone, and the runs sent with
    /// it are stored; ids follow the order runs are stored in.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replay_writes_nothing_and_a_refused_row_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (store, handle) = migrated(dir.path()).await;
        let keyed = new_run(Some("k1"), 1);
        let first = handle.write(Row::of(&keyed).unwrap()).await.unwrap();
        assert!(first.is_some());
        assert_eq!(handle.write(Row::of(&keyed).unwrap()).await.unwrap(), None);
        for table in ["runs", "jobs", "run_events", "audit_log", "usage_ledger"] {
            let sql = format!("SELECT COUNT(*) FROM {table}");
            assert_eq!(
                count(&store, &sql).await,
                1,
                "{table}: the replay wrote a row"
            );
        }
        sqlx::query(
            "CREATE TRIGGER refuse BEFORE INSERT ON runs WHEN NEW.tenant = 'refused' \
             BEGIN SELECT RAISE(ABORT, 'refused'); END",
        )
        .execute(store.pool())
        .await
        .unwrap();
        let mut refused = new_run(None, 1);
        refused.tenant = "refused".into();
        let mut writes = vec![handle.write(Row::of(&refused).unwrap())];
        for _ in 0..8 {
            writes.push(handle.write(Row::of(&new_run(None, 1)).unwrap()));
        }
        let results = futures::future::join_all(writes).await;
        assert!(
            matches!(
                results[0],
                Err(StoreError::Sqlite {
                    unavailable: false,
                    ..
                })
            ),
            "{:?}",
            results[0]
        );
        assert!(
            results[1..].iter().all(|r| matches!(r, Ok(Some(_)))),
            "{results:?}"
        );
        assert_eq!(count(&store, "SELECT COUNT(*) FROM runs").await, 9);
        assert_eq!(
            count(
                &store,
                "SELECT SUM(used) FROM usage_counters WHERE meter = 'runs'"
            )
            .await,
            9
        );
        // Ids are drawn as runs are written: in id order, the runs are in
        // the order of their `run.queued` events.
        let by_id: Vec<String> = sqlx::query("SELECT id FROM runs ORDER BY id")
            .fetch_all(store.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>("id"))
            .collect();
        let by_event: Vec<String> = sqlx::query(
            "SELECT run_id FROM run_events WHERE event_type = 'run.queued' ORDER BY id",
        )
        .fetch_all(store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<String, _>("run_id"))
        .collect();
        assert_eq!(by_id, by_event);
    }
}
