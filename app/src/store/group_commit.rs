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

use std::sync::Arc;

use serde_json::{Value, json};
use sqlx::{AnyPool, Row};
use tokio::sync::{Mutex, mpsc, oneshot};
use uuid::Uuid;

use super::events::NewEvent;
use super::{CreateOutcome, Result, Store, StoreError, recordset};
use crate::config::DbBackend;
use crate::model::{EventType, NewRun, Run, RunStatus};

/// Most runs one transaction stores.
pub const MAX_BATCH: usize = 128;
/// Requests waiting for a writer before callers wait to enqueue.
const QUEUE_DEPTH: usize = 4 * MAX_BATCH;

struct Request {
    new: NewRun,
    reply: oneshot::Sender<Result<Option<Run>>>,
}

/// The callers' side of the writers; cheap to clone.
#[derive(Clone)]
pub(crate) struct Handle {
    tx: Option<mpsc::Sender<Request>>,
}

impl Handle {
    /// Starts the writers: one on SQLite (one writer at a time anyway), up to
    /// four on PostgreSQL (leaving half the pool to readers and workers).
    pub(crate) fn start(
        pool: AnyPool,
        backend: DbBackend,
        max_connections: u32,
        events: super::feed::CommitSignal,
    ) -> Self {
        if tokio::runtime::Handle::try_current().is_err() {
            return Self::disabled();
        }
        let writers = match backend {
            DbBackend::Sqlite => 1,
            DbBackend::Postgres => (max_connections / 2).clamp(1, 4),
        };
        let (tx, rx) = mpsc::channel::<Request>(QUEUE_DEPTH);
        let rx = Arc::new(Mutex::new(rx));
        // The writers' store writes directly; holding no sender, it lets the
        // channel close when the last user's store is dropped.
        let store = Store {
            pool,
            backend,
            creates: Self::disabled(),
            events,
        };
        for _ in 0..writers {
            tokio::spawn(writer(store.clone(), rx.clone()));
        }
        Self { tx: Some(tx) }
    }

    pub(crate) fn disabled() -> Self {
        Self { tx: None }
    }

    /// Stores `new` through a writer (or directly) and resolves an idempotency
    /// key that was already taken.
    pub(crate) async fn submit(&self, store: &Store, new: &NewRun) -> Result<CreateOutcome> {
        let stored = match &self.tx {
            Some(tx) => {
                let (reply, answer) = oneshot::channel();
                let request = Request {
                    new: new.clone(),
                    reply,
                };
                match tx.send(request).await {
                    Ok(()) => match answer.await {
                        Ok(result) => result,
                        // The writer went away (runtime shutting down).
                        Err(_) => write_alone(store, new).await,
                    },
                    Err(_) => write_alone(store, new).await,
                }
            }
            None => write_alone(store, new).await,
        }?;
        match stored {
            Some(run) => Ok(CreateOutcome::Created(run)),
            None => store.existing_for_key(new).await,
        }
    }
}

async fn writer(store: Store, rx: Arc<Mutex<mpsc::Receiver<Request>>>) {
    while let Some(mut batch) = crate::batch::next_batch(&rx, MAX_BATCH).await {
        let news: Vec<&NewRun> = batch.iter().map(|r| &r.new).collect();
        match write_batch(&store, &news).await {
            Ok(stored) => {
                for (request, run) in batch.into_iter().zip(stored) {
                    let _ = request.reply.send(Ok(run));
                }
            }
            Err(e) if batch.len() == 1 => {
                if let Some(request) = batch.pop() {
                    let _ = request.reply.send(Err(e));
                }
            }
            Err(_) => {
                for request in batch {
                    let result = write_alone(&store, &request.new).await;
                    let _ = request.reply.send(result);
                }
            }
        }
    }
}

async fn write_alone(store: &Store, new: &NewRun) -> Result<Option<Run>> {
    Ok(write_batch(store, &[new]).await?.pop().flatten())
}

