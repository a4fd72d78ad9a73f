//! Group commit of run creation: concurrent [`Store::create_run`] calls are
//! queued to writer tasks, each of which takes every request waiting (up to
//! [`MAX_BATCH`]) and stores them in one transaction with one statement per
//! table, so 32 clients do not queue for SQLite's single write lock one by one
//! and PostgreSQL pays one commit (one WAL flush) per batch, not per run.
//!
//! There is no timer: a writer takes what is waiting the moment it is free,
//! so a lone request is written at once and batches grow only under load (the
//! "natural batching" of PostgreSQL's own group commit and River's completer).
//! If a batch fails, each of its requests is retried alone, so one bad request
//! never fails its neighbours. Without a Tokio runtime at connect time (or once
//! the writers are gone) requests are written directly.
//!
//! A request made by an HTTP request carries its [`Deadline`]. Nothing is
//! committed for a caller that was answered 408 or went away: a batch
//! claims its requests ([`Deadline::claim`]) just before it commits (the
//! general path, rolling back and writing again without any that has gone
//! meanwhile) or before its one statement is sent (PostgreSQL without
//! plans); the HTTP layer answers a claimed request with the batch's
//! outcome instead of 408. On PostgreSQL the batch's statements take at
//! most the shortest time its requests have left, lock waits included
//! (`statement_timeout`: [`Store::begin_within`] on the general path, the
//! writer's own connection ([`Bounded`]) for the one-statement batch, which
//! stays one round trip), so that a table lock held past it (a migration's
//! `ALTER TABLE`, a `VACUUM FULL`) answers the batch 503 instead of
//! committing its runs once the lock is released, after their clients were
//! told 408. Without a deadline (the store called directly) the batch is
//! one statement on the store's pool that commits by itself.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use sqlx::any::AnyPoolOptions;
use sqlx::pool::PoolConnection;
use sqlx::{AnyPool, Row};
use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

use super::events::NewEvent;
use super::sqlite_writer;
use super::tenancy::{assigned_plan, resolve};
use super::usage::{QuotaRefusal, UsageRow, touched_of};
use super::{CreateOutcome, Result, Store, StoreError, recordset};
use crate::config::DbBackend;
use crate::deadline::Deadline;
use crate::model::{EventType, NewRun, Run, RunStatus};
use crate::plans::{Meter, Overage};

/// Most runs one transaction stores.
pub const MAX_BATCH: usize = 128;
/// Most writers on PostgreSQL; writer `n` adds to usage-counter shard
/// `counter_shard(n + 1)`, so the shards of other concurrent writers of a
/// store start past `counter_shard(MAX_WRITERS)`.
///
/// One: each batch's commit waits for its WAL flush, and while no other
/// batch is in flight every run that arrives meanwhile waits for the next
/// one, so a run costs the server less (fewer statements and commits).
/// Measured in interleaved runs: four writers against two, the steady-state
/// bench spent 13% less CPU per job with two (in each of six pairs); two
/// against one, it ran 4% faster with one in each of six pairs (6,925 →
/// 7,202 jobs/s on average) on 12% less CPU per job, while `POST
/// /api/v2/runs` on PostgreSQL (wrk, 32 clients) answered 3% less (9.7k
/// against 10.0k req/s, four pairs; the goal is 5k).
pub(crate) const MAX_WRITERS: u32 = 1;
/// Requests waiting for a writer before callers wait to enqueue.
const QUEUE_DEPTH: usize = 4 * MAX_BATCH;

struct Request {
    new: NewRun,
    /// The deadline of the HTTP request it came with, if any.
    deadline: Option<Arc<Deadline>>,
    reply: oneshot::Sender<Result<Stored>>,
}

impl Request {
    /// Takes the request for a commit ([`Deadline::claim`]): false when its
    /// caller stopped waiting (answered 408, or gone), and nothing of it may
    /// be committed any more.
    fn claim(&self) -> bool {
        !self.reply.is_closed() && self.deadline.as_deref().is_none_or(Deadline::claim)
    }
}

/// What became of one request of a batch.
#[derive(Debug, Clone)]
pub(crate) enum Stored {
    /// Stored now.
    Created(Run),
    /// Its idempotency key was taken: the caller looks the original up.
    Taken,
    /// A `block` allowance is used up: nothing was stored or counted.
    Refused(QuotaRefusal),
}

/// PostgreSQL: the connection a writer sends its one-statement batches for
/// HTTP requests through, a pool of one of its own beside the store's
/// (opened at the first such batch), so that the session's
/// `statement_timeout` is the writer's to set: it bounds the statement,
/// lock waits included, by the time its requests have left without a
/// round trip of its own per batch. It is set again only when it no longer
/// fits the batch's budget, and on every new connection.
struct Bounded {
    pool: AnyPool,
    /// The connection's `statement_timeout` (ms; 0: none yet).
    timeout_ms: Arc<AtomicU64>,
}

/// Sets the session's `statement_timeout` to `$1` ms (a bound parameter,
/// unlike `SET`, so that it is one prepared statement).
const SET_STATEMENT_TIMEOUT: &str = "SELECT set_config('statement_timeout', $1, false)";

