//! The batch completer (River's design): job tasks hand their results here and
//! wait; a flusher takes every result waiting (up to [`MAX_BATCH`]) and records
//! them with [`Store::complete_batch`] in one transaction. There is no timer:
//! while one batch commits the next accumulates, so batches grow with load and
//! a lone result is written at once. Two flushers overlap one batch's commit
//! with the next one's statement.

use std::sync::Arc;

use serde_json::Value;
use tokio::sync::{Mutex, mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::warn;

use super::{Unrecorded, persist, persist_or_why};
use crate::model::ClaimedJob;
use crate::store::{Completion, Finish, Store};

/// Most results one transaction records.
pub const MAX_BATCH: usize = 512;
/// Flushers per worker.
const FLUSHERS: usize = 2;

type Reply = oneshot::Sender<Option<Finish>>;

/// The job tasks' side; cheap to clone.
#[derive(Clone)]
pub struct Completer {
    tx: mpsc::Sender<(Completion, Reply)>,
    flushers: Arc<Mutex<JoinSet<()>>>,
}

impl Completer {
    /// Starts the flushers over `store`.
    pub fn start(store: Store) -> Self {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let rx = Arc::new(Mutex::new(rx));
        let mut flushers = JoinSet::new();
        for lane in 0..FLUSHERS {
            flushers.spawn(flush(store.clone(), rx.clone(), lane as u64));
        }
        Self {
            tx,
            flushers: Arc::new(Mutex::new(flushers)),
        }
    }

    /// Records `output` for `job` with the next batch; `None` when it could not
    /// be recorded (the database stayed away: the lease will run out and the
    /// job will be delivered again).
    pub async fn complete(&self, job: ClaimedJob, output: Value) -> Option<Finish> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((Completion { job, output }, reply))
            .await
            .ok()?;
        answer.await.ok().flatten()
    }

    /// Waits until every result handed over so far is recorded. Call after the
    /// job tasks have stopped.
    pub async fn close(self) {
        let flushers = self.flushers.clone();
        drop(self);
        let mut flushers = flushers.lock().await;
        // The channel closes when the last sender (the tasks' clones and this
        // one) is gone; flushers then finish what they hold and return.
        while flushers.join_next().await.is_some() {}
    }
}

/// One flusher; `lane` keeps its usage counts off the other flusher's
/// counter row (see [`Store::complete_batch_in_lane`]).
async fn flush(store: Store, rx: Arc<Mutex<mpsc::Receiver<(Completion, Reply)>>>, lane: u64) {
    while let Some(batch) = crate::batch::next_batch(&rx, MAX_BATCH).await {
        let (done, replies): (Vec<Completion>, Vec<Reply>) = batch.into_iter().unzip();
        match persist_or_why(|| store.complete_batch_in_lane(&done, lane)).await {
            Ok(finishes) => {
                for (reply, finish) in replies.into_iter().zip(finishes) {
                    let _ = reply.send(Some(finish));
                }
            }
            // Every result of the batch would meet the same outage: retrying
            // them one by one would make the last wait out a retry cycle per
            // result before it (eight results: 81 s). Their leases run
            // out and the jobs are delivered again, as for a lone result.
            Err(Unrecorded::Refused) if done.len() > 1 => {
                // One bad result must not cost the others: record them alone.
                warn!(
                    jobs = done.len(),
                    "a batch of results failed; recording them one by one"
                );
                for (c, reply) in done.into_iter().zip(replies) {
                    let finish = persist(|| store.complete(&c.job, &c.output)).await;
                    let _ = reply.send(finish);
                }
            }
            Err(_) => {
                for reply in replies {
                    let _ = reply.send(None);
                }
            }
        }
    }
}