/// Stores `news` in one transaction; `None` for a run whose idempotency key
/// was already taken (the caller looks the original up).
async fn write_batch(store: &Store, news: &[&NewRun]) -> Result<Vec<Option<Run>>> {
    let backend = store.backend();
    let ids: Vec<Uuid> = news.iter().map(|_| Uuid::now_v7()).collect();
    let mut runs = Vec::with_capacity(news.len());
    for (id, new) in ids.iter().zip(news) {
        let steps = serde_json::to_string(&new.steps)
            .map_err(|_| StoreError::Corrupt("steps do not serialise".into()))?;
        runs.push(json!({
            "id": id.to_string(),
            "input": new.input.to_string(),
            "steps": steps,
            "step_count": new.steps.len(),
            "idempotency_key": new.idempotency_key,
            "request_hash": new.request_hash,
            "correlation_id": new.correlation_id,
        }));
    }
    let insert_runs = store.sql(&format!(
        "INSERT INTO runs (id, status, input, steps, step_count, idempotency_key, request_hash, \
         correlation_id, created_at, updated_at) \
         SELECT id, 'queued', input, steps, step_count, idempotency_key, request_hash, correlation_id, {{now}}, {{now}} \
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
            ]
        )
    ));
    let mut tx = store.begin().await?;
    let inserted = sqlx::query(&insert_runs)
        .bind(Value::Array(runs).to_string())
        .fetch_all(&mut *tx)
        .await?;
    let mut created_at = std::collections::HashMap::with_capacity(inserted.len());
    for row in &inserted {
        created_at.insert(
            row.try_get::<String, _>("id")?,
            row.try_get::<i64, _>("created_at")?,
        );
    }
    if created_at.is_empty() {
        tx.commit().await?;
        return Ok(vec![None; news.len()]);
    }

    let mut jobs = Vec::new();
    let mut audits = Vec::new();
    let id_texts: Vec<String> = ids.iter().map(Uuid::to_string).collect();
    for (id, new) in id_texts.iter().zip(news) {
        if !created_at.contains_key(id) {
            continue;
        }
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
        audits.push(json!({
            "actor": new.actor,
            "target": id,
            "request_id": new.request_id,
            "detail": json!({"steps": new.steps.len()}).to_string(),
        }));
    }
    let insert_jobs = store.sql(&format!(
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
    ));
    sqlx::query(&insert_jobs)
        .bind(Value::Array(jobs).to_string())
        .execute(&mut *tx)
        .await?;
    let events: Vec<NewEvent<'_>> = id_texts
        .iter()
        .zip(news)
        .filter(|(id, _)| created_at.contains_key(*id))
        .map(|(id, new)| {
            NewEvent::run(id, EventType::RunQueued).data(json!({"steps": new.steps.len()}))
        })
        .collect();
    store.insert_events(&mut tx, &events).await?;
    let insert_audit = store.sql(&format!(
        "INSERT INTO audit_log (at, actor, action, target, outcome, request_id, detail) \
         SELECT {{now}}, actor, 'run.created', target, 'success', request_id, detail FROM ({}) s",
        recordset(
            backend,
            &[
                ("actor", "text"),
                ("target", "text"),
                ("request_id", "text"),
                ("detail", "text"),
            ]
        )
    ));
    sqlx::query(&insert_audit)
        .bind(Value::Array(audits).to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    store.events.raise();

    Ok(ids
        .iter()
        .zip(id_texts)
        .zip(news)
        .map(|((id, text), new)| {
            created_at.get(&text).map(|at| Run {
                id: *id,
                status: RunStatus::Queued,
                correlation_id: new.correlation_id.clone(),
                input: new.input.clone(),
                steps: new.steps.clone(),
                output: None,
                error: None,
                created_at: *at,
                updated_at: *at,
                started_at: None,
                finished_at: None,
            })
        })
        .collect())
}