impl Bounded {
    /// A pool of one connection to the database of `pool`, opened when first
    /// used.
    fn new(pool: &AnyPool) -> Self {
        let timeout_ms = Arc::new(AtomicU64::new(0));
        let applied = timeout_ms.clone();
        let pool = AnyPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _| {
                let ms = applied.load(Ordering::Acquire);
                Box::pin(async move {
                    if ms > 0 {
                        sqlx::query(SET_STATEMENT_TIMEOUT)
                            .bind(ms.to_string())
                            .execute(&mut *conn)
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_lazy_with((*pool.connect_options()).clone());
        Self { pool, timeout_ms }
    }

    /// The connection, its statements bounded by at most `budget` and at
    /// least half of it: three quarters of it when set, so that the budgets
    /// of later batches (their requests as fresh, or a little older) fit the
    /// same setting.
    ///
    /// Errors: the database's (unavailable when it cannot be reached).
    async fn acquire(&self, budget: Duration) -> Result<PoolConnection<sqlx::Any>> {
        let mut conn = self.pool.acquire().await?;
        let budget = u64::try_from(budget.as_millis()).unwrap_or(u64::MAX).max(1);
        let current = self.timeout_ms.load(Ordering::Acquire);
        if !timeout_fits(current, budget) {
            let set = (budget / 4 * 3).max(1);
            sqlx::query(SET_STATEMENT_TIMEOUT)
                .bind(set.to_string())
                .execute(&mut *conn)
                .await?;
            self.timeout_ms.store(set, Ordering::Release);
        }
        Ok(conn)
    }
}

/// Whether a `statement_timeout` of `current` ms (0: none) bounds a batch
/// whose requests have `budget` ms left: at most the budget, and not less
/// than half of it (a setting made for an old request would fail fresh
/// ones early).
fn timeout_fits(current: u64, budget: u64) -> bool {
    current > 0 && current <= budget && current.saturating_mul(2) >= budget
}

/// The callers' side of the writers; cheap to clone.
#[derive(Clone)]
pub(crate) struct Handle {
    tx: Option<mpsc::Sender<Request>>,
    /// SQLite: the writer thread that stores runs while no plans are
    /// loaded ([`sqlite_writer`]); the writer tasks take the rest.
    direct: Option<sqlite_writer::Handle>,
    /// PostgreSQL: each writer's own connection ([`Bounded`]), closed with
    /// the store.
    bounded: Vec<AnyPool>,
}

impl Handle {
    /// Starts the writers: one on SQLite (one writer at a time anyway), up to
    /// [`MAX_WRITERS`] on PostgreSQL (and at most half the pool, leaving the
    /// rest to readers and workers).
    pub(crate) fn start(
        pool: AnyPool,
        backend: DbBackend,
        max_connections: u32,
        usage: Arc<super::usage::Shared>,
        events: super::feed::CommitSignal,
        writes: Arc<super::writes::WriteHealth>,
        sqlite_file: Option<&str>,
    ) -> Self {
        if tokio::runtime::Handle::try_current().is_err() {
            return Self::disabled();
        }
        let direct = match backend {
            DbBackend::Sqlite => sqlite_file.and_then(|path| {
                sqlite_writer::Handle::start(path, usage.counter_shard(1), events.clone())
            }),
            DbBackend::Postgres => None,
        };
        let writers = match backend {
            DbBackend::Sqlite => 1,
            DbBackend::Postgres => (max_connections / 2).clamp(1, MAX_WRITERS),
        };
        let (tx, rx) = mpsc::channel::<Request>(QUEUE_DEPTH);
        let rx = Arc::new(Mutex::new(rx));
        // The writers' store writes directly; holding no sender, it lets the
        // channel close when the last user's store is dropped.
        let store = Store {
            pool,
            backend,
            creates: Self::disabled(),
            usage,
            events,
            writes,
        };
        let mut pools = Vec::new();
        for n in 0..writers {
            let shard = store.usage.counter_shard(u64::from(n) + 1);
            let bounded = (backend == DbBackend::Postgres).then(|| Bounded::new(&store.pool));
            pools.extend(bounded.as_ref().map(|b| b.pool.clone()));
            tokio::spawn(writer(store.clone(), rx.clone(), shard, bounded));
        }
        Self {
            tx: Some(tx),
            direct,
            bounded: pools,
        }
    }

    /// Closes the SQLite writer thread's connection, if there is one (see
    /// [`sqlite_writer::Handle::close`]), and the PostgreSQL writers' own
    /// connections; the async writers end with the store's last clone.
    /// Creations after this fail.
    pub(crate) async fn close(&self) {
        if let Some(direct) = &self.direct {
            direct.close().await;
        }
        for pool in &self.bounded {
            pool.close().await;
        }
    }

    /// Whether run creation without plans goes to the SQLite writer thread.
    #[cfg(test)]
    pub(crate) fn has_sqlite_writer(&self) -> bool {
        self.direct.is_some()
    }

    pub(crate) fn disabled() -> Self {
        Self {
            tx: None,
            direct: None,
            bounded: Vec::new(),
        }
    }

    /// Stores `new` through a writer (or directly) and resolves an idempotency
    /// key that was already taken.
    pub(crate) async fn submit(&self, store: &Store, new: &NewRun) -> Result<CreateOutcome> {
        if let Some(direct) = self.direct.as_ref().filter(|_| store.plans().is_none()) {
            let row = sqlite_writer::Row::of(new)?;
            return match direct.write(row).await? {
                Some(s) => Ok(CreateOutcome::Created(created(s.id, new, s.created_at))),
                None => store.existing_for_key(new).await,
            };
        }
        let deadline = Deadline::current();
        let stored = match &self.tx {
            Some(tx) => {
                let (reply, answer) = oneshot::channel();
                let request = Request {
                    new: new.clone(),
                    deadline: deadline.clone(),
                    reply,
                };
                match tx.send(request).await {
                    Ok(()) => match answer.await {
                        Ok(result) => result,
                        // The writer went away (runtime shutting down).
                        Err(_) => write_alone(store, new, deadline.as_deref()).await,
                    },
                    Err(_) => write_alone(store, new, deadline.as_deref()).await,
                }
            }
            None => write_alone(store, new, deadline.as_deref()).await,
        }?;
        match stored {
            Stored::Created(run) => Ok(CreateOutcome::Created(run)),
            Stored::Taken => store.existing_for_key(new).await,
            Stored::Refused(refusal) => Ok(CreateOutcome::QuotaExceeded(refusal)),
        }
    }
}

/// A writer task; `shard` is the usage-counter shard its transactions add
/// to, `bounded` its own connection on PostgreSQL.
async fn writer(
    store: Store,
    rx: Arc<Mutex<mpsc::Receiver<Request>>>,
    shard: i64,
    bounded: Option<Bounded>,
) {
    let bounded = bounded.as_ref();
    while let Some(mut batch) = crate::batch::next_batch(&rx, MAX_BATCH).await {
        // Noted here: a batch's requests get a copy of its error that no
        // longer says why.
        let written = store.noted(write_requests(&store, &mut batch, shard, bounded).await);
        if batch.is_empty() {
            continue;
        }
        match written {
            Ok(stored) => {
                for (request, run) in batch.into_iter().zip(stored) {
                    let _ = request.reply.send(Ok(run));
                }
            }
            // The database is unreachable (not a conflict to retry): alone,
            // each request would wait for it as long again, one after the
            // other (the pool's acquire timeout each), and so would the
            // requests that came while it waited. All are answered now; a
            // lone request gets the error itself.
            Err(e) if e.is_unavailable() && !e.is_retryable_conflict() => {
                let behind = crate::batch::waiting(&rx).await;
                let mut original = (batch.len() == 1).then_some(e);
                for request in batch.into_iter().chain(behind) {
                    let error = original.take().unwrap_or_else(|| {
                        let again = std::io::Error::other("database unavailable for this batch");
                        StoreError::Unavailable(sqlx::Error::Io(again))
                    });
                    let _ = request.reply.send(Err(error));
                }
            }
            Err(e) if batch.len() == 1 => {
                if let Some(request) = batch.pop() {
                    let _ = request.reply.send(Err(e));
                }
            }
            Err(_) => {
                let shard = store.usage.counter_shard(0);
                for request in batch {
                    let mut alone = vec![request];
                    let result = write_requests(&store, &mut alone, shard, bounded).await;
                    if let Some(request) = alone.pop() {
                        let _ = request.reply.send(result.and_then(only));
                    }
                }
            }
        }
    }
}

/// Stores the requests of `batch` in one transaction ([`write_batch`]) and
/// returns one [`Stored`] each, in the order `batch` has then. A request
/// whose caller stopped waiting (its HTTP request timed out and was
/// answered 408, or it went away) is left out of `batch`, before the batch
/// is sent and again just before it commits, so that such a caller never
/// finds its run created afterwards: when one has gone meanwhile, the
/// transaction is rolled back and written again without it. A request whose
/// time is up ([`Deadline::budget`]) is answered [`StoreError::OutOfTime`]
/// and left out too. The batch's statements are bounded by the shortest
/// time left among its requests.
async fn write_requests(
    store: &Store,
    batch: &mut Vec<Request>,
    shard: i64,
    bounded: Option<&Bounded>,
) -> Result<Vec<Stored>> {
    loop {
        let mut kept = Vec::with_capacity(batch.len());
        for request in batch.drain(..) {
            if request.reply.is_closed() {
                continue;
            }
            if request
                .deadline
                .as_ref()
                .is_some_and(|d| d.budget().is_none())
            {
                let _ = request.reply.send(Err(StoreError::OutOfTime));
                continue;
            }
            kept.push(request);
        }
        *batch = kept;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let budget = batch
            .iter()
            .filter_map(|r| r.deadline.as_ref().and_then(|d| d.budget()))
            .min();
        let written = {
            let requests: &[Request] = batch;
            let news: Vec<&NewRun> = requests.iter().map(|r| &r.new).collect();
            let claim = || requests.iter().all(Request::claim);
            write_batch(store, &news, shard, budget, &claim, bounded).await?
        };
        match written {
            Some(stored) => return Ok(stored),
            None => batch.retain(Request::claim),
        }
    }
}

/// Stores `new` without a writer, for a caller with `deadline` (see
/// [`write_requests`]).
async fn write_alone(store: &Store, new: &NewRun, deadline: Option<&Deadline>) -> Result<Stored> {
    let budget = super::transactions::budget_of(deadline)?;
    let claim = || deadline.is_none_or(Deadline::claim);
    write_batch(
        store,
        &[new],
        store.usage.counter_shard(0),
        budget,
        &claim,
        None,
    )
    .await?
    .ok_or(StoreError::OutOfTime)
    .and_then(only)
}

/// The one [`Stored`] of a batch of one.
///
/// Errors: [`StoreError::Corrupt`] when the batch stored nothing.
fn only(mut stored: Vec<Stored>) -> Result<Stored> {
    stored
        .pop()
        .ok_or_else(|| StoreError::Corrupt("a batch of one stored nothing".into()))
}

/// Stores `news` in one transaction, one [`Stored`] each, in order.
///
/// Admission comes first. Per tenant of the batch under a `block` allowance,
/// in name order (so that concurrent batches, on any replica, lock counters
/// in one order), the tenant's shard-0 `runs` counter row of the period is
/// locked by an upsert, and the sum of its shards read;
/// under a `block` allowance only as many new runs as remain are admitted and
/// the others are refused: not stored, not counted, audited as
/// `quota.blocked`. A tenant whose `block` allowance of steps, LLM tokens or
/// approval decisions is used up gets no new run either. The lock is held to the commit, which is what makes the
/// allowance exact across writers and replicas. A request whose idempotency
/// key is already taken, or repeats a key earlier in the batch, is a replay
/// and consumes nothing. The usage of the batch is added to counter shard
/// `shard`; a tenant without a `block` allowance takes no lock, so concurrent
/// writers do not wait for each other.
///
/// The batch has one instant: the database clock as the first lock reads
/// it, bound into every later statement (admission, `created_at`, jobs,
/// events, audit rows, the ledger and its month, warnings), so the month
/// admitted is the month counted on SQLite too, whose clock is read per
/// statement.
///
/// `claim` is asked once, just before the commit: false (a caller stopped
/// waiting) rolls the batch back and returns `None`, nothing of it
/// written. On PostgreSQL each statement takes at most `budget`, lock waits
/// included ([`Store::begin_within`]).
///
/// PostgreSQL without plans: the batch is one statement that commits by
/// itself (one round trip), and `claim` is asked just before it is sent.
/// With a `budget`, it goes through `bounded` (the writer's connection,
/// whose `statement_timeout` fits the budget), the claimed callers' HTTP
/// requests waiting for its outcome instead of answering 408; without
/// `bounded` (no writer), in a transaction bounded by `budget` whose commit
/// `claim` precedes.
async fn write_batch(
    store: &Store,
    news: &[&NewRun],
    shard: i64,
    budget: Option<Duration>,
    claim: &(dyn Fn() -> bool + Sync),
    bounded: Option<&Bounded>,
) -> Result<Option<Vec<Stored>>> {
    let backend = store.backend();
    let plans = store.plans();
    if backend == DbBackend::Postgres && plans.is_none() {
        // No allowance to enforce, so nothing to read or lock first.
        let ids: Vec<Uuid> = news.iter().map(|_| Uuid::now_v7()).collect();
        let id_texts: Vec<String> = ids.iter().map(Uuid::to_string).collect();
        let refused = vec![None; news.len()];
        let runs = runs_of(news, &id_texts, &refused)?;
        let jobs = jobs_of(id_texts.iter().zip(news.iter().copied()));
        let created_at = match (budget, bounded) {
            (None, _) => {
                if !claim() {
                    return Ok(None);
                }
                insert_postgres(store, store.pool(), runs, jobs, None, shard).await?
            }
            (Some(budget), Some(bounded)) => {
                let mut conn = bounded.acquire(budget).await?;
                if !claim() {
                    return Ok(None);
                }
                insert_postgres(store, &mut *conn, runs, jobs, None, shard).await?
            }
            (Some(budget), None) => {
                let mut tx = store.begin_within(Some(budget)).await?;
                let created_at = insert_postgres(store, &mut *tx, runs, jobs, None, shard).await?;
                if !claim() {
                    tx.rollback().await?;
                    return Ok(None);
                }
                tx.commit().await?;
                created_at
            }
        };
        store.events.raise();
        return Ok(Some(outcomes(&ids, &id_texts, news, refused, &created_at)));
    }
    let mut tx = store.begin_within(budget).await?;

    let mut tenants: Vec<&str> = news.iter().map(|n| n.tenant.as_str()).collect();
    tenants.sort_unstable();
    tenants.dedup();
    let mut period: Option<String> = None;
    // The instant of the batch, read by the first lock and bound into every
    // later statement: SQLite reads its clock per statement, so otherwise a
    // batch at midnight at a month's end was admitted against one month and
    // counted in the next (PostgreSQL's `now()` is the transaction's anyway).
    let mut at: Option<i64> = None;
    let mut used_of: HashMap<&str, i64> = HashMap::with_capacity(tenants.len());
    let mut plan_of: HashMap<String, Option<crate::plans::Plan>> = HashMap::new();
    // SQLite: the first statement of a write transaction must write (there
    // is one writer anyway, so every tenant takes the lock row); PostgreSQL
    // reads the plans first and locks only for the tenants that need it.
    if backend == DbBackend::Postgres {
        plan_of = plans_of(&mut tx, plans.as_deref(), &tenants).await?;
    }
    let lock = store.sql_at(
        "INSERT INTO usage_counters (tenant, period, meter, shard, used, updated_at) \
         VALUES ($1, COALESCE($2, {period}), 'runs', 0, 0, {now}) \
         ON CONFLICT (tenant, period, meter, shard) DO UPDATE SET updated_at = excluded.updated_at \
         RETURNING period, updated_at",
        3,
    );
    for tenant in &tenants {
        let blocks = plan_of
            .get(*tenant)
            .and_then(Option::as_ref)
            .is_some_and(|p| {
                Meter::ALL
                    .iter()
                    .any(|m| p.rule(*m).is_some_and(|r| r.overage == Overage::Block))
            });
        if backend == DbBackend::Postgres && !blocks {
            continue;
        }
        let row = sqlx::query(&lock)
            .bind(*tenant)
            .bind(period.as_deref())
            .bind(at)
            .fetch_one(&mut *tx)
            .await?;
        let locked: String = row.try_get("period")?;
        at = Some(row.try_get("updated_at")?);
        // The count only decides refusals, which need a plan (SQLite takes
        // the lock row without one, as the first write of the transaction).
        if plans.is_some() {
            let used = counter_sum(&mut tx, tenant, &locked, Meter::Runs).await?;
            used_of.insert(tenant, used);
        }
        period = Some(locked);
    }
    if backend == DbBackend::Sqlite {
        plan_of = plans_of(&mut tx, plans.as_deref(), &tenants).await?;
    }
    let period = match period {
        Some(p) => p,
        None => sqlx::query(&store.sql("SELECT {period} AS p"))
            .fetch_one(&mut *tx)
            .await?
            .try_get("p")?,
    };

    let keys: Vec<&str> = news
        .iter()
        .filter_map(|n| n.idempotency_key.as_deref())
        .collect();
    let mut taken: HashSet<String> = HashSet::new();
    if !keys.is_empty() {
        let sql = format!(
            "SELECT idempotency_key FROM runs WHERE idempotency_key IN (SELECT k FROM ({}) s)",
            recordset(backend, &[("k", "text")])
        );
        let list = Value::Array(keys.iter().map(|k| json!({ "k": k })).collect()).to_string();
        for row in sqlx::query(&sql).bind(list).fetch_all(&mut *tx).await? {
            taken.insert(row.try_get("idempotency_key")?);
        }
    }

    let mut refused: Vec<Option<QuotaRefusal>> = vec![None; news.len()];
    if plans.is_some() {
        for tenant in &tenants {
            let Some(plan) = plan_of.get(*tenant).and_then(Option::as_ref) else {
                continue;
            };
            // Per new run: how many more it may have, and the refusal past that.
            let mut limit: Option<(i64, QuotaRefusal)> = None;
            if let Some(rule) = plan
                .rule(Meter::Runs)
                .filter(|r| r.overage == Overage::Block)
            {
                let used = used_of.get(tenant).copied().unwrap_or(0);
                let refusal = QuotaRefusal {
                    tenant: tenant.to_string(),
                    meter: Meter::Runs,
                    allowance: rule.allowance,
                    used,
                    period: period.clone(),
                };
                limit = Some(((rule.allowance - used).max(0), refusal));
            }
            // A used-up `block` allowance of another meter refuses new runs
            // too (those already admitted finish whatever they use).
            for meter in [Meter::Steps, Meter::LlmTokens, Meter::ApprovalDecisions] {
                let Some(rule) = plan.rule(meter).filter(|r| r.overage == Overage::Block) else {
                    continue;
                };
                let used = counter_sum(&mut tx, tenant, &period, meter).await?;
                if used >= rule.allowance {
                    let refusal = QuotaRefusal {
                        tenant: tenant.to_string(),
                        meter,
                        allowance: rule.allowance,
                        used,
                        period: period.clone(),
                    };
                    limit = Some((0, refusal));
                    break;
                }
            }
            let Some((mut remaining, refusal)) = limit else {
                continue;
            };
            // A key repeated within the batch shares its first request's
            // fate: stored once (the repeats replay it) or refused.
            let mut first_of_key: HashMap<&str, bool> = HashMap::new();
            for (i, new) in news.iter().enumerate() {
                let key = new.idempotency_key.as_deref();
                if new.tenant != *tenant || key.is_some_and(|k| taken.contains(k)) {
                    continue;
                }
                if let Some(was_refused) = key.and_then(|k| first_of_key.get(k)) {
                    if *was_refused {
                        refused[i] = Some(refusal.clone());
                    }
                    continue;
                }
                let refuse = remaining == 0;
                if refuse {
                    refused[i] = Some(refusal.clone());
                } else {
                    remaining -= 1;
                }
                if let Some(k) = key {
                    first_of_key.insert(k, refuse);
                }
            }
        }
    }

    let ids: Vec<Uuid> = news.iter().map(|_| Uuid::now_v7()).collect();
    let id_texts: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    let runs = runs_of(news, &id_texts, &refused)?;
    let mut created_at = HashMap::with_capacity(runs.len());
    let mut crossed = Vec::new();
    if !runs.is_empty() {
        if backend == DbBackend::Postgres {
            let jobs = jobs_of(
                id_texts
                    .iter()
                    .zip(news.iter().copied())
                    .zip(&refused)
                    .filter(|(_, r)| r.is_none())
                    .map(|(run, _)| run),
            );
            created_at = insert_postgres(store, &mut *tx, runs, jobs, Some(&period), shard).await?;
        } else {
            created_at =
                insert_sqlite(store, &mut tx, runs, news, &id_texts, &period, shard, at).await?;
        }
        let touched = touched_of(
            id_texts
                .iter()
                .zip(news)
                .filter(|(id, _)| created_at.contains_key(*id))
                .map(|(id, new)| (new.tenant.as_str(), Meter::Runs, Some(id.as_str()))),
            &period,
        );
        crossed = store.note_thresholds(&mut tx, &touched, at).await?;
    }
    let blocked: Vec<Value> = news
        .iter()
        .zip(&refused)
        .filter_map(|(new, r)| {
            r.as_ref().map(|r| {
                json!({
                    "actor": new.actor,
                    "target": r.tenant,
                    "request_id": new.request_id,
                    "detail": json!({
                        "meter": r.meter.as_str(), "allowance": r.allowance,
                        "used": r.used, "period": r.period,
                    }).to_string(),
                    "tenant": r.tenant,
                })
            })
        })
        .collect();
    if !blocked.is_empty() {
        insert_audits(store, &mut tx, "quota.blocked", "denied", blocked, at).await?;
    }
    if !claim() {
        tx.rollback().await?;
        return Ok(None);
    }
    tx.commit().await?;
    store.count_crossings(&crossed);
    store.events.raise();

    Ok(Some(outcomes(&ids, &id_texts, news, refused, &created_at)))
}

/// The run rows of `news` that were not refused, as JSON objects of the
/// columns [`insert_postgres`] and [`insert_sqlite`] read.
fn runs_of(
    news: &[&NewRun],
    ids: &[String],
    refused: &[Option<QuotaRefusal>],
) -> Result<Vec<Value>> {
    let mut runs = Vec::with_capacity(news.len());
    for ((id, new), refusal) in ids.iter().zip(news).zip(refused) {
        if refusal.is_some() {
            continue;
        }
        let steps = serde_json::to_string(&new.steps)
            .map_err(|_| StoreError::Corrupt("steps do not serialise".into()))?;
        runs.push(json!({
            "id": id,
            "input": new.input.to_string(),
            "steps": steps,
            "step_count": new.steps.len(),
            "idempotency_key": new.idempotency_key,
            "request_hash": new.request_hash,
            "correlation_id": new.correlation_id,
            "tenant": new.tenant,
            "actor": new.actor,
            "request_id": new.request_id,
        }));
    }
    Ok(runs)
}

/// One [`Stored`] per request, in order: refused, created (with its
/// `created_at`), or a replay of a taken idempotency key.
fn outcomes(
    ids: &[Uuid],
    id_texts: &[String],
    news: &[&NewRun],
    refused: Vec<Option<QuotaRefusal>>,
    created_at: &HashMap<String, i64>,
) -> Vec<Stored> {
    ids.iter()
        .zip(id_texts)
        .zip(news)
        .zip(refused)
        .map(|(((id, text), new), refusal)| {
            if let Some(refusal) = refusal {
                return Stored::Refused(refusal);
            }
            match created_at.get(text) {
                Some(at) => Stored::Created(created(*id, new, *at)),
                None => Stored::Taken,
            }
        })
        .collect()
}

/// The run just stored for `new` under `id` at `at` (ms since the epoch).
fn created(id: Uuid, new: &NewRun, at: i64) -> Run {
    Run {
        id,
        status: RunStatus::Queued,
        correlation_id: new.correlation_id.clone(),
        input: new.input.clone(),
        steps: new.steps.clone(),
        output: None,
        error: None,
        created_at: at,
        updated_at: at,
        started_at: None,
        finished_at: None,
    }
}

/// The job rows of `runs` (id, request), as JSON objects (`run_id`,
/// `correlation_id`, `step_index`, `step_count`, `payload`, `state`: the
/// first step `queued`, the others `waiting`, `max_attempts`).
fn jobs_of<'a>(runs: impl IntoIterator<Item = (&'a String, &'a NewRun)>) -> Vec<Value> {
    let mut jobs = Vec::new();
    for (id, new) in runs {
        for (i, step) in new.steps.iter().enumerate() {
            jobs.push(json!({
                "run_id": id,
                "correlation_id": new.correlation_id,
                "step_index": i,
                "step_count": new.steps.len(),
                "payload": serde_json::to_string(step).unwrap_or_default(),
                "state": if i == 0 { "queued" } else { "waiting" },
                "max_attempts": new.max_attempts,
            }));
        }
    }
    jobs
}

/// PostgreSQL: stores `runs` (JSON objects as [`write_batch`] builds them)
/// and their `jobs` ([`jobs_of`]) in **one statement**, a data-modifying CTE:
/// the runs whose idempotency key is free, their jobs, `run.queued` events,
/// `run.created` audit rows, usage-ledger rows and the `runs` counter of
/// shard `shard` in `period` (the current UTC month when `None`). One round
/// trip instead of one per table; outside a transaction it commits by itself.
/// Returns each stored run's `created_at` (ms since the epoch, database
/// clock) by id.
async fn insert_postgres<'c, E>(
    store: &Store,
    executor: E,
    runs: Vec<Value>,
    jobs: Vec<Value>,
    period: Option<&str>,
    shard: i64,
) -> Result<HashMap<String, i64>>
where
    E: sqlx::Executor<'c, Database = sqlx::Any>,
{
    static SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let sql = SQL.get_or_init(|| {
        store.sql(&format!(
            "WITH new_runs AS ( \
               SELECT * FROM jsonb_to_recordset($1::jsonb) AS r(id text, input text, steps text, \
                 step_count bigint, idempotency_key text, request_hash text, correlation_id text, \
                 tenant text, actor text, request_id text) \
             ), inserted AS ( \
               INSERT INTO runs (id, status, input, steps, step_count, idempotency_key, request_hash, \
                 correlation_id, tenant, created_at, updated_at) \
               SELECT id, 'queued', input, steps, step_count, idempotency_key, request_hash, \
                 correlation_id, tenant, {{now}}, {{now}} FROM new_runs \
               ON CONFLICT (idempotency_key) DO NOTHING \
               RETURNING id, created_at, tenant, step_count \
             ), queued AS ( \
               INSERT INTO jobs (run_id, correlation_id, step_index, step_count, payload, state, \
                 max_attempts, run_at, created_at) \
               SELECT j.run_id, j.correlation_id, j.step_index, j.step_count, j.payload, j.state, \
                 j.max_attempts, {{now}}, {{now}} \
               FROM jsonb_to_recordset($2::jsonb) AS j(run_id text, correlation_id text, \
                 step_index bigint, step_count bigint, payload text, state text, max_attempts bigint) \
               JOIN inserted ON inserted.id = j.run_id \
             ), recorded AS ( \
               INSERT INTO run_events (run_id, event_type, step_index, attempt, message, data, created_at) \
               SELECT id, '{queued}', NULL::BIGINT, NULL::BIGINT, NULL, \
                 '{{\"steps\":' || step_count || '}}', {{now}} FROM inserted \
             ), audited AS ( \
               INSERT INTO audit_log (at, actor, action, target, outcome, request_id, detail, tenant) \
               SELECT {{now}}, n.actor, 'run.created', n.id, 'success', n.request_id, \
                 '{{\"steps\":' || n.step_count || '}}', n.tenant \
               FROM new_runs n JOIN inserted ON inserted.id = n.id \
             ), period AS ( \
               SELECT COALESCE($3, {{period}}) AS p \
             ), ledger AS ( \
               INSERT INTO usage_ledger (tenant, meter, quantity, period, run_id, step_index, source, at) \
               SELECT tenant, 'runs', 1, p, id, NULL::BIGINT, 'run.created', {{now}} FROM inserted, period \
             ), counted AS ( \
               INSERT INTO usage_counters (tenant, period, meter, shard, used, updated_at) \
               SELECT tenant, p, 'runs', $4, COUNT(*), {{now}} FROM inserted, period \
               GROUP BY tenant, p ORDER BY tenant \
               ON CONFLICT (tenant, period, meter, shard) DO UPDATE \
               SET used = usage_counters.used + excluded.used, updated_at = excluded.updated_at \
             ) SELECT id, created_at FROM inserted",
            queued = EventType::RunQueued.as_str(),
        ))
    });
    let rows = sqlx::query(sql)
        .bind(Value::Array(runs).to_string())
        .bind(Value::Array(jobs).to_string())
        .bind(period)
        .bind(shard)
        .fetch_all(executor)
        .await?;
    rows.iter()
        .map(|row| Ok((row.try_get("id")?, row.try_get("created_at")?)))
        .collect()
}

/// SQLite: stores `runs` and what goes with them (jobs, `run.queued` events,
/// `run.created` audit rows, usage of the `runs` meter in `period` on shard
/// `shard`) with one statement per table in `tx`, all stamped `at` (the
/// batch's instant, whose month `period` is; the database clock if `None`).
/// Returns each stored run's `created_at` by id.
#[allow(clippy::too_many_arguments)]
async fn insert_sqlite(
    store: &Store,
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    runs: Vec<Value>,
    news: &[&NewRun],
    id_texts: &[String],
    period: &str,
    shard: i64,
    at: Option<i64>,
) -> Result<HashMap<String, i64>> {
    let backend = store.backend();
    let mut created_at = HashMap::with_capacity(runs.len());
    let insert_runs = store.sql_at(
        &format!(
        "INSERT INTO runs (id, status, input, steps, step_count, idempotency_key, request_hash, \
         correlation_id, tenant, created_at, updated_at) \
         SELECT id, 'queued', input, steps, step_count, idempotency_key, request_hash, correlation_id, \
         tenant, {{now}}, {{now}} \
         FROM ({}) s WHERE true ON CONFLICT (idempotency_key) DO NOTHING RETURNING id, created_at",
        recordset(
            backend,
            &[
                ("id", "text"),
                ("input", "text"),
                ("steps", "text"),
                ("step_count", "bigint"),
                ("idempotency_key", "text"),
                ("request_hash", "text"),
                ("correlation_id", "text"),
                ("tenant", "text"),
            ]
        )
        ),
        2,
    );
    let inserted = sqlx::query(&insert_runs)
        .bind(Value::Array(runs).to_string())
        .bind(at)
        .fetch_all(&mut **tx)
        .await?;
    for row in &inserted {
        created_at.insert(
            row.try_get::<String, _>("id")?,
            row.try_get::<i64, _>("created_at")?,
        );
    }

    let created: Vec<(&String, &&NewRun)> = id_texts
        .iter()
        .zip(news)
        .filter(|(id, _)| created_at.contains_key(*id))
        .collect();
    if !created.is_empty() {
        let usage: Vec<UsageRow> = created
            .iter()
            .map(|(id, new)| UsageRow {
                tenant: new.tenant.clone(),
                meter: Meter::Runs,
                quantity: 1,
                run_id: Some((*id).clone()),
                step_index: None,
                source: "run.created",
            })
            .collect();
        store.add_usage(tx, &usage, Some(period), shard, at).await?;
        let jobs = jobs_of(created.iter().map(|(id, new)| (*id, **new)));
        let mut audits = Vec::new();
        for (id, new) in &created {
            audits.push(json!({
                "actor": new.actor,
                "target": id,
                "request_id": new.request_id,
                "detail": json!({"steps": new.steps.len()}).to_string(),
                "tenant": new.tenant,
            }));
        }
        let insert_jobs = store.sql_at(
            &format!(
        "INSERT INTO jobs (run_id, correlation_id, step_index, step_count, payload, state, \
         max_attempts, run_at, created_at) \
         SELECT run_id, correlation_id, step_index, step_count, payload, state, max_attempts, {{now}}, {{now}} \
         FROM ({}) s",
        recordset(
            backend,
            &[
                ("run_id", "text"),
                ("correlation_id", "text"),
                ("step_index", "bigint"),
                ("step_count", "bigint"),
                ("payload", "text"),
                ("state", "text"),
                ("max_attempts", "bigint"),
            ]
        )
    ),
            2,
        );
        sqlx::query(&insert_jobs)
            .bind(Value::Array(jobs).to_string())
            .bind(at)
            .execute(&mut **tx)
            .await?;
        let events: Vec<NewEvent<'_>> = created
            .iter()
            .map(|(id, new)| {
                NewEvent::run(id, EventType::RunQueued).data(json!({"steps": new.steps.len()}))
            })
            .collect();
        store.insert_events_at(tx, &events, at).await?;
        insert_audits(store, tx, "run.created", "success", audits, at).await?;
    }
    Ok(created_at)
}

/// Audit rows of one `action` and `outcome` from a JSON batch of
/// `{actor, target, request_id, detail, tenant}`, stamped `at` (the database
/// clock if `None`).
async fn insert_audits(
    store: &Store,
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    action: &str,
    outcome: &str,
    rows: Vec<Value>,
    at: Option<i64>,
) -> Result<()> {
    let sql = store.sql_at(
        &format!(
        "INSERT INTO audit_log (at, actor, action, target, outcome, request_id, detail, tenant) \
         SELECT {{now}}, actor, $2, target, $3, request_id, detail, tenant FROM ({}) s",
        recordset(
            store.backend(),
            &[
                ("actor", "text"),
                ("target", "text"),
                ("request_id", "text"),
                ("detail", "text"),
                ("tenant", "text"),
            ]
        )
        ),
        4,
    );
    sqlx::query(&sql)
        .bind(Value::Array(rows).to_string())
        .bind(action)
        .bind(outcome)
        .bind(at)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The sum of `tenant`'s counter shards of `meter` in `period` (0 if none).
async fn counter_sum(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    tenant: &str,
    period: &str,
    meter: Meter,
) -> Result<i64> {
    Ok(sqlx::query(
        "SELECT CAST(COALESCE(SUM(used), 0) AS BIGINT) AS used FROM usage_counters \
         WHERE tenant = $1 AND period = $2 AND meter = $3",
    )
    .bind(tenant)
    .bind(period)
    .bind(meter.as_str())
    .fetch_one(&mut **tx)
    .await?
    .try_get("used")?)
}

/// The plan in force for each of `tenants` (`None`: unlimited), without plans
/// none.
async fn plans_of(
    tx: &mut sqlx::Transaction<'static, sqlx::Any>,
    plans: Option<&crate::plans::Plans>,
    tenants: &[&str],
) -> Result<HashMap<String, Option<crate::plans::Plan>>> {
    let mut out = HashMap::new();
    if let Some(plans) = plans {
        for tenant in tenants {
            let assigned = assigned_plan(tx, tenant).await?;
            out.insert(
                (*tenant).to_owned(),
                resolve(plans, assigned.as_deref(), tenant).cloned(),
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The writer's `statement_timeout` is set again when it would outlast
    /// a batch's budget, or cut fresh requests short after an old one set
    /// it; otherwise the setting stays (no round trip).
    #[test]
    fn the_writer_sets_its_statement_timeout_only_when_it_no_longer_fits() {
        assert!(!timeout_fits(0, 29_000), "none set yet");
        assert!(timeout_fits(21_750, 29_000));
        assert!(timeout_fits(21_750, 28_000), "a little older requests");
        assert!(timeout_fits(21_750, 43_500));
        assert!(!timeout_fits(21_750, 20_000), "would outlast the budget");
        assert!(!timeout_fits(300, 29_000), "set for an old request");
    }

    /// A creation made for an HTTP request claims it (the HTTP layer then
    /// answers its outcome, not 408); one whose time is up writes nothing
    /// and is unavailable (503).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_creation_claims_its_request_and_one_out_of_time_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::test_sqlite_store_on_the_pool(dir.path(), "d.db").await;
        let new = crate::store::test_new_run(None, 1);
        let deadline = Deadline::after(Duration::from_secs(5));
        let created = deadline.clone().scope(store.create_run(&new)).await;
        assert!(
            matches!(created, Ok(CreateOutcome::Created(_))),
            "{created:?}"
        );
        assert!(!deadline.expire(), "claimed by the write");
        let late = Deadline::after(Duration::ZERO);
        let refused = late.scope(store.create_run(&new)).await;
        assert!(matches!(refused, Err(StoreError::OutOfTime)), "{refused:?}");
        assert!(refused.unwrap_err().is_unavailable());
        let runs: i64 = sqlx::query("SELECT COUNT(*) FROM runs")
            .fetch_one(store.pool())
            .await
            .unwrap()
            .get(0);
        assert_eq!(runs, 1);
    }

    /// The general path (here SQLite with plans loaded) leaves out a
    /// request whose caller stopped waiting before its batch was written
    /// (the HTTP request timed out and was answered 408).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_creation_whose_caller_gave_up_is_not_written() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::test_sqlite_store_on_the_pool(dir.path(), "g.db").await;
        let new = |key: Option<&str>| crate::store::test_new_run(key, 1);
        let holder = rusqlite::Connection::open(dir.path().join("g.db")).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let first = tokio::spawn({
            let store = store.clone();
            let first = new(None);
            async move { store.create_run(&first).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let late = new(Some("late"));
        let gave_up =
            tokio::time::timeout(Duration::from_millis(100), store.create_run(&late)).await;
        assert!(gave_up.is_err(), "answered while the lock was held");
        holder.execute_batch("ROLLBACK").unwrap();
        assert!(matches!(
            first.await.unwrap().unwrap(),
            CreateOutcome::Created(_)
        ));
        assert!(matches!(
            store.create_run(&new(None)).await.unwrap(),
            CreateOutcome::Created(_)
        ));
        let count = |sql: &'static str| {
            let store = store.clone();
            async move {
                sqlx::query(sql)
                    .fetch_one(store.pool())
                    .await
                    .unwrap()
                    .get::<i64, _>(0)
            }
        };
        assert_eq!(count("SELECT COUNT(*) FROM runs").await, 2);
        assert_eq!(
            count("SELECT COUNT(*) FROM runs WHERE idempotency_key = 'late'").await,
            0
        );
    }
}
